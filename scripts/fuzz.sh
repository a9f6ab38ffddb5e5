#!/usr/bin/env bash
# Fuzzes every target in fuzz/ for a bounded time, minimises the corpora and writes
# fuzz/REPORT.md. Not part of CI (CI replays the committed inputs: tests/fuzz_corpora.rs).
#
#   bash scripts/fuzz.sh [seconds-per-target] [target...]     # default 300 s, every target
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). It builds every
# target once (`cargo fuzz build`), then runs and minimises with the built binaries directly,
# so editing the sources while it runs changes nothing. One libFuzzer job per target, one
# target after the other; run it under `nice` on a shared machine.
# Each target starts from fuzz/seeds/<t> (hand-made, fuzz/make_seeds.py), fuzz/corpus/<t> (the
# last run's minimised corpus) and fuzz/regressions/<t>; afterwards `cargo fuzz cmin` shrinks
# what it found into fuzz/corpus/<t> (seeds are not repeated there; at most FUZZ_MAX_CORPUS
# files, the smallest kept). Crashes stay in fuzz/artifacts/<t>/ (not committed): turn each
# into a unit test next to the code and a file in fuzz/regressions/<t>/.
#
# Environment: FUZZ_TARGET_DIR (default $CARGO_TARGET_DIR/fuzz, else fuzz/target),
# FUZZ_SANITIZER (default none: the fuzzed code is safe Rust, and without ASan it runs several
# times faster; use `address` for unsafe code), FUZZ_MAX_CORPUS (default 300), FUZZ_PARALLEL
# (targets fuzzed at the same time, default 1; each is still one libFuzzer job),
# FUZZ_REPORT_ONLY=1 (no build, no run: rewrite the report from fuzz/work/ of the last run;
# pass the same seconds).
# Exit status: 0 when no target crashed, 1 otherwise, 2 when the tools are missing.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
FUZZ=$ROOT/fuzz
SECS=${1:-300}
shift || true
SANITIZER=${FUZZ_SANITIZER:-none}
MAX_CORPUS=${FUZZ_MAX_CORPUS:-300}
PARALLEL=${FUZZ_PARALLEL:-1}
if [ -n "${FUZZ_TARGET_DIR:-}" ]; then
    TARGET_DIR=$FUZZ_TARGET_DIR
elif [ -n "${CARGO_TARGET_DIR:-}" ]; then
    TARGET_DIR=$CARGO_TARGET_DIR/fuzz
else
    TARGET_DIR=$FUZZ/target
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is missing (cargo install cargo-fuzz)" >&2
    exit 2
fi

cd "$ROOT"
if [ "$#" -gt 0 ]; then
    TARGETS=("$@")
else
    mapfile -t TARGETS < <(cargo +nightly fuzz list --fuzz-dir "$FUZZ")
fi

# Release with debug assertions and overflow checks (cargo-fuzz's default), no sanitizer.
BUILD=(--fuzz-dir "$FUZZ" --sanitizer "$SANITIZER" --target-dir "$TARGET_DIR")
HOST_TRIPLE=$(rustc +nightly -vV | sed -n 's/^host: //p')
BIN_DIR=$TARGET_DIR/$HOST_TRIPLE/release

# Longest input per target: long enough for realistic inputs (a webhook payload, an index
# with a few charts, a whole configuration), short enough to keep executions fast.
max_len() {
    case "$1" in
        route) echo 1024 ;;
        reference) echo 512 ;;
        range) echo 256 ;;
        challenge) echo 2048 ;;
        webhook) echo 16384 ;;
        helm_index) echo 32768 ;;
        config) echo 8192 ;;
        *) echo 4096 ;;
    esac
}

stat_of() { # stat_of <log> <name>: a libFuzzer -print_final_stats value
    sed -n "s/^stat::$2:[[:space:]]*//p" "$1" | tail -n 1
}

if [ -z "${FUZZ_REPORT_ONLY:-}" ]; then
    echo "== building ${#TARGETS[@]} targets"
    cargo +nightly fuzz build "${BUILD[@]}"
fi
commit=$(git -C "$ROOT" rev-parse --short HEAD)
git -C "$ROOT" diff --quiet HEAD -- src fuzz/fuzz_targets fuzz/Cargo.toml ||
    commit="$commit (plus uncommitted changes)"

