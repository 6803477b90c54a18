//! A former primary's own WAL, kept across its pg_rewind.
//!
//! After a rewind, PostgreSQL replays from the redo point of the last checkpoint the two servers
//! share. That WAL is history both have, and the target has it in its own pg_wal. But pg_rewind
//! makes the target's pg_wal a copy of the source's: PostgreSQL 15's keeps the target's own
//! segments only from that checkpoint's *record* on, and removes the older ones even though
//! recovery starts before them, at the redo point. A checkpoint spread over minutes of writes
//! (any checkpoint that is not `CHECKPOINT`) leaves many segments between the two; unless the
//! source still has them, or an archive does, the rewound standby then waits for WAL nobody has.
//!
//! So the agent hard-links the target's segments into a folder beside the data directory before
//! pg_rewind runs ([`WalAside::keep`]), and afterwards links back those the rewind removed that
//! hold WAL from that redo point to the fork ([`WalAside::restore`]). Recovery reads them as it
//! would have read the source's copies. The new primary need not keep WAL from before the fork
//! for the returning node: only from the fork on, which its replication slots hold (see
//! `failover.rs`).

use std::path::{Path, PathBuf};

use anyhow::Context;

/// A WAL segment's file name: 24 hex digits (timeline, then the segment's log and number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    timeline: u32,
    /// The segment's first LSN, given its size.
    start_lsn: u64,
}

impl Segment {
    fn parse(name: &str, segment_bytes: u64) -> Option<Segment> {
        if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let timeline = u32::from_str_radix(&name[0..8], 16).ok()?;
        let log = u64::from_str_radix(&name[8..16], 16).ok()?;
        let number = u64::from_str_radix(&name[16..24], 16).ok()?;
        Some(Segment {
            timeline,
            start_lsn: (log << 32) + number * segment_bytes,
        })
    }
}

/// The WAL a rewound target replays from its own history: from the redo point of the last
/// checkpoint both servers share (the `backup_label` pg_rewind writes) to the fork (pg_rewind's
/// "servers diverged at WAL location 0/3696FEE0 on timeline 1").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needed {
    pub redo_lsn: u64,
    pub fork_lsn: u64,
    pub timeline: u32,
}

