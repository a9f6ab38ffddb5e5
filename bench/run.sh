#!/usr/bin/env bash
# pullgate benchmark: pullgate vs Debian's docker-registry in proxy mode (the reference
# pull-through cache), both in front of a plain docker-registry upstream, all on 127.0.0.1.
#
#   bench/run.sh                      # full run (256 MiB layers), ~1-2 minutes here
#                                     # (needs ~6 GiB free under $TMPDIR or /tmp)
#   BENCH_SIZE_MIB=16 bench/run.sh    # quick trial
#
# Measures, side by side in one run (the machine is shared and noisy, so read the ratios):
#   1. warm blob throughput (median MiB/s of sequential GETs after one warming GET)
#   2. cold blob GET time through each cache vs directly from the upstream (medians, each cold,
#      each after a `sync`)
#   3. upstream blob GETs for N concurrent cold pulls of one layer (+ sha256 of every download)
#   4. warm manifest-by-tag requests/s (wrk, or a bounded python loader when wrk is missing),
#      against a bare multi-threaded hyper server answering the same manifest (the ceiling)
#   5. peak RSS (VmHWM) of each server over the whole run, and under the 16-client warm load
#   6. 16 concurrent warm clients, aggregate MiB/s, pullgate with workers = cores and = 1
#   7. the cold floor: max(direct GET, sha256 of the layer on one core)
#   8. CPU seconds per GiB served, warm and cold (utime + stime of each server)
# Prints a table with pass/fail against the targets and writes bench/results.md.
#
# Environment:
#   BENCH_SIZE_MIB      layer size in MiB (default 256)
#   BENCH_WARM_RUNS     sequential warm GETs per server (default 11; short transfers, noisy box)
#   BENCH_COLD_RUNS     cold GETs per server, each with a fresh layer (default 5)
#   BENCH_CONCURRENCY   concurrent cold pulls (default 8)
#   BENCH_WRK_SECONDS   manifest load duration (default 5)
#   BENCH_WRK_CONNS     manifest load connections (default 16)
#   BENCH_WRK_THREADS   wrk threads (default 2)
#   BENCH_AGG_CLIENTS   concurrent warm clients for the aggregate row (default 16)
#   BENCH_AGG_RUNS      rounds of the aggregate row (default 3)
#   BENCH_PRIME         1 (default): before each cold GET, write and free twice a layer's size
#                       in /dev/shm, so a cache writes the layer into memory the guest holds
#                       (see row 2); 0: leave memory as earlier rows left it
#   BENCH_DEADLINE      seconds after which the script stops itself (default 900)
#   BENCH_RESULTS_MD    where to write the markdown (default bench/results.md)
#   PULLGATE_BIN        use this binary instead of building with `cargo build --release`
#   BARE_BIN            the ceiling server (default: built with `cargo build --release --example bare_manifest`)
#   REGISTRY_BIN        docker-registry binary (default: docker-registry on PATH)
#
# Network: loopback only. Every wait loop is bounded in count, every request in time, and a
# watchdog ends the script after BENCH_DEADLINE seconds. A trap stops every server this script
# started (by PID: SIGTERM, then SIGKILL after a grace period) and removes its temp dir.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="$HERE/bench.py"

SIZE_MIB="${BENCH_SIZE_MIB:-256}"
WARM_RUNS="${BENCH_WARM_RUNS:-11}"
COLD_RUNS="${BENCH_COLD_RUNS:-5}"
CONC="${BENCH_CONCURRENCY:-8}"
WRK_SECONDS="${BENCH_WRK_SECONDS:-5}"
WRK_CONNS="${BENCH_WRK_CONNS:-16}"
WRK_THREADS="${BENCH_WRK_THREADS:-2}"
AGG_CLIENTS="${BENCH_AGG_CLIENTS:-16}"
AGG_RUNS="${BENCH_AGG_RUNS:-3}"
DEADLINE="${BENCH_DEADLINE:-900}"
RESULTS_MD="${BENCH_RESULTS_MD:-$HERE/results.md}"
REGISTRY_BIN="${REGISTRY_BIN:-docker-registry}"

