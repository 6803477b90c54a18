#!/usr/bin/python3
"""Patroni 4.x + etcd: node-crash failover, automatic rejoin and switchover, measured from the
client side with the shared writer (writer.py) and analyzer (analyze.py).

Run through patroni.sh (which installs Patroni into /opt/compare-venv and etcd-server with apt).
Every run builds a fresh cluster on loopback: one etcd member (client 23790, peer 23800) and three
Patroni nodes (PostgreSQL on 26401-26403, REST API on 26411-26413), all processes started by this
script as the `postgres` OS user, all files under one /tmp/compare-b-* folder that is removed at
the end. Only processes this script started are ended, by PID.

  patroni.py failover   --timings defaults|fastest --runs N --out FILE.json
  patroni.py switchover --timings defaults|fastest --runs N --out FILE.json
"""
import argparse
import datetime
import json
import os
import pwd
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import psycopg2

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.environ.get("COMPARE_VENV", "/opt/compare-venv")
PATRONI = os.path.join(VENV, "bin", "patroni")
PATRONICTL = os.path.join(VENV, "bin", "patronictl")
PGBIN = "/usr/lib/postgresql/15/bin"
PY = "/usr/bin/python3"
ETCD = "/usr/bin/etcd"
ETCD_CLIENT = 23790
ETCD_PEER = 23800
PG_PORTS = [26401, 26402, 26403]
API_PORTS = [26411, 26412, 26413]
NAMES = ["node1", "node2", "node3"]
SCOPE = "compare-b"

TIMINGS = {
    # Patroni's own defaults (patroni/config.py __DEFAULT_CONFIG).
    "defaults": {"ttl": 30, "loop_wait": 10, "retry_timeout": 10},
    # The lowest values Patroni accepts: ttl >= 20, loop_wait >= 1, retry_timeout >= 3 (lower
    # values are raised to these with a warning, see _validate_and_adjust_timeouts), and
    # loop_wait + 2 * retry_timeout <= ttl holds.
    "fastest": {"ttl": 20, "loop_wait": 1, "retry_timeout": 3},
}

WARM_UP = 3.0
WRITES_AFTER_PROMOTION = 3.0
RESTART_DELAY = 2.0
PROMOTION_TIMEOUT = 90.0
REJOIN_TIMEOUT = 120.0
SETUP_TIMEOUT = 90.0
POLL = 0.05

PG = pwd.getpwnam("postgres")


def log(msg):
    sys.stderr.write("[%s] %s\n" % (datetime.datetime.utcnow().strftime("%H:%M:%S.%f")[:-3], msg))
    sys.stderr.flush()


def wait_for(desc, secs, fn, poll=POLL):
    deadline = time.monotonic() + secs
    while True:
        try:
            v = fn()
            if v:
                return v
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("timeout after %.0f s waiting for: %s" % (secs, desc))
        time.sleep(poll)


def as_postgres():
    os.setgid(PG.pw_gid)
    os.setgroups([])
    os.setuid(PG.pw_uid)


def pg_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(HOME=PG.pw_dir, USER="postgres", LOGNAME="postgres", LC_ALL="C.UTF-8",
               PATH=os.path.join(VENV, "bin") + ":" + PGBIN + ":/usr/bin:/bin")
    return env


def sql(port, query, timeout=1):
    conn = psycopg2.connect(host="127.0.0.1", port=port, dbname="postgres", user="postgres",
                            connect_timeout=timeout)
    try:
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute(query)
        return cur.fetchall()
    finally:
        conn.close()


def is_primary(port):
    return sql(port, "SELECT pg_is_in_recovery()")[0][0] is False


def http(method, port, path, body=None, timeout=2):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def conninfo():
    return ("host=%s port=%s dbname=postgres user=postgres target_session_attrs=read-write "
            "connect_timeout=1" % (",".join(["127.0.0.1"] * 3), ",".join(map(str, PG_PORTS))))


def versions():
    out = {}
    for key, cmd in (("patroni", [PATRONI, "--version"]), ("etcd", [ETCD, "--version"]),
                     ("postgres", [PGBIN + "/postgres", "--version"])):
        try:
            out[key] = subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except Exception as e:  # noqa
            out[key] = "unknown (%s)" % e
    return out