impl Needed {
    /// None when pg_rewind found nothing to rewind (or said it in words not understood here).
    /// Without a readable redo point, everything before the fork is needed.
    pub fn after_rewind(output: &str, backup_label: &str) -> Option<Needed> {
        let rest = output.split("diverged at WAL location ").nth(1)?;
        let mut words = rest.split_whitespace();
        let fork_lsn = raftmgr_raft::summary::parse_lsn(words.next()?)?;
        if words.next()? != "on" || words.next()? != "timeline" {
            return None;
        }
        let timeline = words.next()?.trim_end_matches(['.', ',']).parse().ok()?;
        let redo_lsn = backup_label
            .lines()
            .find_map(|l| l.strip_prefix("START WAL LOCATION: "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(raftmgr_raft::summary::parse_lsn)
            .unwrap_or(0);
        Some(Needed {
            redo_lsn,
            fork_lsn,
            timeline,
        })
    }

    fn includes(&self, segment: Segment, segment_bytes: u64) -> bool {
        let end_lsn = segment.start_lsn + segment_bytes;
        segment.timeline <= self.timeline && end_lsn > self.redo_lsn && end_lsn <= self.fork_lsn
    }
}

/// Hard links to the segments of a pg_wal, in a folder of their own.
pub struct WalAside {
    wal: PathBuf,
    aside: PathBuf,
}

impl WalAside {
    /// Links every segment of `wal` into `aside` (created if missing; links already there from
    /// an interrupted rewind are kept, since they may be the only ones left). Hard links cost
    /// no copy, but need one filesystem: when a link fails, that is said once, and the rewind
    /// relies on the source's WAL as before.
    pub fn keep(wal: &Path, aside: &Path) -> anyhow::Result<WalAside> {
        remove_garbage(&garbage_dir(aside));
        std::fs::create_dir_all(aside).with_context(|| format!("creating {}", aside.display()))?;
        for (name, path) in segments(wal)? {
            let link = aside.join(&name);
            if link.exists() {
                continue;
            }
            if let Err(e) = std::fs::hard_link(&path, &link) {
                tracing::warn!(
                    "could not keep {} aside in {} ({e}): a rewind will need the WAL before the \
                     fork from the source or the archive",
                    path.display(),
                    aside.display()
                );
                break;
            }
        }
        Ok(WalAside {
            wal: wal.to_path_buf(),
            aside: aside.to_path_buf(),
        })
    }

    /// Links back into pg_wal the kept segments it no longer has that hold `needed` WAL (on
    /// the fork's timeline or an earlier one), or every one it no longer has when `needed` is
    /// None (pg_rewind failed half-way, and a retry needs what it removed). Returns their names.
    pub fn restore(&self, needed: Option<Needed>) -> anyhow::Result<Vec<String>> {
        let mut restored = Vec::new();
        for (name, path) in segments(&self.aside)? {
            let target = self.wal.join(&name);
            if target.exists() {
                continue;
            }
            let wanted = match needed {
                None => true,
                Some(needed) => {
                    let bytes = std::fs::metadata(&path)?.len();
                    Segment::parse(&name, bytes).is_some_and(|s| needed.includes(s, bytes))
                }
            };
            if wanted {
                std::fs::hard_link(&path, &target)
                    .with_context(|| format!("linking {} back", target.display()))?;
                restored.push(name);
            }
        }
        restored.sort();
        Ok(restored)
    }

    /// Removes the folder of links (the segments live on in pg_wal where they are still linked)
    /// without making the caller wait. Its links are the last ones of the segments pg_rewind
    /// removed, and freeing a gigabyte of them takes ext4 about half a second, which the
    /// standby's start need not wait for: the folder is renamed (so that no later rewind takes
    /// it for an interrupted one's) and emptied by a thread of its own. A folder left behind
    /// by an agent stopped meanwhile goes at the next [`WalAside::keep`].
    pub fn remove(self) -> anyhow::Result<()> {
        let garbage = garbage_dir(&self.aside);
        if std::fs::rename(&self.aside, &garbage).is_err() {
            // The last removal is still under way there: this one waits.
            return std::fs::remove_dir_all(&self.aside)
                .with_context(|| format!("removing {}", self.aside.display()));
        }
        std::thread::Builder::new()
            .name("wal-aside-removal".into())
            .spawn(move || remove_garbage(&garbage))
            .context("starting the removal of the WAL kept aside")?;
        Ok(())
    }
}

/// Where [`WalAside::remove`] moves a folder of links that only waits to be removed.
fn garbage_dir(aside: &Path) -> PathBuf {
    let mut dir = aside.as_os_str().to_owned();
    dir.push(".removing");
    PathBuf::from(dir)
}

fn remove_garbage(garbage: &Path) {
    match std::fs::remove_dir_all(garbage) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("could not remove {}: {e}", garbage.display()),
    }
}

/// The segment files of a folder (names of 24 hex digits), by name.
fn segments(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.len() == 24
            && name.bytes().all(|b| b.is_ascii_hexdigit())
            && entry.file_type()?.is_file()
        {
            found.push((name, entry.path()));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB_16: u64 = 16 << 20;

    const BACKUP_LABEL: &str = "START WAL LOCATION: 0/47589D88 (file 000000010000000000000047)\n\
                                CHECKPOINT LOCATION: 0/4F4049B0\n\
                                BACKUP METHOD: pg_rewind\n";

    #[test]
    fn the_wal_needed_is_read_from_pg_rewinds_output_and_backup_label() {
        let output = "pg_rewind: fetched file \"pg_wal/00000002.history\", length 42\n\
                      pg_rewind: servers diverged at WAL location 1/57B19050 on timeline 3\n\
                      pg_rewind: rewinding from last common checkpoint at 0/4F4049B0 on timeline 3\n";
        assert_eq!(
            Needed::after_rewind(output, BACKUP_LABEL),
            Some(Needed {
                redo_lsn: 0x4758_9D88,
                fork_lsn: 0x1_57B1_9050,
                timeline: 3
            })
        );
        assert_eq!(
            Needed::after_rewind(output, "").map(|n| n.redo_lsn),
            Some(0),
            "without a backup label, everything before the fork"
        );
        assert_eq!(
            Needed::after_rewind("pg_rewind: no rewind required\n", BACKUP_LABEL),
            None
        );
        assert_eq!(
            Needed::after_rewind(
                "servers diverged at WAL location nonsense on timeline 1",
                BACKUP_LABEL
            ),
            None
        );
    }

    #[test]
    fn segment_names_give_their_timeline_and_first_lsn() {
        assert_eq!(
            Segment::parse("000000020000000100000057", MIB_16),
            Some(Segment {
                timeline: 2,
                start_lsn: 0x1_5700_0000
            })
        );
        // 64 MiB segments: number 3 of log 0 starts at 192 MiB.
        assert_eq!(
            Segment::parse("000000010000000000000003", 64 << 20).map(|s| s.start_lsn),
            Some(0x0C00_0000)
        );
        assert_eq!(Segment::parse("00000002.history", MIB_16), None);
        assert_eq!(Segment::parse("00000001000000000000004Z", MIB_16), None);
    }

    /// Files named like segments, 16 MiB long but sparse.
    fn segment_files(dir: &Path, names: &[&str]) {
        for name in names {
            let file = std::fs::File::create(dir.join(name)).unwrap();
            file.set_len(MIB_16).unwrap();
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = segments(dir).unwrap().into_iter().map(|(n, _)| n).collect();
        names.sort();
        names
    }

    #[test]
    fn after_a_rewind_the_removed_segments_from_the_redo_point_to_the_fork_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, aside) = (dir.path().join("pg_wal"), dir.path().join("aside"));
        std::fs::create_dir(&wal).unwrap();
        segment_files(
            &wal,
            &[
                "000000010000000000000046", // before the last common checkpoint's redo point
                "000000010000000000000047", // holds that redo point
                "000000010000000000000048",
                "00000001000000000000004F", // pg_rewind keeps these itself
                "000000010000000000000057", // holds the fork: the source's copy wins
                "000000010000000000000058", // the old primary's own history after the fork
            ],
        );
        std::fs::write(wal.join("00000001.history"), "not a segment").unwrap();
        let kept = WalAside::keep(&wal, &aside).unwrap();
        assert_eq!(names(&aside).len(), 6);

        // What pg_rewind leaves: its own keeps, and the source's files.
        for name in [
            "000000010000000000000046",
            "000000010000000000000047",
            "000000010000000000000048",
            "000000010000000000000058",
        ] {
            std::fs::remove_file(wal.join(name)).unwrap();
        }
        std::fs::remove_file(wal.join("000000010000000000000057")).unwrap();
        segment_files(
            &wal,
            &["000000010000000000000057", "000000020000000000000057"],
        );

        let needed = Needed {
            redo_lsn: 0x4758_9D88,
            fork_lsn: 0x57B1_9050,
            timeline: 1,
        };
        let restored = kept.restore(Some(needed)).unwrap();
        assert_eq!(
            restored,
            ["000000010000000000000047", "000000010000000000000048"]
        );
        assert_eq!(
            names(&wal),
            [
                "000000010000000000000047",
                "000000010000000000000048",
                "00000001000000000000004F",
                "000000010000000000000057",
                "000000020000000000000057",
            ]
        );
        kept.remove().unwrap();
        assert!(!aside.exists());
        assert_eq!(
            names(&wal).len(),
            5,
            "the links in pg_wal outlive the folder"
        );
        let garbage = garbage_dir(&aside);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while garbage.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} is still there 10 s later",
                garbage.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn a_folder_left_to_remove_goes_at_the_next_rewind_and_is_never_restored_from() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, aside) = (dir.path().join("pg_wal"), dir.path().join("aside"));
        std::fs::create_dir(&wal).unwrap();
        // An agent stopped while it removed the last rewind's links.
        let garbage = garbage_dir(&aside);
        std::fs::create_dir(&garbage).unwrap();
        segment_files(&garbage, &["000000010000000000000040"]);

