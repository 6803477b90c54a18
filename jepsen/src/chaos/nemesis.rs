//! The nemeses: real faults on real processes and real packets, on a schedule drawn from a seed.
//!
//! The seed fixes the order of the faults, their lengths and the random choices among eligible
//! nodes; which node *is* the primary or the Raft leader at that moment is the cluster's doing,
//! so a replay repeats the schedule, not necessarily every target.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use raftmgr_raft::NodeId;

use crate::cluster::LocalCluster;

/// A small, seedable, well-mixed generator (SplitMix64): the lab's only source of randomness.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low + 1)
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[(self.next_u64() % items.len() as u64) as usize])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Nemesis {
    /// `kill -9` of the primary's postmaster.
    KillPostgres,
    /// `kill -9` of a random node's agent (PostgreSQL keeps running), restarted when healed.
    KillAgent,
    /// `kill -9` of the primary's agent and postmaster together, the agent restarted when healed.
    KillNode,
    /// SIGSTOP of the primary's agent, SIGCONT when healed.
    PauseAgent,
    /// SIGSTOP of the primary's postmaster (its backends keep running), SIGCONT when healed.
    PausePostgres,
    /// The primary cut off from every other node.
    PartitionPrimary,
    /// The Raft leader cut off from every other node.
    PartitionLeader,
    /// A minority and a majority, the primary on a side chosen at random.
    PartitionHalves,
    /// Two halves that cannot reach each other and one node that reaches both.
    PartitionBridge,
    /// Random loss of a share of the packets between the primary and every other node.
    PacketLoss,
    /// Every agent stopped (SIGTERM) and started again, one after the other.
    RollingRestart,
}

pub const ALL: [Nemesis; 11] = [
    Nemesis::KillPostgres,
    Nemesis::KillAgent,
    Nemesis::KillNode,
    Nemesis::PauseAgent,
    Nemesis::PausePostgres,
    Nemesis::PartitionPrimary,
    Nemesis::PartitionLeader,
    Nemesis::PartitionHalves,
    Nemesis::PartitionBridge,
    Nemesis::PacketLoss,
    Nemesis::RollingRestart,
];

impl Nemesis {
    pub fn name(self) -> &'static str {
        match self {
            Nemesis::KillPostgres => "kill-postgres",
            Nemesis::KillAgent => "kill-agent",
            Nemesis::KillNode => "kill-node",
            Nemesis::PauseAgent => "pause-agent",
            Nemesis::PausePostgres => "pause-postgres",
            Nemesis::PartitionPrimary => "partition-primary",
            Nemesis::PartitionLeader => "partition-leader",
            Nemesis::PartitionHalves => "partition-halves",
            Nemesis::PartitionBridge => "partition-bridge",
            Nemesis::PacketLoss => "packet-loss",
            Nemesis::RollingRestart => "rolling-restart",
        }
    }

    /// Whether it drops packets, which only the namespaced lab can do.
    pub fn needs_network(self) -> bool {
        matches!(
            self,
            Nemesis::PartitionPrimary
                | Nemesis::PartitionLeader
                | Nemesis::PartitionHalves
                | Nemesis::PartitionBridge
                | Nemesis::PacketLoss
        )
    }

    fn group(self) -> &'static str {
        match self {
            Nemesis::KillPostgres | Nemesis::KillAgent | Nemesis::KillNode => "kill",
            Nemesis::PauseAgent | Nemesis::PausePostgres => "pause",
            Nemesis::PacketLoss => "loss",
            Nemesis::RollingRestart => "restart",
            _ => "partition",
        }
    }
}

impl fmt::Display for Nemesis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A comma-separated set of nemeses and group names (`kill`, `pause`, `partition`, `loss`,
/// `restart`, `all`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NemesisSet(pub BTreeSet<Nemesis>);

impl FromStr for NemesisSet {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut set = BTreeSet::new();
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let matched: Vec<Nemesis> = ALL
                .iter()
                .copied()
                .filter(|n| word == "all" || n.name() == word || n.group() == word)
                .collect();
            if matched.is_empty() {
                let names: Vec<&str> = ALL.iter().map(|n| n.name()).collect();
                return Err(format!(
                    "unknown nemesis {word:?}: expected a group (kill, pause, partition, loss, \
                     restart, all) or one of {}",
                    names.join(", ")
                ));
            }
            set.extend(matched);
        }
        if set.is_empty() {
            return Err("no nemesis given".into());
        }
        Ok(NemesisSet(set))
    }
}

