#!/bin/bash
# pg_auto_failover 2.0 (Debian postgresql-15-auto-failover, pg_autoctl): node-crash failover,
# automatic rejoin and switchover of a monitor + 3 data nodes on loopback, measured from the
# client with writer.py/analyze.py (the method of raftmgr's bench-failover). Defaults throughout.
#
#   bash jepsen/compare/paf.sh [--runs N] [--line failover|switchover] [--setting defaults|tuned]
#
# --setting tuned: the monitor's health checks tightened (in the monitor's postgresql.conf):
#   health_check_period=1000ms, health_check_timeout=1000ms, health_check_max_retries=1,
#   health_check_retry_delay=500ms, node_considered_unhealthy_timeout=2000ms. Everything else,
#   and everything with --setting defaults (the default), is pg_auto_failover's default.
#
# failover: each run a fresh cluster in /tmp/compare-a-paf.XXXX (monitor 25420, nodes
#   25421-25423). The writer runs 3 s, then the fault: kill -9, at once, of node1's pg_autoctl
#   processes (the supervisor and its children "start/stop postgres" and "node active", by PID)
#   and of its postmaster. New primary = the first other node answering pg_is_in_recovery() =
#   false. The writer stops once acknowledged for 3 s after that. Rejoin: 2 s after the new
#   primary is seen, `pg_autoctl run` of node1 is restarted; rejoin time runs from that restart
#   until the new primary's pg_stat_replication shows node1 (application_name
#   pgautofailover_standby_<nodeid>) streaming.
# switchover: no fault; `pg_autoctl perform switchover` (from the monitor) after the 3 s warm-up.
#   Unavailability per analyze.py with the command's start as the "fault"; also the command's
#   own wall time.
# Results: jepsen/compare/results/paf-<line>-<UTC date>.json (raw per-run values).
set -u -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"

RUNS=3 LINE=failover SETTING=defaults OUT=
while [ $# -gt 0 ]; do
    case $1 in
        --runs) RUNS=$2; shift 2 ;;
        --line) LINE=$2; shift 2 ;;
        --setting) SETTING=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) die "unknown argument $1" ;;
    esac
done
case $LINE in failover|switchover) ;; *) die "--line failover|switchover" ;; esac
case $SETTING in defaults) SUFFIX= ;; tuned) SUFFIX=-tuned ;; *) die "--setting defaults|tuned" ;; esac
OUT=${OUT:-$HERE/results/paf-$LINE$SUFFIX-$(date -u +%Y%m%dT%H%MZ).json}
mkdir -p "$(dirname "$OUT")"

# --- install (idempotent) -------------------------------------------------------------------
if ! command -v pg_autoctl >/dev/null || ! "$PY" -c 'import psycopg2' 2>/dev/null; then
    apt-get install -y -q postgresql-15-auto-failover python3-psycopg2 >/dev/null || die "apt-get install failed"
fi
if pg_lsclusters -h 2>/dev/null | awk '$4 == "online"' | grep -q .; then
    die "a Debian cluster is online (pg_lsclusters); stop it with pg_ctlcluster 15 main stop"
fi
PAF_VERSION=$(pg_autoctl version 2>&1 | head -n1)
PG_VERSION=$("$PGBIN/postgres" --version)

MPORT=25420
PORTS=(0 25421 25422 25423)
NODES=(1 2 3)
RUNDIR=
declare -A AUTOCTL_PIDS=()   # key: monitor|1|2|3 -> supervisor PID
WRITER_PID=

# pg_autoctl as postgres with every file of its own under $RUNDIR (XDG_RUNTIME_DIR must exist,
# or it puts its pid files under /tmp/pg_autoctl). setpriv execs, so $! is pg_autoctl's PID.
autoctl_env() {
    echo env HOME="$RUNDIR" XDG_CONFIG_HOME="$RUNDIR/xdg/config" XDG_DATA_HOME="$RUNDIR/xdg/data" \
        XDG_RUNTIME_DIR="$RUNDIR/xdg/run" PATH="$PGBIN:/usr/bin:/bin"
}
autoctl() {  # foreground
    setpriv --reuid=postgres --regid=postgres --init-groups $(autoctl_env) pg_autoctl "$@"
}
# start_run KEY PGDATA SOCKDIR LOG: `pg_autoctl run` in the background
start_run() {
    setpriv --reuid=postgres --regid=postgres --init-groups $(autoctl_env) PGHOST="$3" \
        pg_autoctl run --pgdata "$2" >>"$4" 2>&1 &
    AUTOCTL_PIDS[$1]=$!
}

