//! `GET /events?follow=1`: the matching recent events, then each newly applied one, as
//! Server-Sent Events. Each `data:` line is one `GET /events` item (its `id:` is the event index).
//! The stream ends when the client goes away or the agent shuts down.

use std::collections::VecDeque;

use axum::response::sse::{self, KeepAlive, Sse};
use futures::Stream;
use raftmgr_raft::state::RecordedEvent;
use raftmgr_raft::{ClusterState, NodeId};
use raftmgr_storage::StoreView;
use tokio::sync::watch;

use crate::Api;

/// Which events a listing or a stream shows.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only events about this node.
    pub node: Option<NodeId>,
    /// Only events of this type.
    pub kind: Option<String>,
}

impl Selection {
    pub fn matches(&self, e: &RecordedEvent) -> bool {
        self.node.is_none_or(|id| e.event.subject() == Some(id))
            && self.kind.as_deref().is_none_or(|k| e.event.kind() == k)
    }
}

/// What a stream has sent so far: the state's counters when it last looked.
#[derive(Debug, Clone, Copy)]
struct Seen {
    last_event_index: u64,
    events_applied: u64,
}

impl Seen {
    fn of(state: &ClusterState) -> Seen {
        Seen {
            last_event_index: state.last_event_index,
            events_applied: state.events_applied,
        }
    }
}

struct Follow {
    store: StoreView,
    selection: Selection,
    seen: Seen,
    /// Changes whenever Raft applies entries (and on other Raft news).
    raft_news: watch::Receiver<raftmgr_raft::types::RaftMetrics>,
    shutdown: watch::Receiver<bool>,
    pending: VecDeque<sse::Event>,
}

/// The SSE answer: first the matching recent events, then the new ones as they are applied.
pub fn stream(
    api: &Api,
    selection: Selection,
) -> Result<Sse<impl Stream<Item = Result<sse::Event, axum::Error>>>, axum::Error> {
    // Subscribe before reading, so that nothing applied in between goes unnoticed.
    let raft_news = api.raft.metrics();
    let (backlog, seen) = api.store.with(|state| {
        let backlog: Vec<RecordedEvent> = state
            .recent
            .iter()
            .filter(|e| selection.matches(e))
            .cloned()
            .collect();
        (backlog, Seen::of(state))
    });
    let follow = Follow {
        store: api.store.clone(),
        selection,
        seen,
        raft_news,
        shutdown: api.shutdown.clone(),
        pending: backlog.iter().map(to_sse).collect::<Result<_, _>>()?,
    };
    let stream = futures::stream::unfold(follow, |mut follow| async {
        let next = follow.next().await?;
        Some((next, follow))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

fn to_sse(e: &RecordedEvent) -> Result<sse::Event, axum::Error> {
    sse::Event::default()
        .id(e.event_index.to_string())
        .json_data(e)
}

impl Follow {
    /// The next SSE event; `None` ends the stream (the agent is shutting down).
    async fn next(&mut self) -> Option<Result<sse::Event, axum::Error>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            tokio::select! {
                news = self.raft_news.changed() => {
                    if news.is_err() {
                        return None;
                    }
                }
                _ = self.shutdown.wait_for(|stop| *stop) => return None,
            }
            if let Err(e) = self.collect() {
                return Some(Err(e));
            }
        }
    }

    /// Queues the matching events applied since the last look, and a `missed` event when more
    /// were applied than the state still holds.
    fn collect(&mut self) -> Result<(), axum::Error> {
        let seen = self.seen;
        let (new, now) = self.store.with(|state| {
            let mut new: Vec<RecordedEvent> = state
                .recent
                .iter()
                .rev()
                .take_while(|e| e.event_index > seen.last_event_index)
                .cloned()
                .collect();
            new.reverse();
            (new, Seen::of(state))
        });
        let applied = now.events_applied.saturating_sub(seen.events_applied);
        let missed = applied.saturating_sub(new.len() as u64);
        if missed > 0 {
            let gap = sse::Event::default()
                .event("missed")
                .json_data(serde_json::json!({ "missed": missed }))?;
            self.pending.push_back(gap);
        }
        for e in new.iter().filter(|e| self.selection.matches(e)) {
            self.pending.push_back(to_sse(e)?);
        }
        self.seen = now;
        Ok(())
    }
}
