//! The operator's surface beyond `cluster show`: `GET /config`, `GET /history`, followed events
//! (`GET /events?follow=1`, `raftmgr cluster events --follow`) and the status page at `GET /`,
//! with real agent processes (and real PostgreSQL 15 for the status page).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use raftmgr_api::{HistoryEntry, HistoryKind};
use raftmgr_jepsen::cluster::{LocalCluster, Options, API_TOKEN, CLUSTER_SECRET};
use raftmgr_raft::{CandidateAssessment, Event, NodeRegistration, PgRole, PromotionDecision};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

const BINARY: &str = env!("CARGO_BIN_EXE_raftmgr");
const TIMEOUT: Duration = Duration::from_secs(30);

async fn get(cluster: &LocalCluster, id: u64, path: &str) -> reqwest::Response {
    let url = format!("http://{}{path}", cluster.node(id).api_addr);
    cluster.http().get(url).send().await.unwrap()
}

/// `raftmgr ARGS`, its stdout read line by line; killed if the test ends first.
struct Cli {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    seen: Vec<String>,
}

impl Cli {
    fn spawn(args: &[&str]) -> Cli {
        let mut child = tokio::process::Command::new(BINARY)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Cli {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one satisfies `wanted`, failing after `TIMEOUT` with what it printed.
    async fn line_where(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line()).await;
            match line {
                Ok(Ok(Some(line))) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                other => panic!("no line with {what} ({other:?}); printed: {:#?}", self.seen),
            }
        }
    }
}

fn registration(id: u64, role: PgRole) -> Event {
    Event::NodeRegistered(NodeRegistration::for_tests(id, role))
}

#[tokio::test]
async fn config_history_and_followed_events_through_the_api_and_the_cli() {
    let mut cluster = LocalCluster::start(Path::new(BINARY), &Options::default())
        .await
        .unwrap();

    // GET /config: this node's effective settings, never a secret.
    let config = get(&cluster, 1, "/config").await.text().await.unwrap();
    for secret in [CLUSTER_SECRET, API_TOKEN] {
        assert!(!config.contains(secret), "a secret in {config}");
    }
    let config: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["name"], "node1");
    assert_eq!(config["cluster_secret"], "<redacted>");
    assert_eq!(config["api"]["listen"], cluster.node(1).api_addr.as_str());
    assert_eq!(config["raft"]["heartbeat_interval_ms"], 100);

    let openapi: Value = get(&cluster, 1, "/openapi.json")
        .await
        .json()
        .await
        .unwrap();
    assert!(openapi["paths"]["/history"]["get"].is_object(), "{openapi}");

    // Bad input: a 400 with a JSON error.
    for path in [
        "/events?follow=maybe",
        "/events?type=NodeRegisterd",
        "/events?colour=blue",
    ] {
        let response = get(&cluster, 1, path).await;
        assert_eq!(response.status(), 400, "{path}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].is_string(), "{path}: {body}");
    }

    for (id, role) in [(1, PgRole::Primary), (2, PgRole::Standby)] {
        cluster.propose(1, &registration(id, role)).await.unwrap();
    }

    // Followers: every event as JSON lines from node 2, only promotions as text from node 3.
    let api = |id: u64| cluster.node(id).api_addr.clone();
    let mut json = Cli::spawn(&["cluster", "events", "--follow", "--json", "--api", &api(2)]);
    let mut text = Cli::spawn(&[
        "cluster",
        "events",
        "--follow",
        "--type",
        "PromotionCompleted",
        "--api",
        &api(3),
    ]);
    // The recent events come first.
    let first: Value = serde_json::from_str(
        &json
            .line_where("node1's registration", |l| l.contains("NodeRegistered"))
            .await,
    )
    .unwrap();
    assert_eq!(first["event"]["NodeRegistered"]["name"], "node1");
    let response = get(&cluster, 1, "/events?follow=1").await;
    assert_eq!(
        response.headers()["content-type"],
        "text/event-stream",
        "{response:?}"
    );
    drop(response);

    // A failover, proposed by hand (no agent here runs PostgreSQL, so none acts on it).
    cluster
        .propose(
            1,
            &Event::PrimaryResigned {
                primary: 1,
                generation: 1,
                reason: "its PostgreSQL died and no postmaster of its data directory runs".into(),
            },
        )
        .await
        .unwrap();
    let decision = Event::PromotionDecided(PromotionDecision {
        decided_for_generation: 1,
        lease_event_index: None,
        candidate: 2,
        reason: "node 1 resigned in generation 1".into(),
        candidates: vec![CandidateAssessment {
            node_id: 2,
            lsn: Some(0x3000060),
            priority: 100,
            eligible: true,
            why: "won".into(),
        }],
    });
    let decided = cluster.propose(1, &decision).await.unwrap();
    let sent = Instant::now();
    let completed = Event::PromotionCompleted {
        node_id: 2,
        generation: 2,
        timeline: Some(2),
        lsn: Some(0x3000060),
    };
    let completed_at = cluster.propose(1, &completed).await.unwrap();

    let line = json
        .line_where("the decision", |l| l.contains("PromotionDecided"))
        .await;
    eprintln!(
        "followed event arrived {:?} after its proposal",
        sent.elapsed()
    );
    let followed: raftmgr_raft::state::RecordedEvent = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (followed.event_index, followed.event),
        (decided.event_index, decision)
    );
    let line = text
        .line_where("the completed promotion", |l| {
            l.contains("PromotionCompleted")
        })
        .await;
    assert!(
        line.contains(&completed_at.event_index.to_string()) && line.contains("applied"),
        "{line}"
    );
    assert_eq!(
        text.seen.len(),
        1,
        "only the type asked for: {:?}",
        text.seen
    );

    // GET /history: the first primary, then the failover with its timeline and LSN.
    cluster
        .wait_converged(&[1, 2, 3], completed_at.log_index, TIMEOUT)
        .await
        .unwrap();
    let history: Vec<HistoryEntry> = get(&cluster, 3, "/history").await.json().await.unwrap();
    let rows: Vec<_> = history
        .iter()
        .map(|h| {
            (
                h.generation,
                h.primary.as_deref(),
                h.kind,
                h.timeline,
                h.lsn.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            (1, Some("node1"), Some(HistoryKind::Registered), None, None),
            (
                2,
                Some("node2"),
                Some(HistoryKind::Failover),
                Some(2),
                Some("0/3000060")
            ),
        ]
    );
    assert_eq!(history[1].event_index, decided.event_index);
    assert_eq!(
        history[1].completed_event_index,
        Some(completed_at.event_index)
    );

    // An agent stopping ends its streams, so it drains at once; the follower says so.
    let stopping = Instant::now();
    assert_eq!(cluster.stop(2).await.unwrap(), Some(0));
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "stopping took {:?}: an open stream held the API server",
        stopping.elapsed()
    );
    assert!(!cluster.read_log(2).contains("did not drain"));
    let out = tokio::time::timeout(TIMEOUT, json.child.wait_with_output())
        .await
        .expect("the follower exits when its agent stops")
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ended the event stream"), "{stderr}");
}

