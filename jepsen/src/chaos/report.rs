//! A run's report: `history.json` (the record the checkers judged), `results.json` (verdicts and
//! numbers) and `report.html` (one self-contained page: a timeline of faults, generations and
//! acknowledged writes per node, the verdicts, the write unavailability of each fault).

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use serde::Serialize;

use super::history::{History, Outcome};
use super::RunReport;
use crate::bench::Stat;

/// The numbers a DBA asks for after a run.
#[derive(Debug, Serialize)]
pub struct Numbers {
    pub faults: usize,
    pub faults_by_kind: BTreeMap<String, usize>,
    pub writes_acknowledged: usize,
    pub writes_failed: usize,
    pub writes_unknown: usize,
    /// Acknowledged writes missing on the final primary (`None`: no agreed final primary).
    pub writes_lost: Option<usize>,
    pub split_brain_violations: usize,
    /// New generations committed during the run (failovers and switchovers).
    pub promotions: usize,
    /// Per fault: the longest stretch without an acknowledged write from its start until the
    /// first acknowledgement after it was healed; `None` when none came.
    pub unavailability_ms: Vec<Option<f64>>,
    pub unavailability: Option<Stat>,
}

pub fn numbers(history: &History, split_brain_violations: usize) -> Numbers {
    let count = |o: Outcome| history.writes.iter().filter(|w| w.outcome == o).count();
    let mut acks: Vec<f64> = history
        .writes
        .iter()
        .filter(|w| w.outcome == Outcome::Ok)
        .map(|w| w.end_ms)
        .collect();
    acks.sort_by(f64::total_cmp);
    let unavailability_ms: Vec<Option<f64>> = history
        .faults
        .iter()
        .map(|f| longest_gap(&acks, f.start_ms, f.end_ms.unwrap_or(f.start_ms)))
        .collect();
    let measured: Vec<f64> = unavailability_ms.iter().flatten().copied().collect();
    let mut faults_by_kind = BTreeMap::new();
    for f in &history.faults {
        *faults_by_kind.entry(f.kind.clone()).or_insert(0) += 1;
    }
    let writes_lost = history.final_primary().map(|p| {
        let present: HashSet<i64> = p.ids.iter().copied().collect();
        history
            .writes
            .iter()
            .filter(|w| w.outcome == Outcome::Ok && !present.contains(&w.id))
            .count()
    });
    Numbers {
        faults: history.faults.len(),
        faults_by_kind,
        writes_acknowledged: count(Outcome::Ok),
        writes_failed: count(Outcome::Failed),
        writes_unknown: count(Outcome::Unknown),
        writes_lost,
        split_brain_violations,
        promotions: history.generations.len().saturating_sub(1),
        unavailability: (!measured.is_empty()).then(|| Stat::of(measured)),
        unavailability_ms,
    }
}

/// The longest stretch without an acknowledged write (`acks`: acknowledgement times, sorted)
/// that touches a fault from `start_ms` until the first acknowledgement after it ended at
/// `end_ms`: a failover may come a lease timeout after the fault began, or only once it is
/// healed. `None` when no write was acknowledged after the fault.
fn longest_gap(acks: &[f64], start_ms: f64, end_ms: f64) -> Option<f64> {
    let first = acks.partition_point(|a| *a < start_ms);
    let after_end = acks.partition_point(|a| *a <= end_ms);
    acks.get(after_end)?;
    let before = if first == 0 { 0.0 } else { acks[first - 1] };
    let mut gap: f64 = 0.0;
    let mut previous = before;
    for ack in &acks[first..=after_end] {
        gap = gap.max(ack - previous);
        previous = *ack;
    }
    Some(gap)
}

fn numbers_of(report: &RunReport) -> Numbers {
    let violations = report.verdict("split-brain").violations;
    numbers(&report.history, violations)
}

