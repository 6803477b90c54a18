//! Pacing of the API: at most a configured number of requests per second on average, so that a
//! flood of health checks (a load balancer checking far too often, a benchmark) cannot take the
//! CPU a failover needs. A request over the rate is not refused; it waits for its turn. A large
//! answer (`GET /cluster`, `/events`) counts as one request for each [`BYTES_PER_TURN`] it sends.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::HttpBody;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

/// A request may be served this much ahead of its turn: short bursts pass unpaced.
const TOLERANCE: Duration = Duration::from_millis(2);

/// An answer takes one turn for each this many bytes it sends, the first turn included: a
/// load-balancer check's answer (well under it) takes one, a `GET /cluster` answer of 80 KB
/// takes 20. Sending, and the client reading, a large answer cost the machine far more than a
/// check does.
pub const BYTES_PER_TURN: u64 = 4096;

/// Spaces requests `1 s / per_second` apart on average (a virtual schedule, GCRA).
#[derive(Debug)]
pub struct Pace {
    interval: Duration,
    /// When the next request's turn is: never earlier than now.
    next_turn: Mutex<Option<Instant>>,
}

impl Pace {
    /// `None` for 0: no limit.
    pub fn per_second(per_second: u32) -> Option<Arc<Pace>> {
        (per_second > 0).then(|| {
            Arc::new(Pace {
                interval: Duration::from_secs(1) / per_second,
                next_turn: Mutex::new(None),
            })
        })
    }

    /// Books the turn of a request arriving at `now`; how long it must wait: until up to
    /// `TOLERANCE` before its turn.
    pub fn admit(&self, now: Instant) -> Duration {
        let mut next_turn = self
            .next_turn
            .lock()
            .expect("never poisoned: no panics inside");
        let turn = next_turn.map_or(now, |next| next.max(now));
        *next_turn = Some(turn + self.interval);
        (turn - now).saturating_sub(TOLERANCE)
    }

    /// Books `turns` more turns, at `now`, for a request that turned out to cost that many
    /// more: the requests after it wait for them.
    pub fn charge(&self, turns: u32, now: Instant) {
        if turns == 0 {
            return;
        }
        let mut next_turn = self
            .next_turn
            .lock()
            .expect("never poisoned: no panics inside");
        let turn = next_turn.map_or(now, |next| next.max(now));
        *next_turn = Some(turn + self.interval * turns);
    }
}

/// The turns an answer of `bytes` takes beyond the one its request was admitted with.
fn extra_turns(bytes: u64) -> u32 {
    u32::try_from(bytes.saturating_sub(1) / BYTES_PER_TURN).unwrap_or(u32::MAX)
}

/// The middleware: each request waits for its turn, then is served.
pub async fn paced(State(pace): State<Arc<Pace>>, request: Request, next: Next) -> Response {
    let wait = pace.admit(Instant::now());
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    let response = next.run(request).await;
    // A streamed answer (`GET /events?follow=1`) has no size known here: it counts as one.
    if let Some(bytes) = response.body().size_hint().exact() {
        pace.charge(extra_turns(bytes), Instant::now());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_no_limit() {
        assert!(Pace::per_second(0).is_none());
    }

    #[test]
    fn a_burst_waits_in_turn_and_a_quiet_moment_does_not_bank_turns() {
        let pace = Pace::per_second(1000).unwrap(); // a turn every millisecond
        let start = Instant::now();
        let waits: Vec<Duration> = (0..6).map(|_| pace.admit(start)).collect();
        let ms = Duration::from_millis;
        // Each is served up to the tolerance before its turn: the first three at once.
        assert_eq!(waits, [ms(0), ms(0), ms(0), ms(1), ms(2), ms(3)]);

        // Long after the burst: served at once, and the idle second is not saved up as credit.
        let later = start + Duration::from_secs(1);
        let waits: Vec<Duration> = (0..6).map(|_| pace.admit(later)).collect();
        assert_eq!(waits, [ms(0), ms(0), ms(0), ms(1), ms(2), ms(3)]);
    }

    #[test]
    fn a_large_answer_makes_the_next_requests_wait_as_for_that_many_requests() {
        let pace = Pace::per_second(1000).unwrap();
        let start = Instant::now();
        assert_eq!(pace.admit(start), Duration::ZERO);
        // An answer of 20 turns' bytes: the next request's turn is 20 ms after the first's.
        pace.charge(extra_turns(20 * BYTES_PER_TURN), start);
        let ms = Duration::from_millis;
        assert_eq!(pace.admit(start), ms(20) - TOLERANCE);
        // A small answer books nothing more.
        pace.charge(extra_turns(300), start);
        assert_eq!(pace.admit(start), ms(21) - TOLERANCE);
    }

    #[test]
    fn answers_take_a_turn_per_started_block_of_bytes() {
        assert_eq!(extra_turns(0), 0);
        assert_eq!(extra_turns(BYTES_PER_TURN), 0);
        assert_eq!(extra_turns(BYTES_PER_TURN + 1), 1);
        assert_eq!(extra_turns(u64::MAX), u32::MAX);
    }

    #[test]
    fn requests_at_the_rate_never_wait() {
        let pace = Pace::per_second(100).unwrap();
        let start = Instant::now();
        for i in 0..1000 {
            assert_eq!(
                pace.admit(start + Duration::from_millis(10 * i)),
                Duration::ZERO
            );
        }
    }
}
