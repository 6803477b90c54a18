//! `raftmgr lease-guard`: the second line of fencing. A primary's agent fences its own
//! PostgreSQL when its lease runs out — unless the agent itself is dead or paused (SIGSTOP). So
//! each agent starts this small process beside it, in its own process group, and tells it the
//! lease's expiry through a file: `primary <until_ns>` or `standby`, with the agent's pid. Times
//! are on CLOCK_MONOTONIC, which all processes of the machine share.
//!
//! When the file says primary and the expiry has passed, the guard sends SIGQUIT to the
//! postmaster (an immediate shutdown). It exits once the agent and the postmaster are both gone,
//! or the lease file is removed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::Pid;

use crate::pg::{lock_holder, process_alive};

const POLL: Duration = Duration::from_millis(20);
/// Fence this long before the expiry, like the agent's own watchdog.
const MARGIN_NS: u64 = 100_000_000;

/// Nanoseconds on CLOCK_MONOTONIC.
pub fn monotonic_ns() -> u64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC exists on Linux");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardMode {
    /// Fence once CLOCK_MONOTONIC passes this.
    Primary {
        until_ns: u64,
    },
    Standby,
}

/// The file the guard leaves when it fenced PostgreSQL, beside the lease file.
pub fn fenced_marker(lease_file: &Path) -> PathBuf {
    lease_file.with_extension("fenced")
}

/// Whether the guard fenced PostgreSQL since the last call (removes its marker).
pub fn take_fenced_marker(lease_file: &Path) -> bool {
    std::fs::remove_file(fenced_marker(lease_file)).is_ok()
}