/// One fault of the schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub nemesis: Nemesis,
    /// How long the fault lasts before it is healed.
    pub duration: Duration,
    /// Drawn now, used to choose among the eligible nodes when the fault starts.
    pub choice: u64,
}

/// The seeded sequence of faults: each nemesis of `set` in turn order drawn at random, lasting
/// `min..=max` seconds.
pub fn plan(seed: u64, set: &NemesisSet, count: usize, min_s: u64, max_s: u64) -> Vec<Planned> {
    let mut rng = Rng::new(seed);
    let kinds: Vec<Nemesis> = set.0.iter().copied().collect();
    (0..count)
        .map(|_| Planned {
            nemesis: *rng.pick(&kinds).expect("a nemesis set is never empty"),
            duration: Duration::from_millis(rng.between(min_s * 1000, max_s * 1000)),
            choice: rng.next_u64(),
        })
        .collect()
}

/// What the lab knows of the cluster when a fault starts.
#[derive(Debug, Clone, Default)]
pub struct Roles {
    pub primary: Option<NodeId>,
    pub leader: Option<NodeId>,
}

/// A fault in progress, with what it takes to heal it.
#[derive(Debug)]
pub struct Active {
    pub nemesis: Nemesis,
    pub targets: Vec<NodeId>,
    pub note: String,
    heal: Heal,
}

#[derive(Debug)]
enum Heal {
    Nothing,
    StartAgents(Vec<NodeId>),
    Resume(Vec<i32>),
    Network,
}

/// Starts `planned` against `cluster`. `None` when it has no target now (no primary known).
pub async fn inject(
    cluster: &mut LocalCluster,
    planned: &Planned,
    roles: &Roles,
) -> anyhow::Result<Option<Active>> {
    let ids = cluster.ids();
    let mut rng = Rng::new(planned.choice);
    let others = |id: NodeId| -> Vec<NodeId> { ids.iter().copied().filter(|o| *o != id).collect() };
    let active = |targets: Vec<NodeId>, note: String, heal: Heal| Active {
        nemesis: planned.nemesis,
        targets,
        note,
        heal,
    };
    let Some(primary) = roles.primary else {
        return Ok(None);
    };
    Ok(Some(match planned.nemesis {
        Nemesis::KillPostgres => {
            let pid = cluster.kill_postmaster(primary)?;
            active(
                vec![primary],
                format!("postmaster pid {pid}"),
                Heal::Nothing,
            )
        }
        Nemesis::KillAgent => {
            let target = *rng.pick(&ids).expect("nodes");
            cluster.kill(target)?;
            active(vec![target], String::new(), Heal::StartAgents(vec![target]))
        }
        Nemesis::KillNode => {
            cluster.kill(primary)?;
            let note = match cluster.kill_postmaster(primary) {
                Ok(pid) => format!("agent and postmaster pid {pid}"),
                Err(e) => format!("agent; postmaster: {e}"),
            };
            active(vec![primary], note, Heal::StartAgents(vec![primary]))
        }
        Nemesis::PauseAgent => {
            let pid = cluster
                .pid(primary)
                .context("the primary's agent is not running")? as i32;
            kill(Pid::from_raw(pid), Signal::SIGSTOP)?;
            active(
                vec![primary],
                format!("agent pid {pid}"),
                Heal::Resume(vec![pid]),
            )
        }
        Nemesis::PausePostgres => {
            let pid = cluster
                .postmaster_pid(primary)
                .context("the primary's PostgreSQL is not running")?;
            kill(Pid::from_raw(pid), Signal::SIGSTOP)?;
            active(
                vec![primary],
                format!("postmaster pid {pid}"),
                Heal::Resume(vec![pid]),
            )
        }
        Nemesis::PartitionPrimary => {
            cut(cluster, &[vec![primary], others(primary)])?;
            active(vec![primary], "cut off from all".into(), Heal::Network)
        }
        Nemesis::PartitionLeader => {
            let leader = roles.leader.unwrap_or(primary);
            cut(cluster, &[vec![leader], others(leader)])?;
            active(
                vec![leader],
                "Raft leader cut off from all".into(),
                Heal::Network,
            )
        }
        Nemesis::PartitionHalves => {
            let minority_size = (ids.len() - 1) / 2;
            let primary_in_minority = rng.next_u64().is_multiple_of(2);
            let mut rest = others(primary);
            let mut minority = Vec::new();
            if primary_in_minority {
                minority.push(primary);
            }
            while minority.len() < minority_size {
                let i = (rng.next_u64() % rest.len() as u64) as usize;
                minority.push(rest.remove(i));
            }
            let majority: Vec<NodeId> = ids
                .iter()
                .copied()
                .filter(|i| !minority.contains(i))
                .collect();
            cut(cluster, &[minority.clone(), majority.clone()])?;
            let side = if primary_in_minority {
                "minority"
            } else {
                "majority"
            };
            active(
                minority.clone(),
                format!("minority {minority:?} | majority {majority:?}; primary in the {side}"),
                Heal::Network,
            )
        }
        Nemesis::PartitionBridge => {
            let bridge = *rng.pick(&ids).expect("nodes");
            let rest = others(bridge);
            let (left, right) = rest.split_at(rest.len() / 2);
            cut(cluster, &[left.to_vec(), right.to_vec()])?;
            active(
                vec![bridge],
                format!("{left:?} | {right:?}, node{bridge} reaches both"),
                Heal::Network,
            )
        }
        Nemesis::PacketLoss => {
            let percent = rng.between(20, 50) as u8;
            let lab = cluster
                .network()
                .context("packet loss needs the namespaced lab")?;
            lab.lossy(primary, &others(primary), percent)?;
            active(
                vec![primary],
                format!("{percent} % of packets dropped"),
                Heal::Network,
            )
        }
        Nemesis::RollingRestart => {
            for id in &ids {
                cluster
                    .stop(*id)
                    .await
                    .with_context(|| format!("stopping node {id}"))?;
                cluster.start_node(*id)?;
                cluster.wait_api(*id, Duration::from_secs(30)).await?;
            }
            active(
                ids.clone(),
                "each agent stopped and started in turn".into(),
                Heal::Nothing,
            )
        }
    }))
}