REPO="bench/big"
TAG="v1"
ACCEPT="application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
SIZE_BYTES=$((SIZE_MIB * 1024 * 1024))
# Time limit for one request moving one layer (generous: a slow machine at 20 MiB/s).
XFER_MAX=$((30 + SIZE_MIB / 20))

for v in SIZE_MIB WARM_RUNS COLD_RUNS CONC WRK_SECONDS WRK_CONNS WRK_THREADS AGG_CLIENTS AGG_RUNS DEADLINE; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "bench: $v must be a positive integer (got '${!v}')" >&2; exit 2; }
done

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# tools (idempotent; apt-get update only when the package is unknown to apt)

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_install() {
    local pkg="$1"
    command -v apt-get >/dev/null 2>&1 || return 1
    if ! apt-cache show "$pkg" >/dev/null 2>&1; then
        $SUDO apt-get update -qq >/dev/null 2>&1 || return 1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1
}
for need in curl:curl python3:python3 docker-registry:docker-registry; do
    cmd="${need%%:*}"; pkg="${need#*:}"
    if [ "$cmd" = docker-registry ]; then cmd="$REGISTRY_BIN"; fi
    if ! command -v "$cmd" >/dev/null 2>&1; then
        log "installing $pkg"
        apt_install "$pkg" || die "$cmd is missing and could not be installed"
    fi
done
if ! command -v wrk >/dev/null 2>&1; then
    log "installing wrk"
    apt_install wrk || log "wrk could not be installed; falling back to the python loader"
fi

# ---------------------------------------------------------------------------------------------
# pullgate binary

if [ -n "${PULLGATE_BIN:-}" ]; then
    PG_BIN="$PULLGATE_BIN"
else
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
    PG_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/pullgate"
fi
[ -x "$PG_BIN" ] || die "pullgate binary not found at $PG_BIN"
if [ -n "${BARE_BIN:-}" ]; then
    BARE="$BARE_BIN"
else
    log "cargo build --release --example bare_manifest"
    (cd "$ROOT" && cargo build --release --quiet --example bare_manifest) || die "building bare_manifest failed"
    BARE="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bare_manifest"
fi
[ -x "$BARE" ] || die "bare_manifest binary not found at $BARE"

# ---------------------------------------------------------------------------------------------
# temp dir, process bookkeeping, cleanup, watchdog

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pullgate-bench.XXXXXX")"
PIDS=()
WATCHDOG=""