pub fn write(report: &RunReport) -> anyhow::Result<()> {
    let history = serde_json::to_string(&report.history)?;
    std::fs::write(report.out.join("history.json"), history)?;
    let results = serde_json::json!({
        "seed": report.history.seed,
        "passed": report.passed(),
        "verdicts": report.verdicts,
        "numbers": numbers_of(report),
    });
    std::fs::write(
        report.out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(report.out.join("report.html"), html(report))?;
    Ok(())
}

pub fn print(report: &RunReport) {
    let n = numbers_of(report);
    println!(
        "seed {}: {} faults {:?}; writes {} acknowledged, {} failed, {} unknown, {} lost; \
         {} promotions",
        report.history.seed,
        n.faults,
        n.faults_by_kind,
        n.writes_acknowledged,
        n.writes_failed,
        n.writes_unknown,
        n.writes_lost.map_or("?".into(), |l| l.to_string()),
        n.promotions
    );
    if let Some(s) = &n.unavailability {
        println!(
            "write unavailability per fault: median {:.0} ms, max {:.0} ms",
            s.median, s.max
        );
    }
    for v in &report.verdicts {
        println!(
            "{:<14} {}  {}",
            v.checker,
            if v.ok { "ok  " } else { "FAIL" },
            v.summary
        );
        for d in &v.details {
            println!("    {d}");
        }
        if let (false, Some(at)) = (v.ok, v.at_ms) {
            for line in around(&report.history, at) {
                println!("    around it: {line}");
            }
        }
    }
    println!("report: {}", report.out.join("report.html").display());
}

/// The faults and generations within a few seconds before (and one after) `at_ms`.
pub fn around(history: &History, at_ms: f64) -> Vec<String> {
    let window = (at_ms - 5000.0)..=(at_ms + 1000.0);
    let mut lines: Vec<(f64, String)> = Vec::new();
    for f in &history.faults {
        let end = f.end_ms.unwrap_or(f64::INFINITY);
        if f.start_ms <= *window.end() && end >= *window.start() {
            let text = format!(
                "{:.1}–{:.1} s {} on {} {}",
                f.start_ms / 1000.0,
                end / 1000.0,
                f.kind,
                f.targets.join(","),
                f.note
            );
            lines.push((f.start_ms, text));
        }
    }
    for g in &history.generations {
        if window.contains(&g.seen_ms) {
            let text = format!(
                "{:.1} s generation {} (primary {}) seen committed",
                g.seen_ms / 1000.0,
                g.generation,
                g.primary.as_deref().unwrap_or("none")
            );
            lines.push((g.seen_ms, text));
        }
    }
    lines.sort_by(|a, b| a.0.total_cmp(&b.0));
    lines.into_iter().map(|(_, l)| l).collect()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const WIDTH: f64 = 1100.0;
const LEFT: f64 = 110.0;
const ROW: f64 = 26.0;
const PALETTE: [&str; 6] = [
    "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf",
];

fn html(report: &RunReport) -> String {
    let h = &report.history;
    let n = numbers_of(report);
    let end_ms = h
        .writes
        .iter()
        .map(|w| w.end_ms)
        .chain(h.faults.iter().filter_map(|f| f.end_ms))
        .fold(1.0, f64::max);
    let x = |ms: f64| LEFT + (WIDTH - LEFT - 10.0) * ms / end_ms;
    let nodes: Vec<String> = (1..=h.nodes).map(|i| format!("node{i}")).collect();
    let rows = 2 + nodes.len();
    let height = ROW * rows as f64 + 40.0;
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{height}' \
         font-family='sans-serif' font-size='11'>"
    );
    let label = |svg: &mut String, row: usize, text: &str| {
        let _ = write!(
            svg,
            "<text x='4' y='{}'>{}</text>",
            ROW * row as f64 + 17.0,
            escape(text)
        );
    };
    label(&mut svg, 0, "faults");
    label(&mut svg, 1, "write errors");
    for (i, name) in nodes.iter().enumerate() {
        label(&mut svg, 2 + i, &format!("acks on {name}"));
    }
    for f in &h.faults {
        let (a, b) = (x(f.start_ms), x(f.end_ms.unwrap_or(end_ms)));
        let _ = write!(
            svg,
            "<rect x='{a:.1}' y='4' width='{:.1}' height='18' fill='#d62728' opacity='0.6'>\
             <title>{} on {} {:.1}–{:.1} s {}</title></rect>",
            (b - a).max(1.0),
            escape(&f.kind),
            escape(&f.targets.join(",")),
            f.start_ms / 1000.0,
            f.end_ms.unwrap_or(end_ms) / 1000.0,
            escape(&f.note)
        );
    }
    for w in &h.writes {
        let row = match (&w.outcome, &w.node) {
            (Outcome::Ok, Some(node)) => 2 + nodes.iter().position(|n| n == node).unwrap_or(0),
            (Outcome::Ok, None) => continue,
            _ => 1,
        };
        let colour = match w.outcome {
            Outcome::Ok => PALETTE[w.timeline.unwrap_or(0) as usize % PALETTE.len()],
            Outcome::Failed => "#7f7f7f",
            Outcome::Unknown => "#e377c2",
        };
        let _ = write!(
            svg,
            "<rect x='{:.1}' y='{:.1}' width='1' height='18' fill='{colour}'/>",
            x(w.end_ms),
            ROW * row as f64 + 4.0
        );
    }
    for g in &h.generations {
        let gx = x(g.seen_ms);
        let _ = write!(
            svg,
            "<line x1='{gx:.1}' x2='{gx:.1}' y1='0' y2='{:.1}' stroke='black' \
             stroke-dasharray='3,3'/><text x='{:.1}' y='{:.1}'>g{} {}</text>",
            ROW * rows as f64,
            gx + 2.0,
            ROW * rows as f64 + 14.0,
            g.generation,
            escape(g.primary.as_deref().unwrap_or("-"))
        );
    }
    let _ = write!(
        svg,
        "<text x='{LEFT}' y='{:.1}'>0 s</text><text x='{:.1}' y='{:.1}'>{:.0} s</text></svg>",
        height - 4.0,
        WIDTH - 50.0,
        height - 4.0,
        end_ms / 1000.0
    );

    let mut page = format!(
        "<!doctype html><html><head><meta charset='utf-8'><title>raftmgr chaos run, seed {seed}\
         </title><style>body{{font-family:sans-serif;margin:20px}}td,th{{padding:2px 8px;\
         text-align:left;vertical-align:top}}.ok{{color:#2ca02c}}.fail{{color:#d62728;\
         font-weight:bold}}</style></head><body><h1>raftmgr chaos run, seed {seed}: {verdict}</h1>\
         <p>{nodes} nodes, synchronous_mode {mode}, network {network}{netem}. Faults {faults}, \
         writes acknowledged {acked}, failed {failed}, unknown {unknown}, lost {lost}; promotions \
         {promotions}.</p>{svg}<p>Writes: acknowledged (colour = timeline), \
         <span style='color:#7f7f7f'>failed</span>, <span style='color:#e377c2'>unknown</span>. \
         Dashed lines: a new generation first seen committed.</p><h2>Verdicts</h2><table>",
        seed = h.seed,
        verdict = if report.passed() { "passed" } else { "FAILED" },
        nodes = h.nodes,
        mode = escape(&h.synchronous_mode),
        network = escape(&h.network),
        netem = if h.network == "namespaces" {
            " (no added latency: this kernel has no netem)"
        } else {
            " (process faults only)"
        },
        faults = n.faults,
        acked = n.writes_acknowledged,
        failed = n.writes_failed,
        unknown = n.writes_unknown,
        lost = n.writes_lost.map_or("?".into(), |l| l.to_string()),
        promotions = n.promotions,
    );
    for v in &report.verdicts {
        let _ = write!(
            page,
            "<tr><td>{}</td><td class='{}'>{}</td><td>{}<ul>{}</ul></td></tr>",
            v.checker,
            if v.ok { "ok" } else { "fail" },
            if v.ok { "ok" } else { "FAIL" },
            escape(&v.summary),
            v.details
                .iter()
                .map(|d| format!("<li>{}</li>", escape(d)))
                .collect::<String>()
        );
    }
    page += "</table><h2>Faults</h2><table><tr><th>start s</th><th>end s</th><th>nemesis</th>\
             <th>targets</th><th>write unavailability ms</th><th>note</th></tr>";
    for (f, u) in h.faults.iter().zip(&n.unavailability_ms) {
        let _ = write!(
            page,
            "<tr><td>{:.1}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            f.start_ms / 1000.0,
            f.end_ms.unwrap_or(f64::NAN) / 1000.0,
            escape(&f.kind),
            escape(&f.targets.join(",")),
            u.map_or("none after".into(), |u| format!("{u:.0}")),
            escape(&f.note)
        );
    }
    if let Some(s) = &n.unavailability {
        let _ = write!(
            page,
            "</table><p>Write unavailability per fault: median {:.0} ms, max {:.0} ms.</p>",
            s.median, s.max
        );
    } else {
        page += "</table>";
    }
    page += "</body></html>\n";
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::history::{Fault, Write};

    fn ack(id: i64, end_ms: f64) -> Write {
        Write {
            id,
            client: "libpq".into(),
            start_ms: end_ms - 2.0,
            end_ms,
            outcome: Outcome::Ok,
            node: Some("node1".into()),
            timeline: Some(1),
            error: None,
        }
    }

    #[test]
    fn unavailability_is_the_longest_gap_from_a_fault_to_the_first_ack_after_it() {
        let history = History {
            writes: vec![
                ack(1, 100.0),
                ack(2, 120.0),
                ack(3, 140.0),
                ack(4, 1400.0),
                ack(5, 1420.0),
            ],
            faults: vec![
                Fault {
                    kind: "kill-postgres".into(),
                    targets: vec!["node1".into()],
                    start_ms: 130.0,
                    end_ms: Some(200.0),
                    note: String::new(),
                },
                Fault {
                    kind: "kill-node".into(),
                    targets: vec!["node1".into()],
                    start_ms: 1500.0,
                    end_ms: Some(1600.0),
                    note: String::new(),
                },
            ],
            ..History::default()
        };
        let n = numbers(&history, 0);
        // The first fault: acknowledged on until 140 ms, then nothing until 1400 ms. The
        // second: nothing was acknowledged after it ended.
        assert_eq!(n.unavailability_ms, vec![Some(1260.0), None]);
        assert_eq!(n.writes_acknowledged, 5);
        assert_eq!(n.faults_by_kind.len(), 2);
        let near = around(&history, 1400.0);
        assert_eq!(near.len(), 2, "{near:?}");
        assert!(near[0].contains("kill-postgres"), "{near:?}");
    }
}
