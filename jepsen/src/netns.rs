//! Lab hosts in network namespaces (root only): one namespace per node, joined by a private
//! bridge with no route out of the machine, so that a partition drops real packets. A partition
//! is a pair of nftables drop rules inside the cut-off node's namespace; healing deletes them.
//! Everything created is deleted on drop, also when a test panics.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context};

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// The nftables table the lab's partition rules live in.
const TABLE: &str = "raftmgr_lab";

pub struct LabNetwork {
    /// Short prefix of every name this lab creates (interface names are limited to 15 bytes).
    prefix: String,
    /// The first three octets of the lab's /24.
    subnet: String,
    nodes: u64,
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl LabNetwork {
    /// Creates the bridge and one namespace per node (ids 1..=nodes).
    pub fn create(nodes: u64) -> anyhow::Result<LabNetwork> {
        anyhow::ensure!(
            nix::unistd::geteuid().is_root(),
            "network namespaces need root"
        );
        let pid = std::process::id();
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let lab = LabNetwork {
            prefix: format!("rm{}{}", pid % 100_000, n),
            subnet: format!("10.{}.{}", 100 + pid % 100, (pid / 100 + n) % 250),
            nodes,
        };
        lab.build().inspect_err(|_| lab.tear_down())?;
        Ok(lab)
    }

    fn bridge(&self) -> String {
        format!("{}b", self.prefix)
    }

    pub fn namespace(&self, id: u64) -> String {
        format!("{}n{id}", self.prefix)
    }

    /// Node `id`'s address in the lab.
    pub fn address(&self, id: u64) -> String {
        format!("{}.{id}", self.subnet)
    }

    /// The lab's range, for pg_hba.conf.
    pub fn cidr(&self) -> String {
        format!("{}.0/24", self.subnet)
    }

    fn build(&self) -> anyhow::Result<()> {
        let bridge = self.bridge();
        run(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}.254/24", self.subnet),
            "dev",
            &bridge,
        ])?;
        run(&["ip", "link", "set", &bridge, "up"])?;
        for id in 1..=self.nodes {
            let ns = self.namespace(id);
            let veth = format!("{}v{id}", self.prefix);
            run(&["ip", "netns", "add", &ns])?;
            run(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            run(&["ip", "link", "set", &veth, "master", &bridge, "up"])?;
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", self.address(id)),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Drops every packet between node `id` and each of `others`, both ways.
    pub fn partition(&self, id: u64, others: &[u64]) -> anyhow::Result<()> {
        self.drop_from_peers(id, others, "drop")
    }

    /// Drops `percent` % of the packets between node `id` and each of `others`, at random.
    pub fn lossy(&self, id: u64, others: &[u64], percent: u8) -> anyhow::Result<()> {
        anyhow::ensure!(percent <= 100, "a loss of {percent} % is not a percentage");
        self.drop_from_peers(
            id,
            others,
            &format!("numgen random mod 100 < {percent} drop"),
        )
    }

    /// One table in node `id`'s namespace applying `verdict` to traffic with `others` (the lab's
    /// own address on the bridge is never affected). Heal before installing another.
    fn drop_from_peers(&self, id: u64, others: &[u64], verdict: &str) -> anyhow::Result<()> {
        anyhow::ensure!(!others.is_empty(), "no peers to cut node {id} off from");
        let ns = self.namespace(id);
        let peers = others
            .iter()
            .map(|o| self.address(*o))
            .collect::<Vec<_>>()
            .join(", ");
        let script = format!(
            "table inet {TABLE} {{\n\
             chain input {{ type filter hook input priority 0; policy accept; ip saddr {{ {peers} }} {verdict}; }}\n\
             chain output {{ type filter hook output priority 0; policy accept; ip daddr {{ {peers} }} {verdict}; }}\n\
             }}\n"
        );
        let path = std::env::temp_dir().join(format!("{}-partition-{id}.nft", self.prefix));
        std::fs::write(&path, script)?;
        let result = run(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "nft",
            "-f",
            path.to_str().unwrap_or_default(),
        ]);
        let _ = std::fs::remove_file(&path);
        result
    }

    /// Limits what every node sends to `mbit` Mbit/s (a token bucket on its interface), so that
    /// copies between nodes take the time they take on such a link rather than on loopback.
    pub fn limit_rate(&self, mbit: u32) -> anyhow::Result<()> {
        anyhow::ensure!(mbit > 0, "a link of 0 Mbit/s carries nothing");
        for id in 1..=self.nodes {
            run(&[
                "ip",
                "netns",
                "exec",
                &self.namespace(id),
                "tc",
                "qdisc",
                "replace",
                "dev",
                "eth0",
                "root",
                "tbf",
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                "256kb",
                "latency",
                "50ms",
            ])?;
        }
        Ok(())
    }

    /// Removes every partition.
    pub fn heal(&self) -> anyhow::Result<()> {
        for id in 1..=self.nodes {
            let ns = self.namespace(id);
            // Absent in namespaces that were never cut off.
            let _ = run(&[
                "ip", "netns", "exec", &ns, "nft", "delete", "table", "inet", TABLE,
            ]);
        }
        Ok(())
    }

    /// What this lab created, as `delete` takes it: `("netns", name)` for every namespace, then
    /// `("link", bridge)`.
    pub fn created(&self) -> Vec<(&'static str, String)> {
        (1..=self.nodes)
            .map(|id| ("netns", self.namespace(id)))
            .chain([("link", self.bridge())])
            .collect()
    }

    fn tear_down(&self) {
        let created = self.created();
        delete(created.iter().map(|(kind, name)| (*kind, name.as_str())));
    }
}

/// Deletes namespaces (`("netns", name)`) and links (`("link", name)`); ignores anything else
/// and what is already gone.
pub fn delete<'a>(names: impl Iterator<Item = (&'a str, &'a str)>) {
    for (kind, name) in names {
        if matches!(kind, "netns" | "link") {
            let _ = run(&["ip", kind, "del", name]);
        }
    }
}

impl Drop for LabNetwork {
    fn drop(&mut self) {
        self.tear_down();
    }
}