stop_pid() { # pid: SIGTERM, wait up to 15 s, then SIGKILL
    local pid="$1" i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid did not stop after SIGTERM; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    if [ -n "$WATCHDOG" ]; then kill -TERM "$WATCHDOG" 2>/dev/null; wait "$WATCHDOG" 2>/dev/null; fi
    if [ "${BENCH_KEEP:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated (deadline of ${DEADLINE}s or signal)"; exit 124' TERM

# The watchdog: TERM to this script after DEADLINE seconds (every foreground command is itself
# bounded in time, so the trap runs soon after).
(
    trap 'kill "$sp" 2>/dev/null; exit 0' TERM
    sleep "$DEADLINE" &
    sp=$!
    wait "$sp"
    kill -TERM $$ 2>/dev/null
) &
WATCHDOG=$!

port() { python3 "$PY" port; }

wait_http() { # url name pid: up to 20 s for a 200
    local url="$1" name="$2" pid="$3" i
    for ((i = 0; i < 200; i++)); do
        kill -0 "$pid" 2>/dev/null || die "$name exited during startup (see logs in $WORK)"
        if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)" = 200 ]; then return 0; fi
        sleep 0.1
    done
    die "$name did not answer 200 at $url within 20 s"
}

registry_config() { # file port rootdir [remoteurl]
    cat >"$1" <<EOF
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: $3
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$2
  secret: pullgate-bench-secret
EOF
    if [ -n "${4:-}" ]; then
        printf 'proxy:\n  remoteurl: %s\n' "$4" >>"$1"
    fi
}

RESULTS="$WORK/results.txt"
: >"$RESULTS"
put() { printf '%s=%s\n' "$1" "$2" >>"$RESULTS"; }

# ---------------------------------------------------------------------------------------------
# machine and versions

CPU_MODEL="$(awk -F': *' '/^model name/{print $2; exit}' /proc/cpuinfo 2>/dev/null || true)"
[ -n "$CPU_MODEL" ] || CPU_MODEL="$(uname -m)"
MEM="$(awk '/^MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
put nproc "$(nproc)"
put cpu_model "$CPU_MODEL"
put mem "$MEM"
put kernel "$(uname -r)"
put date "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
put size_mib "$SIZE_MIB"
put pullgate_version "$("$PG_BIN" --version 2>&1 | head -1)"
put registry_version "$("$REGISTRY_BIN" --version 2>&1 | head -1)"
put curl_version "$(curl --version | head -1 | awk '{print $1" "$2}')"
if command -v wrk >/dev/null 2>&1; then
    put loader_version "$(wrk -v 2>&1 | head -1 | awk '{print $1" "$2}')"
else
    put loader_version "python loader (wrk missing)"
fi
cmdline="bench/run.sh"
[ "$SIZE_MIB" = 256 ] || cmdline="BENCH_SIZE_MIB=$SIZE_MIB $cmdline"
put command "$cmdline"
log "machine: $(nproc) CPUs ($CPU_MODEL), $MEM, Linux $(uname -r)"
log "pullgate: $PG_BIN ($("$PG_BIN" --version 2>&1 | head -1)); registry: $("$REGISTRY_BIN" --version 2>&1 | head -1)"
log "work dir: $WORK; layer size ${SIZE_MIB} MiB"

# ---------------------------------------------------------------------------------------------
# upstream registry and the generated image

UP_PORT="$(port)"
UP="http://127.0.0.1:$UP_PORT"
registry_config "$WORK/upstream.yml" "$UP_PORT" "$WORK/upstream-data"
"$REGISTRY_BIN" serve "$WORK/upstream.yml" >"$WORK/upstream.access.log" 2>"$WORK/upstream.log" &
UP_PID=$!
PIDS+=("$UP_PID")
wait_http "$UP/v2/" upstream "$UP_PID"
log "upstream registry on $UP (pid $UP_PID)"

push_blob() { # file digest
    local file="$1" digest="$2" loc sep code
    loc="$(curl -sS -f --max-time 30 -X POST -D - -o /dev/null "$UP/v2/$REPO/blobs/uploads/" \
        | awk 'tolower($1)=="location:"{print $2}' | tr -d '\r')"
    [ -n "$loc" ] || die "upload start for $digest gave no Location"
    case "$loc" in http*) ;; *) loc="$UP$loc" ;; esac
    sep='?'; [[ "$loc" == *\?* ]] && sep='&'
    code="$(curl -sS --max-time "$XFER_MAX" -H 'Expect:' -H 'Content-Type: application/octet-stream' \
        -T "$file" -o /dev/null -w '%{http_code}' "$loc${sep}digest=$digest")"
    [ "$code" = 201 ] || die "blob upload of $digest: HTTP $code"
}

new_layer() { # name -> prints digest; generates, pushes, deletes the local file
    local f="$WORK/$1.bin" d
    d="$(python3 "$PY" genlayer "$f" "$SIZE_MIB")"
    push_blob "$f" "$d"
    rm -f "$f"
    echo "$d"
}

log "generating and pushing $((2 + COLD_RUNS)) random layers of ${SIZE_MIB} MiB"
BIG="$(new_layer big)"
CFG_DIGEST="$(python3 "$PY" genconfig "$WORK/config.json" "$BIG")"
push_blob "$WORK/config.json" "$CFG_DIGEST"
python3 "$PY" manifest "$WORK/manifest.json" "$CFG_DIGEST" "$(stat -c %s "$WORK/config.json")" "$BIG" "$SIZE_BYTES"
code="$(curl -sS --max-time 30 -X PUT -H 'Content-Type: application/vnd.docker.distribution.manifest.v2+json' \
    --data-binary @"$WORK/manifest.json" -o /dev/null -w '%{http_code}' "$UP/v2/$REPO/manifests/$TAG")"
[ "$code" = 201 ] || die "manifest push: HTTP $code"
COLD=()
for ((i = 1; i <= COLD_RUNS; i++)); do COLD+=("$(new_layer "cold$i")"); done
CONC_LAYER="$(new_layer conc)"
log "pushed $REPO:$TAG (layer $BIG), cold layers ${COLD[*]}, concurrency layer $CONC_LAYER"

