#!/bin/bash
# Patroni 4.x + etcd on loopback: installs what it needs (idempotent), then measures.
#   jepsen/compare/patroni.sh setup                       # install only
#   jepsen/compare/patroni.sh failover   defaults|fastest [RUNS]
#   jepsen/compare/patroni.sh switchover defaults|fastest [RUNS] [patronictl|rest]
# Results: jepsen/compare/results/patroni-<scenario>[-rest]-<timings>-<date>.json
# PHASE=stratified|random (failover): the extra 0..loop_wait s before the fault is spread evenly
#   over the runs (default) or drawn at random (the first defaults line, 20261201T0246Z, used random).
# SYNC=1 sets Patroni's synchronous_mode: true (default off, as Patroni ships).
# KEEP_LOGS=/some/dir (outside /tmp) keeps every run's etcd/patroni/postgres/writer logs.
# Run as root; every PostgreSQL/Patroni/etcd process runs as the postgres OS user, and is ended by
# PID when the script exits (patroni.py's finally/trap). Ports: etcd 23790/23800, PostgreSQL
# 26401-26403, Patroni REST 26411-26413. Folders: /tmp/compare-b-* (removed at the end).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${COMPARE_VENV:-/opt/compare-venv}
PATRONI_SPEC=${PATRONI_SPEC:-patroni[etcd3]>=4,<5}

setup() {
    local need=()
    [ -x /usr/bin/etcd ] || need+=(etcd-server)
    command -v etcdctl >/dev/null || need+=(etcd-client)
    /usr/bin/python3 -c 'import psycopg2' 2>/dev/null || need+=(python3-psycopg2)
    /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
    [ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql-15)
    if [ ${#need[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    fi
    if [ ! -x "$VENV/bin/patroni" ]; then
        /usr/bin/python3 -m venv --system-site-packages "$VENV"
        "$VENV/bin/pip" install -q "$PATRONI_SPEC"
    fi
    # apt may have created (and started) a distribution cluster: it must not run during the runs.
    if command -v pg_lsclusters >/dev/null; then
        pg_lsclusters --no-header | while read -r ver name port status rest; do
            if [ "$status" = online ]; then pg_ctlcluster "$ver" "$name" stop; fi
        done
    fi
    # Debian's etcd package may have started its own etcd (no systemd here: init script).
    if [ -f /run/etcd.pid ] || [ -f /var/run/etcd.pid ]; then
        echo "note: a distribution etcd seems to be running; this script does not use it" >&2
    fi
    "$VENV/bin/patroni" --version
    /usr/bin/etcd --version | sed -n 1p  # not head -1: SIGPIPE + pipefail would end the script
}

case "${1:-}" in
    setup) setup ;;
    failover|switchover)
        setup >&2
        timings=${2:-defaults}
        runs=${3:-5}
        via=${4:-patronictl}
        tag=$1; [ "$1" = switchover ] && [ "$via" = rest ] && tag=switchover-rest
        sync=(); [ "${SYNC:-0}" = 1 ] && { sync=(--synchronous-mode); tag=$tag-sync; }
        mkdir -p "$HERE/results"
        out="$HERE/results/patroni-$tag-$timings-$(date -u +%Y%m%dT%H%MZ).json"
        COMPARE_VENV=$VENV /usr/bin/python3 "$HERE/patroni.py" "$1" --timings "$timings" --runs "$runs" \
            --via "$via" "${sync[@]}" --phase "${PHASE:-stratified}" --out "$out" ${KEEP_LOGS:+--keep-logs "$KEEP_LOGS"}
        echo "results: $out" >&2
        ;;
    *) sed -n '2,13p' "$0"; exit 2 ;;
esac