/// Cuts every node of each group off from every node of the other groups (nodes in no group
/// reach everyone).
fn cut(cluster: &LocalCluster, groups: &[Vec<NodeId>]) -> anyhow::Result<()> {
    let lab = cluster
        .network()
        .context("partitions need the namespaced lab")?;
    for (i, group) in groups.iter().enumerate() {
        let unreachable: Vec<NodeId> = groups
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .flat_map(|(_, g)| g.iter().copied())
            .collect();
        for id in group {
            lab.partition(*id, &unreachable)?;
        }
    }
    Ok(())
}

/// A paused process is resumed even when the run ends early (an error, Ctrl-C): a stopped
/// postmaster would otherwise hang its own shutdown.
impl Drop for Active {
    fn drop(&mut self) {
        if let Heal::Resume(pids) = &self.heal {
            for pid in pids {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGCONT);
            }
        }
    }
}

/// Ends the fault: restarts what was killed, resumes what was paused, removes the partition.
pub fn heal(cluster: &mut LocalCluster, active: &mut Active) -> anyhow::Result<()> {
    match std::mem::replace(&mut active.heal, Heal::Nothing) {
        Heal::Nothing => Ok(()),
        Heal::StartAgents(ids) => {
            for id in ids {
                cluster.start_node(id)?;
            }
            Ok(())
        }
        Heal::Resume(pids) => {
            for pid in pids {
                // Gone already is fine: a killed process needs no resuming.
                let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
            }
            Ok(())
        }
        Heal::Network => cluster.network().context("no lab network to heal")?.heal(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_and_names_parse_and_nonsense_is_refused() {
        let set: NemesisSet = "kill,pause-agent".parse().expect("parses");
        assert_eq!(
            set.0.into_iter().collect::<Vec<_>>(),
            vec![
                Nemesis::KillPostgres,
                Nemesis::KillAgent,
                Nemesis::KillNode,
                Nemesis::PauseAgent
            ]
        );
        assert_eq!(
            "all".parse::<NemesisSet>().expect("parses").0.len(),
            ALL.len()
        );
        let error = "kill,explode".parse::<NemesisSet>().unwrap_err();
        assert!(error.contains("\"explode\""), "{error}");
        assert!(",".parse::<NemesisSet>().is_err());
    }

    #[test]
    fn a_seed_replays_its_schedule_and_another_seed_differs() {
        let set: NemesisSet = "all".parse().expect("parses");
        let a = plan(7, &set, 20, 2, 8);
        assert_eq!(a, plan(7, &set, 20, 2, 8));
        assert_ne!(a, plan(8, &set, 20, 2, 8));
        assert!(a
            .iter()
            .all(|p| (2000..=8000).contains(&(p.duration.as_millis() as u64))));
        let kinds: BTreeSet<Nemesis> = a.iter().map(|p| p.nemesis).collect();
        assert!(kinds.len() > 3, "20 draws over 11 nemeses: {kinds:?}");
    }
}
