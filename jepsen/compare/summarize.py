#!/usr/bin/python3
"""Collects per-run JSON objects (one per file, or the `{"run": ...}` lines of a script's output
with --from-log) into one results document with median/max summaries, and prints the summary.

Usage: python3 summarize.py --out FILE --meta '{"tool": ...}' (RUN.json ... | --from-log OUTPUT)
"""
import argparse
import json
import os
import platform
import statistics
import sys

KEYS = ("unavailability_ms", "lost", "rejoin_ms", "command_ms", "promotion_seen_ms_after_fault")


def summary(runs, key):
    v = [r[key] for r in runs if r.get(key) is not None]
    return {"median": statistics.median(v), "max": max(v), "min": min(v), "n": len(v)} if v else None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--meta", default="{}", help="JSON object merged into the document")
    p.add_argument("--from-log", help="read the run objects from a script's output")
    p.add_argument("files", nargs="*")
    a = p.parse_args()
    runs = []
    for f in a.files:
        with open(f) as fh:
            runs.append(json.load(fh))
    if a.from_log:
        with open(a.from_log) as fh:
            for line in fh:
                line = line.strip()
                if line.startswith('{"') and '"run":' in line:
                    runs.append(json.loads(line))
    runs.sort(key=lambda r: r["run"])
    doc = {"machine": "%s, %d cores" % (platform.platform(), os.cpu_count()), "runs": runs}
    doc.update(json.loads(a.meta))
    for k in KEYS:
        doc[k] = summary(runs, k)
    doc["runs_total"] = len(runs)
    doc["runs_failed_or_no_failover"] = sum(1 for r in runs if r.get("unavailability_ms") is None)
    with open(a.out, "w") as fh:
        json.dump(doc, fh, indent=1, sort_keys=True)
    short = {k: doc[k] for k in ("unavailability_ms", "lost", "rejoin_ms", "command_ms") if doc.get(k)}
    short["runs_total"] = doc["runs_total"]
    print(json.dumps(short))
    return 0


if __name__ == "__main__":
    sys.exit(main())