# ---------------------------------------------------------------------------------------------
# the two caches

PG_PORT="$(port)"
PG="http://127.0.0.1:$PG_PORT"
"$PG_BIN" serve --listen "127.0.0.1:$PG_PORT" --data-dir "$WORK/pullgate-data" \
    --upstream "docker.io=$UP" >"$WORK/pullgate.out" 2>"$WORK/pullgate.log" &
PG_PID=$!
PIDS+=("$PG_PID")
wait_http "$PG/metrics" pullgate "$PG_PID"
log "pullgate on $PG (pid $PG_PID, workers = $(nproc))"
put pg_workers "$(nproc)"

# The same binary with one worker (its own data dir), for the workers 1 vs N row.
PG1_PORT="$(port)"
PG1="http://127.0.0.1:$PG1_PORT"
"$PG_BIN" serve --workers 1 --listen "127.0.0.1:$PG1_PORT" --data-dir "$WORK/pullgate1-data" \
    --upstream "docker.io=$UP" >"$WORK/pullgate1.out" 2>"$WORK/pullgate1.log" &
PG1_PID=$!
PIDS+=("$PG1_PID")
wait_http "$PG1/metrics" "pullgate (1 worker)" "$PG1_PID"
log "pullgate with workers = 1 on $PG1 (pid $PG1_PID)"

PEER_PORT="$(port)"
PEER="http://127.0.0.1:$PEER_PORT"
registry_config "$WORK/peer.yml" "$PEER_PORT" "$WORK/peer-data" "$UP"
"$REGISTRY_BIN" serve "$WORK/peer.yml" >"$WORK/peer.access.log" 2>"$WORK/peer.log" &
PEER_PID=$!
PIDS+=("$PEER_PID")
wait_http "$PEER/v2/" peer "$PEER_PID"
log "peer (docker-registry proxy) on $PEER (pid $PEER_PID)"

blob_url() { echo "$1/v2/$REPO/blobs/$2"; }

timed_get() { # url -> prints seconds; dies unless 200 with the whole layer. With TIMED_CPU set,
    # curl's user and system CPU seconds go to that file.
    local out code size t TIMEFORMAT='%3U %3S'
    { time curl -s -o /dev/null --max-time "$XFER_MAX" -w '%{http_code} %{size_download} %{time_total}' "$1" \
        >"$WORK/timed_get.out" || true; } 2>"${TIMED_CPU:-/dev/null}"
    out="$(cat "$WORK/timed_get.out")"
    read -r code size t <<<"$out"
    [ "$code" = 200 ] && [ "$size" = "$SIZE_BYTES" ] || die "GET $1: HTTP ${code:-?}, ${size:-?} bytes (want 200, $SIZE_BYTES)"
    echo "$t"
}

sha_get() { # url -> prints "sha256:<hex>" of the body; empty on a failed transfer
    local sum
    sum="$( (set -o pipefail; curl -sS -f --max-time "$XFER_MAX" "$1" | sha256sum | cut -d' ' -f1) || true)"
    if [ -n "$sum" ]; then echo "sha256:$sum"; fi
}

CLK_TCK="$(getconf CLK_TCK)"
cpu_ticks() { # pid -> utime + stime in clock ticks
    awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}
cpu_per_gib() { # ticks_before ticks_after bytes -> CPU seconds per GiB
    awk -v a="$1" -v b="$2" -v n="$3" -v hz="$CLK_TCK" 'BEGIN{ if (n > 0) printf "%.3f", (b - a) / hz / (n / 1073741824); else print "nan" }'
}

metric() { # base name -> value, summed over label sets (0 if absent)
    curl -s --max-time 5 "$1/metrics" \
        | awk -v n="$2" '$1==n || index($1, n"{")==1 {v+=$NF} END{printf "%.0f\n", v}' || echo 0
}

# ---------------------------------------------------------------------------------------------
# 1. warm throughput

