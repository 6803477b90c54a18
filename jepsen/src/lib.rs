//! The lab: real raftmgr clusters on this machine, for integration tests, chaos runs and
//! benchmarks. Every process it starts is ended by its id when the cluster is dropped, and its
//! folder is removed — also when a test panics.

pub mod api_bench;
pub mod bench;
pub mod chaos;
pub mod cluster;
pub mod failover_bench;
pub mod netns;
pub mod orphans;
pub mod procfs;
pub mod tls;
pub mod wait;
