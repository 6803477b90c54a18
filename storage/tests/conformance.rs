// openraft fixes the error type of the suite.
#![allow(clippy::result_large_err)]

//! openraft's own storage conformance suite, run against the sled store.

use openraft::testing::{StoreBuilder, Suite};
use raftmgr_raft::types::StorageError;
use raftmgr_raft::TypeConfig;
use raftmgr_storage::{LogStore, StateMachineStore};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = raftmgr_storage::open(dir.path()).expect("a fresh store opens");
        Ok((dir, store.log, store.state_machine))
    }
}

#[test]
fn sled_store_passes_openraft_conformance_suite() -> Result<(), StorageError> {
    Suite::test_all(SledBuilder)
}
