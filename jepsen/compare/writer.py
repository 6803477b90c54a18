#!/usr/bin/python3
"""The client-side writer of the comparison, the same method as raftmgr's `bench-failover`.

One insert every 20 ms (`INSERT INTO writes(id, at) VALUES ($1, now())`, id increasing by one
per attempt) through a libpq multi-host conninfo that finds the primary by itself
(`target_session_attrs=read-write connect_timeout=1`). After any error the connection is dropped
and the next attempt (20 ms later) reconnects. An insert unanswered for 1 s counts as *unknown*
(not acknowledged) and the connection is dropped; a connect that takes more than 3 s in all is an
error (as in the Rust harness).

The 1 s limit is enforced on the client side (psycopg2 asynchronous mode + select), like the
Rust harness's `timeout(STATEMENT_TIMEOUT, ...)`, not with the server's `statement_timeout`:
a server-side cancel that fires while a commit waits for a synchronous standby makes PostgreSQL
*acknowledge* the commit with only a WARNING, so it would turn "unknown" into "acked".

Every ACKNOWLEDGED insert is logged as `id<TAB>ack_time_unix_ns` (flushed per line).
Errors go, one line each with a unix-ns time stamp, to --errors FILE when given.
Runs until SIGTERM/SIGINT.

Usage: python3 writer.py --conninfo '...' --log FILE [--errors FILE]
"""
import argparse
import select
import signal
import sys
import time

import psycopg2
import psycopg2.extensions

WRITE_INTERVAL = 0.020
STATEMENT_TIMEOUT = 1.0
CONNECT_TIMEOUT = 3.0
INSERT = "INSERT INTO writes(id, at) VALUES (%s, now())"
CREATE = "CREATE TABLE IF NOT EXISTS writes(id bigint PRIMARY KEY, at timestamptz)"

stop = False


def on_signal(_signo, _frame):
    global stop
    stop = True


class Timeout(Exception):
    pass


def wait(conn, deadline):
    """Drive an asynchronous psycopg2 connection until its operation is done or `deadline`."""
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout()
        if state == psycopg2.extensions.POLL_READ:
            select.select([conn.fileno()], [], [], left)
        elif state == psycopg2.extensions.POLL_WRITE:
            select.select([], [conn.fileno()], [], left)
        else:
            raise psycopg2.OperationalError("poll() returned %s" % state)


def close_quietly(conn):
    if conn is not None:
        try:
            conn.close()
        except Exception:
            pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conninfo", required=True)
    parser.add_argument("--log", required=True, help="acknowledged inserts: id<TAB>unix_ns")
    parser.add_argument("--errors", help="optional: errors, one per line, with unix_ns")
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    log = open(args.log, "a", buffering=1)
    errors = open(args.errors, "a", buffering=1) if args.errors else None
    table_ready = False
    conn = None
    cur = None
    node = None
    last_error = None

    def note(kind, msg):
        nonlocal last_error
        msg = " ".join(str(msg).split())
        if errors is not None and (kind, msg) != last_error:
            errors.write("%d\t%s\t%s\t%s\n" % (time.time_ns(), kind, node, msg))
        last_error = (kind, msg)

    next_id = 0
    while not stop:
        next_id += 1
        sent = time.monotonic()
        ok = False
        try:
            if conn is None:
                deadline = time.monotonic() + CONNECT_TIMEOUT
                c = psycopg2.connect(args.conninfo, async_=1)
                try:
                    wait(c, deadline)
                    cur = c.cursor()
                    cur.execute("SHOW port")
                    wait(c, deadline)
                    node = cur.fetchone()[0]
                    if not table_ready:
                        cur.execute(CREATE)
                        wait(c, deadline)
                        table_ready = True
                except BaseException:
                    close_quietly(c)
                    raise
                conn = c
                if errors is not None:
                    errors.write("%d\tconnected\t%s\t\n" % (time.time_ns(), node))
                last_error = None
            cur.execute(INSERT, (next_id,))
            wait(conn, time.monotonic() + STATEMENT_TIMEOUT)
            ack = time.time_ns()
            log.write("%d\t%d\n" % (next_id, ack))
            ok = True
        except Timeout:
            note("unknown" if conn is not None else "connect-timeout", "no answer in time")
        except Exception as e:  # psycopg2 errors, socket errors
            note("error", e)
        if ok:
            left = sent + WRITE_INTERVAL - time.monotonic()
            if left > 0:
                time.sleep(left)
        else:
            close_quietly(conn)
            conn = None
            cur = None
            time.sleep(WRITE_INTERVAL)
    close_quietly(conn)
    log.close()
    if errors is not None:
        errors.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
