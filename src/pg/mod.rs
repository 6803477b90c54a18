//! Control of the local PostgreSQL: its programs run as the data's owner (PostgreSQL refuses
//! root), its configuration files are written by raftmgr, and it is started and stopped with
//! pg_ctl, so it keeps running when the agent restarts.

pub mod probe;
pub mod wal;

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::config::PgSettings;

/// raftmgr's settings live in this file in the data directory, included from postgresql.conf.
pub const RAFTMGR_CONF: &str = "raftmgr.conf";
/// `synchronous_standby_names`, written by the primary's sync manager, included from raftmgr.conf.
pub const SYNC_CONF: &str = "raftmgr.sync.conf";
const INCLUDE_LINE: &str = "include_if_exists = 'raftmgr.conf'\t# added by raftmgr";

/// How long pg_ctl waits for a start or a stop.
const PG_CTL_WAIT_SECS: &str = "60";
/// How long [`Pg::stop`] waits for the postmaster to exit, and how often it looks.
const STOP_WAIT: Duration = Duration::from_secs(60);
const STOP_POLL: Duration = Duration::from_millis(5);

/// The comment line in raftmgr.conf that names the node `primary_conninfo` points at.
const UPSTREAM_MARKER: &str = "# raftmgr upstream node: ";

/// The node a standby streams from.
#[derive(Debug, Clone, Copy)]
pub struct Upstream<'a> {
    pub node_id: u64,
    pub conninfo: &'a str,
}

/// Whether the postmaster of the data directory is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running { pid: i32 },
    Stopped,
}

/// The local PostgreSQL instance.
#[derive(Debug, Clone)]
pub struct Pg {
    pub settings: PgSettings,
    /// The OS user to run PostgreSQL's programs as, when the agent is root.
    run_as: Option<String>,
    /// The OS user that connects over the Unix socket (peer authentication maps it).
    os_user_connecting: String,
}

