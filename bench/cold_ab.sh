#!/usr/bin/env bash
# Row 2 of bench/run.sh alone, for A/B work on the cold path: one upstream registry with
# ROUNDS fresh layers; for each layer, alternating the order, one GET directly from the
# upstream and one cold GET through each pullgate build (its own data dir), with the time of
# each, the medians, each build's ratio to the direct GET, and each build's CPU per GiB
# (utime + stime from /proc/<pid>/stat over its cold GETs).
#
#   bench/cold_ab.sh                                     # 5 layers of 256 MiB, current build
#   PULLGATE_BIN_B=<another build> bench/cold_ab.sh      # + a second build, interleaved
#   ROUNDS=7 SIZE_MIB=128 bench/cold_ab.sh
#   SYNC=1 bench/cold_ab.sh          # `sync` before every GET (no writeback of earlier GETs
#                                    #   competing with the next)
#   PRIME=1 bench/cold_ab.sh         # before every GET, write and free twice a layer in
#                                    #   /dev/shm, so the fill writes into memory the guest
#                                    #   holds (as bench/run.sh does; see bench/profile.md)
#   PERF=1 bench/cold_ab.sh          # + `perf record -g` of build A over every round
#                                    #   (target/cold.perf.data; PERF_ARGS, PERF_OUT)
#
# Loopback only; every server started here is stopped by PID on exit.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="$HERE/bench.py"
T="${CARGO_TARGET_DIR:-$ROOT/target}"
PG_BIN="${PULLGATE_BIN:-$T/release/pullgate}"
ROUNDS="${ROUNDS:-5}"
SIZE_MIB="${SIZE_MIB:-256}"
SIZE_BYTES=$((SIZE_MIB * 1048576))
REPO="bench/cold"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pullgate-coldab.XXXXXX")"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
log() { printf '[coldab %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# shellcheck source=bench/ab_common.sh
. "$HERE/ab_common.sh"
start_upstream
LAYERS=()
for ((i = 1; i <= ROUNDS; i++)); do
    d="$(python3 "$PY" genlayer "$WORK/l.bin" "$SIZE_MIB")"
    push_blob "$WORK/l.bin" "$d"
    rm -f "$WORK/l.bin"
    LAYERS+=("$d")
done

start_pg() { # bin name -> sets PG_PID and PG_PORT (in this shell, so the trap stops it)
    PG_PORT="$(python3 "$PY" port)"
    "$1" serve --listen "127.0.0.1:$PG_PORT" --data-dir "$WORK/$2-data" --upstream "docker.io=$UP" \
        >/dev/null 2>"$WORK/$2.log" &
    PG_PID=$!
    PIDS+=("$PG_PID")
    wait_http "http://127.0.0.1:$PG_PORT/metrics"
}
start_pg "$PG_BIN" a
A_PID="$PG_PID"; A_PORT="$PG_PORT"
NAMES=(direct a)
if [ -n "${PULLGATE_BIN_B:-}" ]; then
    start_pg "$PULLGATE_BIN_B" b
    B_PID="$PG_PID"; B_PORT="$PG_PORT"
    NAMES+=(b)
fi
if [ "${PERF:-0}" = 1 ]; then
    # shellcheck disable=SC2086
    perf record -F 999 ${PERF_ARGS:--g} -o "${PERF_OUT:-$HERE/../target/cold.perf.data}" -p "$A_PID" >/dev/null 2>&1 &
    PERF_PID=$!
    PIDS+=("$PERF_PID")
fi
log "$ROUNDS layers of $SIZE_MIB MiB; pullgate A pid $A_PID${B_PID:+, B pid $B_PID}"

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ="$(getconf CLK_TCK)"
declare -A TIMES CPU
get() { # name digest -> seconds (dies unless 200 with every byte and the right digest)
    local base out code size t sum
    case "$1" in
        direct) base="$UP" ;;
        a) base="http://127.0.0.1:$A_PORT" ;;
        b) base="http://127.0.0.1:$B_PORT" ;;
    esac
    out="$(curl -s -o "$WORK/got" --max-time 120 -w '%{http_code} %{size_download} %{time_total}' \
        "$base/v2/$REPO/blobs/$2" || true)"
    read -r code size t <<<"$out"
    sum="sha256:$(sha256sum "$WORK/got" | cut -d' ' -f1)"
    rm -f "$WORK/got"
    [ "$code" = 200 ] && [ "$size" = "$SIZE_BYTES" ] && [ "$sum" = "$2" ] \
        || { log "GET via $1: HTTP $code, $size bytes, $sum"; exit 1; }
    echo "$t"
}
for ((r = 0; r < ROUNDS; r++)); do
    d="${LAYERS[$r]}"
    n=${#NAMES[@]}
    order=()
    for ((k = 0; k < n; k++)); do order+=("${NAMES[$(((k + r) % n))]}"); done
    line=""
    for who in "${order[@]}"; do
        pid=""; [ "$who" = a ] && pid="$A_PID"; [ "$who" = b ] && pid="${B_PID:-}"
        # SYNC=1: write back what earlier GETs left dirty first, so the kernel's writeback
        # does not compete with this GET for the cores.
        [ "${SYNC:-0}" = 1 ] && sync
        if [ "${PRIME:-0}" = 1 ]; then
            dd if=/dev/zero of="/dev/shm/pullgate-coldab-prime.$$" bs=4M count=$((SIZE_MIB / 2)) status=none
            rm -f "/dev/shm/pullgate-coldab-prime.$$"
        fi
        [ -n "$pid" ] && t0="$(ticks "$pid")"
        t="$(get "$who" "$d")"
        [ -n "$pid" ] && CPU[$who]="${CPU[$who]:-0} + $(ticks "$pid") - $t0"
        TIMES[$who]="${TIMES[$who]:-} $t"
        line+=" $who $t s"
    done
    log "round $((r + 1)):$line"
done
[ -n "${PERF_PID:-}" ] && { kill -INT "$PERF_PID" 2>/dev/null || true; wait "$PERF_PID" 2>/dev/null || true; }
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# shellcheck disable=SC2086
md="$(med ${TIMES[direct]})"
for who in a b; do
    [ -n "${TIMES[$who]:-}" ] || continue
    # shellcheck disable=SC2086
    m="$(med ${TIMES[$who]})"
    cpu="$(python3 -c "print(round(($((${CPU[$who]})))/$HZ/($ROUNDS*$SIZE_BYTES/1073741824), 3))")"
    echo "pullgate $who: median $m s (${TIMES[$who]# }), $(awk -v a="$m" -v b="$md" 'BEGIN{printf "%.2f", a/b}')x direct, $cpu CPU s/GiB"
done
echo "direct: median $md s (${TIMES[direct]# })"
