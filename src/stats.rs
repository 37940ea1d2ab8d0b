//! The counters every thread updates and /health and /metrics read: atomics only,
//! never a lock on the delivery path, and nothing secret in them. [`crate::health`]
//! turns them into the /health document, [`crate::metrics`] into Prometheus text.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Consecutive failed attempts after which `push_worker` reads `error`.
pub const FAILURES_BEFORE_ERROR: u64 = 3;

#[derive(Debug, Default)]
pub struct Stats {
    pub configured: AtomicBool,
    /// This instance holds the lease and delivers; false for a standby.
    pub active: AtomicBool,
    /// The reader's connection answered its last command.
    pub redis_ok: AtomicBool,
    /// The worker has tried Redis at least once (answered or not): until then /health
    /// says `starting`, not a Redis outage nobody has seen (issue 15).
    pub redis_tried: AtomicBool,
    /// The acker's last acknowledgement or dead letter failed, and is waiting to be
    /// written again. Kept apart from `redis_ok` so the two connections do not
    /// overwrite each other's view (/health's `redis` flapped between ok and error).
    pub redis_writes_failing: AtomicBool,
    /// Unix seconds of the last delivery, 0 for none yet.
    pub last_success_at: AtomicU64,
    /// Failed HTTP attempts since the last delivery.
    pub consecutive_failures: AtomicU64,
    /// Entries of the group read but not acknowledged, as Redis last said.
    pub pending: AtomicU64,
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub invalid: AtomicU64,
    /// Events waiting for their next attempt (backoff or Retry-After).
    pub parked: AtomicU64,
    /// Pending entries that were trimmed from the stream before delivery.
    pub lost_to_trim: AtomicU64,
    /// Unix seconds since the circuit breaker opened; 0 while Paheko answers.
    pub paheko_down_since: AtomicU64,
    /// The 4xx the plugin answers to every ticket (a plugin-wide refusal: 401, 403,
    /// 404…), 0 when it does not.
    pub paheko_refusing: AtomicU64,
    /// Entries in the stream the group has not read yet (XINFO GROUPS lag).
    pub lag: AtomicU64,
    /// Backlog (pending + lag) above which /health warns; 0 never warns.
    pub backlog_warn: AtomicU64,
    /// Age of the oldest unacknowledged entry, from its ID's time stamp.
    pub oldest_pending_age_seconds: AtomicU64,
    /// Length of the dead-letter stream.
    pub dead_letters: AtomicU64,
    /// Dead letters make /health degraded (API mode, where they are held sessions).
    pub dead_letters_degrade: AtomicBool,
    /// Entries held in memory (read, not yet settled) and their fields' bytes.
    pub held: AtomicU64,
    pub held_bytes: AtomicU64,
    /// `trimmed` records in the dead-letter stream (tickets lost before they were
    /// read), as the reader last counted them; /health stays degraded while any remain.
    pub trimmed_records: AtomicU64,
    /// 2xx answers saying the plugin holds a session (`"status":"held"`: totals that do
    /// not match, an unmapped payment method…) until the treasurer decides (issue 16).
    pub held_sessions: AtomicU64,
    pub request_duration: Histogram,
}

impl Stats {
    pub fn record_success(&self) {
        self.delivered.fetch_add(1, Relaxed);
        self.consecutive_failures.store(0, Relaxed);
        self.last_success_at
            .store(crate::clock::unix_now(), Relaxed);
    }

    pub fn record_failure(&self) {
        self.consecutive_failures.fetch_add(1, Relaxed);
    }

    pub fn set_redis_ok(&self, ok: bool) {
        self.redis_ok.store(ok, Relaxed);
        self.redis_tried.store(true, Relaxed);
    }

    /// Whether the worker is still starting: it has not tried Redis yet.
    pub fn starting(&self) -> bool {
        !self.redis_tried.load(Relaxed)
    }

    /// `redis` of /health: `starting` before the first attempt, then `ok` or `error`.
    pub fn redis(&self) -> &'static str {
        if self.starting() {
            "starting"
        } else if self.redis_up() {
            "ok"
        } else {
            "error"
        }
    }

    /// Whether Redis answers both the reader and the acker.
    pub fn redis_up(&self) -> bool {
        self.redis_ok.load(Relaxed) && !self.redis_writes_failing.load(Relaxed)
    }

    /// `push_worker` of /health, as the Python worker named it: unconfigured, error
    /// (requests keep failing, or the plugin refuses every ticket) or ok.
    pub fn push_worker(&self) -> &'static str {
        if !self.configured.load(Relaxed) {
            "unconfigured"
        } else if self.consecutive_failures.load(Relaxed) >= FAILURES_BEFORE_ERROR
            || self.paheko_refusing.load(Relaxed) != 0
        {
            "error"
        } else {
            "ok"
        }
    }

    /// `paheko` of /health: up, down (the breaker is open on failures) or refusing.
    pub fn paheko(&self) -> &'static str {
        match (
            self.paheko_refusing.load(Relaxed),
            self.paheko_down_since.load(Relaxed),
        ) {
            (0, 0) => "up",
            (0, _) => "down",
            _ => "refusing",
        }
    }

    /// The overall `status` of /health: starting (Redis not tried yet, so nothing is
    /// known), error (Redis unreachable, or a refusing plugin, which will not heal by
    /// itself: someone must fix the secret or the URL), degraded (it delivers, or will
    /// once Paheko is back, but something needs a look), or ok.
    pub fn status(&self) -> &'static str {
        if self.starting() {
            "starting"
        } else if !self.redis_up() || self.paheko_refusing.load(Relaxed) != 0 {
            "error"
        } else if self.push_worker() != "ok"
            // Every ticket lost to a trim has a record now, a vanished one too (issue 13,
            // 10): degraded while one remains, ok again once the operator dropped them.
            || self.trimmed_records.load(Relaxed) > 0
            || self.paheko_down_since.load(Relaxed) != 0
            || self.backlog_warning()
            // In API mode a dead letter is a held session or ticket (issue 16): booking
            // waits for a person, so it shows until it is booked or dropped.
            || (self.dead_letters_degrade.load(Relaxed) && self.dead_letters.load(Relaxed) > 0)
        {
            "degraded"
        } else {
            "ok"
        }
    }

    /// Whether pending plus unread entries passed the warning level: the producer
    /// trims at 10,000, so past that tickets start to be lost.
    pub fn backlog_warning(&self) -> bool {
        let warn = self.backlog_warn.load(Relaxed);
        warn > 0 && self.pending.load(Relaxed) + self.lag.load(Relaxed) > warn
    }
}

/// Upper bounds of the request-duration buckets, in seconds.
pub const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A cumulative histogram of HTTP request durations, lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative), the last one for everything above the largest bound.
    pub counts: [AtomicU64; BUCKETS.len() + 1],
    pub sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let at = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[at].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }
}