log "1. warm throughput: one warming GET each (verified), then $WARM_RUNS sequential GETs, interleaved"
warm_ok=1
for who in PG PEER; do
    base="${!who}"
    got="$(sha_get "$(blob_url "$base" "$BIG")")"
    if [ "$got" != "$BIG" ]; then
        log "warming GET via $who: sha256 ${got:-<failed>} != $BIG"
        warm_ok=0
    fi
done
warm_pg=(); warm_peer=()
pg_t0="$(cpu_ticks "$PG_PID")"; peer_t0="$(cpu_ticks "$PEER_PID")"
for ((i = 1; i <= WARM_RUNS; i++)); do
    warm_pg+=("$(timed_get "$(blob_url "$PG" "$BIG")")")
    warm_peer+=("$(timed_get "$(blob_url "$PEER" "$BIG")")")
    log "   run $i: pullgate ${warm_pg[-1]} s, peer ${warm_peer[-1]} s"
done
put cpu_warm_pg "$(cpu_per_gib "$pg_t0" "$(cpu_ticks "$PG_PID")" $((WARM_RUNS * SIZE_BYTES)))"
put cpu_warm_peer "$(cpu_per_gib "$peer_t0" "$(cpu_ticks "$PEER_PID")" $((WARM_RUNS * SIZE_BYTES)))"
put warm_pg_s "${warm_pg[*]}"
put warm_peer_s "${warm_peer[*]}"
put warm_ok "$warm_ok"

# ---------------------------------------------------------------------------------------------
# 2. cold time vs direct

log "2. cold GETs: $COLD_RUNS runs, each with a layer neither cache has seen; order rotates"
cold_pg=(); cold_peer=(); cold_direct=(); direct_cpu=(); after_pg=(); after_peer=()
# The servers' CPU seconds since ticks were read as "$1" (upstream pullgate peer).
all_ticks() { echo "$(cpu_ticks "$UP_PID") $(cpu_ticks "$PG_PID") $(cpu_ticks "$PEER_PID")"; }
# Waits until no server has used CPU for 0.3 s (at most 15 s): a cache may go on working after
# its answer ended (the peer commits a proxied blob only then, re-reading it), and that work
# must not land on the next GET. Prints the ticks the servers used meanwhile.
settle() {
    local before now last i
    before="$(all_ticks)"; last="$before"
    for ((i = 0; i < 50; i++)); do
        sleep 0.3
        now="$(all_ticks)"
        [ "$now" = "$last" ] && break
        last="$now"
    done
    awk -v a="$before" -v b="$now" 'BEGIN{split(a, x); split(b, y); print y[1]-x[1], y[2]-x[2], y[3]-x[3]}'
}
# This VM hands freed memory back to its host (virtio-balloon free page reporting): the first
# write to such a page costs a host fault, and a buffered write of a layer into it took 0.61 s
# against 0.12 s into memory the guest held (bench/profile.md). Every cold GET of a cache
# writes a whole layer, so without priming its time depends on what earlier rows freed and
# when. Priming writes and frees twice a layer in /dev/shm just before the GET, for every GET
# alike (the direct GET writes nothing and does not need it).
prime() {
    [ "${BENCH_PRIME:-1}" = 1 ] && [ -d /dev/shm ] || return 0
    dd if=/dev/zero of="/dev/shm/pullgate-bench-prime.$$" bs=4M count=$((SIZE_MIB / 2)) status=none 2>/dev/null || true
    rm -f "/dev/shm/pullgate-bench-prime.$$"
}
pg_t0="$(cpu_ticks "$PG_PID")"; peer_t0="$(cpu_ticks "$PEER_PID")"
for ((i = 0; i < COLD_RUNS; i++)); do
    d="${COLD[$i]}"
    order=(direct pg peer)
    order=("${order[@]:$((i % 3))}" "${order[@]:0:$((i % 3))}")
    for who in "${order[@]}"; do
        # Every cold GET starts with nothing dirty in the page cache (the earlier rows write
        # gigabytes, and their writeback would otherwise land on whichever GET runs then),
        # with memory primed, and once every server is idle.
        sync
        prime
        settle >/dev/null
        case "$who" in
            direct)
                up0="$(cpu_ticks "$UP_PID")"
                cold_direct+=("$(TIMED_CPU="$WORK/direct.cpu" timed_get "$(blob_url "$UP" "$d")")")
                # CPU of the transfer alone: the upstream sending and curl receiving.
                direct_cpu+=("$(awk -v a="$up0" -v b="$(cpu_ticks "$UP_PID")" -v hz="$CLK_TCK" -v c="$(cat "$WORK/direct.cpu")" \
                    'BEGIN{split(c, x); printf "%.3f", (b - a) / hz + x[1] + x[2]}')")
                ;;
            pg)
                cold_pg+=("$(timed_get "$(blob_url "$PG" "$d")")")
                read -r _ after _ < <(settle)
                after_pg+=("$(awk -v t="$after" -v hz="$CLK_TCK" 'BEGIN{printf "%.2f", t / hz}')")
                ;;
            peer)
                cold_peer+=("$(timed_get "$(blob_url "$PEER" "$d")")")
                read -r _ _ after < <(settle)
                after_peer+=("$(awk -v t="$after" -v hz="$CLK_TCK" 'BEGIN{printf "%.2f", t / hz}')")
                ;;
        esac
    done
    log "   run $((i + 1)) (${order[*]}): direct ${cold_direct[-1]} s (${direct_cpu[-1]} CPU s), pullgate ${cold_pg[-1]} s (+${after_pg[-1]} CPU s after), peer ${cold_peer[-1]} s (+${after_peer[-1]} CPU s after)"
