//! What the worker is doing, for people and monitors: the counters every thread
//! updates ([`Stats`], atomics only, never a lock on the delivery path) and the
//! tiny_http server that shows them at GET /health. It reads counters, never Redis, so
//! a slow Redis cannot make the health check hang. Nothing secret is ever in them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;

use serde_json::json;

/// Consecutive failed attempts after which `push_worker` reads `error`.
pub const FAILURES_BEFORE_ERROR: u64 = 3;

#[derive(Debug, Default)]
pub struct Stats {
    pub configured: AtomicBool,
    pub redis_ok: AtomicBool,
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
    /// Events whose in-line retries ran out, waiting to be tried again.
    pub parked: AtomicU64,
    /// Pending entries that were trimmed from the stream before delivery.
    pub lost_to_trim: AtomicU64,
    /// Unix seconds since the circuit breaker opened; 0 while Paheko answers.
    pub paheko_down_since: AtomicU64,
    /// Entries in the stream the group has not read yet (XINFO GROUPS lag).
    pub lag: AtomicU64,
    /// Backlog (pending + lag) above which /health warns; 0 never warns.
    pub backlog_warn: AtomicU64,
    /// Age of the oldest unacknowledged entry, from its ID's time stamp.
    pub oldest_pending_age_seconds: AtomicU64,
    /// Length of the dead-letter stream.
    pub dead_letters: AtomicU64,
    pub request_duration: crate::metrics::Histogram,
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
    }

    /// Whether pending plus unread entries passed the warning level: the producer
    /// trims at 10,000, so past that tickets start to be lost.
    pub fn backlog_warning(&self) -> bool {
        let warn = self.backlog_warn.load(Relaxed);
        warn > 0 && self.pending.load(Relaxed) + self.lag.load(Relaxed) > warn
    }

    /// The /health document and its HTTP status.
    pub fn health(&self) -> (u16, serde_json::Value) {
        let redis_ok = self.redis_ok.load(Relaxed);
        let failures = self.consecutive_failures.load(Relaxed);
        let push_worker = if !self.configured.load(Relaxed) {
            "unconfigured"
        } else if failures >= FAILURES_BEFORE_ERROR {
            "error"
        } else {
            "ok"
        };
        let lost = self.lost_to_trim.load(Relaxed);
        let down_since = self.paheko_down_since.load(Relaxed);
        let backlog_warning = self.backlog_warning();
        let status = if !redis_ok {
            "error"
        } else if push_worker != "ok" || lost > 0 || down_since != 0 || backlog_warning {
            "degraded"
        } else {
            "ok"
        };
        let last = self.last_success_at.load(Relaxed);
        let doc = json!({
            "status": status,
            "redis": if redis_ok { "ok" } else { "error" },
            "push_worker": push_worker,
            "last_success_at": if last == 0 { None } else { Some(last) },
            "pending": self.pending.load(Relaxed),
            "consecutive_failures": failures,
            "delivered": self.delivered.load(Relaxed),
            "retried": self.retried.load(Relaxed),
            "dead_lettered": self.dead_lettered.load(Relaxed),
            "invalid": self.invalid.load(Relaxed),
            "parked": self.parked.load(Relaxed),
            "lost_to_trim": lost,
            "paheko": if down_since == 0 { "up" } else { "down" },
            "paheko_down_since": if down_since == 0 { None } else { Some(down_since) },
            "lag": self.lag.load(Relaxed),
            "backlog_warning": backlog_warning,
            "oldest_pending_age_seconds": self.oldest_pending_age_seconds.load(Relaxed),
            "dead_letters": self.dead_letters.load(Relaxed),
            "version": env!("CARGO_PKG_VERSION"),
        });
        (if status == "error" { 503 } else { 200 }, doc)
    }
}

/// The running health server; [`Server::stop`] ends its thread.
pub struct Server {
    server: Arc<tiny_http::Server>,
    thread: JoinHandle<()>,
}

