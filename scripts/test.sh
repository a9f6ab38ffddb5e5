#!/usr/bin/env bash
# The one command that runs every test, on a fresh machine too: it installs what the tests need
# (scripts/setup.sh), then checks formatting and lints on every host feature, checks that the
# core builds for both wasm targets, and runs the unit, core and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== rustfmt"
cargo fmt --all -- --check

echo "== clippy (native, all targets)"
cargo clippy --all-targets --locked -- -D warnings

for target in wasm32-unknown-unknown wasm32-wasip2; do
    echo "== core on $target"
    cargo check --locked --no-default-features --target "$target"
done
for feature in worker spin; do
    target=wasm32-unknown-unknown
    [ "$feature" = spin ] && target=wasm32-wasip2
    echo "== clippy (--features $feature, $target)"
    cargo clippy --locked --lib --no-default-features --features "$feature" --target "$target" -- -D warnings
done

echo "== tests"
cargo test --locked --all-targets
echo "== Spin host and S3 store unit tests (native, spin feature)"
cargo test --locked --lib --no-default-features --features spin -- spin:: stores::
