//! The checkers: pure functions from a recorded [`History`] to a verdict. They trust nothing but
//! the record — what clients were told, what the lab saw committed, what the databases hold after
//! healing — never the agents' opinion of themselves.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::Serialize;

use super::history::{History, NodeFinal, Outcome, Write};

/// How many example violations a verdict keeps.
const EXAMPLES_MAX: usize = 10;

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub checker: &'static str,
    pub ok: bool,
    /// One line: what was checked and what was found.
    pub summary: String,
    pub violations: usize,
    /// The first violations (at most [`EXAMPLES_MAX`]), each with the records around it.
    pub details: Vec<String>,
    /// When the earliest violation happened (run time, ms), for the faults and generations
    /// around it in the printout.
    pub at_ms: Option<f64>,
}

impl Verdict {
    fn new(checker: &'static str, problems: Vec<String>, summary: String) -> Verdict {
        Verdict {
            checker,
            ok: problems.is_empty(),
            summary,
            violations: problems.len(),
            details: problems.into_iter().take(EXAMPLES_MAX).collect(),
            at_ms: None,
        }
    }

    fn at(mut self, at_ms: Option<f64>) -> Verdict {
        self.at_ms = at_ms;
        self
    }
}

/// Every checker, in the order the report shows them.
pub fn check_all(history: &History) -> Vec<Verdict> {
    vec![
        lost_writes(history),
        split_brain(history),
        convergence(history),
        log_agreement(history),
    ]
}

fn synchronous(history: &History) -> bool {
    matches!(history.synchronous_mode.as_str(), "on" | "strict")
}

fn acked(history: &History) -> impl Iterator<Item = &Write> {
    history.writes.iter().filter(|w| w.outcome == Outcome::Ok)
}

/// Every acknowledged insert is on the final primary; no insert that was refused is. In
/// asynchronous mode lost writes are counted and reported, not failed: the mode does not promise
/// them.
pub fn lost_writes(history: &History) -> Verdict {
    let Some(primary) = history.final_primary() else {
        return Verdict::new(
            "lost-writes",
            vec![
                "the agents do not agree on a final primary, or it did not answer: nothing to \
                 check against"
                    .into(),
            ],
            "no final primary".into(),
        );
    };
    let present: HashSet<i64> = primary.ids.iter().copied().collect();
    let acked: Vec<&Write> = acked(history).collect();
    let lost: Vec<&&Write> = acked.iter().filter(|w| !present.contains(&w.id)).collect();
    let phantom: Vec<&Write> = history
        .writes
        .iter()
        .filter(|w| w.outcome == Outcome::Failed && present.contains(&w.id))
        .collect();
    let mut problems: Vec<String> = phantom
        .iter()
        .map(|w| format!("write {} was refused but is present: {}", w.id, describe(w)))
        .collect();
    if synchronous(history) {
        problems.extend(
            lost.iter()
                .map(|w| format!("acknowledged write {} is lost: {}", w.id, describe(w))),
        );
    }
    let unknown = history
        .writes
        .iter()
        .filter(|w| w.outcome == Outcome::Unknown)
        .count();
    let summary = format!(
        "{} acknowledged, {} lost{}, {} unknown ({} of them present), {} refused but present; \
         checked against {}",
        acked.len(),
        lost.len(),
        if synchronous(history) {
            ""
        } else {
            " (asynchronous mode: reported, not failed)"
        },
        unknown,
        history
            .writes
            .iter()
            .filter(|w| w.outcome == Outcome::Unknown && present.contains(&w.id))
            .count(),
        phantom.len(),
        primary.name,
    );
    let first = lost
        .iter()
        .map(|w| w.start_ms)
        .chain(phantom.iter().map(|w| w.start_ms))
        .reduce(f64::min);
    Verdict::new("lost-writes", problems, summary).at(first)
}

fn describe(w: &Write) -> String {
    format!(
        "{} client, {:.0}–{:.0} ms, node {}, timeline {}",
        w.client,
        w.start_ms,
        w.end_ms,
        w.node.as_deref().unwrap_or("?"),
        w.timeline.map_or("?".into(), |t| t.to_string())
    )
}