done
put cpu_cold_pg "$(cpu_per_gib "$pg_t0" "$(cpu_ticks "$PG_PID")" $((COLD_RUNS * SIZE_BYTES)))"
put cpu_cold_peer "$(cpu_per_gib "$peer_t0" "$(cpu_ticks "$PEER_PID")" $((COLD_RUNS * SIZE_BYTES)))"
# The floor: hashing the layer on one core (hashlib over the upstream's copy, in the page
# cache after the direct GETs), median of 3; a verifying cache cannot be faster than that.
hex="${COLD[0]#sha256:}"
layer_file="$WORK/upstream-data/docker/registry/v2/blobs/sha256/${hex:0:2}/$hex/data"
sha_s=()
if [ -f "$layer_file" ]; then
    read -r -a sha_s < <(python3 "$PY" sha-time "$layer_file" 3)
fi
put cold_sha_s "${sha_s[*]}"
log "   sha256 of one layer on one core: ${sha_s[*]} s"
# The cold copies must have been stored right: a second GET through each cache, verified.
cold_ok=1
for who in PG PEER; do
    got="$(sha_get "$(blob_url "${!who}" "${COLD[0]}")")"
    if [ "$got" != "${COLD[0]}" ]; then
        log "re-GET of cold layer via $who: sha256 ${got:-<failed>} != ${COLD[0]}"
        cold_ok=0
    fi
done
put cold_pg_s "${cold_pg[*]}"
put cold_peer_s "${cold_peer[*]}"
put cold_direct_s "${cold_direct[*]}"
put cold_direct_cpu "${direct_cpu[*]}"
put cold_pg_after "${after_pg[*]}"
put cold_peer_after "${after_peer[*]}"
put cold_ok "$cold_ok"

# ---------------------------------------------------------------------------------------------
# 6. 16 concurrent warm clients, aggregate; peak RSS under that load

