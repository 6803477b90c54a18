//! Requests that only the Raft leader can carry out — proposing an event, changing membership —
//! and the [`Proposer`] that sends them to the leader from any member.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ChangeMembershipError, CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::raft::ClientWriteResponse;
use openraft::ChangeMembers;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use crate::event::Event;
use crate::network::{RpcClient, RpcFailure, PATH_FORWARD};
use crate::types::{Applied, Member, NodeId, Raft, TypeConfig};

/// How long to wait between attempts while no leader is known.
const NO_LEADER_RETRY: Duration = Duration::from_millis(50);

/// How long a read keeps asking the followers to confirm the leader before it fails.
const READ_QUORUM_RETRY_FOR: Duration = Duration::from_secs(1);

/// How long a membership change waits for the previous one to finish committing.
const MEMBERSHIP_IN_PROGRESS_TIMEOUT: Duration = Duration::from_secs(10);

/// How long adding a voter waits for it to replicate as a learner first. Shorter than the
/// default proposal timeout, so that a request forwarded to the leader gets this answer rather
/// than "outcome unknown".
const LEARNER_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(8);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    Propose(Event),
    /// Add a member as a learner, wait until it has caught up, then (if `voter`) make it a voter.
    AddMember {
        node_id: NodeId,
        member: Member,
        voter: bool,
    },
    RemoveMember {
        node_id: NodeId,
    },
    /// ReadIndex: the leader confirms it still leads (a heartbeat round with a quorum) and
    /// answers the index a linearizable read must wait for.
    ReadIndex,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    Applied(Applied),
    MembershipChanged { log_index: u64 },
    ReadIndex { log_index: Option<u64> },
}

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardError {
    /// This member is not the leader; `leader` is where to go, when known.
    #[error("not the Raft leader; the leader is {}", describe_leader(.leader))]
    NotLeader { leader: Option<(NodeId, Member)> },
    /// The request cannot be carried out as asked (a client mistake).
    #[error("{0}")]
    Refused(String),
    /// It may or may not have been carried out (a timeout, a lost connection, a fatal error).
    #[error("{0}")]
    Failed(String),
}

fn describe_leader(leader: &Option<(NodeId, Member)>) -> String {
    match leader {
        Some((id, member)) => format!("node {id} ({member})"),
        None => "not known yet".to_string(),
    }
}

fn from_write_error(e: RaftError<NodeId, ClientWriteError<NodeId, Member>>) -> ForwardError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ForwardError::NotLeader {
            leader: f.leader_id.zip(f.leader_node),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            ForwardError::Refused(e.to_string())
        }
        RaftError::Fatal(e) => ForwardError::Failed(format!("Raft stopped: {e}")),
    }
}

/// How many log entries of events the leader writes at once; events proposed meanwhile wait and
/// go together in the next entry. openraft 0.9 appends (and syncs) one client write at a time,
/// so a second entry in flight only keeps the pipeline full; more would only make entries
/// smaller.
const ENTRIES_IN_FLIGHT: usize = 2;

/// The most events in one log entry. With [`PAYLOAD_ENTRIES_MAX`] it bounds an append-entries
/// request: 32 entries of 64 events of even 4 KiB each (an observation is well under 1 KiB) are
/// 8 MiB, half the RPC server's body limit.
pub const EVENTS_PER_ENTRY_MAX: usize = 64;

/// The most entries in one append-entries request (openraft's `max_payload_entries`; its
/// default, 300, is sized for entries of one small command each).
pub const PAYLOAD_ENTRIES_MAX: u64 = 32;

const _: () = assert!(
    PAYLOAD_ENTRIES_MAX as usize * EVENTS_PER_ENTRY_MAX * 4096
        <= crate::server::BODY_LIMIT_BYTES / 2
);

/// Proposals waiting for an entry; proposers wait beyond it.
const PROPOSALS_QUEUED_MAX: usize = 4096;