/// Split brain, three ways, all from what clients were told:
/// - one timeline, one writer: two nodes acknowledging writes on the same timeline means two
///   promotions from one history;
/// - no going back: a write acknowledged on an older timeline that began after a write on a newer
///   timeline had been acknowledged means the old primary still took writes while the new one did;
/// - no write without the current generation: a write that began after the lab saw a generation
///   committed whose primary is another node, acknowledged by a node that no later generation
///   made primary again.
pub fn split_brain(history: &History) -> Verdict {
    let mut problems = Vec::new();
    let mut first: Option<f64> = None;
    let acked: Vec<&Write> = acked(history).collect();

    let mut writers: BTreeMap<u32, BTreeSet<&str>> = BTreeMap::new();
    for w in &acked {
        if let (Some(t), Some(node)) = (w.timeline, w.node.as_deref()) {
            writers.entry(t).or_default().insert(node);
        }
    }
    for (timeline, nodes) in &writers {
        if nodes.len() > 1 {
            problems.push(format!(
                "timeline {timeline} was written by {} nodes: {nodes:?}",
                nodes.len()
            ));
        }
    }

    // Acknowledged writes by the time their answer came, with the newest timeline so far.
    let mut by_end: Vec<&Write> = acked
        .iter()
        .filter(|w| w.timeline.is_some())
        .copied()
        .collect();
    by_end.sort_by(|a, b| a.end_ms.total_cmp(&b.end_ms));
    let mut newest: Vec<&Write> = Vec::with_capacity(by_end.len());
    for w in &by_end {
        let keep = match newest.last() {
            Some(best) if best.timeline >= w.timeline => *best,
            _ => *w,
        };
        newest.push(keep);
    }
    for w in &acked {
        let before = by_end.partition_point(|v| v.end_ms < w.start_ms);
        if before == 0 {
            continue;
        }
        let newer = newest[before - 1];
        if newer.timeline > w.timeline && w.timeline.is_some() {
            first = Some(first.map_or(w.start_ms, |f| f.min(w.start_ms)));
            problems.push(format!(
                "write {} ({}) was acknowledged on an older timeline after write {} ({}) had \
                 been acknowledged on a newer one",
                w.id,
                describe(w),
                newer.id,
                describe(newer)
            ));
        }
    }

    for w in &acked {
        let Some(node) = w.node.as_deref() else {
            continue;
        };
        let Some(current) = history
            .generations
            .iter()
            .filter(|g| g.seen_ms < w.start_ms)
            .max_by_key(|g| g.generation)
        else {
            continue;
        };
        let deposed = current.primary.as_deref() != Some(node);
        let primary_again = history
            .generations
            .iter()
            .any(|g| g.generation > current.generation && g.primary.as_deref() == Some(node));
        if deposed && !primary_again {
            first = Some(first.map_or(w.start_ms, |f| f.min(w.start_ms)));
            problems.push(format!(
                "write {} ({}) began {:.0} ms after generation {} (primary {}) was seen \
                 committed, yet {node} acknowledged it",
                w.id,
                describe(w),
                w.start_ms - current.seen_ms,
                current.generation,
                current.primary.as_deref().unwrap_or("none"),
            ));
        }
    }
    let summary = format!(
        "{} acknowledged writes on {} timeline(s), {} generation(s) seen: {} violation(s)",
        acked.len(),
        writers.len(),
        history.generations.len(),
        problems.len()
    );
    Verdict::new("split-brain", problems, summary).at(first)
}

/// What keeps `finals` from being one converged cluster: exactly one writable primary, the one
/// the committed state names; every other node a standby streaming from it on its timeline; the
/// same rows everywhere.
pub fn convergence_problems(finals: &[NodeFinal]) -> Vec<String> {
    let mut problems = Vec::new();
    let writable: Vec<&NodeFinal> = finals
        .iter()
        .filter(|f| f.in_recovery == Some(false))
        .collect();
    if writable.len() != 1 {
        problems.push(format!(
            "{} writable primaries: {:?}",
            writable.len(),
            writable.iter().map(|f| &f.name).collect::<Vec<_>>()
        ));
        return problems;
    }
    let primary = writable[0];
    for f in finals {
        if f.committed_primary.as_ref() != Some(&primary.name) {
            problems.push(format!(
                "{}'s agent names {:?} as primary, but {} is the writable one",
                f.name, f.committed_primary, primary.name
            ));
        }
        if f.name == primary.name {
            continue;
        }
        if !f.running {
            problems.push(format!("{}: PostgreSQL is not running", f.name));
            continue;
        }
        if f.receiver_status.as_deref() != Some("streaming")
            || f.upstream.as_ref() != Some(&primary.name)
        {
            problems.push(format!(
                "{}: not streaming from {} (receiver {:?}, upstream {:?})",
                f.name, primary.name, f.receiver_status, f.upstream
            ));
        }
        if f.timeline != primary.timeline {
            problems.push(format!(
                "{}: on timeline {:?}, the primary on {:?}",
                f.name, f.timeline, primary.timeline
            ));
        }
        if f.ids != primary.ids {
            let theirs: HashSet<i64> = f.ids.iter().copied().collect();
            let ours: HashSet<i64> = primary.ids.iter().copied().collect();
            problems.push(format!(
                "{}: {} rows, the primary {}; {} missing here, {} only here",
                f.name,
                f.ids.len(),
                primary.ids.len(),
                ours.difference(&theirs).count(),
                theirs.difference(&ours).count()
            ));
        }
    }
    problems
}

