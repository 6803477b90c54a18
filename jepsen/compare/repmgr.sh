#!/bin/bash
# repmgr 5.3 (Debian postgresql-15-repmgr): node-crash failover of a 3-node cluster on loopback,
# measured from the client with writer.py/analyze.py (the method of raftmgr's bench-failover).
#
#   bash jepsen/compare/repmgr.sh --setting tuned|defaults [--runs N] [--rejoin]
#
# Each run: a fresh cluster in /tmp/compare-a-repmgr.XXXX (ports 25411-25413): node1 initdb +
# `repmgr primary register`; node2/node3 `repmgr standby clone` + `standby register`; repmgrd on
# all three (failover=automatic, promote_command/follow_command). The writer runs 3 s, then the
# fault: kill -9 of node1's repmgrd and of its postmaster, at once. The new primary is the first
# standby that answers pg_is_in_recovery() = false (polled every ~50 ms). The writer stops once it
# has been acknowledged for 3 s after that; analyze.py gives the unavailability and the lost
# acknowledged writes (checked on the new primary).
# --rejoin: then (>= 3 s after the promotion) times the hand procedure `CHECKPOINT` on the new
#   primary + `repmgr node rejoin --force-rewind` on node1, until the new primary's
#   pg_stat_replication shows node1 streaming (repmgr has no automatic rejoin). This line sets
#   wal_keep_size=512MB (see the trap in README: pg_rewind needs the WAL back to the last common
#   checkpoint, and the crash recovery pg_rewind runs first can recycle it).
# --line switchover: no fault; `repmgr standby switchover --siblings-follow` issued on node2
#   after the 3 s warm-up. It needs passwordless SSH between the nodes: the script starts a
#   private sshd on 127.0.0.1:25499 (own host key, own authorized_keys, AllowUsers postgres) for
#   the whole invocation and gives repmgr ssh_options with a key under /tmp/compare-a-ssh.*.
# Results: jepsen/compare/results/repmgr-<setting>-<UTC date>.json (raw per-run values).
set -u -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"

SETTING=tuned RUNS=5 REJOIN=0 LINE=failover OUT=
while [ $# -gt 0 ]; do
    case $1 in
        --setting) SETTING=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --rejoin) REJOIN=1; shift ;;
        --line) LINE=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) die "unknown argument $1" ;;
    esac
done
case $SETTING in
    tuned) TIMING="monitor_interval_secs=1
reconnect_attempts=2
reconnect_interval=1" ;;
    defaults) TIMING="# repmgr defaults: monitor_interval_secs=2 reconnect_attempts=6 reconnect_interval=10" ;;
    *) die "--setting tuned|defaults" ;;
esac
case $LINE in failover|switchover) ;; *) die "--line failover|switchover" ;; esac
if [ "$LINE" = switchover ]; then
    NAME=repmgr-switchover-$SETTING
elif [ "$REJOIN" = 1 ]; then
    NAME=repmgr-$SETTING-rejoin
else
    NAME=repmgr-$SETTING
fi
OUT=${OUT:-$HERE/results/$NAME-$(date -u +%Y%m%dT%H%MZ).json}
mkdir -p "$(dirname "$OUT")"

# --- install (idempotent) -------------------------------------------------------------------
if ! [ -x "$PGBIN/repmgr" ] || ! "$PY" -c 'import psycopg2' 2>/dev/null || ! [ -x /usr/sbin/sshd ]; then
    # openssh-server only for --line switchover; Debian's policy-rc.d or the absence of systemd
    # keeps it from starting as a service (the script starts its own sshd when needed)
    apt-get install -y -q postgresql-15-repmgr python3-psycopg2 openssh-server openssh-client >/dev/null \
        || die "apt-get install failed"
fi
# the Debian packages must not leave a distribution cluster running
if pg_lsclusters -h 2>/dev/null | awk '$4 == "online"' | grep -q .; then
    die "a Debian cluster is online (pg_lsclusters); stop it with pg_ctlcluster 15 main stop"
