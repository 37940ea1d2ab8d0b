//! The circuit breaker every pusher shares. After a run of consecutive transient
//! failures (Paheko down, not one bad event) it opens: pushers stop sending and wait,
//! and a single probe request goes out per backoff interval, the interval growing by
//! the retry factor up to its cap, with jitter. The first answer that is not a
//! transient failure closes it, and the backlog drains at full speed. It decides only
//! *when* to send; what becomes of an event stays the pusher's and the acker's call.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::RetryConfig;
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// How often a waiting pusher looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(250);

/// What a pusher may send: anything while closed, the one probe while open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Send,
    Probe,
}

pub struct Breaker {
    /// Consecutive transient failures that open it; 0 never opens.
    threshold: u32,
    retry: RetryConfig,
    stats: Arc<Stats>,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug)]
struct State {
    failures: u32,
    open: Option<Open>,
}

#[derive(Debug)]
struct Open {
    since: Instant,
    probes: u32,
    next_probe: Instant,
    probing: bool,
}

impl Breaker {
    pub fn new(threshold: u32, retry: RetryConfig, stats: Arc<Stats>) -> Breaker {
        Breaker {
            threshold,
            retry,
            stats,
            state: Mutex::new(State {
                failures: 0,
                open: None,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until a request may go out. `None` when the worker is stopping.
    pub fn acquire(&self, shutdown: &Shutdown) -> Option<Permit> {
        let mut state = self.lock();
        loop {
            if shutdown.is_stopping() {
                return None;
            }
            let now = Instant::now();
            let wait = match &mut state.open {
                None => return Some(Permit::Send),
                Some(open) if !open.probing && now >= open.next_probe => {
                    open.probing = true;
                    return Some(Permit::Probe);
                }
                Some(open) if open.probing => STOP_CHECK,
                Some(open) => (open.next_probe - now).min(STOP_CHECK),
            };
            state = match self.changed.wait_timeout(state, wait) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Paheko answered (2xx or a refusal): it is up.
    pub fn record_answer(&self, permit: Permit) {
        let mut state = self.lock();
        state.failures = 0;
        if let Some(open) = state.open.take() {
            let down_for = open.since.elapsed();
            self.stats.paheko_down_since.store(0, Relaxed);
            log::info!(down_for_s = down_for.as_secs(), probes = open.probes, permit = format!("{permit:?}").as_str();
                "paheko answers again: circuit closed, delivering at full speed");
            self.changed.notify_all();
        }
    }

    /// A transient failure (5xx, 408, 429, no answer).
    pub fn record_failure(&self, permit: Permit) {
        let mut state = self.lock();
        state.failures = state.failures.saturating_add(1);
        let now = Instant::now();
        let failures = state.failures;
        match &mut state.open {
            Some(open) if permit == Permit::Probe => {
                open.probing = false;
                open.probes += 1;
                let wait = jitter(self.retry.delay_after(open.probes + 1));
                open.next_probe = now + wait;
                log::warn!(probes = open.probes, next_probe_in_ms = wait.as_millis() as u64,
                        down_for_s = open.since.elapsed().as_secs();
                        "paheko still down: probe failed");
            }
            // A request that was already under way when the breaker opened.
            Some(_) => {}
            None if self.threshold > 0 && failures >= self.threshold => {
                let wait = jitter(self.retry.delay_after(1));
                state.open = Some(Open {
                    since: now,
                    probes: 0,
                    next_probe: now + wait,
                    probing: false,
                });
                self.stats
                    .paheko_down_since
                    .store(crate::clock::unix_now(), Relaxed);
                log::error!(consecutive_failures = failures, next_probe_in_ms = wait.as_millis() as u64;
                    "paheko looks down: circuit open, sending one probe per backoff interval until it answers");
            }
            None => {}
        }
    }

    /// The probe was not sent after all (the worker is stopping).
    pub fn release(&self, permit: Permit) {
        if permit == Permit::Probe
            && let Some(open) = &mut self.lock().open
        {
            open.probing = false;
        }
    }

    pub fn is_open(&self) -> bool {
        self.lock().open.is_some()
    }
}

/// `d` spread by ±10 %, so that workers (and the probes of several instances) do not
/// fall into step.
pub fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    let unit = (h.finish() % 2001) as f64 / 1000.0 - 1.0;
    d.mul_f64(1.0 + 0.1 * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32) -> Breaker {
        let retry = RetryConfig {
            max_attempts: 5,
            backoff: Duration::from_millis(20),
            factor: 2.0,
            max_backoff: Duration::from_millis(100),
        };
        Breaker::new(threshold, retry, Arc::new(Stats::default()))
    }

    #[test]
    fn opens_after_the_threshold_and_lets_one_probe_out() {
        let b = breaker(3);
        let stop = Shutdown::new();
        for _ in 0..2 {
            b.record_failure(Permit::Send);
        }
        assert!(!b.is_open());
        b.record_failure(Permit::Send);
        assert!(b.is_open());
        assert_ne!(b.stats.paheko_down_since.load(Relaxed), 0);
        // The probe comes after the first backoff interval, and only one at a time.
        let started = Instant::now();
        assert_eq!(b.acquire(&stop), Some(Permit::Probe));
        assert!(
            started.elapsed() >= Duration::from_millis(15),
            "{:?}",
            started.elapsed()
        );
        b.record_failure(Permit::Probe);
        assert_eq!(b.acquire(&stop), Some(Permit::Probe));
        b.record_answer(Permit::Probe);
        assert!(!b.is_open());
        assert_eq!(b.stats.paheko_down_since.load(Relaxed), 0);
        assert_eq!(b.acquire(&stop), Some(Permit::Send));
    }

    #[test]
    fn an_answer_resets_the_count() {
        let b = breaker(3);
        b.record_failure(Permit::Send);
        b.record_failure(Permit::Send);
        b.record_answer(Permit::Send);
        b.record_failure(Permit::Send);
        b.record_failure(Permit::Send);
        assert!(!b.is_open());
    }

    #[test]
    fn zero_never_opens_and_a_stop_ends_the_wait() {
        let b = breaker(0);
        for _ in 0..100 {
            b.record_failure(Permit::Send);
        }
        assert!(!b.is_open());
        let b = breaker(1);
        b.record_failure(Permit::Send);
        let stop = Shutdown::new();
        assert_eq!(b.acquire(&stop), Some(Permit::Probe));
        stop.trigger();
        assert_eq!(b.acquire(&stop), None);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(10)).as_secs_f64();
            assert!((9.0..=11.0).contains(&j), "{j}");
        }
    }
}
