#!/usr/bin/env bash
# Workers row of the benchmark: workerd's CPU per MiB for a cold blob fill under
# `wrangler dev --local` (R2 simulated inside workerd), pullgate vs a plain JavaScript worker
# (bench/worker_fill_js) that tees the same upstream body into one R2 put with R2's SHA-256
# check and to the client. Side by side in one run, each fill of a blob neither has seen.
#
#   bash bench/worker_fill.sh                 # 32 MiB and 256 MiB, 3 runs each; writes bench/worker_fill.md
#   BENCH_SIZES_MIB="16" BENCH_RUNS=1 bash bench/worker_fill.sh   # quick trial
#
# CPU is utime + stime of the workerd process (from /proc/<pid>/stat), read before the GET
# and again once it has stayed unchanged for a moment after the body ended and the blob is in
# R2 (so the put's work is counted too). pullgate runs with the colo tier off
# (PULLGATE_COLO_MAX_BYTES=0: the baseline has none). The pullgate bundle must be built
# (`cargo test --test e2e_worker_fill` builds it, or the [build] command of wrangler.toml).
#
# Environment: BENCH_SIZES_MIB (default "32 256"), BENCH_RUNS (default 3), BENCH_JS_ROUTE
# (blob, the baseline; blob-byob does in JavaScript what pullgate's fill does; blob-held adds
# the two JavaScript transforms pullgate used before issue 11, to attribute cost),
# BENCH_RESULTS_MD (default bench/worker_fill.md), BENCH_DEADLINE seconds (default 1200).
# Network: loopback only. Servers this script started are stopped by PID on exit.
# Not run in CI.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
SIZES="${BENCH_SIZES_MIB:-32 256}"
RUNS="${BENCH_RUNS:-3}"
RESULTS_MD="${BENCH_RESULTS_MD:-$HERE/worker_fill.md}"
DEADLINE="${BENCH_DEADLINE:-1200}"
# blob: the plain tee baseline; blob-byob: pullgate's fill in JavaScript; blob-held: the tee
# plus the two JavaScript transforms pullgate used before.
JS_ROUTE="${BENCH_JS_ROUTE:-blob}"
TICKS=$(getconf CLK_TCK)