/// Writes the lease file atomically (a rename), for the guard to read.
pub fn write_lease_file(path: &Path, mode: GuardMode) -> std::io::Result<()> {
    let text = match mode {
        GuardMode::Primary { until_ns } => format!("primary {until_ns} {}\n", std::process::id()),
        GuardMode::Standby => format!("standby 0 {}\n", std::process::id()),
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

fn read_lease_file(path: &Path) -> Option<(GuardMode, i32)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut parts = text.split_whitespace();
    let mode = parts.next()?;
    let until_ns: u64 = parts.next()?.parse().ok()?;
    let agent: i32 = parts.next()?.parse().ok()?;
    let mode = match mode {
        "primary" => GuardMode::Primary { until_ns },
        _ => GuardMode::Standby,
    };
    Some((mode, agent))
}

/// The guard's loop; returns when there is nothing left to guard.
pub fn run(lease_file: &Path, data_dir: &Path) -> anyhow::Result<()> {
    eprintln!(
        "lease-guard: watching {} for {}",
        lease_file.display(),
        data_dir.display()
    );
    let mut seen = false;
    loop {
        let Some((mode, agent)) = read_lease_file(lease_file) else {
            if seen && !lease_file.exists() {
                eprintln!("lease-guard: {} is gone; exiting", lease_file.display());
                return Ok(());
            }
            std::thread::sleep(POLL);
            continue;
        };
        seen = true;
        let postmaster = lock_holder(&data_dir.join("postmaster.pid"));
        if let Some(pid) = to_stop(mode, postmaster, monotonic_ns()) {
            eprintln!("lease-guard: the lease ran out and the agent did not fence; stopping postmaster {pid}");
            // Written first, so that the agent never takes the stop for a crash.
            if let Err(e) = std::fs::write(fenced_marker(lease_file), pid.to_string()) {
                eprintln!("lease-guard: cannot write the fenced marker: {e}");
            }
            kill(Pid::from_raw(pid), Signal::SIGQUIT).context("signalling the postmaster")?;
        }
        if postmaster.is_none() && !process_alive(agent) {
            eprintln!("lease-guard: agent {agent} and PostgreSQL are gone; exiting");
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}

/// Starts a guard for this agent unless the one named in `pid_file` still runs.
pub fn ensure_running(lease_file: &Path, data_dir: &Path, pid_file: &Path) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    adopt_lease_file(lease_file)?;
    if let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
    {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if process_alive(pid) && String::from_utf8_lossy(&cmdline).contains("lease-guard") {
            return Ok(());
        }
    }
    let exe = std::env::current_exe()?;
    let child = std::process::Command::new(exe)
        .arg("lease-guard")
        .arg("--lease-file")
        .arg(lease_file)
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(std::process::Stdio::null())
        // Its own process group: a signal to the agent's group does not reach it.
        .process_group(0)
        .spawn()
        .context("starting the lease guard")?;
    std::fs::write(pid_file, child.id().to_string())?;
    tracing::info!(pid = child.id(), "started the lease guard");
    Ok(())
}

/// Makes the lease file name this agent. A file left by an earlier agent (say, "primary until
/// T") stays in force, but a guard reading it must not take that agent's death, with
/// PostgreSQL not started yet, for the end of its watch: found by the chaos lab, where a guard
/// started beside a restarted agent exited at once and the next kill of that agent left its
/// PostgreSQL writable with nobody to fence it.
fn adopt_lease_file(lease_file: &Path) -> std::io::Result<()> {
    let mode = read_lease_file(lease_file).map_or(GuardMode::Standby, |(mode, _)| mode);
    write_lease_file(lease_file, mode)
}

/// The paths of the guard's files in the agent's data folder.
pub fn paths(agent_data_dir: &Path) -> (PathBuf, PathBuf) {
    (
        agent_data_dir.join("lease"),
        agent_data_dir.join("lease-guard.pid"),
    )
}

/// The postmaster to stop at `now_ns`: the lease file names a primary whose lease ran out, and
/// `holder` (of postmaster.pid, [`lock_holder`]) is a postmaster. A standalone backend (its pid
/// negated) takes no connections: the agent runs one for a former primary's crash recovery,
/// before the lease file says it is no longer the primary.
fn to_stop(mode: GuardMode, holder: Option<i32>, now_ns: u64) -> Option<i32> {
    match (mode, holder) {
        (GuardMode::Primary { until_ns }, Some(pid)) if pid > 0 => {
            (now_ns + MARGIN_NS >= until_ns).then_some(pid)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_postmaster_past_its_primarys_lease_is_stopped() {
        let ran_out = GuardMode::Primary { until_ns: 1_000 };
        let now = 1_000 + MARGIN_NS;
        assert_eq!(to_stop(ran_out, Some(42), now), Some(42));
        assert_eq!(
            to_stop(ran_out, Some(-42), now),
            None,
            "a standalone backend"
        );
        assert_eq!(to_stop(ran_out, None, now), None);
        assert_eq!(to_stop(GuardMode::Standby, Some(42), now), None);
        let live = GuardMode::Primary {
            until_ns: now + MARGIN_NS + 1,
        };
        assert_eq!(to_stop(live, Some(42), now), None);
    }

    #[test]
    fn a_restarted_agent_adopts_the_lease_file_and_keeps_its_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let lease = dir.path().join("lease");
        adopt_lease_file(&lease).unwrap();
        assert_eq!(
            read_lease_file(&lease),
            Some((GuardMode::Standby, std::process::id() as i32))
        );
        // An earlier agent, long gone, left a primary's lease.
        std::fs::write(&lease, "primary 42 999999999\n").unwrap();
        adopt_lease_file(&lease).unwrap();
        assert_eq!(
            read_lease_file(&lease),
            Some((
                GuardMode::Primary { until_ns: 42 },
                std::process::id() as i32
            ))
        );
    }

    #[test]
    fn the_fenced_marker_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let lease = dir.path().join("lease");
        assert!(!take_fenced_marker(&lease));
        std::fs::write(fenced_marker(&lease), "42").unwrap();
        assert!(take_fenced_marker(&lease));
        assert!(!take_fenced_marker(&lease));
    }

    #[test]
    fn the_lease_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease");
        write_lease_file(&path, GuardMode::Primary { until_ns: 42 }).unwrap();
        assert_eq!(
            read_lease_file(&path),
            Some((
                GuardMode::Primary { until_ns: 42 },
                std::process::id() as i32
            ))
        );
        write_lease_file(&path, GuardMode::Standby).unwrap();
        assert_eq!(read_lease_file(&path).unwrap().0, GuardMode::Standby);
    }
}