        let kept = WalAside::keep(&wal, &aside).unwrap();
        assert!(!garbage.exists());
        assert_eq!(kept.restore(None).unwrap(), Vec::<String>::new());
        kept.remove().unwrap();
    }

    #[test]
    fn after_a_failed_rewind_every_removed_segment_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, aside) = (dir.path().join("pg_wal"), dir.path().join("aside"));
        std::fs::create_dir(&wal).unwrap();
        segment_files(
            &wal,
            &["000000010000000000000046", "000000010000000000000058"],
        );
        let kept = WalAside::keep(&wal, &aside).unwrap();
        std::fs::remove_file(wal.join("000000010000000000000058")).unwrap();
        assert_eq!(kept.restore(None).unwrap(), ["000000010000000000000058"]);
        kept.remove().unwrap();
        assert_eq!(names(&wal).len(), 2);
    }

    #[test]
    fn links_left_by_an_interrupted_rewind_are_kept_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, aside) = (dir.path().join("pg_wal"), dir.path().join("aside"));
        std::fs::create_dir(&wal).unwrap();
        segment_files(&wal, &["000000010000000000000046"]);
        let first = WalAside::keep(&wal, &aside).unwrap();
        // The agent stops after pg_rewind removed the segment, before it linked it back.
        std::fs::remove_file(wal.join("000000010000000000000046")).unwrap();
        drop(first);
        let second = WalAside::keep(&wal, &aside).unwrap();
        let needed = Needed {
            redo_lsn: 0x4600_0028,
            fork_lsn: 0x5700_0000,
            timeline: 1,
        };
        assert_eq!(
            second.restore(Some(needed)).unwrap(),
            ["000000010000000000000046"]
        );
        second.remove().unwrap();
    }
}