/// Within the bound after the last fault healed, the cluster converged.
pub fn convergence(history: &History) -> Verdict {
    let mut problems = convergence_problems(&history.finals);
    if history.converged_ms.is_none() && problems.is_empty() {
        problems.push(format!(
            "did not converge in time: {}",
            history
                .convergence_error
                .as_deref()
                .unwrap_or("no reason recorded")
        ));
    }
    let summary = match (history.converged_ms, history.healed_ms) {
        (Some(c), Some(h)) => format!(
            "{} nodes converged {:.1} s after the last fault healed",
            history.finals.len(),
            (c - h) / 1000.0
        ),
        (Some(_), None) => format!("{} nodes converged", history.finals.len()),
        (None, _) => "not converged".into(),
    };
    Verdict::new("convergence", problems, summary)
}

/// Every agent's applied event log is a prefix of the longest: no event index holds two different
/// events, on two agents or on one agent at two times.
pub fn log_agreement(history: &History) -> Verdict {
    let mut problems: Vec<String> = history.log_rewrites.clone();
    let mut agreed: BTreeMap<u64, (&str, &str)> = BTreeMap::new();
    for (node, log) in &history.logs {
        for (index, event) in log {
            match agreed.get(index) {
                None => {
                    agreed.insert(*index, (node, event));
                }
                Some((first, theirs)) if *theirs != event => problems.push(format!(
                    "event index {index}: {first} applied {theirs}, {node} applied {event}"
                )),
                Some(_) => {}
            }
        }
    }
    let lengths: Vec<String> = history
        .logs
        .iter()
        .map(|(node, log)| {
            format!(
                "{node} {} events up to index {}",
                log.len(),
                log.keys().last().copied().unwrap_or(0)
            )
        })
        .collect();
    let summary = format!(
        "{} distinct event indexes compared ({})",
        agreed.len(),
        lengths.join(", ")
    );
    Verdict::new("log-agreement", problems, summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::history::GenerationSeen;

    fn write(id: i64, start_ms: f64, node: &str, timeline: u32) -> Write {
        Write {
            id,
            client: "libpq".into(),
            start_ms,
            end_ms: start_ms + 5.0,
            outcome: Outcome::Ok,
            node: Some(node.into()),
            timeline: Some(timeline),
            error: None,
        }
    }

    fn node(name: &str, primary: &str, recovery: bool, timeline: u32, ids: &[i64]) -> NodeFinal {
        NodeFinal {
            name: name.into(),
            running: true,
            in_recovery: Some(recovery),
            timeline: Some(timeline),
            receiver_status: recovery.then(|| "streaming".into()),
            upstream: recovery.then(|| primary.into()),
            committed_primary: Some(primary.into()),
            generation: Some(2),
            ids: ids.to_vec(),
        }
    }

    fn seen(generation: u64, primary: &str, seen_ms: f64) -> GenerationSeen {
        GenerationSeen {
            generation,
            primary: Some(primary.into()),
            seen_ms,
        }
    }

    /// A clean failover from node1 (timeline 1) to node2 (timeline 2), converged.
    fn healthy() -> History {
        let mut log = BTreeMap::new();
        log.insert(1, "NodeRegistered(node1)".to_string());
        log.insert(2, "PromotionDecided(2)".to_string());
        let mut short = log.clone();
        short.remove(&2);
        History {
            synchronous_mode: "on".into(),
            writes: vec![
                write(1, 0.0, "node1", 1),
                write(2, 20.0, "node1", 1),
                Write {
                    outcome: Outcome::Unknown,
                    timeline: None,
                    ..write(3, 40.0, "node1", 1)
                },
                write(4, 900.0, "node2", 2),
            ],
            generations: vec![seen(1, "node1", 0.0), seen(2, "node2", 800.0)],
            logs: [("node1".into(), log.clone()), ("node2".into(), short)].into(),
            healed_ms: Some(1000.0),
            converged_ms: Some(2000.0),
            finals: vec![
                node("node1", "node2", true, 2, &[1, 2, 4]),
                node("node2", "node2", false, 2, &[1, 2, 4]),
                node("node3", "node2", true, 2, &[1, 2, 4]),
            ],
            ..History::default()
        }
    }

    fn failed(verdicts: &[Verdict]) -> Vec<&'static str> {
        verdicts
            .iter()
            .filter(|v| !v.ok)
            .map(|v| v.checker)
            .collect()
    }

    #[test]
    fn a_healthy_history_passes_every_checker() {
        let verdicts = check_all(&healthy());
        assert!(failed(&verdicts).is_empty(), "{verdicts:#?}");
    }

    #[test]
    fn a_lost_acknowledged_write_fails_in_synchronous_mode_only() {
        let mut history = healthy();
        for f in &mut history.finals {
            f.ids.retain(|id| *id != 2);
        }
        let verdict = lost_writes(&history);
        assert!(!verdict.ok);
        assert!(
            verdict.details[0].contains("write 2 is lost"),
            "{verdict:?}"
        );
        assert_eq!(verdict.at_ms, Some(20.0));

        history.synchronous_mode = "off".into();
        let verdict = lost_writes(&history);
        assert!(verdict.ok, "{verdict:?}");
        assert!(verdict.summary.contains("1 lost"), "{verdict:?}");
    }

    #[test]
    fn a_refused_write_that_is_present_fails() {
        let mut history = healthy();
        history.writes[3].outcome = Outcome::Failed;
        assert!(!lost_writes(&history).ok);
    }

    #[test]
    fn two_writers_on_one_timeline_are_split_brain() {
        let mut history = healthy();
        history.writes.push(write(5, 950.0, "node3", 2));
        let verdict = split_brain(&history);
        assert!(!verdict.ok);
        assert!(verdict.details[0].contains("timeline 2 was written by 2 nodes"));
    }

    #[test]
    fn an_old_primary_acknowledging_after_the_new_one_is_split_brain() {
        let mut history = healthy();
        // Node1 still acknowledges on timeline 1 after node2 acknowledged on timeline 2, and
        // after generation 2 was seen committed.
        history.writes.push(write(5, 1000.0, "node1", 1));
        let verdict = split_brain(&history);
        assert!(!verdict.ok);
        assert_eq!(verdict.details.len(), 2, "{verdict:#?}");
        assert!(verdict.details[0].contains("older timeline"));
        assert!(verdict.details[1].contains("after generation 2"));
    }

    #[test]
    fn an_ack_after_a_newer_generation_is_split_brain_even_before_the_new_primary_writes() {
        let mut history = healthy();
        history.writes.truncate(3);
        history.writes.push(write(5, 850.0, "node1", 1));
        let verdict = split_brain(&history);
        assert!(!verdict.ok);
        assert!(
            verdict.details[0].contains("after generation 2"),
            "{verdict:?}"
        );
    }

    #[test]
    fn a_node_made_primary_again_may_write_again() {
        let mut history = healthy();
        history.generations.push(seen(3, "node1", 1500.0));
        history.writes.push(write(5, 1600.0, "node1", 3));
        let verdict = split_brain(&history);
        assert!(verdict.ok, "{verdict:?}");
    }

    #[test]
    fn a_standby_that_does_not_stream_is_not_converged() {
        let mut history = healthy();
        history.finals[2].receiver_status = None;
        let verdict = convergence(&history);
        assert!(!verdict.ok);
        assert!(
            verdict.details[0].contains("node3: not streaming"),
            "{verdict:?}"
        );
    }

    #[test]
    fn two_writable_nodes_or_different_rows_are_not_converged() {
        let mut history = healthy();
        history.finals[0].ids.push(99);
        assert!(convergence(&history).details[0].contains("1 only here"));
        history.finals[0].in_recovery = Some(false);
        assert!(convergence(&history).details[0].contains("2 writable primaries"));
    }

    #[test]
    fn an_event_index_with_two_events_fails_agreement() {
        let mut history = healthy();
        history
            .logs
            .get_mut("node2")
            .expect("node2")
            .insert(2, "PromotionDecided(3)".into());
        let verdict = log_agreement(&history);
        assert!(!verdict.ok);
        assert!(verdict.details[0].contains("event index 2"), "{verdict:?}");

        let mut history = healthy();
        history.log_rewrites.push("node1 rewrote index 1".into());
        assert!(!log_agreement(&history).ok);
    }
}