fi
REPMGR_VERSION=$(as_pg "$PGBIN/repmgr" --version)
PG_VERSION=$("$PGBIN/postgres" --version)

PORTS=(0 25411 25412 25413)
NODES=(1 2 3)
RUNDIR=
REPMGRD_PIDS=()
WRITER_PID=

# --- cleanup on every exit path ----------------------------------------------------------------
cleanup_run() {
    stop_writer
    local i pid
    for i in "${NODES[@]}"; do
        pid=${REPMGRD_PIDS[$i]:-}
        if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null; fi
    done
    for i in "${NODES[@]}"; do
        pid=${REPMGRD_PIDS[$i]:-}
        if [ -n "$pid" ]; then wait "$pid" 2>/dev/null; fi
        REPMGRD_PIDS[$i]=
    done
    remove_run_dir "$RUNDIR"/node*/data
    RUNDIR=
}
trap 'cleanup_run' EXIT
trap 'exit 130' INT TERM

node_conf() { echo "$RUNDIR/node$1/repmgr.conf"; }
data_of() { echo "$RUNDIR/node$1/data"; }

write_repmgr_conf() {
    local i=$1
    cat > "$(node_conf "$i")" <<EOF
node_id=$i
node_name='node$i'
conninfo='host=127.0.0.1 port=${PORTS[$i]} user=postgres dbname=repmgr connect_timeout=2'
data_directory='$(data_of "$i")'
pg_bindir='$PGBIN'
log_file='$RUNDIR/node$i/repmgrd.log'
repmgrd_pid_file='$RUNDIR/node$i/repmgrd.pid'
log_level=INFO
failover=automatic
promote_command='$PGBIN/repmgr standby promote -f $(node_conf "$i") --log-to-file'
follow_command='$PGBIN/repmgr standby follow -f $(node_conf "$i") --log-to-file --upstream-node-id=%n'
service_start_command='$PGBIN/pg_ctl -D $(data_of "$i") -l $RUNDIR/node$i/pg.log -w start'
service_stop_command='$PGBIN/pg_ctl -D $(data_of "$i") -m fast -w stop'
service_restart_command='$PGBIN/pg_ctl -D $(data_of "$i") -l $RUNDIR/node$i/pg.log -m fast -w restart'
$TIMING
${SSH_OPTIONS:+ssh_options='$SSH_OPTIONS'}
EOF
    # node-specific PostgreSQL settings live outside the data directory, so that neither
    # standby clone nor pg_rewind copies node1's port over them
    cat > "$RUNDIR/node$i/node.conf" <<EOF
port=${PORTS[$i]}
unix_socket_directories='$RUNDIR/node$i'
cluster_name='cmpa-$(basename "$RUNDIR")-node$i'
EOF
    chown postgres: "$(node_conf "$i")" "$RUNDIR/node$i/node.conf"
}

start_pg() { as_pg "$PGBIN/pg_ctl" -D "$(data_of "$1")" -l "$RUNDIR/node$1/pg.log" -w -t 60 start >/dev/null; }

start_repmgrd() {
    local i=$1
    # setpriv execs (no fork), so $! is repmgrd's own PID
    setpriv --reuid=postgres --regid=postgres --init-groups env HOME="$RUNDIR" \
        "$PGBIN/repmgrd" -f "$(node_conf "$i")" --daemonize=false \
        >>"$RUNDIR/node$i/repmgrd.out" 2>&1 &
    REPMGRD_PIDS[$i]=$!
}