impl Server {
    pub fn stop(self) {
        self.server.unblock();
        let _ = self.thread.join();
    }
}

/// Binds `addr` and serves /health and /metrics from `stats` on a thread of its own.
pub fn serve(addr: &str, stats: Arc<Stats>) -> std::io::Result<Server> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| std::io::Error::other(format!("cannot listen on {addr}: {e}")))?;
    let server = Arc::new(server);
    let bound = server.server_addr().to_string();
    log::info!(addr = bound.as_str(); "health server listening");
    let serving = Arc::clone(&server);
    let thread = std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            for request in serving.incoming_requests() {
                let (status, body, content_type) = match (request.method(), request.url()) {
                    (tiny_http::Method::Get, "/health") => {
                        let (status, doc) = stats.health();
                        (status, doc.to_string(), "application/json")
                    }
                    (tiny_http::Method::Get, "/metrics") => (
                        200,
                        crate::metrics::render(&stats),
                        "text/plain; version=0.0.4",
                    ),
                    _ => (
                        404,
                        json!({"error": "not found"}).to_string(),
                        "application/json",
                    ),
                };
                let header = tiny_http::Header::from_bytes("Content-Type", content_type)
                    .expect("a static header is valid");
                let response = tiny_http::Response::from_string(body)
                    .with_status_code(status)
                    .with_header(header);
                if let Err(e) = request.respond(response) {
                    log::debug!(error = e.to_string().as_str(); "health response not sent");
                }
            }
        })?;
    Ok(Server { server, thread })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> Stats {
        let s = Stats::default();
        s.configured.store(true, Relaxed);
        s.set_redis_ok(true);
        s
    }

    #[test]
    fn ok_until_failures_pile_up() {
        let s = stats();
        let (code, doc) = s.health();
        assert_eq!(
            (code, doc["status"].as_str(), doc["push_worker"].as_str()),
            (200, Some("ok"), Some("ok"))
        );
        assert!(doc["last_success_at"].is_null());
        for _ in 0..FAILURES_BEFORE_ERROR {
            s.record_failure();
        }
        let (code, doc) = s.health();
        assert_eq!(
            (code, doc["status"].as_str(), doc["push_worker"].as_str()),
            (200, Some("degraded"), Some("error"))
        );
        s.record_success();
        let (_, doc) = s.health();
        assert_eq!(doc["push_worker"], "ok");
        assert!(doc["last_success_at"].as_u64().unwrap() > 1_700_000_000);
    }

    #[test]
    fn redis_down_is_an_error() {
        let s = stats();
        s.set_redis_ok(false);
        let (code, doc) = s.health();
        assert_eq!(
            (code, doc["status"].as_str(), doc["redis"].as_str()),
            (503, Some("error"), Some("error"))
        );
    }

    #[test]
    fn unconfigured_and_lost_entries_degrade() {
        let s = stats();
        s.configured.store(false, Relaxed);
        assert_eq!(s.health().1["push_worker"], "unconfigured");
        assert_eq!(s.health().1["status"], "degraded");
        let s = stats();
        s.lost_to_trim.store(1, Relaxed);
        assert_eq!(s.health().1["status"], "degraded");
        let s = stats();
        s.paheko_down_since.store(1_800_000_000, Relaxed);
        let (code, doc) = s.health();
        assert_eq!(
            (
                code,
                doc["paheko"].as_str(),
                doc["paheko_down_since"].as_u64()
            ),
            (200, Some("down"), Some(1_800_000_000))
        );
        assert_eq!(doc["status"], "degraded");
        let s = stats();
        s.backlog_warn.store(8000, Relaxed);
        s.pending.store(100, Relaxed);
        s.lag.store(7900, Relaxed);
        assert_eq!(s.health().1["backlog_warning"], false);
        s.lag.store(7901, Relaxed);
        assert_eq!(s.health().1["backlog_warning"], true);
        assert_eq!(s.health().1["status"], "degraded");
    }
}