class Cluster:
    """One etcd member and three Patroni nodes under one /tmp/compare-b-* folder."""

    def __init__(self, timings, keep_logs=None, sync=False):
        self.timings = timings
        self.sync = sync
        self.keep_logs = keep_logs
        self.dir = tempfile.mkdtemp(prefix="compare-b-", dir="/tmp")
        os.chown(self.dir, PG.pw_uid, PG.pw_gid)
        self.etcd = None
        self.patroni = [None, None, None]
        self.logs = []
        self.writer = None

    # --- files -----------------------------------------------------------------------------
    def path(self, *p):
        return os.path.join(self.dir, *p)

    def data_dir(self, i):
        return self.path(NAMES[i], "data")

    def cfg(self, i):
        return self.path(NAMES[i] + ".yml")

    def write_config(self, i):
        os.makedirs(self.path(NAMES[i], "sock"), exist_ok=True)
        t = self.timings
        cfg = """scope: {scope}
namespace: /compare-b/
name: {name}
log:
  level: INFO
restapi:
  listen: 127.0.0.1:{api}
  connect_address: 127.0.0.1:{api}
etcd3:
  hosts: 127.0.0.1:{etcd}
bootstrap:
  dcs:
    ttl: {ttl}
    loop_wait: {loop_wait}
    retry_timeout: {retry_timeout}
    synchronous_mode: {sync}
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: replica
        hot_standby: "on"
        max_wal_senders: 10
        max_replication_slots: 10
        wal_keep_size: 256MB
        wal_log_hints: "on"
  initdb:
    - encoding: UTF8
    - locale: C.UTF-8
postgresql:
  listen: 127.0.0.1:{port}
  connect_address: 127.0.0.1:{port}
  data_dir: {data}
  bin_dir: {pgbin}
  pgpass: {dir}/{name}.pgpass
  remove_data_directory_on_rewind_failure: true
  remove_data_directory_on_diverged_timelines: true
  authentication:
    superuser:
      username: postgres
    replication:
      username: replicator
    rewind:
      username: postgres
  parameters:
    unix_socket_directories: {dir}/{name}/sock
    logging_collector: "off"
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 trust
    - host replication all 127.0.0.1/32 trust
tags:
  nofailover: false
  noloadbalance: false
  clonefrom: false
""".format(scope=SCOPE, name=NAMES[i], api=API_PORTS[i], etcd=ETCD_CLIENT, port=PG_PORTS[i],
           data=self.data_dir(i), pgbin=PGBIN, dir=self.dir,
           sync="true" if self.sync else "false", **t)
        with open(self.cfg(i), "w") as f:
            f.write(cfg)
        for p in (self.cfg(i), self.path(NAMES[i]), self.path(NAMES[i], "sock")):
            os.chown(p, PG.pw_uid, PG.pw_gid)
        os.chmod(self.path(NAMES[i], "sock"), 0o700)

    # --- processes ---------------------------------------------------------------------------
    def spawn(self, name, argv):
        logf = open(self.path(name + ".log"), "ab")
        os.chown(logf.name, PG.pw_uid, PG.pw_gid)
        self.logs.append(logf)
        return subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=as_postgres, env=pg_env(), cwd=self.dir)

    def start_etcd(self):
        os.makedirs(self.path("etcd"), mode=0o700)
        os.chown(self.path("etcd"), PG.pw_uid, PG.pw_gid)
        self.etcd = self.spawn("etcd", [
            ETCD, "--name", "e1", "--data-dir", self.path("etcd"),
            "--listen-client-urls", "http://127.0.0.1:%d" % ETCD_CLIENT,
            "--advertise-client-urls", "http://127.0.0.1:%d" % ETCD_CLIENT,
            "--listen-peer-urls", "http://127.0.0.1:%d" % ETCD_PEER,
            "--initial-advertise-peer-urls", "http://127.0.0.1:%d" % ETCD_PEER,
            "--initial-cluster", "e1=http://127.0.0.1:%d" % ETCD_PEER,
            "--initial-cluster-state", "new", "--initial-cluster-token", "compare-b"])
        wait_for("etcd health", 30, lambda: http("GET", ETCD_CLIENT, "/health")[0] == 200)

    def start_patroni(self, i):
        self.patroni[i] = self.spawn(NAMES[i], [PATRONI, self.cfg(i)])
        return self.patroni[i]

    def postmaster_pid(self, i):
        try:
            with open(os.path.join(self.data_dir(i), "postmaster.pid")) as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def start(self):
        self.start_etcd()
        for i in range(3):
            self.write_config(i)
        # node1 bootstraps alone so it is the primary; then the two replicas clone from it.
        self.start_patroni(0)
        wait_for("node1 primary", SETUP_TIMEOUT, lambda: is_primary(PG_PORTS[0]))
        self.start_patroni(1)
        self.start_patroni(2)
        wait_for("node2 and node3 streaming from node1", SETUP_TIMEOUT,
                 lambda: self.streaming(0, [1, 2]))
        # Patroni's own view: one leader, two streaming replicas.
        wait_for("patroni sees 2 streaming replicas", SETUP_TIMEOUT, self.patroni_view_ok)

    def streaming(self, primary, others):
        rows = sql(PG_PORTS[primary], "SELECT application_name FROM pg_stat_replication "
                                      "WHERE state = 'streaming'")
        names = {r[0] for r in rows}
        return all(NAMES[o] in names for o in others)

    def patroni_view_ok(self):
        code, body = http("GET", API_PORTS[0], "/cluster")
        if code != 200:
            return False
        members = json.loads(body)["members"]
        roles = sorted((m["role"], m["state"]) for m in members)
        if self.sync:  # one synchronous standby (synchronous_node_count 1), chosen by the leader
            return roles == [("leader", "running"), ("replica", "streaming"), ("sync_standby", "streaming")]
        return roles == [("leader", "running"), ("replica", "streaming"), ("replica", "streaming")]

    def start_writer(self, logname):
        self.writer_log = self.path(logname)
        self.writer_err = self.path(logname + ".errors")
        self.writer = subprocess.Popen([PY, os.path.join(HERE, "writer.py"), "--conninfo", conninfo(),
                                        "--log", self.writer_log, "--errors", self.writer_err],
                                       stdin=subprocess.DEVNULL)
        return self.writer

    def stop_writer(self):
        if self.writer is not None and self.writer.poll() is None:
            self.writer.send_signal(signal.SIGTERM)
            try:
                self.writer.wait(10)
            except subprocess.TimeoutExpired:
                self.writer.kill()
                self.writer.wait()
        self.writer = None

    def acks(self):
        out = []
        try:
            with open(self.writer_log) as f:
                for line in f:
                    p = line.split()
                    if len(p) == 2:
                        out.append((int(p[0]), int(p[1])))
        except OSError:
            pass
        return out

    def acked_for_since(self, since_ns, secs):
        a = [t for _, t in self.acks() if t > since_ns]
        return bool(a) and (a[-1] - a[0]) >= secs * 1e9

    def grep_log(self, i, needles):
        try:
            with open(self.path(NAMES[i] + ".log"), errors="replace") as f:
                text = f.read()
        except OSError:
            return {}
        return {n: (n in text) for n in needles}

    def stop(self):
        """Ends everything this cluster started, by PID; removes the folder."""
        self.stop_writer()
        pms = [self.postmaster_pid(i) for i in range(3)]
        for p in self.patroni:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)  # patroni stops its postgres (fast) and exits
        deadline = time.monotonic() + 30
        for p in self.patroni:
            if p is None:
                continue
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # Any postmaster still alive (e.g. one whose patroni had been killed): fast stop, then -9.
        for i, pid in enumerate(pms + [self.postmaster_pid(i) for i in range(3)]):
            if pid and pid_alive(pid) and is_our_postmaster(pid, self.dir):
                try:
                    os.kill(pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for pid in set(pms + [self.postmaster_pid(i) for i in range(3)]):
            while pid and pid_alive(pid) and is_our_postmaster(pid, self.dir) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid and pid_alive(pid) and is_our_postmaster(pid, self.dir):
                os.kill(pid, signal.SIGKILL)
        if self.etcd is not None and self.etcd.poll() is None:
            self.etcd.send_signal(signal.SIGTERM)
            try:
                self.etcd.wait(10)
            except subprocess.TimeoutExpired:
                self.etcd.kill()
                self.etcd.wait()
        for f in self.logs:
            f.close()
        if self.keep_logs:
            os.makedirs(self.keep_logs, exist_ok=True)
            for name in os.listdir(self.dir):
                if name.endswith(".log") or name.endswith(".errors"):
                    shutil.copy(self.path(name), os.path.join(self.keep_logs, name))
        shutil.rmtree(self.dir, ignore_errors=True)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def is_our_postmaster(pid, folder):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return folder.encode() in f.read()
    except OSError:
        return False


def analyze(log_path, fault_ns, check_port=None):
    cmd = [PY, os.path.join(HERE, "analyze.py"), "--log", log_path, "--fault-ns", str(fault_ns)]
    if check_port:
        cmd += ["--check-conninfo", "host=127.0.0.1 port=%d dbname=postgres user=postgres "
                "connect_timeout=2" % check_port]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError("analyze.py failed: " + r.stderr)
    return json.loads(r.stdout)


def new_primary_among(candidates):
    for i in candidates:
        try:
            if is_primary(PG_PORTS[i]):
                return i
        except Exception:
            pass
    return None


def wait_rejoin(new, old, start_ns, timeout):
    """Polls (50 ms) the new primary's pg_stat_replication until `old` streams; ms from start_ns."""
    conn = psycopg2.connect(host="127.0.0.1", port=PG_PORTS[new], dbname="postgres", user="postgres",
                            connect_timeout=2)
    conn.autocommit = True
    try:
        cur = conn.cursor()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cur.execute("SELECT count(*) FROM pg_stat_replication WHERE application_name = %s "
                        "AND state = 'streaming'", (NAMES[old],))
            if cur.fetchone()[0] == 1:
                return (time.time_ns() - start_ns) / 1e6
            time.sleep(POLL)
        return None
    finally:
        conn.close()


def leader_key_age(logfile, fault_ns):
    """Seconds between the old leader's last "the leader with the lock" log line (written once per
    HA loop, right after it renewed the leader key) and the fault; None if not found."""
    last = None
    try:
        with open(logfile, errors="replace") as f:
            for line in f:
                if "the leader with the lock" not in line:
                    continue
                try:
                    t = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                except ValueError:
                    continue
                ns = int(t.replace(tzinfo=datetime.timezone.utc).timestamp() * 1e9)
                if ns <= fault_ns:
                    last = ns
    except OSError:
        return None
    return None if last is None else round((fault_ns - last) / 1e9, 2)


def run_failover(timings, n, keep_logs, sync=False, runs=1, phase="stratified"):
    c = Cluster(TIMINGS[timings], keep_logs, sync)
    res = {"run": n}
    try:
        t0 = time.monotonic()
        c.start()
        res["setup_s"] = round(time.monotonic() - t0, 1)
        c.start_writer("writer.log")
        wait_for("writer acked for %.0f s" % WARM_UP, 30, lambda: c.acked_for_since(0, WARM_UP))
        # The leader renews its key once per loop_wait; a random extra wait of 0..loop_wait s puts
        # the fault at a random phase of that loop (otherwise the near-constant setup time could
        # pin it to one phase and bias the result).
        # "stratified": run n of N waits (n - 0.5) / N * loop_wait, so the N runs sample the loop's
        # phase evenly; "random": uniform in [0, loop_wait).
        lw = TIMINGS[timings]["loop_wait"]
        if phase == "stratified":
            res["jitter_s"] = round((n - 0.5) / runs * lw, 2)
        else:
            res["jitter_s"] = round(random.uniform(0, lw), 2)
        res["phase"] = phase
        time.sleep(res["jitter_s"])
        old = 0
        pm = c.postmaster_pid(old)
        ppid = c.patroni[old].pid
        # The fault: kill -9 the primary's patroni and its postmaster, back to back.
        fault_ns = time.time_ns()
        os.kill(ppid, signal.SIGKILL)
        os.kill(pm, signal.SIGKILL)
        c.patroni[old].wait()
        log("run %d: killed patroni %d and postmaster %d of %s" % (n, ppid, pm, NAMES[old]))
        try:
            new = wait_for("a new primary", PROMOTION_TIMEOUT, lambda: new_primary_among([1, 2]))
        except TimeoutError:
            res["error"] = "no failover within %.0f s" % PROMOTION_TIMEOUT
            return res
        promoted_ns = time.time_ns()
        res["new_primary"] = NAMES[new]
        res["promotion_seen_ms"] = round((promoted_ns - fault_ns) / 1e6, 1)
        log("run %d: %s is primary %.1f s after the fault" % (n, NAMES[new], (promoted_ns - fault_ns) / 1e9))
        # Rejoin: restart the old node's patroni 2 s after the new primary is up.
        time.sleep(max(0, promoted_ns / 1e9 + RESTART_DELAY - time.time()))
        restart_ns = time.time_ns()
        c.start_patroni(old)
        rejoin_ms = wait_rejoin(new, old, restart_ns, REJOIN_TIMEOUT)
        res["rejoin_ms"] = round(rejoin_ms, 1) if rejoin_ms is not None else None
        if rejoin_ms is None:
            res["rejoin_error"] = "not streaming within %.0f s" % REJOIN_TIMEOUT
        log("run %d: %s streaming again %s ms after its patroni restart" % (n, NAMES[old], res["rejoin_ms"]))
        res["rejoin_log"] = c.grep_log(old, ["running pg_rewind", "pg_rewind exited", "Done",
                                             "single-user mode", "removing data directory",
                                             "Rewind failed", "remove_data_directory"])
        wait_for("writer acked for %.0f s after the promotion" % WRITES_AFTER_PROMOTION, 60,
                 lambda: c.acked_for_since(promoted_ns, WRITES_AFTER_PROMOTION))
        c.stop_writer()
        res.update(analyze(c.writer_log, fault_ns, PG_PORTS[new]))
        res["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
        # Patroni logs in the local time zone; this machine's is UTC.
        res["leader_key_age_at_fault_s"] = leader_key_age(c.path(NAMES[old] + ".log"), fault_ns)
        log("run %d: unavailability %s ms, lost %s, rejoin %s ms" % (
            n, res.get("unavailability_ms"), res.get("lost"), res.get("rejoin_ms")))
        return res
    except Exception as e:
        res["error"] = "%s: %s" % (type(e).__name__, e)
        log("run %d: ERROR %s" % (n, res["error"]))
        return res
    finally:
        c.stop()


def run_switchover(timings, n, keep_logs, via="patronictl", sync=False):
    c = Cluster(TIMINGS[timings], keep_logs, sync)
    res = {"run": n}
    try:
        t0 = time.monotonic()
        c.start()
        res["setup_s"] = round(time.monotonic() - t0, 1)
        c.start_writer("writer.log")
        wait_for("writer acked for %.0f s" % WARM_UP, 30, lambda: c.acked_for_since(0, WARM_UP))
        old, cand = 0, 1
        res["via"] = via
        if via == "patronictl":
            cmd = [PATRONICTL, "-c", c.cfg(old), "switchover", "--leader", NAMES[old],
                   "--candidate", NAMES[cand], "--force"]
            fault_ns = time.time_ns()
            r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=as_postgres,
                               env=pg_env(), cwd=c.dir, timeout=120)
            done_ns = time.time_ns()
            res["command_rc"] = r.returncode
            res["command_output"] = (r.stdout + r.stderr).strip().splitlines()[-3:]
        else:
            # Patroni's REST API, sent to the leader's API; it answers once the switchover is done.
            fault_ns = time.time_ns()
            code, body = http("POST", API_PORTS[old], "/switchover",
                              {"leader": NAMES[old], "candidate": NAMES[cand]}, timeout=120)
            done_ns = time.time_ns()
            res["command_rc"] = code
            res["command_output"] = [body.strip()]
        res["command_ms"] = round((done_ns - fault_ns) / 1e6, 1)
        log("run %d: switchover (%s) took %.0f ms rc=%s: %s" % (n, via, res["command_ms"],
                                                               res["command_rc"], res["command_output"]))
        wait_for("%s primary" % NAMES[cand], PROMOTION_TIMEOUT, lambda: is_primary(PG_PORTS[cand]))
        new = cand
        promoted_ns = time.time_ns()
        res["promotion_seen_ms"] = round((promoted_ns - fault_ns) / 1e6, 1)
        rejoin_ms = wait_rejoin(new, old, fault_ns, REJOIN_TIMEOUT)
        res["old_primary_streaming_ms"] = round(rejoin_ms, 1) if rejoin_ms is not None else None
        res["old_primary_streaming_after_command_ms"] = (
            round(rejoin_ms - res["command_ms"], 1) if rejoin_ms is not None else None)
        res["rejoin_log"] = c.grep_log(old, ["running pg_rewind", "single-user mode",
                                             "removing data directory"])
        wait_for("writer acked for %.0f s after the promotion" % WRITES_AFTER_PROMOTION, 60,
                 lambda: c.acked_for_since(max(promoted_ns, done_ns), WRITES_AFTER_PROMOTION))
        c.stop_writer()
        res.update(analyze(c.writer_log, fault_ns, PG_PORTS[new]))
        res["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
        log("run %d: unavailability %s ms, command %s ms, old primary streaming %s ms, lost %s" % (
            n, res.get("unavailability_ms"), res["command_ms"], res["old_primary_streaming_ms"],
            res.get("lost")))
        return res
    except Exception as e:
        res["error"] = "%s: %s" % (type(e).__name__, e)
        log("run %d: ERROR %s" % (n, res["error"]))
        return res
    finally:
        c.stop()


def stat(values):
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"median": round(statistics.median(v), 1), "max": round(max(v), 1),
            "min": round(min(v), 1), "n": len(v)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", choices=["failover", "switchover"])
    ap.add_argument("--timings", choices=sorted(TIMINGS), default="defaults")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", required=True)
    ap.add_argument("--via", choices=["patronictl", "rest"], default="patronictl",
                    help="switchover: patronictl switchover --force, or POST /switchover to the leader")
    ap.add_argument("--synchronous-mode", action="store_true",
                    help="bootstrap.dcs.synchronous_mode: true (default: false, Patroni's default)")
    ap.add_argument("--phase", choices=["stratified", "random"], default="stratified",
                    help="failover: extra wait before the fault, 0..loop_wait s, evenly spread over the runs "
                         "(stratified) or random")
    ap.add_argument("--keep-logs", help="copy every run's logs into this folder (outside /tmp)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (processes are started as the postgres user)")

    def on_signal(signo, _frame):
        raise KeyboardInterrupt("signal %d" % signo)

    signal.signal(signal.SIGTERM, on_signal)
    started = datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")
    runs = []
    for n in range(1, args.runs + 1):
        log("=== %s %s run %d/%d" % (args.scenario, args.timings, n, args.runs))
        keep = os.path.join(args.keep_logs, "run%d" % n) if args.keep_logs else None
        if args.scenario == "failover":
            runs.append(run_failover(args.timings, n, keep, args.synchronous_mode, args.runs, args.phase))
        else:
            runs.append(run_switchover(args.timings, n, keep, args.via, args.synchronous_mode))
        out = {
            "tool": "patroni", "scenario": args.scenario, "timings": args.timings,
            "switchover_via": args.via if args.scenario == "switchover" else None,
            "settings": dict(TIMINGS[args.timings], use_pg_rewind=True,
                             synchronous_mode=args.synchronous_mode,
                             remove_data_directory_on_rewind_failure=True),
            "versions": versions(), "machine": "%s, %d cores" % (os.uname().release, os.cpu_count()),
            "started_utc": started,
            "finished_utc": datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
            "runs": runs,
        }
        ok = [r for r in runs if "error" not in r]
        keys = (["unavailability_ms", "promotion_seen_ms", "rejoin_ms", "lost"] if args.scenario == "failover"
                else ["unavailability_ms", "command_ms", "promotion_seen_ms", "old_primary_streaming_ms",
                      "old_primary_streaming_after_command_ms", "lost"])
        out["summary"] = {k: stat([r.get(k) for r in ok]) for k in keys}
        out["summary"]["runs_ok"] = len(ok)
        out["summary"]["runs_failed"] = len(runs) - len(ok)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)
            f.write("\n")
    print(json.dumps(out["summary"], indent=1, sort_keys=True))
    return 0 if not any("error" in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
