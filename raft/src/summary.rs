//! What the committed state says about each node, for `cluster show` and the API: a pure function
//! of [`ClusterState`], so every member shows the same table.

use serde::{Deserialize, Serialize};

use crate::event::Observation;
use crate::state::{ClusterState, NodeRecord};
use crate::types::NodeId;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSummary {
    pub id: NodeId,
    pub name: String,
    /// `primary` or `standby`.
    pub role: String,
    /// `running` (the primary, up), `streaming` (a standby receiving WAL), `running` for a
    /// standby that is up but not streaming, `down`, or `unknown` when no majority of observers
    /// agrees either way.
    pub status: String,
    /// The node this standby streams from, by name.
    pub upstream: Option<String>,
    pub timeline: Option<u32>,
    /// Current WAL LSN on a primary; last received LSN on a standby.
    pub lsn: Option<String>,
    pub replayed_lsn: Option<String>,
    pub lag_bytes: Option<u64>,
    pub lag_ms: Option<u64>,
    pub priority: u32,
    pub nofailover: bool,
    pub nosync: bool,
    /// A member of the committed synchronous set.
    pub sync: bool,
    /// How many observers' latest observation found it reachable / unreachable.
    pub observed_up: usize,
    pub observed_down: usize,
}

/// `16/B374D848`, PostgreSQL's way of writing an LSN.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses PostgreSQL's `16/B374D848`.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    let high = u64::from_str_radix(high, 16).ok()?;
    let low = u64::from_str_radix(low, 16).ok()?;
    (high <= u32::MAX as u64 && low <= u32::MAX as u64).then_some((high << 32) | low)
}

impl ClusterState {
    pub fn node_summaries(&self) -> Vec<NodeSummary> {
        self.nodes
            .values()
            .map(|node| self.summarize(node))
            .collect()
    }

    fn summarize(&self, node: &NodeRecord) -> NodeSummary {
        let r = &node.registration;
        let majority = self.nodes.len() / 2 + 1;
        let observed_up = node
            .health
            .values()
            .filter(|h| h.observation.reachable)
            .count();
        let observed_down = node.health.len() - observed_up;
        // The node's own probe sees the most (WAL receiver, replicas); a peer's will do.
        let own_record = node
            .health
            .get(&r.node_id)
            .filter(|h| h.observation.reachable);
        let own = own_record.map(|h| &h.observation);
        let best = own.or_else(|| {
            node.health
                .values()
                .map(|h| &h.observation)
                .find(|o| o.reachable)
        });
        let is_primary = self.primary == Some(r.node_id);
        let (upstream, lag_bytes, lag_ms) = self.upstream_of(&r.name);
        let streaming = best.and_then(|o| o.wal_receiver.as_deref()) == Some("streaming");
        // A standby's own report that it is up, committed after every observation that found
        // it unreachable, is the freshest word on it: its agent is alive and its PostgreSQL
        // answers. (Without this a node back from a crash, or one the peers last probed before
        // it was started, stayed "down" until a peer's next recorded probe. A crashed node's
        // last own report is older than the peers' "unreachable", so it stays down.)
        let own_is_newest = !is_primary
            && own_record.is_some_and(|mine| {
                node.health
                    .values()
                    .all(|h| h.observation.reachable || h.event_index < mine.event_index)
            });
        let status = if observed_down >= majority && !own_is_newest {
            "down"
        } else if observed_up >= majority || own.is_some() {
            if !is_primary && streaming {
                "streaming"
            } else {
                "running"
            }
        } else {
            "unknown"
        };
        NodeSummary {
            id: r.node_id,
            name: r.name.clone(),
            role: if is_primary { "primary" } else { "standby" }.into(),
            status: status.into(),
            upstream,
            timeline: best.and_then(|o| o.timeline),
            lsn: best.and_then(|o| o.lsn).map(format_lsn),
            replayed_lsn: best.and_then(|o| o.replayed_lsn).map(format_lsn),
            lag_bytes,
            lag_ms,
            priority: r.priority,
            nofailover: r.nofailover,
            nosync: r.nosync,
            sync: self.sync_set.contains(&r.node_id),
            observed_up,
            observed_down,
        }
    }

    /// How far node `id` replays behind its upstream, in bytes, as the upstream measured it.
    pub fn lag_bytes_of(&self, id: NodeId) -> Option<u64> {
        let name = &self.nodes.get(&id)?.registration.name;
        self.upstream_of(name).1
    }

