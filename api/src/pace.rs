//! Pacing of the API: at most a configured number of requests per second on average, so that a
//! flood of health checks (a load balancer checking far too often, a benchmark) cannot take the
//! CPU a failover needs. A request over the rate is not refused; it waits for its turn.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

/// A request may be served this much ahead of its turn: short bursts pass unpaced.
const TOLERANCE: Duration = Duration::from_millis(2);

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
}

/// The middleware: each request waits for its turn, then is served.
pub async fn paced(State(pace): State<Arc<Pace>>, request: Request, next: Next) -> Response {
    let wait = pace.admit(Instant::now());
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    next.run(request).await
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