cleanup_run() {
    stop_writer
    local k pid
    # data nodes first, the monitor last
    for k in 3 2 1 monitor; do
        pid=${AUTOCTL_PIDS[$k]:-}
        if [ -n "$pid" ]; then
            kill -TERM "$pid" 2>/dev/null
            local deadline=$(( $(date +%s) + 30 ))
            while kill -0 "$pid" 2>/dev/null && (( $(date +%s) < deadline )); do sleep 0.1; done
            wait "$pid" 2>/dev/null
        fi
        AUTOCTL_PIDS[$k]=
    done
    remove_run_dir "$RUNDIR"/node*/data "$RUNDIR"/monitor/data
    RUNDIR=
}

node_conf() {  # per-node settings outside the data directory (pg_basebackup copies postgresql.conf)
    cat > "$RUNDIR/$1/node.conf" <<EOF
listen_addresses='127.0.0.1'
unix_socket_directories='$RUNDIR/$1'
shared_buffers='128MB'
cluster_name='cmpa-$(basename "$RUNDIR")-$1'
EOF
    chown postgres: "$RUNDIR/$1/node.conf"
}
add_include() {
    grep -q "include_if_exists='../node.conf'" "$1/postgresql.conf" ||
        echo "include_if_exists='../node.conf'" >> "$1/postgresql.conf"
}

monitor_sql() { PGCONNECT_TIMEOUT=2 "$PGBIN/psql" -X -At -h 127.0.0.1 -p "$MPORT" -U autoctl_node -d pg_auto_failover -c "$1" 2>/dev/null; }
node_state() { monitor_sql "SELECT reportedstate FROM pgautofailover.node WHERE nodename = 'node$1'"; }
node_is() { [ "$(node_state "$1")" = "$2" ]; }
node_id() { monitor_sql "SELECT nodeid FROM pgautofailover.node WHERE nodename = 'node$1'"; }