. "$(bash "$ROOT/scripts/worker-tools.sh" --check)"
BUNDLE="$ROOT/build/worker/shim.mjs"
[ -f "$BUNDLE" ] || { echo "no pullgate bundle at $BUNDLE: build it first" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pullgate-worker-fill.XXXXXX")
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -INT -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true; done
    sleep 1
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
( sleep "$DEADLINE"; echo "worker_fill: deadline reached" >&2; kill -TERM $$ ) &
WATCHDOG=$!
PIDS+=("$WATCHDOG")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- the upstream: blobs by digest from files, with Content-Length --------------------------
mkdir -p "$WORK/blobs"
UP_PORT=$(free_port)
setsid python3 - "$WORK/blobs" "$UP_PORT" >"$WORK/upstream.log" 2>&1 <<'EOF' &
import http.server, os, re, sys
root, port = sys.argv[1], int(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def answer(self, body):
        m = re.search(r"/blobs/sha256:([0-9a-f]{64})$", self.path)
        path = m and os.path.join(root, m.group(1))
        if self.path == "/v2/":
            self.send_response(200); self.send_header("content-length", "2"); self.end_headers()
            if body: self.wfile.write(b"{}")
            return
        if not path or not os.path.exists(path):
            self.send_response(404); self.send_header("content-length", "0"); self.end_headers(); return
        size = os.path.getsize(path)
        self.send_response(200)
        self.send_header("content-length", str(size))
        self.send_header("content-type", "application/octet-stream")
        self.end_headers()
        if body:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    self.wfile.write(chunk)
    def do_GET(self): self.answer(True)
    def do_HEAD(self): self.answer(False)
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
EOF
PIDS+=("$!")

# --- the two workers --------------------------------------------------------------------------
start_worker() { # name dir port -> pid
    local name=$1 dir=$2 port=$3
    mkdir -p "$dir/home"
    # exec + setsid: the PID printed is wrangler's, leader of its own process group.
    ( cd "$dir" && exec env XDG_CONFIG_HOME="$dir/home/.config" HOME="$dir/home" \
        WRANGLER_SEND_METRICS=false WRANGLER_HIDE_BANNER=true CLOUDFLARE_CF_FETCH_ENABLED=false \
        setsid "$WRANGLER_BIN" dev --local --ip 127.0.0.1 --port "$port" \
        --inspector-port "$(free_port)" --persist-to "$dir/state" >"$dir/log" 2>&1 ) &
    echo $!
}
wait_serving() { # url: until it answers at all
    local code
    for _ in $(seq 1 240); do
        code=$(curl -sS -o /dev/null --max-time 2 -w '%{http_code}' "$1" 2>/dev/null || true)
        [ -n "$code" ] && [ "$code" != "000" ] && return 0
        sleep 0.5
    done
    echo "not serving: $1" >&2
    tail -20 "$PG_DIR/log" "$JS_DIR/log" >&2 || true
    return 1
}
workerd_of() { # wrangler pid -> every workerd pid among its descendants (the worker and the
    # local R2 simulation may run in separate workerd processes: all of them are counted)
    local queue=("$1") pid kids found=()
    while [ ${#queue[@]} -gt 0 ]; do
        pid=${queue[0]}; queue=("${queue[@]:1}")
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "workerd" ] && found+=("$pid")
        kids=$(cat /proc/"$pid"/task/*/children 2>/dev/null || true)
        for k in $kids; do queue+=("$k"); done
    done
    [ ${#found[@]} -gt 0 ] || return 1
    echo "${found[*]}"
}
cpu_ticks() { # pids...
    local total=0 p
    for p in "$@"; do total=$((total + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done
    echo "$total"
}
settled_ticks() { # pids: ticks once they stayed unchanged for 1 s (bounded)
    local last now
    last=$(cpu_ticks $1)
    for _ in $(seq 1 60); do
        sleep 1
        now=$(cpu_ticks $1)
        [ "$now" = "$last" ] && { echo "$now"; return 0; }
        last=$now
    done
    echo "$now"
}

PG_DIR="$WORK/pullgate"; JS_DIR="$WORK/js"
mkdir -p "$PG_DIR" "$JS_DIR"
PG_PORT=$(free_port); JS_PORT=$(free_port)
# pullgate: the repository's wrangler.toml with the built bundle, no [build], our config.
awk -v main="$BUNDLE" -v q="'''" '
    inml { if (index($0, q)) inml = 0; next }
    /^\[/ { skip = ($0 == "[build]" || $0 == "[vars]") }
    skip { if (index($0, q) && !index(substr($0, index($0, q) + 3), q)) inml = 1; next }
    /^main =/ { print "main = \"" main "\""; next }
    { print }' "$ROOT/wrangler.toml" >"$PG_DIR/wrangler.toml"
cat >>"$PG_DIR/wrangler.toml" <<EOF

[vars]
PULLGATE_COLO_MAX_BYTES = "0"
PULLGATE_CONFIG = '''
[[upstream]]
host = "docker.io"
url = "http://127.0.0.1:1"

[[upstream]]
host = "reg.test"
url = "http://127.0.0.1:$UP_PORT"
'''
EOF
cp "$HERE/worker_fill_js/index.js" "$JS_DIR/"
sed "s|^UPSTREAM = .*|UPSTREAM = \"http://127.0.0.1:$UP_PORT\"|" "$HERE/worker_fill_js/wrangler.toml" >"$JS_DIR/wrangler.toml"

PG_WRANGLER=$(start_worker pullgate "$PG_DIR" "$PG_PORT"); PIDS+=("$PG_WRANGLER")
JS_WRANGLER=$(start_worker js "$JS_DIR" "$JS_PORT"); PIDS+=("$JS_WRANGLER")
wait_serving "http://127.0.0.1:$PG_PORT/healthz"
wait_serving "http://127.0.0.1:$JS_PORT/" 
PG_WORKERD=$(workerd_of "$PG_WRANGLER"); JS_WORKERD=$(workerd_of "$JS_WRANGLER")
echo "workerd: pullgate pids $PG_WORKERD, js pids $JS_WORKERD" >&2

# --- the runs ---------------------------------------------------------------------------------
ROWS="$WORK/rows"
: >"$ROWS"
measure() { # name pid url size_mib hex
    local name=$1 pid=$2 url=$3 mib=$4 hex=$5 before after got
    before=$(settled_ticks "$pid")
    got=$(curl -fsS --max-time 600 "$url" | sha256sum | cut -c1-64)
    after=$(settled_ticks "$pid")
    if [ "$got" != "$hex" ]; then echo "$name: body does not verify ($got)" >&2; exit 1; fi
    awk -v n="$name" -v m="$mib" -v d="$((after - before))" -v t="$TICKS" \
        'BEGIN { printf "%s %s %.1f\n", n, m, d * 1000 / t / m }' >>"$ROWS"
    tail -1 "$ROWS" >&2
}
# Warm-up (not counted): one 1 MiB fill through each, so neither pays its first request's
# setup (pullgate builds its core from the configuration on the first request) in a row.
head -c "$((1 << 20))" /dev/urandom >"$WORK/blob"
hex=$(sha256sum "$WORK/blob" | cut -c1-64)
mv "$WORK/blob" "$WORK/blobs/$hex"
curl -fsS -o /dev/null --max-time 120 "http://127.0.0.1:$PG_PORT/v2/reg.test/bench/blobs/sha256:$hex"
curl -fsS -o /dev/null --max-time 120 "http://127.0.0.1:$JS_PORT/$JS_ROUTE/$hex"
for mib in $SIZES; do
    for run in $(seq 1 "$RUNS"); do
        head -c "$((mib << 20))" /dev/urandom >"$WORK/blob"
        hex=$(sha256sum "$WORK/blob" | cut -c1-64)
        mv "$WORK/blob" "$WORK/blobs/$hex"
        # Alternate which goes first, so neither always runs on a warmer machine.
        if [ $((run % 2)) = 1 ]; then order="pg js"; else order="js pg"; fi
        for who in $order; do
            case $who in
            pg) measure pullgate "$PG_WORKERD" "http://127.0.0.1:$PG_PORT/v2/reg.test/bench/blobs/sha256:$hex" "$mib" "$hex" ;;
            js) measure js-tee "$JS_WORKERD" "http://127.0.0.1:$JS_PORT/$JS_ROUTE/$hex" "$mib" "$hex" ;;
            esac
        done
        rm -f "$WORK/blobs/$hex"
    done
done
grep -c "put=tee" "$PG_DIR/log" >"$WORK/tee_count" || true
grep -c "event=stored" "$JS_DIR/log" >"$WORK/js_count" || true

# --- the report -------------------------------------------------------------------------------
{
    echo "# Workers cold fill: workerd CPU per MiB (bench/worker_fill.sh)"
    echo
    echo "\`wrangler dev --local\` ($("$WRANGLER_BIN" --version 2>/dev/null | tail -1)), R2 simulated inside workerd, all on"
    echo "loopback, $(nproc) cores shared with other work, $(date -u +%Y-%m-%d). CPU is utime + stime of each"
    echo "workerd process from \`/proc/<pid>/stat\` around one cold GET of a blob it has never seen (the"
    echo "upstream's body, the R2 put and the client's copy), after one uncounted 1 MiB warm-up fill"
    echo "through each. pullgate runs with the colo tier off. JS route: /$JS_ROUTE."
    echo "Runs per size: $RUNS. Fills pullgate stored in the runtime (\`put=tee\`): $(cat "$WORK/tee_count");"
    echo "fills the baseline stored: $(cat "$WORK/js_count") (both include the warm-up)."
    echo
    echo "| layer | pullgate ms/MiB (median) | JS tee baseline ms/MiB (median) | ratio | target | runs (pullgate; JS) |"
    echo "|---|---|---|---|---|---|"
    for mib in $SIZES; do
        python3 - "$ROWS" "$mib" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
mib = sys.argv[2]
pg = [float(r[2]) for r in rows if r[0] == "pullgate" and r[1] == mib]
js = [float(r[2]) for r in rows if r[0] == "js-tee" and r[1] == mib]
p, j = statistics.median(pg), statistics.median(js)
ratio = p / j if j else float("inf")
verdict = "pass" if ratio <= 1.3 else "FAIL"
print(f"| {mib} MiB | {p:.1f} | {j:.1f} | {ratio:.2f}x | <= 1.3x: {verdict} | {', '.join(f'{x:.1f}' for x in pg)}; {', '.join(f'{x:.1f}' for x in js)} |")
EOF
    done
} >"$RESULTS_MD"
cat "$RESULTS_MD"
