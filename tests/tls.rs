//! TLS on the API and Raft ports (`[tls]`), with real agent processes on loopback: a cluster
//! that elects, commits and answers the CLI over HTTPS; plain HTTP and Raft calls without the
//! cluster's client certificate refused before Raft sees them; bad `[tls]` files refused at
//! start, naming the key.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use raftmgr_jepsen::cluster::{LocalCluster, Options, CLUSTER_SECRET};
use raftmgr_jepsen::tls::TestCa;
use raftmgr_raft::{Event, NodeId, NodeRegistration, Outcome, PgRole};

const BINARY: &str = env!("CARGO_BIN_EXE_raftmgr");
const TIMEOUT: Duration = Duration::from_secs(30);

fn binary() -> &'static Path {
    Path::new(BINARY)
}

fn with_tls() -> Options {
    Options {
        tls: true,
        ..Options::default()
    }
}

fn tls_file(cluster: &LocalCluster, name: &str) -> PathBuf {
    cluster.dir().join("tls").join(name)
}

/// A reqwest client that trusts the lab CA, presenting `identity` (PEM certificate and key)
/// when given.
fn https_client(cluster: &LocalCluster, identity: Option<String>) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(cluster.ca_pem().unwrap().as_bytes()).unwrap();
    let mut builder = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(10));
    if let Some(pem) = identity {
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

fn raftmgr(args: &[&str]) -> std::process::Output {
    Command::new(BINARY)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[tokio::test]
async fn a_cluster_with_tls_elects_commits_and_answers_the_cli() {
    let mut cluster = LocalCluster::start(binary(), &with_tls()).await.unwrap();
    let ids = cluster.ids();

    // Each proposal goes through a different member: followers forward to the leader over
    // the Raft port, with their certificates.
    let mut last = 0;
    for id in &ids {
        let role = if *id == 1 {
            PgRole::Primary
        } else {
            PgRole::Standby
        };
        let event = Event::NodeRegistered(NodeRegistration::for_tests(*id, role));
        let answer = cluster.propose(*id, &event).await.unwrap();
        assert_eq!(answer.outcome, Outcome::Applied);
        last = last.max(answer.log_index);
    }
    cluster.wait_converged(&ids, last, TIMEOUT).await.unwrap();

    // The CLI with the node's configuration: https, its CA, its certificate.
    let table = cluster.raftmgr_ok(2, &["cluster", "show"]).unwrap();
    for name in ["node1", "node2", "node3", "leader"] {
        assert!(table.contains(name), "{name} missing from:\n{table}");
    }
    // The CLI with an address and the CA, with and without the scheme.
    let api = cluster.node(3).api_addr.clone();
    let ca = tls_file(&cluster, "ca.crt");
    let ca = ca.to_str().unwrap();
    for address in [format!("https://{api}"), api.clone()] {
        let out = raftmgr(&["cluster", "show", "--api", &address, "--ca-file", ca]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("node3"),
            "cluster show --api {address}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Without the CA the agent's certificate is not trusted (the built-in web roots do not
    // know the lab CA).
    let out = raftmgr(&["cluster", "show", "--api", &format!("https://{api}")]);
    assert!(!out.status.success(), "trusted an unknown CA");

    // Plain HTTP is refused on both ports: the TLS handshake fails, no request is read.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let node = cluster.node(1);
    for url in [
        format!("http://{}/cluster", node.api_addr),
        format!("http://{}/raft/vote", node.raft_addr),
    ] {
        let answer = plain.get(&url).send().await;
        assert!(answer.is_err(), "plain HTTP to {url} answered: {answer:?}");
    }

    // Graceful shutdown still drains; the node comes back and catches up over TLS.
    assert_eq!(cluster.stop(3).await.unwrap(), Some(0));
    let event = Event::NodeRegistered(NodeRegistration::for_tests(4, PgRole::Standby));
    let answer = cluster.propose(2, &event).await.unwrap();
    cluster.start_node(3).unwrap();
    cluster
        .wait_converged(&ids, answer.log_index, TIMEOUT)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_raft_port_refuses_clients_without_the_clusters_certificate() {
    let cluster = LocalCluster::start(binary(), &with_tls()).await.unwrap();
    let ids = cluster.ids();
    let leader = cluster.wait_for_leader(&ids, TIMEOUT).await.unwrap();
    let term = cluster.view(leader).await.unwrap().raft.term;
    let target = cluster.node(1).raft_addr.clone();
    let url = format!("https://{target}{}", raftmgr_raft::network::PATH_VOTE);

    // A vote request far ahead of the current term, with the right cluster secret: accepted,
    // it would make node 1 give up its term (and leadership).
    let vote = openraft::raft::VoteRequest::<NodeId>::new(openraft::Vote::new(term + 100, 9), None);
    let body = raftmgr_raft::codec::encode(&vote);
    let post = |client: &reqwest::Client| {
        client
            .post(&url)
            .header(raftmgr_raft::SECRET_HEADER, CLUSTER_SECRET)
            .header("content-type", "application/octet-stream")
            .body(body.clone())
            .send()
    };

    let no_certificate = https_client(&cluster, None);
    let answer = post(&no_certificate).await;
    assert!(
        answer.is_err(),
        "no client certificate, answered: {answer:?}"
    );

    let stranger = TestCa::new("another CA").unwrap();
    let issued = stranger
        .issue("intruder", &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let foreign = https_client(&cluster, Some(issued.cert_pem + &issued.key_pem));
    let answer = post(&foreign).await;
    assert!(
        answer.is_err(),
        "a foreign CA's certificate, answered: {answer:?}"
    );

    // A member's certificate gets through TLS: without the secret the RPC layer answers 401.
    // So the refusals above were the TLS layer's, and this one is the secret check's.
    let member_identity = std::fs::read_to_string(tls_file(&cluster, "node2.crt")).unwrap()
        + &std::fs::read_to_string(tls_file(&cluster, "node2.key")).unwrap();
    let member = https_client(&cluster, Some(member_identity));
    let answer = member
        .post(&url)
        .body(body.clone())
        .send()
        .await
        .expect("a member's certificate is accepted");
    assert_eq!(answer.status(), reqwest::StatusCode::UNAUTHORIZED);

    // Nothing changed: no member saw the vote's term, the leader still leads.
    for id in &ids {
        let view = cluster.view(*id).await.unwrap();
        assert!(
            view.raft.term < term + 100,
            "node {id} is at term {}",
            view.raft.term
        );
    }
    let log = cluster.read_log(1);
    assert!(
        log.contains("raft port: refused a TLS connection"),
        "node 1's log does not mention the refusals:\n{log}"
    );
    cluster.wait_for_leader(&ids, TIMEOUT).await.unwrap();
}

/// Runs `raftmgr agent -c config` and returns its exit code and stderr; kills it (by its own
/// handle) if it is still running after 10 s, which fails the test.
fn start_agent_briefly(config: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(BINARY)
        .arg("agent")
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            return (status.code(), stderr);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent started with {}", config.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_bad_tls_section_is_refused_at_start_naming_the_key() {
    let options = Options {
        voters: 2,
        ..with_tls()
    };
    // Writes the configurations and certificates; starts nothing.
    let cluster = LocalCluster::new(binary(), &options).unwrap();
    let good = std::fs::read_to_string(&cluster.node(1).config).unwrap();
    let garbage = cluster.dir().join("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").unwrap();
    let broken_pem = cluster.dir().join("broken.pem");
    std::fs::write(
        &broken_pem,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let path = |name: &str| tls_file(&cluster, name).display().to_string();

    let cases = [
        // A missing file.
        (
            good.replace(&path("node1.crt"), "/nonexistent/node1.crt"),
            "tls.cert_file: cannot read /nonexistent/node1.crt",
        ),
        // A file with no PEM in it.
        (
            good.replace(&path("node1.key"), &garbage.display().to_string()),
            "tls.key_file",
        ),
        // A PEM block that does not decode.
        (
            good.replace(&path("ca.crt"), &broken_pem.display().to_string()),
            "tls.ca_file",
        ),
        // Another node's key: it does not match the certificate.
        (
            good.replace(&path("node1.key"), &path("node2.key")),
            "tls.key_file",
        ),
        // A certificate from a CA the cluster does not trust.
        (
            good.replace(&path("ca.crt"), &garbage_ca(&cluster)),
            "tls.cert_file",
        ),
        // A value that is not one of none, optional, required.
        (
            good.replace("[tls]\n", "[tls]\nraft_verify_client = \"sometimes\"\n"),
            "raft_verify_client",
        ),
        // A key that does not exist.
        (
            good.replace("[tls]\n", "[tls]\ncertfile = \"x.pem\"\n"),
            "unknown field `certfile`",
        ),
    ];
    for (text, expected) in cases {
        let config = cluster.dir().join("bad.toml");
        std::fs::write(&config, &text).unwrap();
        let (code, stderr) = start_agent_briefly(&config);
        assert_eq!(code, Some(64), "expected exit 64 for {expected}: {stderr}");
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in: {stderr}"
        );
    }
}

/// The path of a CA certificate (PEM) unrelated to the lab's.
fn garbage_ca(cluster: &LocalCluster) -> String {
    let other = TestCa::new("unrelated CA").unwrap();
    let path = cluster.dir().join("unrelated-ca.crt");
    std::fs::write(&path, other.cert_pem()).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn postgres_replication_is_set_up_and_checked_over_tls() {
    let options = Options {
        postgres: true,
        ..with_tls()
    };
    let cluster = LocalCluster::start(binary(), &options).await.unwrap();
    // primary init, standby clone and standby register talk to the agents over HTTPS.
    cluster.setup_replication(&[1, 2]).await.unwrap();

    // The load balancers' check, over HTTPS with the lab CA.
    let http = cluster.http();
    for (id, expected) in [(1, 200), (2, 503)] {
        let status = http
            .get(cluster.api_url(id, "/primary"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status.as_u16(), expected, "GET /primary on node {id}");
    }
    let status = cluster.raftmgr_ok(2, &["node", "status"]).unwrap();
    assert!(status.contains("replica (PostgreSQL running"), "{status}");
}
