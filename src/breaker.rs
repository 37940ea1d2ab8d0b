//! The circuit breaker, as plain data the acker owns. It opens after a run of
//! consecutive transient failures (Paheko down, not one bad ticket), or at once on a
//! plugin-wide refusal (401, 403, 404…: a secret rotated on one side, a wrong URL).
//! While open, nothing is sent but one probe per interval, the interval growing by the
//! retry factor up to its cap, with jitter. The first answer that is neither a transient
//! failure nor a refusal closes it, and the backlog drains at full speed. It decides
//! only *when* requests may go out; each method says what changed, and the acker logs
//! it and shows it on /health.

use std::time::{Duration, Instant};

use crate::config::RetryConfig;
use crate::retry::{Rng, jitter};

/// What a request may be sent as: anything while closed, the one probe while open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Send,
    Probe,
}

/// Why the breaker is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Transient failures: Paheko is down or overloaded.
    Down,
    /// The plugin answers this 4xx to every ticket.
    Refusing(u16),
}

/// A change worth a log line and a /health update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change {
    Opened {
        cause: Cause,
        failures: u32,
        next_probe_in: Duration,
    },
    /// A probe failed again: still open, the next one in `next_probe_in`.
    StillOpen {
        cause: Cause,
        probes: u32,
        down_for: Duration,
        next_probe_in: Duration,
    },
    Closed {
        was: Cause,
        down_for: Duration,
        probes: u32,
    },
}

#[derive(Debug)]
pub struct Breaker {
    /// Consecutive transient failures that open it; 0: never for transient failures
    /// (a plugin-wide refusal still does).
    threshold: u32,
    retry: RetryConfig,
    failures: u32,
    open: Option<Open>,
    rng: Rng,
}

#[derive(Debug)]
struct Open {
    cause: Cause,
    since: Instant,
    probes: u32,
    next_probe: Instant,
    probing: bool,
}

impl Breaker {
    /// `seed` spreads the probe intervals (the breaker reads no clock and no system
    /// randomness, so the coordinator's simulation replays exactly).
    pub fn new(threshold: u32, retry: RetryConfig, seed: u64) -> Breaker {
        Breaker {
            threshold,
            retry,
            failures: 0,
            open: None,
            rng: Rng::new(seed),
        }
    }

    /// Whether a request may go out now; taking the probe marks it as under way.
    pub fn permit(&mut self, now: Instant) -> Option<Permit> {
        match &mut self.open {
            None => Some(Permit::Send),
            Some(open) if !open.probing && now >= open.next_probe => {
                open.probing = true;
                Some(Permit::Probe)
            }
            Some(_) => None,
        }
    }

    /// When the next probe may go out, while open and no probe is under way: a timer
    /// for the acker's loop.
    pub fn next_probe(&self) -> Option<Instant> {
        self.open
            .as_ref()
            .filter(|open| !open.probing)
            .map(|open| open.next_probe)
    }

    pub fn cause(&self) -> Option<Cause> {
        self.open.as_ref().map(|open| open.cause)
    }

    /// The plugin answered (2xx or a per-ticket refusal): it is up, and takes tickets.
    pub fn on_answer(&mut self, now: Instant) -> Option<Change> {
        self.failures = 0;
        let open = self.open.take()?;
        Some(Change::Closed {
            was: open.cause,
            down_for: now.saturating_duration_since(open.since),
            probes: open.probes,
        })
    }

    /// A transient failure (5xx, 408, 429, no answer).
    pub fn on_failure(&mut self, permit: Permit, now: Instant) -> Option<Change> {
        self.failures = self.failures.saturating_add(1);
        if self.open.is_some() {
            return self.probe_failed(permit, Cause::Down, now);
        }
        if self.threshold == 0 || self.failures < self.threshold {
            return None;
        }
        Some(self.open(Cause::Down, now))
    }

    /// A plugin-wide refusal: opens at once, since every ticket would get the same.
    pub fn on_refusal(&mut self, status: u16, permit: Permit, now: Instant) -> Option<Change> {
        self.failures = self.failures.saturating_add(1);
        let cause = Cause::Refusing(status);
        match &self.open {
            Some(open) if open.cause == cause => self.probe_failed(permit, cause, now),
            // Closed, or open for another reason: a new state worth saying.
            _ => Some(self.open(cause, now)),
        }
    }

    /// The probe was not sent after all (the worker is stopping).
    pub fn release(&mut self, permit: Permit) {
        if permit == Permit::Probe
            && let Some(open) = &mut self.open
        {
            open.probing = false;
        }
    }

