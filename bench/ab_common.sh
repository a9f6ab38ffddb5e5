# Shared by bench/manifest_ab.sh and bench/cold_ab.sh (sourced, not run): waiting for a
# server, the upstream registry, pushing a blob. Expects from the sourcing script: `log`,
# `PY` (bench.py), `WORK` (its temp dir), `PIDS` (servers its trap stops) and `REPO`.

wait_http() { # url: up to 20 s for a 200, else the script ends
    local i
    for ((i = 0; i < 200; i++)); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" || true)" = 200 ] && return 0
        sleep 0.1
    done
    log "no 200 from $1"; exit 1
}

start_upstream() { # sets UP_PORT and UP: a plain docker-registry under $WORK/up-data
    UP_PORT="$(python3 "$PY" port)"
    UP="http://127.0.0.1:$UP_PORT"
    cat >"$WORK/up.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $WORK/up-data
http:
  addr: 127.0.0.1:$UP_PORT
EOF
    docker-registry serve "$WORK/up.yml" >/dev/null 2>&1 &
    PIDS+=($!)
    wait_http "$UP/v2/"
}

push_blob() { # file digest: a monolithic upload to $UP's $REPO
    local loc sep
    loc="$(curl -sS -f -X POST -D - -o /dev/null "$UP/v2/$REPO/blobs/uploads/" | awk 'tolower($1)=="location:"{print $2}' | tr -d '\r')"
    case "$loc" in http*) ;; *) loc="$UP$loc" ;; esac
    sep='?'; [[ "$loc" == *\?* ]] && sep='&'
    curl -sS -f -H 'Expect:' -H 'Content-Type: application/octet-stream' -T "$1" -o /dev/null "$loc${sep}digest=$2"
}