/// Carries out leader-only requests on this member, which must be the leader. Each event
/// proposed while earlier entries are being written waits, then goes with the others that
/// arrived meanwhile as one log entry: one disk sync for all of them instead of one each. An
/// event proposed when nothing is in flight is written at once, alone.
#[derive(Clone)]
pub struct Leader {
    raft: Raft,
    proposals: mpsc::Sender<Proposal>,
}

struct Proposal {
    event: Event,
    answer: oneshot::Sender<Result<Applied, ForwardError>>,
}

impl Leader {
    /// Starts the task that writes proposed events; it ends when the last clone is dropped.
    pub fn new(raft: Raft) -> Leader {
        let (proposals, queued) = mpsc::channel(PROPOSALS_QUEUED_MAX);
        tokio::spawn(write_entries(raft.clone(), queued));
        Leader { raft, proposals }
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Carries out `request` on this member, which must be the leader.
    pub async fn execute(&self, request: Request) -> Result<Reply, ForwardError> {
        let raft = &self.raft;
        match request {
            Request::Propose(event) => self.propose(event).await.map(Reply::Applied),
            Request::ReadIndex => read_index(raft).await,
            Request::AddMember {
                node_id,
                member,
                voter,
            } => add_member(raft, node_id, member, voter).await,
            Request::RemoveMember { node_id } => remove_member(raft, node_id).await,
        }
    }

    async fn propose(&self, event: Event) -> Result<Applied, ForwardError> {
        let (answer, answered) = oneshot::channel();
        self.proposals
            .send(Proposal { event, answer })
            .await
            .map_err(|_| ForwardError::Failed("the event writer has stopped".into()))?;
        answered.await.unwrap_or_else(|_| {
            Err(ForwardError::Failed(
                "the event writer stopped; the outcome is unknown".into(),
            ))
        })
    }
}

/// Writes the queued proposals as log entries, at most [`ENTRIES_IN_FLIGHT`] at a time.
async fn write_entries(raft: Raft, mut queued: mpsc::Receiver<Proposal>) {
    let in_flight = Arc::new(Semaphore::new(ENTRIES_IN_FLIGHT));
    loop {
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let Some(first) = queued.recv().await else {
            return;
        };
        let mut entry = vec![first];
        while entry.len() < EVENTS_PER_ENTRY_MAX {
            match queued.try_recv() {
                Ok(next) => entry.push(next),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            write_entry(&raft, entry).await;
            drop(permit);
        });
    }
}

/// Commits `proposals` as one log entry and answers each with its own event's result.
async fn write_entry(raft: &Raft, proposals: Vec<Proposal>) {
    let (events, answers): (Vec<Event>, Vec<_>) =
        proposals.into_iter().map(|p| (p.event, p.answer)).unzip();
    match raft.client_write(events).await {
        Ok(response) => {
            for (answer, applied) in answers.into_iter().zip(response.data) {
                let _ = answer.send(Ok(applied));
            }
        }
        Err(e) => {
            let e = from_write_error(e);
            for answer in answers {
                let _ = answer.send(Err(e.clone()));
            }
        }
    }
}

async fn read_index(raft: &Raft) -> Result<Reply, ForwardError> {
    match confirm_leadership(raft).await {
        Ok(log_id) => Ok(Reply::ReadIndex {
            log_index: log_id.map(|id| id.index),
        }),
        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
            Err(ForwardError::NotLeader {
                leader: f.leader_id.zip(f.leader_node),
            })
        }
        Err(e) => Err(ForwardError::Failed(format!("confirming leadership: {e}"))),
    }
}

async fn add_member(
    raft: &Raft,
    node_id: NodeId,
    member: Member,
    voter: bool,
) -> Result<Reply, ForwardError> {
    // Not openraft's blocking add: it waits for the learner without a deadline, so an
    // unreachable address held the request (and its caller) forever.
    let mut response =
        after_membership_change(|| raft.add_learner(node_id, member.clone(), false)).await?;
    if voter {
        wait_caught_up(raft, node_id, &member, response.log_id.index).await?;
        let add = ChangeMembers::AddVoterIds(BTreeSet::from([node_id]));
        response = after_membership_change(|| raft.change_membership(add.clone(), false)).await?;
    }
    Ok(Reply::MembershipChanged {
        log_index: response.log_id.index,
    })
}

