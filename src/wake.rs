//! When the agent's control loops (the executor, the failover decision) take their next step:
//! on their own ticker, as soon as Raft applies a new entry (so that a committed decision is
//! acted on without waiting for the next tick), and when nudged (the executor: its postmaster
//! has just died).

use std::sync::Arc;
use std::time::Duration;

use raftmgr_raft::types::{LogId, RaftMetrics};
use raftmgr_raft::Raft;
use tokio::sync::{watch, Notify};
use tokio::time::{Instant, Interval, MissedTickBehavior};

pub struct Wake {
    ticker: Interval,
    metrics: watch::Receiver<RaftMetrics>,
    applied: Option<LogId>,
    /// After a newly applied entry, the loop steps no sooner than this after its previous
    /// step: a burst of entries costs one or two steps, not one each.
    spacing: Duration,
    last_step: Option<Instant>,
    nudge: Option<Arc<Notify>>,
    /// The next step is due at once.
    again: bool,
}

impl Wake {
    pub fn new(raft: &Raft, every: Duration, spacing: Duration) -> Self {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Wake {
            ticker,
            metrics: raft.metrics(),
            applied: None,
            spacing,
            last_step: None,
            nudge: None,
            again: false,
        }
    }

    /// Also wakes (with the same spacing) when `nudge` is notified.
    pub fn nudged_by(mut self, nudge: Arc<Notify>) -> Self {
        self.nudge = Some(nudge);
        self
    }

    /// Makes the next step due at once: the step just taken did something the next one acts
    /// on (a lease acquired, then the promotion it allows).
    pub fn again(&mut self) {
        self.again = true;
    }

    /// Waits until the next step is due; `false` once `stop` is set (or Raft has stopped).
    pub async fn next(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        if std::mem::take(&mut self.again) {
            self.last_step = Some(Instant::now());
            return !*stop.borrow();
        }
        loop {
            let nudge = self.nudge.clone();
            let nudged = async move {
                match nudge {
                    Some(nudge) => nudge.notified().await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                _ = self.ticker.tick() => false,
                _ = nudged => true,
                changed = self.metrics.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                    let now = self.metrics.borrow_and_update().last_applied;
                    if now == self.applied {
                        continue;
                    }
                    self.applied = now;
                    true
                }
                _ = stop.wait_for(|s| *s) => return false,
            };
            if let (true, Some(last)) = (event, self.last_step) {
                tokio::time::sleep_until(last + self.spacing).await;
            }
            self.last_step = Some(Instant::now());
            return true;
        }
    }
}
