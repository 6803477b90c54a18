#!/usr/bin/python3
"""Reads a writer.py log (`id<TAB>ack_unix_ns` per acknowledged insert) and prints JSON.

* unavailability_ms: the longest gap between consecutive acknowledged inserts from the last
  acknowledgement before the fault (--fault-ns) on; the same definition as raftmgr's
  `bench-failover`. null when nothing was acknowledged after the fault.
* last_ack_before_fault_ms_before: how long before the fault that last acknowledgement was.
* first_ack_after_fault_ms: from the fault to the first acknowledgement after it.
* gap_start_ms_after_fault: where the longest gap starts, relative to the fault (normally < 0).
* acked, acked_after_fault: counts.
* With --check-conninfo: reads `SELECT id FROM writes` there (the new primary) and reports
  lost = acked ids missing from it (lost_ids: the first 20 of them), and extra_rows = rows present
  that were never acknowledged (inserts whose outcome was unknown or whose answer was lost).

Usage: python3 analyze.py --log FILE --fault-ns N [--check-conninfo '...']
"""
import argparse
import json
import sys


def read_log(path):
    acks = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 2:
                continue  # a torn last line (the writer was killed mid-write)
            acks.append((int(parts[0]), int(parts[1])))
    acks.sort(key=lambda a: a[1])
    return acks


def analyze(acks, fault_ns):
    out = {"acked": len(acks)}
    before = [a for a in acks if a[1] <= fault_ns]
    after = [a for a in acks if a[1] > fault_ns]
    out["acked_after_fault"] = len(after)
    if before:
        out["last_ack_before_fault_ms_before"] = round((fault_ns - before[-1][1]) / 1e6, 1)
    else:
        out["last_ack_before_fault_ms_before"] = None
    if after:
        out["first_ack_after_fault_ms"] = round((after[0][1] - fault_ns) / 1e6, 1)
        out["last_ack_after_fault_ms"] = round((after[-1][1] - fault_ns) / 1e6, 1)
    else:
        out["first_ack_after_fault_ms"] = None
        out["last_ack_after_fault_ms"] = None
    if not before or not after:
        out["unavailability_ms"] = None
        out["gap_start_ms_after_fault"] = None
        return out
    series = [before[-1]] + after
    best = (0, None)
    for prev, cur in zip(series, series[1:]):
        gap = cur[1] - prev[1]
        if gap > best[0]:
            best = (gap, prev[1])
    out["unavailability_ms"] = round(best[0] / 1e6, 1)
    out["gap_start_ms_after_fault"] = round((best[1] - fault_ns) / 1e6, 1)
    return out


def check(acks, conninfo):
    import psycopg2

    conn = psycopg2.connect(conninfo)
    try:
        cur = conn.cursor()
        cur.execute("SELECT id FROM writes")
        present = {r[0] for r in cur.fetchall()}
        cur.execute("SELECT inet_server_port(), pg_is_in_recovery()")
        port, in_recovery = cur.fetchone()
    finally:
        conn.close()
    acked_ids = {a[0] for a in acks}
    lost = sorted(acked_ids - present)
    return {
        "checked_port": port,
        "checked_in_recovery": in_recovery,
        "rows": len(present),
        "lost": len(lost),
        "lost_ids": lost[:20],
        "extra_rows": len(present - acked_ids),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", required=True)
    parser.add_argument("--fault-ns", required=True, type=int)
    parser.add_argument("--check-conninfo")
    args = parser.parse_args()
    acks = read_log(args.log)
    out = analyze(acks, args.fault_ns)
    if args.check_conninfo:
        out.update(check(acks, args.check_conninfo))
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
