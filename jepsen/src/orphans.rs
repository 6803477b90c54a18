//! Labs left behind by a test process that died without dropping them. A signal (nextest's
//! timeout, a killed test run) runs no destructor, so that lab's agents, PostgreSQL servers,
//! network namespaces and folder would stay. Every lab therefore records, in its folder, who
//! owns it and what it started; the next lab to start cleans up each lab whose owner is gone,
//! and never touches one whose owner runs (a test running beside it).

use std::path::Path;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The test process that owns a lab (`ProcessId` of it).
pub const OWNER_FILE: &str = "owner";
/// The lab's namespaces and bridge, one name a line: `netns NAME` or `link NAME`.
pub const NETWORK_FILE: &str = "network";
/// `nodeN.agent`, beside `nodeN.toml`: the agent started for node N (`ProcessId` of it).
pub const AGENT_EXTENSION: &str = "agent";
/// Every lab's folder, in the temporary directory, starts so.
pub const LAB_PREFIX: &str = "raftmgr-lab-";

/// One process, named by its pid and its start time: a pid alone may be another process's by
/// the time it is read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: i32,
    start: u64,
}

impl ProcessId {
    /// Process `pid` as it is now, if it runs.
    pub fn of(pid: i32) -> Option<ProcessId> {
        Some(ProcessId {
            pid,
            start: crate::procfs::start_time(pid)?,
        })
    }

    pub fn me() -> ProcessId {
        ProcessId::of(std::process::id() as i32).expect("this process has a /proc entry")
    }

    /// Whether this very process still runs (a zombie does not).
    pub fn alive(&self) -> bool {
        crate::cluster::process_alive(self.pid)
            && crate::procfs::start_time(self.pid) == Some(self.start)
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, format!("{} {}\n", self.pid, self.start))
    }

    pub fn read(path: &Path) -> Option<ProcessId> {
        let text = std::fs::read_to_string(path).ok()?;
        let (pid, start) = text.trim().split_once(' ')?;
        Some(ProcessId {
            pid: pid.parse().ok()?,
            start: start.parse().ok()?,
        })
    }
}

/// Cleans up every lab in the temporary directory whose owner no longer runs. A lab without an
/// owner file is left alone: it is being created, or predates this.
pub fn sweep() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(LAB_PREFIX) {
            continue;
        }
        let dir = entry.path();
        if ProcessId::read(&dir.join(OWNER_FILE)).is_some_and(|owner| !owner.alive()) {
            clean_up(&dir);
        }
    }
}

/// Kills the lab's agents (those still the processes the lab started), stops its PostgreSQL
/// servers as a lab's drop does, deletes its network and removes its folder.
fn clean_up(dir: &Path) {
    eprintln!("removing {}, a lab whose test process died", dir.display());
    let entries: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    for path in &entries {
        let is_agent = path.extension().is_some_and(|e| e == AGENT_EXTENSION);
        if let Some(agent) = ProcessId::read(path).filter(|a| is_agent && a.alive()) {
            let _ = kill(Pid::from_raw(agent.pid), Signal::SIGKILL);
        }
    }
    for data in entries
        .iter()
        .map(|p| p.join("pgdata"))
        .filter(|d| d.is_dir())
    {
        crate::cluster::stop_postgres_of(&data);
    }
    if let Ok(network) = std::fs::read_to_string(dir.join(NETWORK_FILE)) {
        crate::netns::delete(network.lines().filter_map(|l| l.split_once(' ')));
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        eprintln!("could not remove {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_named_by_its_pid_and_start_time() {
        let me = ProcessId::me();
        assert!(me.alive());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("owner");
        me.write(&file).unwrap();
        assert_eq!(ProcessId::read(&file), Some(me));

        // The same pid with another start time is another process.
        let other = ProcessId {
            start: me.start + 1,
            ..me
        };
        assert!(!other.alive());

        // A process that exited, reaped or not, is gone.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let exited = ProcessId::of(child.id() as i32);
        child.wait().unwrap();
        assert!(exited.is_none_or(|p| !p.alive()));

        std::fs::write(&file, "not a process\n").unwrap();
        assert_eq!(ProcessId::read(&file), None);
    }
}
