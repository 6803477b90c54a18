#!/bin/bash
# Self-test of writer.py/analyze.py against a throwaway single PostgreSQL on port 25400:
# kill -9 its postmaster, restart it 2 s later; expect ~2.1 s unavailability, lost 0.
set -u
. "$(dirname "$0")/lib.sh"
D=$(mktemp -d /tmp/compare-a-test.XXXX); chown postgres: $D
cleanup() { stop_writer; [ -f $D/data/postmaster.pid ] && as_pg $PGBIN/pg_ctl -D $D/data -m immediate stop >/dev/null 2>&1; rm -rf $D; }
trap cleanup EXIT
as_pg $PGBIN/initdb -D $D/data -A trust -U postgres >/dev/null || exit 1
cat >> $D/data/postgresql.conf <<C
port=25400
listen_addresses='127.0.0.1'
unix_socket_directories='$D'
C
as_pg $PGBIN/pg_ctl -D $D/data -l $D/pg.log -w start >/dev/null || exit 1
start_writer "$(multi_conninfo 25400 25401 25402)" $D/acks $D/errs
sleep 3
F=$(now_ns); kill_pid $(postmaster_pid $D/data) 9
log "killed"
sleep 2
# orphan backends? wait for them to exit
rm -f $D/data/postmaster.pid
as_pg $PGBIN/pg_ctl -D $D/data -l $D/pg.log -w start >/dev/null || { cat $D/pg.log; exit 1; }
wait_acked_for $D/acks $F 3 30 || exit 1
stop_writer
$PY "$COMPARE_DIR/analyze.py" --log $D/acks --fault-ns $F --check-conninfo "$(multi_conninfo 25400)"
head -n 5 $D/errs