/// Runs headless Chromium on `url`; returns its stdout. Killed with its whole process group
/// (its own, made at spawn) if it does not finish in time.
async fn chromium(args: &[&str], url: &str, profile: &Path) -> String {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new("chromium");
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
    let child = command
        .spawn()
        .expect("chromium (scripts/test installs it)");
    let group = ProcessGroup(child.id() as i32);
    let output = tokio::task::spawn_blocking(move || child.wait_with_output());
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .expect("chromium finishes within a minute")
        .unwrap()
        .unwrap();
    drop(group);
    assert!(output.status.success(), "chromium: {:?}", output.status);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Kills a process group we started (by its id, the leader's pid) when dropped.
struct ProcessGroup(i32);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[tokio::test]
async fn a_follower_and_the_status_page_in_a_real_browser_show_a_real_cluster() {
    let options = Options {
        postgres: true,
        ..Options::default()
    };
    let cluster = LocalCluster::start(Path::new(BINARY), &options)
        .await
        .unwrap();
    // A follower sees the registrations that `standby register` causes.
    let api = cluster.node(1).api_addr.clone();
    let mut follower = Cli::spawn(&[
        "cluster",
        "events",
        "--follow",
        "--type",
        "NodeRegistered",
        "--api",
        &api,
    ]);
    cluster.setup_replication(&[1, 2, 3]).await.unwrap();
    follower
        .line_where("node3's registration", |l| {
            l.contains("NodeRegistered") && l.contains("node3")
        })
        .await;

    let page = get(&cluster, 2, "/").await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external URLs"
    );

    let url = format!("http://{}/", cluster.node(2).api_addr);
    let profile = cluster.dir().join("chromium");
    // Rendered again until it shows what the cluster is: a standby's status comes from a
    // majority of the peers' probes, and a slow probe on a loaded machine shows it down a while.
    raftmgr_jepsen::wait::until(
        "the status page to show the cluster",
        2 * TIMEOUT,
        || async {
            let dom = chromium(
                &["--virtual-time-budget=5000", "--dump-dom"],
                &url,
                &profile,
            )
            .await;
            for (name, role) in [
                ("node1", "primary"),
                ("node2", "standby"),
                ("node3", "standby"),
            ] {
                let start = dom
                    .find(&format!("<tr data-node=\"{name}\""))
                    .ok_or_else(|| format!("no row for {name} in {dom}"))?;
                let row = &dom[start..start + dom[start..].find("</tr>").unwrap_or(0)];
                if !row.contains(&format!(">{role}<")) {
                    return Err(format!("{name} is not {role}: {row}"));
                }
                if !(row.contains(">streaming<") || role == "primary") {
                    return Err(format!("not streaming: {row}"));
                }
            }
            if !dom.contains("registered as the primary") {
                return Err(format!("no history: {dom}"));
            }
            Ok(())
        },
    )
    .await
    .unwrap();

    let screenshot = cluster.dir().join("status.png");
    chromium(
        &[
            "--virtual-time-budget=5000",
            "--window-size=1400,900",
            &format!("--screenshot={}", screenshot.display()),
        ],
        &url,
        &profile,
    )
    .await;
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.len() > 1000, "{} bytes", png.len());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}