SSHDIR= SSHD_PID= SSH_OPTIONS=
start_sshd() {
    SSHDIR=$(mktemp -d /tmp/compare-a-ssh.XXXX)
    chmod 0755 "$SSHDIR"
    ssh-keygen -q -t ed25519 -N '' -f "$SSHDIR/host_key" || return 1
    ssh-keygen -q -t ed25519 -N '' -f "$SSHDIR/pg_key" -C compare-a || return 1
    cp "$SSHDIR/pg_key.pub" "$SSHDIR/authorized_keys"
    chown postgres: "$SSHDIR/pg_key" "$SSHDIR/pg_key.pub" "$SSHDIR/authorized_keys"
    chmod 0600 "$SSHDIR/pg_key"
    # UsePAM yes: Debian's postgres account is locked (no password), which sshd refuses with
    # UsePAM no even for key logins
    cat > "$SSHDIR/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port 25499
HostKey $SSHDIR/host_key
PidFile $SSHDIR/sshd.pid
AuthorizedKeysFile $SSHDIR/authorized_keys
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM yes
AllowUsers postgres
PermitRootLogin no
EOF
    mkdir -p /run/sshd && chmod 0755 /run/sshd
    /usr/sbin/sshd -D -e -f "$SSHDIR/sshd_config" >"$SSHDIR/sshd.log" 2>&1 &
    SSHD_PID=$!
    SSH_OPTIONS="-q -p 25499 -i $SSHDIR/pg_key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o ConnectTimeout=10"
    wait_for 10 "ssh to postgres@127.0.0.1:25499" as_pg ssh $SSH_OPTIONS 127.0.0.1 true
}
stop_sshd() {
    if [ -n "$SSHD_PID" ]; then kill -TERM "$SSHD_PID" 2>/dev/null; wait "$SSHD_PID" 2>/dev/null; SSHD_PID=; fi
    if [ -n "$SSHDIR" ]; then rm -rf "$SSHDIR"; SSHDIR=; fi
}

build_cluster() {
    RUNDIR=$(mktemp -d /tmp/compare-a-repmgr.XXXX)
    chmod 0755 "$RUNDIR"
    local i
    for i in "${NODES[@]}"; do
        mkdir -p "$RUNDIR/node$i"
        write_repmgr_conf "$i"
    done
    chown -R postgres: "$RUNDIR"
    as_pg "$PGBIN/initdb" -D "$(data_of 1)" -A trust -U postgres >"$RUNDIR/node1/initdb.log" 2>&1 || return 1
    cat >> "$(data_of 1)/postgresql.conf" <<EOF
listen_addresses='127.0.0.1'
shared_preload_libraries='repmgr'
wal_level=replica
max_wal_senders=10
max_replication_slots=10
hot_standby=on
$([ "$REJOIN" = 1 ] && echo "wal_keep_size='512MB'")
wal_log_hints=on
include_if_exists='../node.conf'
EOF
    start_pg 1 || return 1
    as_pg "$PGBIN/createdb" -h 127.0.0.1 -p "${PORTS[1]}" -U postgres repmgr || return 1
    as_pg "$PGBIN/repmgr" -f "$(node_conf 1)" primary register >>"$RUNDIR/node1/setup.log" 2>&1 || return 1
    for i in 2 3; do
        as_pg "$PGBIN/repmgr" -h 127.0.0.1 -p "${PORTS[1]}" -U postgres -d repmgr -f "$(node_conf "$i")" \
            standby clone --fast-checkpoint >>"$RUNDIR/node$i/setup.log" 2>&1 || { cat "$RUNDIR/node$i/setup.log" >&2; return 1; }
        start_pg "$i" || return 1
        wait_for 30 "node$i streaming" streaming_from "${PORTS[1]}" "node$i" || return 1
        as_pg "$PGBIN/repmgr" -f "$(node_conf "$i")" standby register >>"$RUNDIR/node$i/setup.log" 2>&1 \
            || { cat "$RUNDIR/node$i/setup.log" >&2; return 1; }
    done
    for i in "${NODES[@]}"; do start_repmgrd "$i"; done
    wait_for 30 "repmgrd node1 monitoring" grep -q 'monitoring cluster primary' "$RUNDIR/node1/repmgrd.log" || return 1
    for i in 2 3; do
        wait_for 30 "repmgrd node$i monitoring" grep -q 'monitoring connection to upstream node' "$RUNDIR/node$i/repmgrd.log" || return 1
    done
}