async fn remove_member(raft: &Raft, node_id: NodeId) -> Result<Reply, ForwardError> {
    let membership = raft.metrics().borrow().membership_config.clone();
    let is_voter = membership.voter_ids().any(|id| id == node_id);
    let is_member = membership.nodes().any(|(id, _)| *id == node_id);
    let change = if is_voter {
        ChangeMembers::RemoveVoters(BTreeSet::from([node_id]))
    } else if is_member {
        ChangeMembers::RemoveNodes(BTreeSet::from([node_id]))
    } else {
        return Err(ForwardError::Refused(format!(
            "node {node_id} is not a member"
        )));
    };
    if is_voter && membership.voter_ids().count() == 1 {
        return Err(ForwardError::Refused(format!(
            "node {node_id} is the only voter; removing it would leave no cluster"
        )));
    }
    let response =
        after_membership_change(|| raft.change_membership(change.clone(), false)).await?;
    Ok(Reply::MembershipChanged {
        log_index: response.log_id.index,
    })
}

/// Waits until the leader has replicated to learner `node_id` the entry that added it, for at
/// most [`LEARNER_CATCH_UP_TIMEOUT`]; it is not made a voter otherwise, so that an unreachable
/// member never counts towards the quorum.
async fn wait_caught_up(
    raft: &Raft,
    node_id: NodeId,
    member: &Member,
    added_at_index: u64,
) -> Result<(), ForwardError> {
    let caught_up = raft
        .wait(Some(LEARNER_CATCH_UP_TIMEOUT))
        .metrics(
            |m| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&node_id))
                    .and_then(|matched| matched.as_ref())
                    .is_some_and(|matched| matched.index >= added_at_index)
            },
            "the new learner to catch up",
        )
        .await;
    match caught_up {
        Ok(_) => Ok(()),
        Err(openraft::metrics::WaitError::Timeout(..)) => Err(ForwardError::Refused(format!(
            "node {node_id} was added as a learner but has not replicated within \
             {LEARNER_CATCH_UP_TIMEOUT:?} (does its agent run and answer at {}?), so it was not \
             made a voter; add it again once it runs, or remove it",
            member.raft_addr
        ))),
        Err(e) => Err(ForwardError::Failed(format!(
            "waiting for node {node_id} to catch up: {e}"
        ))),
    }
}

type WriteResult =
    Result<ClientWriteResponse<TypeConfig>, RaftError<NodeId, ClientWriteError<NodeId, Member>>>;

/// Runs a membership change, first waiting (with a deadline) for a previous change that is still
/// being committed: openraft allows one at a time, and an operator's back-to-back requests
/// should not fail for it.
async fn after_membership_change<F, Fut>(
    mut change: F,
) -> Result<ClientWriteResponse<TypeConfig>, ForwardError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = WriteResult>,
{
    let deadline = Instant::now() + MEMBERSHIP_IN_PROGRESS_TIMEOUT;
    loop {
        match change().await {
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(_),
            ))) if Instant::now() < deadline => tokio::time::sleep(NO_LEADER_RETRY).await,
            other => return other.map_err(from_write_error),
        }
    }
}

/// Raft's ReadIndex on the leader. openraft confirms leadership with one heartbeat round that
/// must reach a quorum within one heartbeat interval, and does not retry; a follower busy for
/// that long (a flush, a loaded host) made a read fail. A read changes nothing, so it is asked
/// again for a while before the failure is reported.
async fn confirm_leadership(
    raft: &Raft,
) -> Result<Option<openraft::LogId<NodeId>>, RaftError<NodeId, CheckIsLeaderError<NodeId, Member>>>
{
    let deadline = Instant::now() + READ_QUORUM_RETRY_FOR;
    loop {
        match raft.ensure_linearizable().await {
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(NO_LEADER_RETRY).await
            }
            other => return other,
        }
    }
}