# Fuzzes one target, then minimises what it found into fuzz/corpus/<t>.
fuzz_one() {
    local t=$1 work log len
    work=$FUZZ/work/$t
    log=$FUZZ/work/$t.log
    rm -rf "$work" "$work.min" "$FUZZ/artifacts/$t"
    mkdir -p "$work" "$work.min" "$FUZZ/artifacts/$t" "$FUZZ/corpus/$t"
    for set in seeds corpus regressions; do
        if [ -d "$FUZZ/$set/$t" ]; then
            find "$FUZZ/$set/$t" -maxdepth 1 -type f -exec cp -n -t "$work" {} +
        fi
    done
    len=$(max_len "$t")
    echo "== $t: ${SECS}s from $(find "$work" -type f | wc -l) inputs (log: $log)"
    "$BIN_DIR/$t" -artifact_prefix="$FUZZ/artifacts/$t/" \
        -max_total_time="$SECS" -max_len="$len" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -close_fd_mask=1 "$work" >"$log" 2>&1 ||
        echo "fuzz.sh: $t stopped early; see $log and fuzz/artifacts/$t" >&2

    echo "== $t: minimising the corpus"
    if ! "$BIN_DIR/$t" -merge=1 -max_len="$len" -timeout=10 -rss_limit_mb=2048 \
        -close_fd_mask=1 "$work.min" "$work" >"$log.cmin" 2>&1; then
        echo "fuzz.sh: minimising $t failed, corpus left as it was; see $log.cmin" >&2
        return 0
    fi
    # libFuzzer names corpus files by the SHA-1 of their content: drop the seeds.
    if [ -d "$FUZZ/seeds/$t" ]; then
        for f in "$FUZZ/seeds/$t"/*; do
            rm -f "$work.min/$(sha1sum "$f" | cut -d' ' -f1)"
        done
    fi
    find "$FUZZ/corpus/$t" -maxdepth 1 -type f -delete
    find "$work.min" -maxdepth 1 -type f -printf '%s %p\n' | sort -n >"$work.sizes"
    head -n "$MAX_CORPUS" "$work.sizes" | cut -d' ' -f2- | xargs -r cp -t "$FUZZ/corpus/$t"
}

# One report row from the last run's log, artifacts and corpus; `crashed` when the run found
# a crash or did not end normally.
row_of() {
    local t=$1 log crashes execs rate rss files
    log=$FUZZ/work/$t.log
    crashes=$(find "$FUZZ/artifacts/$t" -type f \( -name 'crash-*' -o -name 'oom-*' \
        -o -name 'timeout-*' -o -name 'leak-*' \) 2>/dev/null | wc -l)
    if [ "$crashes" -eq 0 ] && ! grep -q '^Done [0-9]* runs' "$log" 2>/dev/null; then
        crashes="? (no clean end: see the log)"
    fi
    execs=$(stat_of "$log" number_of_executed_units)
    rate=$(stat_of "$log" average_exec_per_sec)
    rss=$(stat_of "$log" peak_rss_mb)
    files=$(find "$FUZZ/corpus/$t" -type f 2>/dev/null | wc -l)
    echo "| \`$t\` | $SECS | ${execs:-?} | ${rate:-?} | $files | ${rss:-?} | $crashes |"
}

if [ -z "${FUZZ_REPORT_ONLY:-}" ]; then
    mkdir -p "$FUZZ/work"
    for t in "${TARGETS[@]}"; do
        fuzz_one "$t" &
        while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do
            wait -n || true
        done
    done
    wait
fi
ROWS=()
CRASHED=0
for t in "${TARGETS[@]}"; do
    row=$(row_of "$t")
    ROWS+=("$row")
    case "$row" in *"| 0 |") ;; *) CRASHED=1 ;; esac
done

{
    echo "# Fuzzing report"
    echo
    echo "Written by \`scripts/fuzz.sh $SECS\`; do not edit by hand. CI does not fuzz: it replays"
    echo "\`fuzz/seeds\`, \`fuzz/corpus\` and \`fuzz/regressions\` (\`tests/fuzz_corpora.rs\`)."
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- commit: $commit"
    echo "- toolchain: $(rustc +nightly --version), $(cargo +nightly fuzz --version)"
    echo "- build: release with debug assertions and overflow checks, sanitizer \`$SANITIZER\`;"
    echo "  one libFuzzer job per target ($PARALLEL target(s) at a time), \`-max_total_time=$SECS\`,"
    echo "  \`-timeout=10\`"
    echo "- machine: $(nproc) cores shared with other work (load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "  at the end), so the rates are lower bounds"
    echo
    echo "| target | seconds | executions | exec/s | corpus files (after cmin) | peak RSS MB | crashes |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "What each target feeds (input layouts: \`src/fuzzing.rs\`): \`route\` — method, path and"
    echo "query through \`parse_route\`; \`reference\` — names, tags, digests; \`challenge\` —"
    echo "\`WWW-Authenticate\` values and token answers; \`range\` — \`Range\` against a blob size;"
    echo "\`webhook\` — signature check, delivery id, payload and rule matching for every provider;"
    echo "\`helm_index\` — the streaming \`index.yaml\` rewriter and its chart map; \`config\` — the"
    echo "TOML configuration, parsed and resolved."
} >"$FUZZ/REPORT.md"
echo "== wrote $FUZZ/REPORT.md"
exit "$CRASHED"
