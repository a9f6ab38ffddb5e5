#!/usr/bin/env bash
# Rows 4/4b of bench/run.sh alone, for A/B work on the manifest path: one upstream registry with
# one image, pullgate (default config, workers = cores) and the bare hyper server, then
# alternating wrk runs against each (ROUNDS rounds), with medians, the ratio, and each server's
# CPU per request (utime + stime from /proc/<pid>/stat over its runs, divided by requests).
#
#   bench/manifest_ab.sh                          # 3 rounds of 5 s
#   ROUNDS=5 SECS=5 bench/manifest_ab.sh
#   PERF=1 bench/manifest_ab.sh                   # + `perf record -g` of pullgate over one run
#   PERF=1 PERF_ARGS="--call-graph dwarf" ...     # (other `perf record` options)
#   PULLGATE_BIN=... BARE_BIN=... bench/manifest_ab.sh
#   PULLGATE_BIN_B=<another build> bench/manifest_ab.sh   # + a second pullgate in each round
#   PULLGATE_B_ENV="RUST_LOG=warn" ...            # (environment for the second one only)
#   HOLD=600 bench/manifest_ab.sh                 # keep the servers up 600 s before the rounds
#                                                 # (ports and PIDs logged), to probe them by hand
#
# Loopback only; every server started here is stopped by PID on exit.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="$HERE/bench.py"
T="${CARGO_TARGET_DIR:-$ROOT/target}"
PG_BIN="${PULLGATE_BIN:-$T/release/pullgate}"
BARE="${BARE_BIN:-$T/release/examples/bare_manifest}"
ROUNDS="${ROUNDS:-3}"
SECS="${SECS:-5}"
CONNS="${CONNS:-16}"
THREADS="${THREADS:-2}"
REPO="bench/big"
TAG="v1"
ACCEPT="application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
MT="application/vnd.docker.distribution.manifest.v2+json"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pullgate-mfab.XXXXXX")"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    [ "${KEEP:-0}" = 1 ] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT
log() { printf '[mfab %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# shellcheck source=bench/ab_common.sh
. "$HERE/ab_common.sh"
start_upstream
LAYER="$(python3 "$PY" genlayer "$WORK/l.bin" 1)"
push_blob "$WORK/l.bin" "$LAYER"
CFG="$(python3 "$PY" genconfig "$WORK/config.json" "$LAYER")"
push_blob "$WORK/config.json" "$CFG"
python3 "$PY" manifest "$WORK/manifest.json" "$CFG" "$(stat -c %s "$WORK/config.json")" "$LAYER" 1048576
curl -sS -f -X PUT -H "Content-Type: $MT" --data-binary @"$WORK/manifest.json" -o /dev/null "$UP/v2/$REPO/manifests/$TAG"

PG_PORT="$(python3 "$PY" port)"
"$PG_BIN" serve --listen "127.0.0.1:$PG_PORT" --data-dir "$WORK/pg-data" --upstream "docker.io=$UP" \
    >"$WORK/pg.out" 2>"$WORK/pg.log" &
PG_PID=$!
PIDS+=("$PG_PID")
wait_http "http://127.0.0.1:$PG_PORT/metrics"
if [ -n "${PULLGATE_BIN_B:-}" ]; then
    PGB_PORT="$(python3 "$PY" port)"
    env ${PULLGATE_B_ENV:-} "$PULLGATE_BIN_B" serve --listen "127.0.0.1:$PGB_PORT" --data-dir "$WORK/pgb-data" --upstream "docker.io=$UP" \
        >"$WORK/pgb.out" 2>"$WORK/pgb.log" &
    PGB_PID=$!
    PIDS+=("$PGB_PID")
    wait_http "http://127.0.0.1:$PGB_PORT/metrics"
    curl -sS -f -H "Accept: $ACCEPT" -o /dev/null "http://127.0.0.1:$PGB_PORT/v2/$REPO/manifests/$TAG"
fi
BARE_PORT="$(python3 "$PY" port)"
"$BARE" "127.0.0.1:$BARE_PORT" "$WORK/manifest.json" "$MT" >/dev/null 2>&1 &
BARE_PID=$!
PIDS+=("$BARE_PID")
wait_http "http://127.0.0.1:$BARE_PORT/v2/$REPO/manifests/$TAG"
curl -sS -f -H "Accept: $ACCEPT" -o "$WORK/mf.pg" "http://127.0.0.1:$PG_PORT/v2/$REPO/manifests/$TAG"
cmp -s "$WORK/mf.pg" "$WORK/manifest.json" || { log "pullgate's manifest differs"; exit 1; }
log "pullgate pid $PG_PID, bare pid $BARE_PID, manifest $(stat -c %s "$WORK/manifest.json") bytes"

if [ -n "${HOLD:-}" ]; then
    log "holding $HOLD s: pullgate 127.0.0.1:$PG_PORT (pid $PG_PID), bare 127.0.0.1:$BARE_PORT (pid $BARE_PID), path /v2/$REPO/manifests/$TAG"
    sleep "$HOLD"
fi
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ="$(getconf CLK_TCK)"
run() { # name pid port -> "rps us_per_req"
    local t0 t1 out rps reqs
    t0="$(ticks "$2")"
    out="$(wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" -H "Accept: $ACCEPT" "http://127.0.0.1:$3/v2/$REPO/manifests/$TAG")"
    t1="$(ticks "$2")"
    rps="$(awk '/^Requests\/sec:/{print $2}' <<<"$out")"
    reqs="$(awk '/requests in/{print $1}' <<<"$out")"
    grep -q 'Non-2xx' <<<"$out" && log "$1: $(grep 'Non-2xx' <<<"$out")"
    awk -v r="$rps" -v n="$reqs" -v a="$t0" -v b="$t1" -v hz="$HZ" 'BEGIN{printf "%.0f %.1f\n", r, (b - a) / hz * 1e6 / n}'
}
# A short warm-up of each.
run pg "$PG_PID" "$PG_PORT" >/dev/null
run bare "$BARE_PID" "$BARE_PORT" >/dev/null
[ -n "${PULLGATE_BIN_B:-}" ] && run pgb "$PGB_PID" "$PGB_PORT" >/dev/null
PG_R=(); BARE_R=(); PG_C=(); BARE_C=(); PGB_R=(); PGB_C=()
for ((r = 1; r <= ROUNDS; r++)); do
    if [ -n "${PULLGATE_BIN_B:-}" ]; then
        read -r e f <<<"$(run pgb "$PGB_PID" "$PGB_PORT")"; PGB_R+=("$e"); PGB_C+=("$f")
        log "round $r: pullgate B $e req/s ($f us CPU/req)"
    fi
    read -r a c <<<"$(run pg "$PG_PID" "$PG_PORT")"; PG_R+=("$a"); PG_C+=("$c")
    read -r b d <<<"$(run bare "$BARE_PID" "$BARE_PORT")"; BARE_R+=("$b"); BARE_C+=("$d")
    log "round $r: pullgate $a req/s ($c us CPU/req), bare $b req/s ($d us CPU/req), ratio $(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.2f", a/b}')"
done
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
mp="$(med "${PG_R[@]}")"; mb="$(med "${BARE_R[@]}")"
if [ -n "${PULLGATE_BIN_B:-}" ]; then
    mq="$(med "${PGB_R[@]}")"
    echo "pullgate B median $mq req/s, $(med "${PGB_C[@]}") us CPU/req; ratio to bare $(awk -v a="$mq" -v b="$mb" 'BEGIN{printf "%.2f", a/b}')"
fi
echo "pullgate median $mp req/s, $(med "${PG_C[@]}") us CPU/req; bare median $mb req/s, $(med "${BARE_C[@]}") us CPU/req; ratio $(awk -v a="$mp" -v b="$mb" 'BEGIN{printf "%.2f", a/b}')"
if [ "${PERF:-0}" = 1 ]; then
    OUT="${PERF_OUT:-$WORK/perf.data}"
    # shellcheck disable=SC2086
    perf record -F 999 ${PERF_ARGS:--g} -o "$OUT" -p "$PG_PID" -- sleep "$SECS" >/dev/null 2>&1 &
    PP=$!
    run pg "$PG_PID" "$PG_PORT" >/dev/null
    wait "$PP" || true
    log "perf data in $OUT"
fi