/// Sends leader-only requests to wherever the leader is, from any member.
#[derive(Clone)]
pub struct Proposer {
    raft: Raft,
    leader: Leader,
    rpc: RpcClient,
    timeout: Duration,
}

impl Proposer {
    pub fn new(leader: Leader, rpc: RpcClient, timeout: Duration) -> Self {
        Proposer {
            raft: leader.raft().clone(),
            leader,
            rpc,
            timeout,
        }
    }

    pub async fn propose(&self, event: Event) -> Result<Applied, ForwardError> {
        match self.submit(Request::Propose(event)).await? {
            Reply::Applied(applied) => Ok(applied),
            other => Err(ForwardError::Failed(format!("unexpected answer {other:?}"))),
        }
    }

    /// `propose`, then waits until this member has applied the entry too: the caller's next
    /// read of the local state includes it, so a loop acting on that state does not propose
    /// the same event again.
    pub async fn propose_here(&self, event: Event) -> Result<Applied, ForwardError> {
        let applied = self.propose(event).await?;
        self.raft
            .wait(Some(self.timeout))
            .applied_index_at_least(Some(applied.log_index), "proposal applied here")
            .await
            .map_err(|e| {
                ForwardError::Failed(format!(
                    "committed at index {}, not applied here: {e}",
                    applied.log_index
                ))
            })?;
        Ok(applied)
    }

    /// Waits until this member has applied everything committed before the call: after it,
    /// reading the local state is linearizable (Raft's ReadIndex, served from any member).
    pub async fn read_barrier(&self) -> Result<(), ForwardError> {
        let index = match self.submit(Request::ReadIndex).await? {
            Reply::ReadIndex { log_index } => log_index,
            other => return Err(ForwardError::Failed(format!("unexpected answer {other:?}"))),
        };
        self.raft
            .wait(Some(self.timeout))
            .applied_index_at_least(index, "read barrier")
            .await
            .map_err(|e| ForwardError::Failed(format!("waiting to apply index {index:?}: {e}")))?;
        Ok(())
    }

    /// Carries out `request` on the leader. Retries only where the request certainly was not
    /// carried out (no leader known, a refused connection, "not the leader"), so that nothing is
    /// proposed twice by this function.
    pub async fn submit(&self, request: Request) -> Result<Reply, ForwardError> {
        let deadline = Instant::now() + self.timeout;
        let mut leader: Option<(NodeId, Member)> = None;
        loop {
            let result = match &leader {
                Some((id, member)) if *id != self.raft_id() => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    match self
                        .rpc
                        .post::<_, Result<Reply, ForwardError>>(
                            &member.raft_addr,
                            PATH_FORWARD,
                            &request,
                            remaining.max(Duration::from_millis(1)),
                        )
                        .await
                    {
                        Ok(answer) => answer,
                        Err(RpcFailure::Unreachable { .. }) => {
                            Err(ForwardError::NotLeader { leader: None })
                        }
                        Err(RpcFailure::Failed(e)) => Err(ForwardError::Failed(format!(
                            "forwarding to the leader, node {id}: {e}; the outcome is unknown"
                        ))),
                    }
                }
                _ => self.leader.execute(request.clone()).await,
            };
            match result {
                Err(ForwardError::NotLeader { leader: hint }) => {
                    if Instant::now() >= deadline {
                        return Err(ForwardError::Failed(format!(
                            "no Raft leader answered within {:?}",
                            self.timeout
                        )));
                    }
                    if hint.is_none() || hint == leader {
                        tokio::time::sleep(NO_LEADER_RETRY).await;
                    }
                    leader = hint;
                }
                other => return other,
            }
        }
    }

    fn raft_id(&self) -> NodeId {
        self.raft.metrics().borrow().id
    }
}

/// The members of the current membership config: voters and learners, with their addresses.
pub fn members(raft: &Raft) -> (BTreeSet<NodeId>, BTreeMap<NodeId, Member>) {
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let voters = membership.voter_ids().collect();
    let nodes = membership
        .nodes()
        .map(|(id, member)| (*id, member.clone()))
        .collect();
    (voters, nodes)
}