build_cluster() {
    RUNDIR=$(mktemp -d /tmp/compare-a-paf.XXXX)
    chmod 0755 "$RUNDIR"
    mkdir -p "$RUNDIR/xdg/config" "$RUNDIR/xdg/data" "$RUNDIR/xdg/run" "$RUNDIR/monitor" "$RUNDIR"/node{1,2,3}
    chmod 0700 "$RUNDIR/xdg/run"
    chown -R postgres: "$RUNDIR"
    # monitor: create (postgres is stopped again at its end), then our settings, then run
    autoctl create monitor --pgdata "$RUNDIR/monitor/data" --pgport "$MPORT" --hostname 127.0.0.1 \
        --auth trust --no-ssl --pgctl "$PGBIN/pg_ctl" >"$RUNDIR/monitor/create.log" 2>&1 || return 1
    autoctl config set --pgdata "$RUNDIR/monitor/data" postgresql.listen_addresses 127.0.0.1 >/dev/null || return 1
    node_conf monitor; add_include "$RUNDIR/monitor/data"
    if [ "$SETTING" = tuned ]; then
        cat >> "$RUNDIR/monitor/node.conf" <<EOF
pgautofailover.health_check_period=1000
pgautofailover.health_check_timeout=1000
pgautofailover.health_check_max_retries=1
pgautofailover.health_check_retry_delay=500
pgautofailover.node_considered_unhealthy_timeout=2000
EOF
    fi
    start_run monitor "$RUNDIR/monitor/data" "$RUNDIR/monitor" "$RUNDIR/monitor/run.log"
    wait_for 60 "monitor up" bash -c "PGCONNECT_TIMEOUT=1 $PGBIN/psql -X -At -h 127.0.0.1 -p $MPORT -U autoctl_node -d pg_auto_failover -c 'SELECT 1'" || return 1
    local monitor_uri="postgres://autoctl_node@127.0.0.1:$MPORT/pg_auto_failover?sslmode=disable"
    local i
    for i in "${NODES[@]}"; do
        # the keeper connects to its own postgres over TCP (--pghost 127.0.0.1), so our socket
        # folder (node.conf, included from postgresql.conf) does not matter to it
        node_conf "node$i"
        autoctl create postgres --pgdata "$RUNDIR/node$i/data" --pgport "${PORTS[$i]}" \
            --pghost 127.0.0.1 --listen 127.0.0.1 --hostname 127.0.0.1 --name "node$i" \
            --monitor "$monitor_uri" --auth trust --no-ssl --pgctl "$PGBIN/pg_ctl" \
            >"$RUNDIR/node$i/create.log" 2>&1 || { tail -n 20 "$RUNDIR/node$i/create.log" >&2; return 1; }
        add_include "$RUNDIR/node$i/data"
        start_run "$i" "$RUNDIR/node$i/data" 127.0.0.1 "$RUNDIR/node$i/run.log"
        if [ "$i" = 1 ]; then
            wait_for 90 "node1 single" node_is 1 single || return 1
        else
            wait_for 120 "node$i secondary" node_is "$i" secondary || return 1
        fi
    done
    wait_for 60 "node1 primary" node_is 1 primary || return 1
    MONITOR_SETTINGS=$(PGCONNECT_TIMEOUT=2 "$PGBIN/psql" -X -At -h 127.0.0.1 -p "$MPORT" -U autoctl_node -d pg_auto_failover \
        -c "SELECT string_agg(name || '=' || setting || coalesce(unit, ''), ' ' ORDER BY name) FROM pg_settings WHERE name LIKE 'pgautofailover.%'" 2>/dev/null)
    wait_for 30 "node2 streaming" streaming_from "${PORTS[1]}" "pgautofailover_standby_$(node_id 2)" || return 1
    wait_for 30 "node3 streaming" streaming_from "${PORTS[1]}" "pgautofailover_standby_$(node_id 3)" || return 1
}

# kill -9 node1's pg_autoctl supervisor, its children, and its postmaster, at once
crash_node1() {
    local sup=${AUTOCTL_PIDS[1]}
    local kids; kids=$(ps -o pid= --ppid "$sup" | tr '\n' ' ')
    local pm; pm=$(postmaster_pid "$RUNDIR/node1/data")
    FAULT_NS=$(now_ns)
    kill -9 "$sup" $kids "$pm"
    wait "$sup" 2>/dev/null
    AUTOCTL_PIDS[1]=
    log "fault at $FAULT_NS: killed pg_autoctl $sup, children $kids, postmaster $pm of node1"
}

