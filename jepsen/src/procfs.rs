//! Reading a process's memory and CPU use from `/proc` (Linux only).

use anyhow::Context;

/// Clock ticks per second of `utime`/`stime` in `/proc/<pid>/stat`: `USER_HZ`, which Linux fixes
/// at 100 for user space on every architecture this runs on (`getconf CLK_TCK`).
const USER_HZ: f64 = 100.0;

/// The resident set size of process `pid` (`VmRSS` in `/proc/<pid>/status`), in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_rss_kib(&status).with_context(|| format!("no VmRSS line in {path}"))
}

fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    // "VmRSS:     12345 kB"
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The CPU time process `pid` has used so far (user + system, all threads), in seconds.
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = parse_cpu_ticks(&stat).with_context(|| format!("unexpected format of {path}"))?;
    Ok(ticks as f64 / USER_HZ)
}

/// The CPU time this process has used so far, in seconds.
pub fn own_cpu_secs() -> anyhow::Result<f64> {
    cpu_secs(std::process::id())
}

/// When process `pid` started, in clock ticks since boot (field 22 of `/proc/<pid>/stat`): with
/// the pid, it names one process, even after the pid is reused.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    after_name(&stat)?.nth(19)?.parse().ok()
}

/// The fields of a `/proc/<pid>/stat` line after the command name (field 2), which is in
/// parentheses and may contain spaces: so they are counted after the last `)`, field 3
/// (`state`) first.
pub fn after_name(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace())
}

/// `utime + stime` from a `/proc/<pid>/stat` line: fields 14 and 15, the 12th and 13th after
/// the command name.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let mut fields = after_name(stat)?.skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_from_its_line() {
        let status = "Name:\traftmgr\nVmPeak:\t  99999 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss_kib(status), Some(12345));
        assert_eq!(parse_vm_rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn cpu_ticks_are_counted_after_the_command_name() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1 2 3";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("42 (x) S 1"), None);
    }

    #[test]
    fn this_process_has_a_resident_set() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        assert!(own_cpu_secs().unwrap() >= 0.0);
    }
}
