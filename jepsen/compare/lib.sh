# Shared bash helpers for the comparison scripts. Source it: . "$(dirname "$0")/lib.sh"
# Everything here is loopback-only and ends only processes by their PID.

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PY=${PY:-/usr/bin/python3}          # Debian's python (python3-psycopg2), not a pyenv shim
COMPARE_DIR=${COMPARE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}

log() { echo "[$(date -u +%H:%M:%S.%3N)] $*" >&2; }
die() { log "FATAL: $*"; exit 1; }
now_ns() { date +%s%N; }
# ms between two ns stamps, one decimal
ms_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) / 1e6 }'; }

as_pg() { runuser -u postgres -- "$@"; }

# wait_for SECONDS DESCRIPTION CMD...: polls CMD every 50 ms until it succeeds; 1 on deadline.
wait_for() {
    local secs=$1 desc=$2; shift 2
    local deadline=$(( $(date +%s%N) + secs * 1000000000 ))
    while ! "$@" >/dev/null 2>&1; do
        if (( $(date +%s%N) > deadline )); then
            log "timeout after ${secs}s waiting for: $desc"
            return 1
        fi
        sleep 0.05
    done
}

# psql_at PORT SQL: one value, unaligned, via TCP loopback, as postgres, 1 s connect timeout.
psql_at() {
    PGCONNECT_TIMEOUT=1 "$PGBIN/psql" -X -At -h 127.0.0.1 -p "$1" -U postgres -d postgres \
        -c "$2" 2>/dev/null
}

is_primary() { [ "$(psql_at "$1" 'SELECT pg_is_in_recovery()')" = "f" ]; }
is_standby() { [ "$(psql_at "$1" 'SELECT pg_is_in_recovery()')" = "t" ]; }
pg_up() { psql_at "$1" 'SELECT 1' | grep -q 1; }

# streaming_from PRIMARY_PORT APPLICATION_NAME: the primary's pg_stat_replication shows it streaming
streaming_from() {
    [ "$(psql_at "$1" "SELECT count(*) FROM pg_stat_replication WHERE application_name = '$2' AND state = 'streaming'")" = "1" ]
}

# postmaster_pid DATADIR: line 1 of postmaster.pid
postmaster_pid() { head -n1 "$1/postmaster.pid" 2>/dev/null; }

# multi_conninfo PORT...: the writer's conninfo naming every node on 127.0.0.1
multi_conninfo() {
    local hosts="" ports="" p
    for p in "$@"; do
        hosts="${hosts:+$hosts,}127.0.0.1"
        ports="${ports:+$ports,}$p"
    done
    echo "host=$hosts port=$ports dbname=postgres user=postgres target_session_attrs=read-write connect_timeout=1"
}

# start_writer CONNINFO LOGFILE [ERRFILE]: sets WRITER_PID
start_writer() {
    "$PY" "$COMPARE_DIR/writer.py" --conninfo "$1" --log "$2" ${3:+--errors "$3"} &
    WRITER_PID=$!
}

stop_writer() {
    if [ -n "${WRITER_PID:-}" ]; then
        kill -TERM "$WRITER_PID" 2>/dev/null || true
        wait "$WRITER_PID" 2>/dev/null || true
        WRITER_PID=
    fi
}

# acked_since LOGFILE NS: number of acks with time stamp > NS
acked_since() { awk -v t="$2" '$2 > t { n++ } END { print n + 0 }' "$1"; }
# last_ack_ns LOGFILE
last_ack_ns() { tail -n1 "$1" | awk '{ print $2 }'; }

# wait_acked_for LOGFILE FROM_NS SECONDS DEADLINE_S: waits until the writer has been acknowledged
# for SECONDS after FROM_NS (first ack after FROM_NS to latest ack >= SECONDS), with a deadline.
acked_span_ok() {
    awk -v t="$2" -v s="$3" '$2 > t { if (!f) f = $2; l = $2 } END { exit !(f && (l - f) >= s * 1e9) }' "$1"
}
wait_acked_for() { wait_for "$4" "writer acked for ${3}s after $2" acked_span_ok "$1" "$2" "$3"; }

# kill_pid PID [SIGNAL]: only a PID we know; never by name
kill_pid() { [ -n "$1" ] && kill "-${2:-9}" "$1" 2>/dev/null || true; }

# median/max of numbers on stdin (one a line), as "median max"
median_max() {
    sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) { print "null null"; exit }
        m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; print m, a[NR] }'
}

# find_new_primary: prints the index (2 or 3) of the standby whose PostgreSQL (on ${PORTS[i]})
# now answers as a primary, or fails
find_new_primary() {
    local i
    for i in 2 3; do
        if is_primary "${PORTS[$i]}"; then echo "$i"; return 0; fi
    done
    return 1
}

# keep_run_logs RUN FILE...: with KEEP_LOGS set, copies the FILEs that exist (paths under $RUNDIR)
# to $KEEP_LOGS/runRUN/, named by their path with / as _
# wait_new_primary SECS: prints the node id find_new_primary finds, polling every 50 ms; prints
# nothing after SECS.
wait_new_primary() {
    local deadline=$(( $(date +%s) + $1 )) newp
    until newp=$(find_new_primary); do
        if (( $(date +%s) > deadline )); then return 0; fi
        sleep 0.05
    done
    echo "$newp"
}

keep_run_logs() {
    local run=$1 f; shift
    [ -n "${KEEP_LOGS:-}" ] || return 0
    mkdir -p "$KEEP_LOGS/run$run"
    for f in "$@"; do
        [ -f "$f" ] && cp "$f" "$KEEP_LOGS/run$run/$(echo "${f#$RUNDIR/}" | tr / _)"
    done
    return 0
}

# remove_run_dir DATA_DIR...: stops each PostgreSQL still running in DATA_DIR (immediate mode),
# waits for the orphan backends of a kill -9'd postmaster to exit by themselves (found by this
# run's cluster_name, read only), then removes $RUNDIR.
remove_run_dir() {
    [ -n "$RUNDIR" ] && [ -d "$RUNDIR" ] || return 0
    local d
    for d in "$@"; do
        if [ -f "$d/postmaster.pid" ]; then
            as_pg "$PGBIN/pg_ctl" -D "$d" -m immediate -t 20 stop >/dev/null 2>&1
        fi
    done
    wait_for 20 "orphans of $RUNDIR gone" bash -c "! pgrep -u postgres -f 'cmpa-$(basename "$RUNDIR")-' >/dev/null"
    rm -rf "$RUNDIR"
}
