//! The API against its own description: schemathesis (a property-based fuzzer for OpenAPI, from
//! PyPI) generates requests from `api/openapi.json` — well-formed and malformed — and sends them
//! to one agent of a real three-node cluster with real PostgreSQL 15; every answer must be
//! documented (status, content type, headers, body schema), no answer may be a 5xx, and
//! malformed input must be refused with a 4xx. Mutating requests carry the API token, so
//! switchovers, restarts, rejoins and pauses really happen.
//!
//! Needs schemathesis in `/opt/raftmgr-schemathesis` (`scripts/test` installs it) or named by
//! `RAFTMGR_SCHEMATHESIS`. The run is bounded ([`MAX_EXAMPLES`] per operation, killed after
//! [`RUN_TIMEOUT`]) and sends the same requests for the same seed (what the cluster answers
//! still depends on timing); `tests/api_fuzz/schemathesis.toml` and `hooks.py` hold its
//! settings. The README ("Fuzzing the API") has the command to run it by hand.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use raftmgr_jepsen::cluster::{LocalCluster, Options, API_TOKEN};
use raftmgr_jepsen::wait;

const BINARY: &str = env!("CARGO_BIN_EXE_raftmgr");

/// The schemathesis release the settings and the seed were tried with (`scripts/test` installs
/// it); another release may generate other requests from the same seed.
const SCHEMATHESIS_VERSION: &str = "4.32.5";
const DEFAULT_SCHEMATHESIS: &str = "/opt/raftmgr-schemathesis/bin/schemathesis";
const SEED: u64 = 1;
const MAX_EXAMPLES: u32 = 200;
/// Past this the run is killed and the test fails: it takes under a minute here, and must end
/// well before nextest's limit for a slow test. (schemathesis' own `--max-time` is no bound: it
/// makes the fuzzing phase go on until the time is spent.)
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

fn schemathesis() -> PathBuf {
    let path = std::env::var_os("RAFTMGR_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SCHEMATHESIS));
    let install = format!(
        "install it with scripts/test (as root), or by hand: python3 -m venv \
         /opt/raftmgr-schemathesis && /opt/raftmgr-schemathesis/bin/pip install \
         schemathesis=={SCHEMATHESIS_VERSION} (or point RAFTMGR_SCHEMATHESIS at its executable)"
    );
    let version = std::process::Command::new(&path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "schemathesis is not installed ({}: {e}); {install}",
                path.display()
            )
        });
    let version = String::from_utf8_lossy(&version.stdout).to_string();
    assert!(
        version.split_whitespace().last() == Some(SCHEMATHESIS_VERSION),
        "{} is {}, not schemathesis {SCHEMATHESIS_VERSION} that this test's seed was tried \
         with; {install}",
        path.display(),
        version.trim()
    );
    path
}

#[tokio::test]
async fn the_api_answers_a_fuzz_run_against_its_openapi_description() {
    let schemathesis = schemathesis();
    let options = Options {
        postgres: true,
        ..Options::default()
    };
    let mut cluster = LocalCluster::start(Path::new(BINARY), &options)
        .await
        .unwrap();
    cluster.setup_replication(&[1, 2, 3]).await.unwrap();

    let settings = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/api_fuzz");
    let config = settings.join("schemathesis.toml");
    let schema = format!("http://{}/openapi.json", cluster.node(1).api_addr);
    let args = [
        "--config-file".to_string(),
        config.display().to_string(),
        "--no-color".into(),
        "run".into(),
        schema,
        "--checks".into(),
        "all".into(),
        "--seed".into(),
        SEED.to_string(),
        "--max-examples".into(),
        MAX_EXAMPLES.to_string(),
        // Every request and answer, kept with the agents' logs when the run fails.
        "--report".into(),
        "har".into(),
        "--report-dir".into(),
        cluster.dir().join("report").display().to_string(),
    ];
    println!(
        "RAFTMGR_API_TOKEN=... SCHEMATHESIS_HOOKS=tests/api_fuzz/hooks.py {} {}",
        schemathesis.display(),
        args.join(" ")
    );
    let started = Instant::now();
    let child = tokio::process::Command::new(&schemathesis)
        .args(&args)
        .env("RAFTMGR_API_TOKEN", API_TOKEN)
        // Keeps well-formed membership changes and events from being carried out (see there).
        .env("SCHEMATHESIS_HOOKS", settings.join("hooks.py"))
        // Where it may leave files (reports, caches): the cluster's folder, removed on drop.
        .current_dir(cluster.dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let output = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("schemathesis ran past {RUN_TIMEOUT:?}; killed"))
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("schemathesis took {:?}", started.elapsed());
    if !output.status.success() {
        let kept = keep_for_a_human(&cluster);
        panic!(
            "schemathesis found problems ({}); its requests and answers (HAR) and the agents' \
             logs are in {kept}:\n{printed}",
            output.status
        );
    }
    println!("{printed}");

    // What it set in motion (switchovers, restarts, rejoins) must leave a working cluster.
    for id in cluster.ids() {
        if !cluster.is_running(id) {
            let kept = keep_for_a_human(&cluster);
            panic!("node {id}'s agent died; its log is in {kept}");
        }
    }
    let primary = wait::until("a writable primary", Duration::from_secs(60), || async {
        for id in cluster.ids() {
            let url = format!("http://{}/primary", cluster.node(id).api_addr);
            let answer = cluster.http().get(url).send().await;
            if answer.is_ok_and(|a| a.status() == 200) {
                return Ok(id);
            }
        }
        Err("no node's GET /primary answers 200".to_string())
    })
    .await;
    if let Err(e) = primary {
        let view = cluster.get::<serde_json::Value>(1, "/cluster").await;
        let kept = keep_for_a_human(&cluster);
        panic!("after the fuzz run: {e}; node 1's view: {view:?}; the logs are in {kept}");
    }
}

/// Copies the run's report and the agents' logs out of the cluster's folder (removed when the
/// test ends) to a folder under the target directory; returns where.
fn keep_for_a_human(cluster: &LocalCluster) -> String {
    let kept =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("api-fuzz-{}", std::process::id()));
    let copy = || -> std::io::Result<()> {
        std::fs::create_dir_all(&kept)?;
        if let Ok(report) = std::fs::read_dir(cluster.dir().join("report")) {
            for entry in report {
                let entry = entry?;
                std::fs::copy(entry.path(), kept.join(entry.file_name()))?;
            }
        }
        for id in cluster.ids() {
            std::fs::copy(&cluster.node(id).log, kept.join(format!("node{id}.log")))?;
        }
        Ok(())
    };
    match copy() {
        Ok(()) => kept.display().to_string(),
        Err(e) => format!("(nowhere: copying to {} failed: {e})", kept.display()),
    }
}