agg_run() { # base pid -> aggregate MiB/s of AGG_CLIENTS concurrent warm GETs
    local base="$1" i start end okn=0 pids=()
    start="$(date +%s.%N)"
    for ((i = 1; i <= AGG_CLIENTS; i++)); do
        (curl -s -o /dev/null --max-time "$XFER_MAX" -w '%{http_code} %{size_download}' \
            "$(blob_url "$base" "$BIG")" >"$WORK/agg.$i" || true) &
        pids+=("$!")
    done
    for p in "${pids[@]}"; do wait "$p" || true; done
    end="$(date +%s.%N)"
    for ((i = 1; i <= AGG_CLIENTS; i++)); do
        [ "$(cat "$WORK/agg.$i")" = "200 $SIZE_BYTES" ] && okn=$((okn + 1))
    done
    [ "$okn" = "$AGG_CLIENTS" ] || die "aggregate run via $base: $okn/$AGG_CLIENTS complete transfers"
    awk -v a="$start" -v b="$end" -v n="$AGG_CLIENTS" -v m="$SIZE_MIB" 'BEGIN{printf "%.1f", n * m / (b - a)}'
}
log "6. $AGG_CLIENTS concurrent warm clients, aggregate, $AGG_RUNS rounds (pullgate workers = $(nproc), = 1, peer)"
got="$(sha_get "$(blob_url "$PG1" "$BIG")")"
[ "$got" = "$BIG" ] || log "warming GET via pullgate (1 worker): sha256 ${got:-<failed>} != $BIG"
# Reset each server's peak RSS (clear_refs 5), so VmHWM afterwards is the peak under this load.
for pid in "$PG_PID" "$PEER_PID"; do echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true; done
agg_pg=(); agg_pg1=(); agg_peer=()
for ((i = 1; i <= AGG_RUNS; i++)); do
    agg_pg+=("$(agg_run "$PG")")
    agg_pg1+=("$(agg_run "$PG1")")
    agg_peer+=("$(agg_run "$PEER")")
    log "   round $i: pullgate ${agg_pg[-1]} MiB/s, pullgate (1 worker) ${agg_pg1[-1]} MiB/s, peer ${agg_peer[-1]} MiB/s"
done
put agg_clients "$AGG_CLIENTS"
put agg_pg "${agg_pg[*]}"
put agg_pg1 "${agg_pg1[*]}"
put agg_peer "${agg_peer[*]}"
put rss16_pg_kb "$(awk '/^VmHWM/{print $2}' "/proc/$PG_PID/status" 2>/dev/null || echo nan)"
put rss16_peer_kb "$(awk '/^VmHWM/{print $2}' "/proc/$PEER_PID/status" 2>/dev/null || echo nan)"

# ---------------------------------------------------------------------------------------------
# 3. upstream transfers for N concurrent cold pulls

conc_run() { # key base
    local key="$1" base="$2" off i start end okn=0 heads gets bytes up0 co0
    off="$(wc -l <"$WORK/upstream.access.log")"
    if [ "$key" = pg ]; then
        up0="$(metric "$PG" pullgate_upstream_requests_total)"
        co0="$(metric "$PG" pullgate_coalesced_waits_total)"
    fi
    local pids=()
    start="$(date +%s.%N)"
    for ((i = 1; i <= CONC; i++)); do
        (sha_get "$(blob_url "$base" "$CONC_LAYER")" >"$WORK/conc.$key.$i" || true) &
        pids+=("$!")
    done
    for p in "${pids[@]}"; do wait "$p" || true; done
    end="$(date +%s.%N)"
    for ((i = 1; i <= CONC; i++)); do
        [ "$(cat "$WORK/conc.$key.$i")" = "$CONC_LAYER" ] && okn=$((okn + 1))
    done
    sleep 2 # let the upstream write its last access-log lines (and any background fill end)
    read -r gets bytes heads < <(python3 "$PY" upstream-gets "$WORK/upstream.access.log" "$off" "$REPO" "$CONC_LAYER")
    put "conc_${key}_gets" "$gets"
    put "conc_${key}_bytes" "$bytes"
    put "conc_${key}_heads" "$heads"
    put "conc_${key}_sha_ok" "$okn"
    put "conc_${key}_wall" "$(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.3f", b-a}')"
    if [ "$key" = pg ]; then
        put conc_pg_metric_upstream "$(awk -v a="$up0" -v b="$(metric "$PG" pullgate_upstream_requests_total)" 'BEGIN{print b-a}')"
        put conc_pg_metric_coalesced "$(awk -v a="$co0" -v b="$(metric "$PG" pullgate_coalesced_waits_total)" 'BEGIN{print b-a}')"
    fi
    log "   $key: upstream blob GETs $gets ($bytes bytes), HEADs $heads, sha256 ok $okn/$CONC"
}
log "3. $CONC concurrent cold pulls of one layer, through each cache in turn"
put conc_n "$CONC"
conc_run pg "$PG"
conc_run peer "$PEER"

# ---------------------------------------------------------------------------------------------
# 4. warm manifest-by-tag requests/s