    fn open(&mut self, cause: Cause, now: Instant) -> Change {
        let wait = jitter(self.retry.delay_after(1), self.rng.unit());
        let since = self.open.as_ref().map_or(now, |open| open.since);
        self.open = Some(Open {
            cause,
            since,
            probes: 0,
            next_probe: now + wait,
            probing: false,
        });
        Change::Opened {
            cause,
            failures: self.failures,
            next_probe_in: wait,
        }
    }

    /// A failure while open: the probe's sets the next probe time; a request that was
    /// already under way when the breaker opened changes nothing.
    fn probe_failed(&mut self, permit: Permit, cause: Cause, now: Instant) -> Option<Change> {
        let open = self.open.as_mut()?;
        if permit != Permit::Probe {
            return None;
        }
        open.cause = cause;
        open.probing = false;
        open.probes += 1;
        let wait = jitter(self.retry.delay_after(open.probes + 1), self.rng.unit());
        open.next_probe = now + wait;
        Some(Change::StillOpen {
            cause,
            probes: open.probes,
            down_for: now.saturating_duration_since(open.since),
            next_probe_in: wait,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32) -> Breaker {
        let retry = RetryConfig {
            max_attempts: 5,
            backoff: Duration::from_secs(1),
            factor: 2.0,
            max_backoff: Duration::from_secs(10),
        };
        Breaker::new(threshold, retry, 1)
    }

    #[test]
    fn opens_after_the_threshold_and_lets_one_probe_out_per_interval() {
        let mut b = breaker(3);
        let t0 = Instant::now();
        assert_eq!(b.on_failure(Permit::Send, t0), None);
        assert_eq!(b.on_failure(Permit::Send, t0), None);
        assert!(matches!(
            b.on_failure(Permit::Send, t0),
            Some(Change::Opened {
                cause: Cause::Down,
                failures: 3,
                ..
            })
        ));
        assert_eq!(b.permit(t0), None, "no probe before the first interval");
        let first = b.next_probe().unwrap();
        assert!(first >= t0 + Duration::from_millis(900), "{:?}", first - t0);
        assert_eq!(b.permit(first), Some(Permit::Probe));
        assert_eq!(b.permit(first), None, "one probe at a time");
        assert_eq!(b.next_probe(), None, "no timer while the probe is out");
        // A request already under way when it opened changes nothing.
        assert_eq!(b.on_failure(Permit::Send, first), None);
        let Some(Change::StillOpen {
            probes: 1,
            next_probe_in,
            ..
        }) = b.on_failure(Permit::Probe, first)
        else {
            panic!("the probe failed")
        };
        assert!(
            next_probe_in >= Duration::from_millis(1800),
            "{next_probe_in:?}"
        );
        assert_eq!(b.permit(first), None, "the next probe waits its interval");
        let second = b.next_probe().unwrap();
        assert_eq!(second, first + next_probe_in);
        assert_eq!(b.permit(second), Some(Permit::Probe));
        assert!(matches!(
            b.on_answer(second),
            Some(Change::Closed {
                was: Cause::Down,
                probes: 1,
                ..
            })
        ));
        assert_eq!(b.permit(second), Some(Permit::Send));
        assert_eq!(b.next_probe(), None);
    }

    #[test]
    fn an_answer_resets_the_count() {
        let mut b = breaker(3);
        let now = Instant::now();
        b.on_failure(Permit::Send, now);
        b.on_failure(Permit::Send, now);
        assert_eq!(b.on_answer(now), None);
        b.on_failure(Permit::Send, now);
        b.on_failure(Permit::Send, now);
        assert_eq!(b.cause(), None);
    }

    #[test]
    fn a_refusal_opens_at_once_even_with_threshold_zero() {
        let mut b = breaker(0);
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(b.on_failure(Permit::Send, now), None);
        }
        assert!(matches!(
            b.on_refusal(401, Permit::Send, now),
            Some(Change::Opened {
                cause: Cause::Refusing(401),
                ..
            })
        ));
        assert_eq!(b.cause(), Some(Cause::Refusing(401)));
        // The same refusal from a request already under way: nothing new.
        assert_eq!(b.on_refusal(401, Permit::Send, now), None);
        // Another status is a new state, worth a log line.
        assert!(matches!(
            b.on_refusal(404, Permit::Send, now),
            Some(Change::Opened {
                cause: Cause::Refusing(404),
                ..
            })
        ));
        let at = b.next_probe().unwrap();
        assert_eq!(b.permit(at), Some(Permit::Probe));
        b.release(Permit::Probe);
        assert_eq!(b.permit(at), Some(Permit::Probe), "released, so free again");
        assert!(matches!(
            b.on_answer(at),
            Some(Change::Closed {
                was: Cause::Refusing(404),
                ..
            })
        ));
    }
}