    /// The node whose own observation lists `name` among its replicas, with the lag it measured.
    fn upstream_of(&self, name: &str) -> (Option<String>, Option<u64>, Option<u64>) {
        for node in self.nodes.values() {
            let Some(own) = node.health.get(&node.registration.node_id) else {
                continue;
            };
            let own: &Observation = &own.observation;
            if let Some(replica) = own.replicas.iter().find(|r| r.name == name) {
                let lag_bytes = match (own.lsn, replica.replay_lsn) {
                    (Some(sent), Some(replayed)) => Some(sent.saturating_sub(replayed)),
                    _ => None,
                };
                return (
                    Some(node.registration.name.clone()),
                    lag_bytes,
                    replica.replay_lag_ms,
                );
            }
        }
        (None, None, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, NodeRegistration, PgRole, ReplicaStatus};

    #[test]
    fn lsns_round_trip_in_postgres_notation() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("nonsense"), None);
        assert_eq!(parse_lsn("1/FFFFFFFFF"), None);
    }

    /// Node 1 the primary, nodes 2 and 3 standbys (event indexes 1-3).
    fn three_nodes() -> ClusterState {
        let mut state = ClusterState::default();
        for id in [1, 2, 3] {
            let role = if id == 1 {
                PgRole::Primary
            } else {
                PgRole::Standby
            };
            let registration = NodeRegistration::for_tests(id, role);
            state.apply(&Event::NodeRegistered(registration), id);
        }
        state
    }

    fn seen(observer: NodeId, subject: NodeId, reachable: bool) -> Observation {
        Observation {
            observer,
            subject,
            reachable,
            in_recovery: Some(subject != 1),
            timeline: Some(1),
            lsn: Some(1000),
            replayed_lsn: Some(900),
            lag_bytes: None,
            wal_receiver: (subject != 1).then(|| "streaming".to_string()),
            replicas: vec![],
        }
    }

    #[test]
    fn status_follows_the_majority_and_upstream_comes_from_the_primary() {
        let mut state = three_nodes();
        let mut primary_self = seen(1, 1, true);
        primary_self.lsn = Some(5000);
        primary_self.replicas = vec![ReplicaStatus {
            name: "node2".into(),
            state: "streaming".into(),
            sync_state: "async".into(),
            replay_lsn: Some(4000),
            replay_lag_ms: Some(3),
        }];
        let mut index = 10;
        let mut observe = |state: &mut ClusterState, o: Observation| {
            index += 1;
            state.apply(&Event::HealthObserved(o), index);
        };
        observe(&mut state, primary_self);
        observe(&mut state, seen(2, 2, true));
        observe(&mut state, seen(3, 3, false)); // its own agent cannot reach it: one vote
        let rows = state.node_summaries();
        assert_eq!(rows[0].role, "primary");
        assert_eq!(rows[0].status, "running");
        assert_eq!(rows[1].status, "streaming");
        assert_eq!(rows[1].upstream.as_deref(), Some("node1"));
        assert_eq!((rows[1].lag_bytes, rows[1].lag_ms), (Some(1000), Some(3)));
        assert_eq!(
            state.lag_bytes_of(2),
            Some(1000),
            "what the checks read alone"
        );
        assert_eq!(state.lag_bytes_of(1), None, "the primary follows no one");
        assert_eq!(state.lag_bytes_of(9), None, "no such node");
        assert_eq!(rows[2].status, "unknown", "one observer is not a majority");

        observe(&mut state, seen(1, 3, false));
        assert_eq!(state.node_summaries()[2].status, "down");
        observe(&mut state, seen(3, 3, true));
        assert_eq!(
            state.node_summaries()[2].status,
            "streaming",
            "its own report, newer than every 'unreachable', says it is back"
        );
        observe(&mut state, seen(1, 3, true));
        assert_eq!(state.node_summaries()[2].status, "streaming");
    }

    #[test]
    fn a_crashed_standby_is_down_until_it_reports_again() {
        let mut state = three_nodes();
        state.apply(&Event::HealthObserved(seen(3, 3, true)), 10);
        assert_eq!(state.node_summaries()[2].status, "streaming");
        state.apply(&Event::HealthObserved(seen(1, 3, false)), 11);
        state.apply(&Event::HealthObserved(seen(2, 3, false)), 12);
        assert_eq!(state.node_summaries()[2].status, "down");
        // Started again, not streaming yet (its primary is gone, say): its own newer report
        // says it is up.
        let mut back = seen(3, 3, true);
        back.wal_receiver = None;
        state.apply(&Event::HealthObserved(back), 13);
        assert_eq!(state.node_summaries()[2].status, "running");
    }
}