impl Pg {
    pub fn new(settings: &PgSettings) -> anyhow::Result<Pg> {
        let root = nix::unistd::geteuid().is_root();
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| "root".into());
        let run_as = if root {
            let user = &settings.section.os_user;
            nix::unistd::User::from_name(user)
                .ok()
                .flatten()
                .with_context(|| format!("postgres.os_user: there is no OS user {user:?}"))?;
            Some(user.clone())
        } else {
            None
        };
        Ok(Pg {
            settings: settings.clone(),
            run_as,
            os_user_connecting: me,
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.settings.section.data_directory
    }

    pub fn port(&self) -> u16 {
        self.settings.section.port
    }

    /// The OS user that owns the data directory and runs the server.
    pub fn owner(&self) -> String {
        self.run_as
            .clone()
            .unwrap_or_else(|| self.os_user_connecting.clone())
    }

    /// A command running `program` from bin_dir as the data's owner.
    pub fn command(&self, program: &str) -> Command {
        let path = self.settings.bin_dir.join(program);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(path);
                c
            }
            None => Command::new(path),
        };
        command
            .current_dir("/")
            .env("LC_ALL", "C.UTF-8")
            .stdin(Stdio::null());
        command
    }

    /// libpq keywords for connecting as the superuser over the Unix socket.
    pub fn local_conninfo(&self) -> String {
        format!(
            "host={} port={} user={} dbname=postgres",
            self.settings.socket_dir.display(),
            self.port(),
            self.settings.section.superuser
        )
    }

    /// libpq keywords for reaching another node as the replication user.
    pub fn peer_conninfo(&self, node_conninfo: &str, dbname: &str) -> String {
        format!(
            "{node_conninfo} user={} password={} dbname={dbname}",
            self.settings.section.replication_user,
            quote(&self.settings.replication_password)
        )
    }

    /// pg_rewind's connection to its source, with JIT compilation off: pg_rewind lists the
    /// source's files with one recursive query that the planner costs so high that it compiles
    /// it with LLVM, which took 0.3–0.5 s of every rewind (PostgreSQL 15 as Debian builds it,
    /// `jit = on` by default), for a query that runs in 5 ms.
    fn rewind_source_conninfo(&self, node_conninfo: &str) -> String {
        format!(
            "{} options='-c jit=off'",
            self.peer_conninfo(node_conninfo, "postgres")
        )
    }

    /// The major version of the PostgreSQL binaries (`postgres --version`).
    pub fn binaries_major_version(&self) -> anyhow::Result<u32> {
        let out = Command::new(self.settings.bin_dir.join("postgres"))
            .arg("--version")
            .output()
            .context("running postgres --version")?;
        let text = String::from_utf8_lossy(&out.stdout);
        parse_major_version(&text)
            .with_context(|| format!("cannot read a version from {:?}", text.trim()))
    }

    pub fn is_initialized(&self) -> bool {
        self.data_dir().join("PG_VERSION").is_file()
    }

    /// Refuses a data directory that exists and is not empty.
    pub fn require_empty_data_dir(&self) -> anyhow::Result<()> {
        let dir = self.data_dir();
        if let Ok(mut entries) = std::fs::read_dir(dir) {
            if entries.next().is_some() {
                bail!(
                    "the data directory {} is not empty; refusing to overwrite it",
                    dir.display()
                );
            }
        }
        Ok(())
    }

    /// Creates the data and socket folders, owned by the data's owner, and makes their parents
    /// traversable for it.
    pub fn prepare_dirs(&self) -> anyhow::Result<()> {
        for (dir, mode) in [
            (self.data_dir(), 0o700),
            (self.settings.socket_dir.as_path(), 0o755),
        ] {
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
                for ancestor in parent.ancestors() {
                    make_traversable(ancestor)?;
                }
            }
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
            self.chown(dir)?;
        }
        Ok(())
    }

    fn chown(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(user) = &self.run_as {
            let user = nix::unistd::User::from_name(user)?.context("the OS user vanished")?;
            nix::unistd::chown(path, Some(user.uid), Some(user.gid))
                .with_context(|| format!("chown {} to {}", path.display(), user.name))?;
        }
        Ok(())
    }

    /// `initdb` with data checksums (so pg_rewind can work later) and peer/scram authentication.
    pub fn initdb(&self) -> anyhow::Result<()> {
        let section = &self.settings.section;
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", &section.superuser])
            .args(["--auth-local=peer", "--auth-host=scram-sha-256"])
            .args(["--data-checksums", "--encoding=UTF8", "--locale=C.UTF-8"])
            .output()
            .context("running initdb")?;
        check("initdb", &out)
    }

    /// Writes raftmgr.conf, pg_hba.conf and pg_ident.conf, and the include in postgresql.conf.
    /// `primary_conninfo` is set for a standby (application_name = this node's name).
    pub fn write_config(
        &self,
        node_name: &str,
        upstream: Option<Upstream<'_>>,
    ) -> anyhow::Result<()> {
        let section = &self.settings.section;
        // No WAL kept beyond what the replication slots hold (every node has one on the
        // primary, made at the latest when it is promoted), no segment recycled: pg_rewind
        // copies the source's whole pg_wal, so every segment there slows a rejoin. The slots
        // hold at most `max_slot_wal_keep_size`.
        let mut conf = format!(
            "# Written by raftmgr; edits are overwritten. Put your own settings in postgresql.conf.\n\
             listen_addresses = '{}'\n\
             port = {}\n\
             unix_socket_directories = '{}'\n\
             wal_level = replica\n\
             wal_log_hints = on\n\
             max_wal_senders = 16\n\
             max_replication_slots = 16\n\
             wal_keep_size = 0\n\
             max_slot_wal_keep_size = {}\n\
             wal_recycle = off\n\
             hot_standby = on\n\
             hot_standby_feedback = on\n\
             logging_collector = on\n\
             log_directory = 'log'\n\
             cluster_name = '{}'\n\
             include_if_exists = '{SYNC_CONF}'\n",
            section.listen_address,
            section.port,
            self.settings.socket_dir.display(),
            match section.max_slot_wal_keep_size_mb {
                0 => "-1".to_string(),
                mb => format!("'{mb}MB'"),
            },
            node_name,
        );
        if let Some(command) = &section.archive_command {
            conf += &format!(
                "archive_mode = on\narchive_command = '{}'\n",
                escape_conf(command)
            );
        }
        if let Some(command) = &section.restore_command {
            conf += &format!("restore_command = '{}'\n", escape_conf(command));
        }
        if let Some(upstream) = upstream {
            conf += &format!(
                "{UPSTREAM_MARKER}{}\nprimary_conninfo = '{}'\nprimary_slot_name = '{}'\n",
                upstream.node_id,
                escape_conf(&format!(
                    "{} application_name={node_name}",
                    self.peer_conninfo(upstream.conninfo, "replication")
                )),
                slot_name(node_name),
            );
        }
        self.write_owned(RAFTMGR_CONF, &conf, 0o600)?;
        // Whatever this node was, it starts with no synchronous standby: the primary's sync
        // manager names one once it is committed.
        self.write_sync_names("")?;

        let mut hba = String::from(
            "# Written by raftmgr.\n\
             # TYPE  DATABASE     USER  ADDRESS  METHOD\n\
             local   all          all            peer map=raftmgr\n",
        );
        for cidr in &section.allowed_cidrs {
            hba += &format!(
                "host    all,replication  {}  {cidr}  scram-sha-256\n",
                section.replication_user
            );
        }
        self.write_owned("pg_hba.conf", &hba, 0o600)?;
        let mut ident =
            String::from("# Written by raftmgr: who may connect as whom over the Unix socket.\n");
        for os_user in [&self.os_user_connecting, &self.owner(), &"root".to_string()] {
            ident += &format!("raftmgr  {os_user}  {}\n", section.superuser);
        }
        ident += &format!("raftmgr  {}  {}\n", self.owner(), self.owner());
        self.write_owned("pg_ident.conf", &ident, 0o600)?;

        let main_conf = self.data_dir().join("postgresql.conf");
        let text = std::fs::read_to_string(&main_conf)
            .with_context(|| format!("reading {}", main_conf.display()))?;
        if !text.lines().any(|l| l.trim() == INCLUDE_LINE.trim()) {
            let mut file = std::fs::OpenOptions::new().append(true).open(&main_conf)?;
            writeln!(file, "\n{INCLUDE_LINE}")?;
        }
        Ok(())
    }

    fn write_owned(&self, name: &str, text: &str, mode: u32) -> anyhow::Result<()> {
        let path = self.data_dir().join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        self.chown(&path)
    }

    /// Writes `synchronous_standby_names` (takes effect on reload).
    pub fn write_sync_names(&self, names: &str) -> anyhow::Result<()> {
        let text = format!(
            "# Written by raftmgr's sync manager.\nsynchronous_standby_names = '{}'\n",
            escape_conf(names)
        );
        self.write_owned(SYNC_CONF, &text, 0o600)
    }

    /// The `synchronous_standby_names` raftmgr last wrote.
    pub fn sync_names(&self) -> String {
        std::fs::read_to_string(self.data_dir().join(SYNC_CONF))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("synchronous_standby_names = '"))
                    .map(|v| v.trim_end_matches('\'').replace("''", "'"))
            })
            .unwrap_or_default()
    }

    /// Makes the next start a standby start.
    pub fn write_standby_signal(&self) -> anyhow::Result<()> {
        self.write_owned("standby.signal", "", 0o600)
    }

    pub fn has_standby_signal(&self) -> bool {
        self.data_dir().join("standby.signal").exists()
    }

    pub fn remove_standby_signal(&self) -> anyhow::Result<()> {
        match std::fs::remove_file(self.data_dir().join("standby.signal")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// The node raftmgr.conf's `primary_conninfo` points at, if any.
    pub fn following(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.data_dir().join(RAFTMGR_CONF)).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(UPSTREAM_MARKER))
            .and_then(|id| id.trim().parse().ok())
    }

    /// `pg_ctl reload`: primary_conninfo changes take effect without a restart (PostgreSQL 13+).
    pub fn reload(&self) -> anyhow::Result<()> {
        let out = self
            .command("pg_ctl")
            .arg("reload")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-s"])
            .output()
            .context("running pg_ctl reload")?;
        check("pg_ctl reload", &out)
    }

    /// Renames the data directory to `<name>.<tag>-<unix time>` beside it (`rewind-failed`,
    /// `reinitialized`); returns the new path. Nothing is deleted.
    pub fn move_data_aside(&self, tag: &str) -> anyhow::Result<std::path::PathBuf> {
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let mut aside = self.data_dir().as_os_str().to_owned();
        aside.push(format!(".{tag}-{seconds}"));
        let aside = std::path::PathBuf::from(aside);
        std::fs::rename(self.data_dir(), &aside).with_context(|| {
            format!(
                "moving {} aside to {}",
                self.data_dir().display(),
                aside.display()
            )
        })?;
        Ok(aside)
    }

    /// `pg_rewind` of this (stopped) data directory from `source_conninfo`, after crash
    /// recovery when the target was not shut down cleanly ([`Pg::recover_keeping_wal`]). With a
    /// `restore_command`, WAL missing from the target's pg_wal is fetched from the archive.
    /// `--progress` makes its output (which the agent logs) say how much it copied. The
    /// target's own segments from before the fork, which pg_rewind may remove though recovery
    /// needs them, are kept aside and linked back (see [`wal`]).
    pub fn rewind(&self, source_conninfo: &str) -> anyhow::Result<String> {
        self.remove_stale_lock_files()?;
        let kept = wal::WalAside::keep(&self.data_dir().join("pg_wal"), &self.wal_aside_dir())?;
        let recovered = self.recover_keeping_wal()?;
        let mut command = self.command("pg_rewind");
        command
            .arg("--progress")
            .arg("--target-pgdata")
            .arg(self.data_dir())
            .arg("--source-server")
            .arg(self.rewind_source_conninfo(source_conninfo));
        if self.settings.section.restore_command.is_some() {
            command.arg("--restore-target-wal");
        }
        let out = command.output().context("running pg_rewind")?;
        let mut output = format!(
            "{recovered}{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let rewound = check("pg_rewind", &out);
        let needed = match rewound {
            Ok(()) => {
                let label = std::fs::read_to_string(self.data_dir().join("backup_label"));
                wal::Needed::after_rewind(&output, &label.unwrap_or_default())
            }
            Err(_) => None,
        };
        // After a failure every removed segment comes back, for the retry; when pg_rewind found
        // nothing to rewind, it removed nothing.
        if rewound.is_err() || needed.is_some() {
            let restored = kept.restore(needed)?;
            if let (Some(first), Some(last)) = (restored.first(), restored.last()) {
                output += &format!(
                    "raftmgr: linked back {} segments of its own WAL from before the fork \
                     ({first} to {last})\n",
                    restored.len()
                );
            }
        }
        kept.remove()?;
        rewound.map(|()| output)
    }

    /// Crash recovery of a primary that was not shut down cleanly, in single-user mode, as
    /// pg_rewind would run it, but keeping every WAL segment: the recovery's checkpoint would
    /// otherwise remove those before its redo point, with `wal_keep_size = 0` all of them, and
    /// pg_rewind, which then reads the target's WAL back from the fork to the last common
    /// checkpoint, failed with "could not open file" whenever that checkpoint lay in one of
    /// them (and the node was cloned again instead). Returns its output, for the log.
    fn recover_keeping_wal(&self) -> anyhow::Result<String> {
        if self.control_state()? != "in production" {
            return Ok(String::new());
        }
        let started = Instant::now();
        let out = self
            .command("postgres")
            .args(["--single", "-F", "-c", "wal_keep_size=2147483647", "-D"])
            .arg(self.data_dir())
            .arg("template1")
            .output()
            .context("running postgres --single for crash recovery")?;
        check("crash recovery (postgres --single)", &out)?;
        Ok(format!(
            "raftmgr: crash recovery keeping every WAL segment ({} ms): {}{}",
            started.elapsed().as_millis(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// Where [`Pg::rewind`] keeps pg_wal's segments: beside the data directory (pg_rewind
    /// removes what it finds in it that the source lacks), on the same filesystem as a rule.
    fn wal_aside_dir(&self) -> std::path::PathBuf {
        let mut dir = self.data_dir().as_os_str().to_owned();
        dir.push(".wal-during-rewind");
        std::path::PathBuf::from(dir)
    }

    /// Whether a postmaster runs for this data directory ([`lock_holder`] of postmaster.pid;
    /// the pid is negated for a standalone backend, which `pg_ctl stop` refuses to stop).
    pub fn run_state(&self) -> RunState {
        match lock_holder(&self.data_dir().join("postmaster.pid")) {
            Some(pid) => RunState::Running { pid },
            None => RunState::Stopped,
        }
    }

    /// The `Database cluster state` pg_controldata prints (`in production`, `shut down`,
    /// `shut down in recovery`, `in archive recovery`, ...), read from `global/pg_control`
    /// itself: the executor asks on every step while PostgreSQL is down, a failover's first
    /// steps among them, where running pg_controldata (through runuser: two programs) took
    /// milliseconds, and more on a busy host.
    pub fn control_state(&self) -> anyhow::Result<&'static str> {
        use std::io::Read;
        let path = self.data_dir().join("global/pg_control");
        let mut head = [0u8; CONTROL_HEAD];
        std::fs::File::open(&path)
            .and_then(|mut file| file.read_exact(&mut head))
            .with_context(|| format!("reading {}", path.display()))?;
        control_state_of(&head).with_context(|| format!("reading {}", path.display()))
    }

    /// Removes the lock files of a dead postmaster, including one not yet reaped: pg_ctl,
    /// pg_rewind and PostgreSQL itself refuse to start while `kill(pid, 0)` succeeds on the pid
    /// in postmaster.pid or in the socket's lock file, which it does on a zombie (until whoever
    /// inherited it reaps it, a second or more in some containers). PostgreSQL's own check of
    /// its shared memory segment still refuses to start while an old backend is attached to it.
    fn remove_stale_lock_files(&self) -> anyhow::Result<()> {
        if self.run_state() != RunState::Stopped {
            return Ok(());
        }
        let socket_lock = self
            .settings
            .socket_dir
            .join(format!(".s.PGSQL.{}.lock", self.port()));
        for lock in [self.data_dir().join("postmaster.pid"), socket_lock] {
            if !lock.exists() || lock_holder(&lock).is_some() {
                continue;
            }
            match std::fs::remove_file(&lock) {
                Ok(()) => tracing::info!("removed {} of a dead postmaster", lock.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub fn start(&self) -> anyhow::Result<()> {
        self.remove_stale_lock_files()?;
        std::fs::create_dir_all(self.data_dir().join("log")).ok();
        self.chown(&self.data_dir().join("log"))?;
        let out = self
            .command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", PG_CTL_WAIT_SECS, "-s"])
            .arg("-l")
            .arg(self.data_dir().join("log").join("startup.log"))
            // The postmaster outlives this call; it must not hold our pipes open.
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .context("running pg_ctl start")?;
        check("pg_ctl start", &out).map_err(|e| {
            let tail = server_log_tail(self.data_dir(), SERVER_LOG_LINES);
            anyhow::anyhow!("{e:#}; PostgreSQL's log ends: {}", tail.join(" | "))
        })
    }

    /// `pg_ctl stop -m fast|immediate`, then waits until the postmaster is gone. (pg_ctl's own
    /// wait looks only every 100 ms; a switchover waits for this stop.)
    pub fn stop(&self, mode: &str) -> anyhow::Result<()> {
        let out = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", mode, "-W", "-s"])
            .output()
            .context("running pg_ctl stop")?;
        check("pg_ctl stop", &out)?;
        let deadline = Instant::now() + STOP_WAIT;
        while let RunState::Running { pid } = self.run_state() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "PostgreSQL (postmaster pid {pid}) still runs {STOP_WAIT:?} after pg_ctl stop -m {mode}"
            );
            std::thread::sleep(STOP_POLL);
        }
        Ok(())
    }

    /// `pg_ctl stop -m fast` when a postmaster runs; nothing otherwise.
    pub fn stop_if_running(&self) -> anyhow::Result<()> {
        match self.run_state() {
            RunState::Running { .. } => self.stop("fast"),
            RunState::Stopped => Ok(()),
        }
    }

    /// `pg_basebackup` from `upstream_conninfo` with WAL streamed and a replication slot. Shows
    /// a progress bar on a terminal, plain progress lines otherwise.
    pub fn basebackup(
        &self,
        upstream_conninfo: &str,
        slot: &str,
        create_slot: bool,
    ) -> anyhow::Result<()> {
        let mut command = self.command("pg_basebackup");
        command
            .arg("-d")
            .arg(self.peer_conninfo(upstream_conninfo, "replication"))
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-X",
                "stream",
                "--checkpoint=fast",
                "--progress",
                "-S",
                slot,
            ]);
        if create_slot {
            command.arg("-C");
        }
        let terminal = std::io::stderr().is_terminal();
        if terminal {
            let status = command.status().context("running pg_basebackup")?;
            if !status.success() {
                bail!("pg_basebackup failed ({status})");
            }
            return Ok(());
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running pg_basebackup")?;
        let mut stderr = child.stderr.take().expect("piped");
        let mut collected = String::new();
        // pg_basebackup redraws its progress with '\r'; print each state as its own line.
        let mut reader = BufReader::new(&mut stderr);
        let mut last_line = String::new();
        loop {
            let mut chunk = Vec::new();
            let n = read_until_any(&mut reader, &mut chunk)?;
            if n == 0 {
                break;
            }
            let line = String::from_utf8_lossy(&chunk).trim().to_string();
            if !line.is_empty() && line != last_line {
                eprintln!("pg_basebackup: {line}");
                collected += &line;
                collected.push('\n');
                last_line = line;
            }
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("pg_basebackup failed ({status}): {}", collected.trim());
        }
        Ok(())
    }
}

/// The live postmaster holding `lock` (postmaster.pid, or its socket's `.lock`): both name its
/// pid, then its data directory, in which a postmaster works (`/proc/<pid>/cwd`). A crash leaves
/// the file behind, and its pid may soon be another process's: pids are reused, in a fresh VM
/// or a container within minutes. Such a process must neither be taken for PostgreSQL (the node
/// would wait for a server that is gone) nor be signalled, nor keep PostgreSQL from starting.
/// PostgreSQL runs as this agent's OS user, or the agent is root: a process whose working
/// directory it cannot read is not the postmaster. A standalone backend (`postgres --single`)
/// writes its pid negated, and is returned so.
pub fn lock_holder(lock: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(lock).ok()?;
    let mut lines = text.lines();
    let written = lines.next()?.trim().parse::<i32>().ok()?;
    let pid = written.checked_abs()?;
    let data_dir = std::fs::canonicalize(lines.next()?.trim()).ok()?;
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    (process_alive(pid) && cwd == data_dir).then_some(written)
}

/// Whether `pid` is a live process. A killed postmaster stays a zombie until whoever inherited
/// it reaps it, and `kill(pid, 0)` still succeeds on a zombie: read its state from /proc.
pub fn process_alive(pid: i32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => {}
        Err(_) => return false,
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// Reads up to and excluding the next '\r' or '\n'; returns the bytes consumed (0 at the end).
fn read_until_any<R: BufRead>(reader: &mut R, out: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut consumed = 0;
    let mut byte = [0u8; 1];
    loop {
        if reader.read(&mut byte)? == 0 {
            return Ok(consumed);
        }
        consumed += 1;
        if byte[0] == b'\r' || byte[0] == b'\n' {
            return Ok(consumed);
        }
        out.push(byte[0]);
    }
}

/// How much of PostgreSQL's own log an error about starting it quotes.
const SERVER_LOG_LINES: usize = 12;

/// The last `lines` lines of the newest file in `<data>/log` (the logging collector's, or
/// `pg_ctl -l`'s before the collector took over), after its name: why a start failed or hangs
/// is said there.
fn server_log_tail(data_dir: &Path, lines: usize) -> Vec<String> {
    let newest = std::fs::read_dir(data_dir.join("log"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max();
    let Some((_, path)) = newest else {
        return vec![format!("no log file in {}/log", data_dir.display())];
    };
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut tail: Vec<String> = text.lines().rev().take(lines).map(String::from).collect();
    tail.push(format!("{}:", path.display()));
    tail.reverse();
    tail
}

fn check(what: &str, out: &std::process::Output) -> anyhow::Result<()> {
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    bail!(
        "{what} failed ({}): {}{}",
        out.status,
        stderr.trim(),
        stdout.trim()
    )
}

/// Gives "others" search (not read) permission on `dir` when the agent is root, so that the
/// data's owner can reach the folders below it.
fn make_traversable(dir: &Path) -> anyhow::Result<()> {
    if dir.as_os_str().is_empty() || !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o001 == 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o001))
            .with_context(|| format!("making {} traversable", dir.display()))?;
        tracing::info!(
            "made {} traversable (o+x) for PostgreSQL's OS user",
            dir.display()
        );
    }
    Ok(())
}

/// The major version in `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)`.
pub fn parse_major_version(text: &str) -> Option<u32> {
    let version = text
        .split("(PostgreSQL)")
        .nth(1)?
        .split_whitespace()
        .next()?;
    version.split('.').next()?.parse().ok()
}

/// Quotes a libpq keyword value.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Escapes a value for a single-quoted postgresql.conf string.
fn escape_conf(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "''")
}

/// How much of pg_control `control_state_of` reads: `ControlFileData` begins with
/// `system_identifier` (8 bytes), `pg_control_version` (4), `catalog_version_no` (4) and
/// `state` (a `DBState`, 4), in the host's byte order; so it has since PostgreSQL 9.
const CONTROL_HEAD: usize = 20;

/// The cluster state in the head of a pg_control file, named as pg_controldata names it.
fn control_state_of(head: &[u8; CONTROL_HEAD]) -> anyhow::Result<&'static str> {
    let word = |at: usize| u32::from_ne_bytes(head[at..at + 4].try_into().expect("4 bytes"));
    let version = word(8);
    // 1300 for PostgreSQL 13 to 16, 1700 for 17: anything else is not a pg_control we know.
    anyhow::ensure!(
        (900..10_000).contains(&version),
        "pg_control_version {version} is not one this agent can read"
    );
    Ok(match word(16) {
        0 => "starting up",
        1 => "shut down",
        2 => "shut down in recovery",
        3 => "shutting down",
        4 => "in crash recovery",
        5 => "in archive recovery",
        6 => "in production",
        other => anyhow::bail!("unknown cluster state {other} (pg_control_version {version})"),
    })
}

/// The replication slot for a node: PostgreSQL allows lower-case letters, digits and '_'.
pub fn slot_name(node_name: &str) -> String {
    let cleaned: String = node_name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("raftmgr_{cleaned}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_error_quotes_the_end_of_the_newest_server_log() {
        let data = tempfile::tempdir().unwrap();
        assert_eq!(
            server_log_tail(data.path(), 2),
            [format!("no log file in {}/log", data.path().display())]
        );
        let log = data.path().join("log");
        std::fs::create_dir(&log).unwrap();
        std::fs::write(log.join("startup.log"), "old\n").unwrap();
        let newest = log.join("postgresql-2026-12-01.log");
        std::fs::write(&newest, "one\ntwo\nFATAL: the reason\n").unwrap();
        let file = std::fs::File::options().write(true).open(&newest).unwrap();
        let later = std::time::SystemTime::now() + Duration::from_secs(60);
        file.set_modified(later).unwrap();
        assert_eq!(
            server_log_tail(data.path(), 2),
            [
                format!("{}:", newest.display()),
                "two".into(),
                "FATAL: the reason".into()
            ]
        );
    }

    #[test]
    fn reads_the_major_version() {
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(parse_major_version("postgres (PostgreSQL) 16beta1"), None);
        assert_eq!(parse_major_version("nonsense"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        assert!(process_alive(std::process::id() as i32));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Exited but not reaped: a zombie, which kill(pid, 0) would call alive.
        while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!process_alive(pid), "a zombie is not alive");
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }

    /// A `Pg` for the data directory `dir/pgdata`, port 5999.
    fn pg_in(
        dir: &Path,
        bin_dir: std::path::PathBuf,
        socket_dir: std::path::PathBuf,
        replication_password: &str,
    ) -> Pg {
        let data = dir.join("pgdata");
        let section = toml::from_str(&format!("data_directory = {data:?}\nport = 5999")).unwrap();
        Pg::new(&crate::config::PgSettings {
            section,
            bin_dir,
            socket_dir,
            conninfo: String::new(),
            replication_password: replication_password.into(),
        })
        .unwrap()
    }

    #[test]
    fn lock_files_are_kept_only_for_a_live_process_working_in_their_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("pgdata");
        std::fs::create_dir(&data).unwrap();
        let pg = pg_in(dir.path(), dir.path().into(), dir.path().into(), "");
        let pid_file = data.join("postmaster.pid");
        let socket_lock = dir.path().join(".s.PGSQL.5999.lock");
        let write_locks = |pid: i32| {
            for lock in [&pid_file, &socket_lock] {
                std::fs::write(lock, format!("{pid}\n{}\n", data.display())).unwrap();
            }
        };

        // A zombie: exited, not reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let zombie = child.id() as i32;
        while process_alive(zombie) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        write_locks(zombie);
        pg.remove_stale_lock_files().unwrap();
        assert!(!pid_file.exists() && !socket_lock.exists());
        child.wait().unwrap();

        // A live process working elsewhere took the pid of a crashed postmaster: it is not
        // PostgreSQL, and the lock files are stale.
        let elsewhere = Sleeper::in_dir(dir.path());
        write_locks(elsewhere.pid());
        assert_eq!(pg.run_state(), RunState::Stopped);
        pg.remove_stale_lock_files().unwrap();
        assert!(!pid_file.exists() && !socket_lock.exists());

        // A process working in the data directory holds its locks (a postmaster; its pid is
        // negated when it is a standalone backend).
        let postmaster = Sleeper::in_dir(&data);
        write_locks(postmaster.pid());
        assert_eq!(
            pg.run_state(),
            RunState::Running {
                pid: postmaster.pid()
            }
        );
        write_locks(-postmaster.pid());
        pg.remove_stale_lock_files().unwrap();
        assert!(pid_file.exists() && socket_lock.exists());
    }

    /// A `sleep` working in a folder, killed when dropped.
    struct Sleeper(std::process::Child);

    impl Sleeper {
        fn in_dir(dir: &Path) -> Sleeper {
            let child = std::process::Command::new("sleep")
                .arg("600")
                .current_dir(dir)
                .spawn()
                .unwrap();
            Sleeper(child)
        }

        fn pid(&self) -> i32 {
            self.0.id() as i32
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn the_cluster_state_is_read_from_pg_control_as_pg_controldata_prints_it() {
        let head = |version: u32, state: u32| {
            let mut head = [0u8; CONTROL_HEAD];
            head[8..12].copy_from_slice(&version.to_ne_bytes());
            head[16..20].copy_from_slice(&state.to_ne_bytes());
            head
        };
        assert_eq!(control_state_of(&head(1300, 6)).unwrap(), "in production");
        assert_eq!(
            control_state_of(&head(1700, 2)).unwrap(),
            "shut down in recovery"
        );
        let unknown = control_state_of(&head(1300, 7)).unwrap_err().to_string();
        assert!(unknown.contains("unknown cluster state 7"), "{unknown}");
        let garbage = control_state_of(&head(0, 1)).unwrap_err().to_string();
        assert!(garbage.contains("pg_control_version 0"), "{garbage}");

        // A real data directory, read both ways.
        let dir = tempfile::tempdir().unwrap();
        let bin_dir = std::process::Command::new("pg_config")
            .arg("--bindir")
            .output()
            .unwrap()
            .stdout;
        let bin_dir = String::from_utf8(bin_dir).unwrap().trim().into();
        let pg = pg_in(dir.path(), bin_dir, dir.path().join("socket"), "");
        let err = pg.control_state().unwrap_err();
        assert!(format!("{err:#}").contains("global/pg_control"), "{err:#}");
        pg.prepare_dirs().unwrap();
        pg.initdb().unwrap();
        let out = pg
            .command("pg_controldata")
            .arg("-D")
            .arg(pg.data_dir())
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                Some(
                    l.strip_prefix("Database cluster state:")?
                        .trim()
                        .to_string(),
                )
            })
            .unwrap();
        assert_eq!(printed, "shut down");
        assert_eq!(pg.control_state().unwrap(), printed);
    }

    #[test]
    fn slot_names_are_valid_for_postgres() {
        assert_eq!(slot_name("Node-2"), "raftmgr_node_2");
    }

    #[test]
    fn pg_rewind_asks_its_source_for_no_jit_compilation() {
        let dir = tempfile::tempdir().unwrap();
        let pg = pg_in(
            dir.path(),
            dir.path().into(),
            dir.path().into(),
            "it's secret",
        );
        let conninfo = pg.rewind_source_conninfo("host=10.0.0.2 port=5432");
        let parsed: tokio_postgres::Config = conninfo.parse().unwrap();
        assert_eq!(parsed.get_options(), Some("-c jit=off"), "{conninfo}");
        assert_eq!(parsed.get_password(), Some("it's secret".as_bytes()));
        assert_eq!(parsed.get_dbname(), Some("postgres"));
    }

    #[test]
    fn conninfo_values_are_quoted() {
        assert_eq!(quote("a b'c"), "'a b\\'c'");
        assert_eq!(escape_conf("x='y'"), "x=''y''");
    }
}
