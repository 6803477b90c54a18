//! A log entry carries several events. How the leader grouped them must not matter: replicas
//! number the events alike and reach the same state.

use openraft::storage::RaftStateMachine;
use openraft::testing::log_id;
use openraft::EntryPayload;
use raftmgr_raft::types::Entry;
use raftmgr_raft::{Applied, ClusterState, Event, NodeRegistration, Outcome, PgRole};

fn registration(id: u64, role: PgRole) -> Event {
    Event::NodeRegistered(NodeRegistration::for_tests(id, role))
}

fn events() -> Vec<Event> {
    vec![
        registration(1, PgRole::Primary),
        registration(2, PgRole::Standby),
        // Already registered: a no-op, numbered all the same.
        registration(2, PgRole::Standby),
        Event::LeaseRenewed {
            primary: 1,
            generation: 1,
        },
        registration(3, PgRole::Standby),
    ]
}

/// Applies `events` cut into entries of the given sizes, with a blank entry first (as a new
/// leader writes); returns the replies and the state.
async fn apply_in_entries(sizes: &[usize]) -> (Vec<Vec<Applied>>, ClusterState) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = raftmgr_storage::open(dir.path()).unwrap();
    let mut entries = vec![Entry {
        log_id: log_id(1, 1, 1),
        payload: EntryPayload::Blank,
    }];
    let mut events = events().into_iter();
    for size in sizes {
        let index = entries.len() as u64 + 1;
        entries.push(Entry {
            log_id: log_id(1, 1, index),
            payload: EntryPayload::Normal(events.by_ref().take(*size).collect()),
        });
    }
    assert_eq!(events.next(), None, "the sizes cover every event");
    let replies = store.state_machine.apply(entries).await.unwrap();
    (replies, store.view.cluster_state())
}

#[tokio::test]
async fn events_are_numbered_in_order_whatever_entries_carry_them() {
    let (one_each, state) = apply_in_entries(&[1, 1, 1, 1, 1]).await;
    let (together, state_together) = apply_in_entries(&[5]).await;
    let (mixed, state_mixed) = apply_in_entries(&[2, 3]).await;

    // One reply per entry: none for the blank one, one per event it carries.
    assert_eq!(
        one_each.iter().map(Vec::len).collect::<Vec<_>>(),
        [0, 1, 1, 1, 1, 1]
    );
    assert_eq!(together.iter().map(Vec::len).collect::<Vec<_>>(), [0, 5]);
    let numbered = |replies: &[Vec<Applied>]| -> Vec<(u64, u64, bool)> {
        replies
            .iter()
            .flatten()
            .map(|a| (a.log_index, a.event_index, a.outcome.is_applied()))
            .collect()
    };
    assert_eq!(
        numbered(&mixed),
        [
            (2, 1, true),
            (2, 2, true),
            (3, 3, false),
            (3, 4, true),
            (3, 5, true)
        ]
    );
    assert!(
        matches!(&mixed[2][0].outcome, Outcome::NoOp { reason } if reason.contains("already registered"))
    );

    assert_eq!(state, state_together);
    assert_eq!(state, state_mixed);
    assert_eq!((state.events_applied, state.last_event_index), (5, 5));
    assert_eq!(state.lease.as_ref().map(|l| l.event_index), Some(4));
    let recorded: Vec<u64> = state.recent.iter().map(|e| e.event_index).collect();
    assert_eq!(recorded, [1, 2, 3, 4, 5]);
}