one_run() {
    local run=$1 result=$2
    build_cluster || { log "run $run: cluster setup failed"; return 1; }
    local conninfo; conninfo=$(multi_conninfo "${PORTS[1]}" "${PORTS[2]}" "${PORTS[3]}")
    start_writer "$conninfo" "$RUNDIR/acks" "$RUNDIR/writer-errors"
    wait_for 10 "first ack" test -s "$RUNDIR/acks" || return 1
    sleep 3   # warm-up
    local extra='{}'
    if [ "$LINE" = failover ]; then
        crash_node1
        local fault=$FAULT_NS
        local newp; newp=$(wait_new_primary 180)
        local promoted; promoted=$(now_ns)
        if [ -z "$newp" ]; then
            stop_writer
            echo '{"run": '"$run"', "failover": false, "note": "no failover within 180 s"}' > "$result"
            return 0
        fi
        log "run $run: node$newp is primary, $(ms_between "$fault" "$promoted") ms after the fault"
        # rejoin: restart node1's pg_autoctl 2 s after the new primary is seen
        local id1; id1=$(node_id 1)
        sleep 2
        wait_for 20 "node1 orphans gone" bash -c "! pgrep -u postgres -f 'cmpa-$(basename "$RUNDIR")-node1' >/dev/null"
        local t0; t0=$(now_ns)
        start_run 1 "$RUNDIR/node1/data" 127.0.0.1 "$RUNDIR/node1/run.log"
        local rejoin_ms=null
        if wait_for 120 "node1 streaming from node$newp" streaming_from "${PORTS[$newp]}" "pgautofailover_standby_$id1"; then
            rejoin_ms=$(ms_between "$t0" "$(now_ns)")
        fi
        log "run $run: node1 rejoined in $rejoin_ms ms after its pg_autoctl restart"
        wait_acked_for "$RUNDIR/acks" "$promoted" 3 30 || log "run $run: writer not acked for 3 s within 30 s"
        stop_writer
        "$PY" "$HERE/analyze.py" --log "$RUNDIR/acks" --fault-ns "$fault" \
            --check-conninfo "$(multi_conninfo "${PORTS[$newp]}")" > "$RUNDIR/analysis.json" || return 1
        extra=$(printf '{"failover": true, "new_primary": "node%s", "promotion_seen_ms_after_fault": %s, "rejoin_ms": %s}' \
            "$newp" "$(ms_between "$fault" "$promoted")" "$rejoin_ms")
    else
        local t0; t0=$(now_ns)
        autoctl perform switchover --pgdata "$RUNDIR/monitor/data" >"$RUNDIR/switchover.log" 2>&1
        local rc=$? t1; t1=$(now_ns)
        local newp; newp=$(find_new_primary)
        log "run $run: switchover rc=$rc in $(ms_between "$t0" "$t1") ms, new primary node${newp:-?}"
        [ -n "$newp" ] || { tail -n 20 "$RUNDIR/switchover.log" >&2; stop_writer; return 1; }
        wait_acked_for "$RUNDIR/acks" "$t1" 3 30 || log "run $run: writer not acked for 3 s within 30 s"
        stop_writer
        "$PY" "$HERE/analyze.py" --log "$RUNDIR/acks" --fault-ns "$t0" \
            --check-conninfo "$(multi_conninfo "${PORTS[$newp]}")" > "$RUNDIR/analysis.json" || return 1
        extra=$(printf '{"switchover_rc": %s, "command_ms": %s, "new_primary": "node%s"}' \
            "$rc" "$(ms_between "$t0" "$t1")" "$newp")
    fi
    "$PY" - "$RUNDIR/analysis.json" "$run" "$extra" > "$result" <<'EOF'
import json, sys
a = json.load(open(sys.argv[1]))
a.update(json.loads(sys.argv[3]))
a["run"] = int(sys.argv[2])
print(json.dumps(a, sort_keys=True))
EOF
    keep_run_logs "$run" "$RUNDIR"/*/*.log "$RUNDIR"/*/data/log/* "$RUNDIR/writer-errors" "$RUNDIR/switchover.log"
    return 0
}

main() {
    TMPRES=$(mktemp -d /tmp/compare-a-res.XXXX)
    trap 'cleanup_run; rm -rf "$TMPRES"' EXIT
    trap 'exit 130' INT TERM
    local start; start=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    local run
    for run in $(seq 1 "$RUNS"); do
        if ! one_run "$run" "$TMPRES/run$run.json"; then
            log "run $run failed; logs:"
            for f in "$RUNDIR"/*/*.log; do echo "== $f" >&2; tail -n 15 "$f" >&2; done
            echo '{"run": '"$run"', "note": "run failed (setup or harness)"}' > "$TMPRES/run$run.json"
        fi
        cat "$TMPRES/run$run.json" >&2
        cleanup_run
    done
    local fault="node crash: kill -9 pg_autoctl (supervisor + children) + postmaster of the primary; rejoin = restart of its pg_autoctl run 2 s after the new primary is seen"
    [ "$LINE" = switchover ] && fault="pg_autoctl perform switchover (issued with the monitor's --pgdata); unavailability from the command's start"
    "$PY" "$HERE/summarize.py" --out "$OUT" --meta "$("$PY" -c 'import json, sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
        tool "$PAF_VERSION" postgres "$PG_VERSION" setting "$SETTING" line "$LINE" fault "$fault" \
        started_utc "$start" monitor_settings "${MONITOR_SETTINGS:-}")" "$TMPRES"/run*.json
    log "wrote $OUT"
}
# everything above is only definitions: bash has read the whole file before main runs
main
exit