switchover_run() {
    local run=$1 result=$2
    local t0; t0=$(now_ns)
    as_pg "$PGBIN/repmgr" -f "$(node_conf 2)" standby switchover --siblings-follow \
        >"$RUNDIR/node2/switchover.log" 2>&1
    local rc=$? t1; t1=$(now_ns)
    log "run $run: switchover rc=$rc in $(ms_between "$t0" "$t1") ms"
    if ! wait_for 10 "node2 primary" is_primary "${PORTS[2]}"; then
        tail -n 30 "$RUNDIR/node2/switchover.log" >&2
        stop_writer
        return 1
    fi
    local old_ms=null
    if wait_for 60 "node1 streaming from node2" streaming_from "${PORTS[2]}" node1; then
        old_ms=$(ms_between "$t0" "$(now_ns)")
    fi
    wait_acked_for "$RUNDIR/acks" "$t1" 3 30 || log "run $run: writer not acked for 3 s within 30 s"
    stop_writer
    "$PY" "$HERE/analyze.py" --log "$RUNDIR/acks" --fault-ns "$t0" \
        --check-conninfo "$(multi_conninfo "${PORTS[2]}")" > "$RUNDIR/analysis.json" || return 1
    "$PY" - "$RUNDIR/analysis.json" "$run" "$rc" "$(ms_between "$t0" "$t1")" "$old_ms" > "$result" <<'EOF'
import json, sys
a = json.load(open(sys.argv[1]))
a.update({"run": int(sys.argv[2]), "switchover_rc": int(sys.argv[3]), "command_ms": float(sys.argv[4]),
          "old_primary_streaming_ms_after_command": json.loads(sys.argv[5]), "new_primary": "node2"})
print(json.dumps(a, sort_keys=True))
EOF
    [ "$rc" = 0 ] || tail -n 30 "$RUNDIR/node2/switchover.log" >&2
    return 0
}

