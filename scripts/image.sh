#!/usr/bin/env bash
# Builds the pullgate container image without pulling any base image: a distroless-style root
# filesystem (the binary, the shared libraries it loads with their dynamic loader, CA roots, a
# passwd entry for the unprivileged user, an empty /data) laid on `FROM scratch` by the
# Containerfile at the top of the repository.
#
#   scripts/image.sh                          release build, tag localhost/pullgate:latest
#   scripts/image.sh --tag ghcr.io/me/pullgate:1.2 --builder podman
#   scripts/image.sh --binary target/debug/pullgate --tag localhost/pullgate:test   (the tests)
#
# The builder is buildah, podman or docker (the first one found unless --builder names one);
# builder settings such as CONTAINERS_STORAGE_CONF come from the environment. The image runs
# on any x86_64/aarch64 Linux host: it carries its own C library.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
binary=""
tag="localhost/pullgate:latest"
builder=""
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --tag) tag="$2"; shift 2 ;;
        --builder) builder="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ -z "$builder" ]; then
    for candidate in buildah podman docker; do
        if command -v "$candidate" >/dev/null 2>&1; then builder="$candidate"; break; fi
    done
fi
if [ -z "$builder" ] || ! command -v "$builder" >/dev/null 2>&1; then
    echo "image.sh: no image builder found (install buildah, podman or docker)" >&2
    exit 1
fi

if [ -z "$binary" ]; then
    (cd "$root" && cargo build --release --locked --bin pullgate)
    binary="$root/target/release/pullgate"
fi
if [ ! -x "$binary" ]; then
    echo "image.sh: $binary is not an executable" >&2
    exit 1
fi
# The example configuration shipped in the image must pass the shipped binary's check.
"$binary" check-config "$root/pullgate.example.toml" >/dev/null

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
rootfs="$context/rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/pullgate" "$rootfs/etc/ssl/certs" \
    "$rootfs/usr/share/doc/pullgate" "$rootfs/tmp" "$context/data"

cp "$binary" "$rootfs/usr/local/bin/pullgate"
if command -v strip >/dev/null 2>&1; then
    strip "$rootfs/usr/local/bin/pullgate"
fi
chmod 0755 "$rootfs/usr/local/bin/pullgate"

# The shared libraries the binary loads, and the dynamic loader itself (none for a static
# binary: ldd then says "not a dynamic executable" and this copies nothing).
libraries="$(ldd "$binary" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u || true)"
for library in $libraries; do
    mkdir -p "$rootfs$(dirname "$library")"
    cp -L "$library" "$rootfs$library"
done

ca_bundle=/etc/ssl/certs/ca-certificates.crt
if [ ! -r "$ca_bundle" ]; then
    echo "image.sh: $ca_bundle is missing (install ca-certificates)" >&2
    exit 1
fi
cp "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
echo 'pullgate:x:65532:65532:pullgate:/data:/sbin/nologin' > "$rootfs/etc/passwd"
echo 'pullgate:x:65532:' > "$rootfs/etc/group"
cp "$root/pullgate.example.toml" "$rootfs/etc/pullgate/pullgate.example.toml"
cp "$root/LICENSE" "$rootfs/usr/share/doc/pullgate/LICENSE"
chmod 1777 "$rootfs/tmp"
cp "$root/Containerfile" "$context/Containerfile"

echo "image.sh: building $tag with $builder from $binary" >&2
"$builder" build --tag "$tag" --file "$context/Containerfile" "$context"