log "4. manifest by tag: warm-up, then ${WRK_SECONDS}s x $WRK_CONNS connections each"
mf_ok=1
for who in PG PEER; do
    out="$(curl -s -o "$WORK/mf.$who" --max-time 30 -H "Accept: $ACCEPT" -w '%{http_code}' \
        "${!who}/v2/$REPO/manifests/$TAG" || true)"
    if [ "$out" != 200 ] || ! cmp -s "$WORK/mf.$who" "$WORK/manifest.json"; then
        log "manifest warm-up via $who: HTTP $out or body differs from the pushed manifest"
        mf_ok=0
    fi
done
put mf_ok "$mf_ok"
put mf_secs "$WRK_SECONDS"
put mf_conns "$WRK_CONNS"
put mf_threads "$WRK_THREADS"
mf_load() { # key base
    local key="$1" url="$2/v2/$REPO/manifests/$TAG" out rps non2xx off
    off="$(wc -l <"$WORK/upstream.access.log")"
    if command -v wrk >/dev/null 2>&1; then
        put mf_tool wrk
        out="$(timeout $((WRK_SECONDS + 30)) wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${WRK_SECONDS}s" --timeout 10s \
            -H "Accept: $ACCEPT" "$url" 2>&1 || true)"
        echo "$out" >"$WORK/wrk.$key.txt"
        rps="$(awk '/^Requests\/sec:/{print $2}' <<<"$out")"
        non2xx="$(awk '/Non-2xx or 3xx responses:/{print $NF}' <<<"$out")"
        non2xx="${non2xx:-0}"
        if grep -q 'Socket errors' <<<"$out"; then log "   $key: $(grep 'Socket errors' <<<"$out")"; fi
    else
        put mf_tool "python loader"
        out="$(timeout $((WRK_SECONDS + 60)) python3 "$PY" load "$url" "$WRK_SECONDS" "$WRK_CONNS" "$ACCEPT" || true)"
        rps="$(sed -n 's/.*rps=\([0-9.]*\).*/\1/p' <<<"$out")"
        non2xx="$(sed -n 's/.*non2xx=\([0-9]*\).*/\1/p' <<<"$out")"
    fi
    [ -n "$rps" ] || { log "   $key: load generator gave no result: $out"; rps=nan; }
    put "mf_${key}_rps" "$rps"
    put "mf_${key}_non2xx" "$non2xx"
    put "mf_${key}_upstream_reqs" "$(tail -n +"$((off + 1))" "$WORK/upstream.access.log" | grep -c "/v2/$REPO/manifests/" || true)"
    log "   $key: $rps req/s, non-2xx $non2xx"
}
mf_load pg "$PG"
mf_load peer "$PEER"
# The ceiling: a bare multi-threaded hyper server answering the same manifest bytes.
BARE_PORT="$(port)"
"$BARE" "127.0.0.1:$BARE_PORT" "$WORK/manifest.json" "application/vnd.docker.distribution.manifest.v2+json" \
    >"$WORK/bare.out" 2>"$WORK/bare.log" &
BARE_PID=$!
PIDS+=("$BARE_PID")
wait_http "http://127.0.0.1:$BARE_PORT/v2/$REPO/manifests/$TAG" bare "$BARE_PID"
mf_load bare "http://127.0.0.1:$BARE_PORT"

# ---------------------------------------------------------------------------------------------
# 5. peak RSS, then the report

hwm() { awk '/^VmHWM/{print $2}' "/proc/$1/status" 2>/dev/null || echo nan; }
put rss_pg_kb "$(hwm "$PG_PID")"
put rss_peer_kb "$(hwm "$PEER_PID")"
put rss_up_kb "$(hwm "$UP_PID")"
log "5. peak RSS: pullgate $(hwm "$PG_PID") kB, peer $(hwm "$PEER_PID") kB, upstream $(hwm "$UP_PID") kB"

# A quick sanity check of the pullgate log: errors or aborted bodies would make figures suspect.
pg_errors="$(grep -c -E 'error=|aborted=true' "$WORK/pullgate.log" || true)"
[ "$pg_errors" = 0 ] || log "note: pullgate logged $pg_errors request lines with errors or aborted bodies"

python3 "$PY" report "$RESULTS" "$RESULTS_MD"