one_run() {
    local run=$1 result=$2
    build_cluster || { log "run $run: cluster setup failed"; return 1; }
    local conninfo; conninfo=$(multi_conninfo "${PORTS[1]}" "${PORTS[2]}" "${PORTS[3]}")
    start_writer "$conninfo" "$RUNDIR/acks" "$RUNDIR/writer-errors"
    wait_for 10 "first ack" test -s "$RUNDIR/acks" || return 1
    sleep 3   # warm-up: the writer runs 3 s before the fault
    if [ "$LINE" = switchover ]; then
        switchover_run "$run" "$result"
        return
    fi
    local pm; pm=$(postmaster_pid "$(data_of 1)")
    local fault; fault=$(now_ns)
    kill -9 "${REPMGRD_PIDS[1]}" "$pm"
    REPMGRD_PIDS[1]=
    log "run $run: fault at $fault (killed repmgrd and postmaster $pm of node1)"
    local newp; newp=$(wait_new_primary 180)
    local promoted; promoted=$(now_ns)
    if [ -z "$newp" ]; then
        stop_writer
        log "run $run: no failover within 180 s"
        echo '{"run": '"$run"', "failover": false, "note": "no failover within 180 s"}' > "$result"
        return 0
    fi
    log "run $run: node$newp is primary, $(ms_between "$fault" "$promoted") ms after the fault"
    wait_acked_for "$RUNDIR/acks" "$promoted" 3 30 || log "run $run: writer not acked for 3 s within 30 s"
    stop_writer
    "$PY" "$HERE/analyze.py" --log "$RUNDIR/acks" --fault-ns "$fault" \
        --check-conninfo "$(multi_conninfo "${PORTS[$newp]}")" > "$RUNDIR/analysis.json" || return 1
    local rejoin_ms=null rejoin_rc=null
    if [ "$REJOIN" = 1 ]; then
        # the kill -9'd node's orphan backends must be gone before pg_rewind starts it
        wait_for 20 "node1 orphans gone" bash -c "! pgrep -u postgres -f 'cmpa-$(basename "$RUNDIR")-node1' >/dev/null"
        local t0; t0=$(now_ns)
        # Trap: right after promotion the new primary's control file still names the old timeline
        # until its (spread) end-of-promotion checkpoint completes, so pg_rewind reports "no rewind
        # required" and node1 cannot follow (timeline 2 forked before its recovery point). Patroni
        # issues a CHECKPOINT before pg_rewind; the hand procedure here does the same.
        psql_at "${PORTS[$newp]}" 'CHECKPOINT' >/dev/null
        as_pg "$PGBIN/repmgr" -f "$(node_conf 1)" node rejoin --force-rewind \
            -d "host=127.0.0.1 port=${PORTS[$newp]} user=postgres dbname=repmgr" \
            >"$RUNDIR/node1/rejoin.log" 2>&1
        rejoin_rc=$?
        if wait_for 60 "node1 streaming from node$newp" streaming_from "${PORTS[$newp]}" node1; then
            rejoin_ms=$(ms_between "$t0" "$(now_ns)")
        fi
        log "run $run: rejoin rc=$rejoin_rc, ${rejoin_ms} ms"
        [ "$rejoin_rc" = 0 ] || tail -n 20 "$RUNDIR/node1/rejoin.log" >&2
    fi
    "$PY" - "$RUNDIR/analysis.json" "$run" "$newp" "$fault" "$promoted" "$rejoin_ms" "$rejoin_rc" > "$result" <<'EOF'
import json, sys
a = json.load(open(sys.argv[1]))
a.update({"run": int(sys.argv[2]), "failover": True, "new_primary": "node" + sys.argv[3],
          "promotion_seen_ms_after_fault": round((int(sys.argv[5]) - int(sys.argv[4])) / 1e6, 1),
          "rejoin_ms": json.loads(sys.argv[6]), "rejoin_rc": json.loads(sys.argv[7])})
print(json.dumps(a, sort_keys=True))
EOF
    keep_run_logs "$run" "$RUNDIR"/node*/*.log "$RUNDIR"/node*/data/log/* "$RUNDIR/writer-errors"
    return 0
}

main() {
    TMPRES=$(mktemp -d /tmp/compare-a-res.XXXX)
    trap 'cleanup_run; stop_sshd; rm -rf "$TMPRES"' EXIT
    if [ "$LINE" = switchover ]; then start_sshd || die "could not start the private sshd"; fi
    local start; start=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    local run
    for run in $(seq 1 "$RUNS"); do
        if ! one_run "$run" "$TMPRES/run$run.json"; then
            log "run $run failed; logs:"
            for f in "$RUNDIR"/node*/*.log; do echo "== $f" >&2; tail -n 15 "$f" >&2; done
            echo '{"run": '"$run"', "failover": false, "note": "run failed (setup or harness)"}' > "$TMPRES/run$run.json"
        fi
        cat "$TMPRES/run$run.json" >&2
        cleanup_run
    done
    local timing; timing=$(echo "$TIMING" | tr '\n' ' ')
    "$PY" "$HERE/summarize.py" --out "$OUT" --meta "$("$PY" -c 'import json, sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
        tool "$REPMGR_VERSION" postgres "$PG_VERSION" setting "$SETTING" repmgr_settings "$timing" \
        line "$LINE" fault "$([ "$LINE" = switchover ] && echo 'repmgr standby switchover --siblings-follow on node2 (unavailability from the command start)' || echo 'node crash: kill -9 repmgrd + postmaster of the primary')" started_utc "$start" \
        rejoin "$([ "$REJOIN" = 1 ] && echo 'hand command: CHECKPOINT on the new primary, then repmgr node rejoin --force-rewind; timed from the CHECKPOINT until node1 streams' || echo 'not measured in this line')")" \
        "$TMPRES"/run*.json
    log "wrote $OUT"
}
# everything above is only definitions: bash has read the whole file before main runs
main
exit
