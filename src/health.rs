//! GET /health and the tiny_http server behind it (which also serves
//! [`crate::metrics`]): the document people and monitors read, made from the counters
//! of [`Stats`]. It reads counters, never Redis, so a slow Redis cannot make the health
//! check hang. Nothing secret is ever in them.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::thread::JoinHandle;

use serde_json::json;

use crate::stats::Stats;

/// The /health document and its HTTP status.
pub fn document(s: &Stats) -> (u16, serde_json::Value) {
    let status = s.status();
    let refusing = s.paheko_refusing.load(Relaxed);
    let down_since = s.paheko_down_since.load(Relaxed);
    let last = s.last_success_at.load(Relaxed);
    let doc = json!({
        "status": status,
        "role": match (s.starting(), s.active.load(Relaxed)) {
            (true, _) => "starting",
            (false, true) => "active",
            (false, false) => "standby",
        },
        "redis": s.redis(),
        "push_worker": s.push_worker(),
        "last_success_at": if last == 0 { None } else { Some(last) },
        "pending": s.pending.load(Relaxed),
        "consecutive_failures": s.consecutive_failures.load(Relaxed),
        "delivered": s.delivered.load(Relaxed),
        "retried": s.retried.load(Relaxed),
        "dead_lettered": s.dead_lettered.load(Relaxed),
        "invalid": s.invalid.load(Relaxed),
        "parked": s.parked.load(Relaxed),
        "lost_to_trim": s.lost_to_trim.load(Relaxed),
        "trimmed_records": s.trimmed_records.load(Relaxed),
        "paheko": s.paheko(),
        "paheko_down_since": if down_since == 0 { None } else { Some(down_since) },
        "paheko_refusing_status": if refusing == 0 { None } else { Some(refusing) },
        "lag": s.lag.load(Relaxed),
        "backlog_warning": s.backlog_warning(),
        "oldest_pending_age_seconds": s.oldest_pending_age_seconds.load(Relaxed),
        "dead_letters": s.dead_letters.load(Relaxed),
        "held": s.held.load(Relaxed),
        "held_bytes": s.held_bytes.load(Relaxed),
        "held_sessions": s.held_sessions.load(Relaxed),
        "version": env!("CARGO_PKG_VERSION"),
    });
    // Starting is not healthy yet (a healthcheck must not pass before Redis was
    // reached), but it is not an outage either: the document says which.
    let code = if matches!(status, "error" | "starting") {
        503
    } else {
        200
    };
    (code, doc)
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
                        let (status, doc) = document(&stats);
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
    use crate::stats::FAILURES_BEFORE_ERROR;

    fn stats() -> Stats {
        let s = Stats::default();
        s.configured.store(true, Relaxed);
        s.set_redis_ok(true);
        s
    }

    #[test]
    fn ok_until_failures_pile_up() {
        let s = stats();
        let (code, doc) = document(&s);
        assert_eq!(
            (code, doc["status"].as_str(), doc["push_worker"].as_str()),
            (200, Some("ok"), Some("ok"))
        );
        assert!(doc["last_success_at"].is_null());
        for _ in 0..FAILURES_BEFORE_ERROR {
            s.record_failure();
        }
        let (code, doc) = document(&s);
        assert_eq!(
            (code, doc["status"].as_str(), doc["push_worker"].as_str()),
            (200, Some("degraded"), Some("error"))
        );
        s.record_success();
        let (_, doc) = document(&s);
        assert_eq!(doc["push_worker"], "ok");
        assert!(doc["last_success_at"].as_u64().unwrap() > 1_700_000_000);
    }

    /// Killed `cargo mutants` survivors: `paheko` up by default, a `trimmed` record alone
    /// degrades, and the backlog warns only past its level.
    #[test]
    fn paheko_up_trimmed_records_and_the_backlog_level() {
        let s = stats();
        assert_eq!(document(&s).1["paheko"], "up");
        s.trimmed_records.store(1, Relaxed);
        assert_eq!(document(&s).1["status"], "degraded");
        let s = stats();
        s.backlog_warn.store(10, Relaxed);
        s.pending.store(4, Relaxed);
        s.lag.store(6, Relaxed);
        assert_eq!(document(&s).1["backlog_warning"], false, "at the level");
        s.lag.store(7, Relaxed);
        assert_eq!(document(&s).1["backlog_warning"], true, "past it");
        assert_eq!(document(&s).1["status"], "degraded");
        s.backlog_warn.store(0, Relaxed);
        assert_eq!(document(&s).1["backlog_warning"], false, "0 never warns");
    }

    #[test]
    fn before_redis_is_tried_it_is_starting_not_an_error() {
        let s = Stats::default();
        s.configured.store(true, Relaxed);
        let (code, doc) = document(&s);
        assert_eq!(
            (
                code,
                doc["status"].as_str(),
                doc["redis"].as_str(),
                doc["role"].as_str()
            ),
            (503, Some("starting"), Some("starting"), Some("starting"))
        );
        s.set_redis_ok(false);
        let (code, doc) = document(&s);
        assert_eq!(
            (
                code,
                doc["status"].as_str(),
                doc["redis"].as_str(),
                doc["role"].as_str()
            ),
            (503, Some("error"), Some("error"), Some("standby"))
        );
    }

    #[test]
    fn redis_down_is_an_error() {
        let s = stats();
        s.set_redis_ok(false);
        let (code, doc) = document(&s);
        assert_eq!(
            (code, doc["status"].as_str(), doc["redis"].as_str()),
            (503, Some("error"), Some("error"))
        );
    }

    #[test]
    fn unconfigured_and_lost_entries_degrade() {
        let s = stats();
        s.configured.store(false, Relaxed);
        assert_eq!(document(&s).1["push_worker"], "unconfigured");
        assert_eq!(document(&s).1["status"], "degraded");
        // Degraded while a `trimmed` record remains; the counter alone does not.
        let s = stats();
        s.lost_to_trim.store(1, Relaxed);
        assert_eq!(document(&s).1["status"], "ok");
        s.trimmed_records.store(1, Relaxed);
        assert_eq!(document(&s).1["status"], "degraded");
        let s = stats();
        s.paheko_down_since.store(1_800_000_000, Relaxed);
        let (code, doc) = document(&s);
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
        assert_eq!(document(&s).1["backlog_warning"], false);
        s.lag.store(7901, Relaxed);
        assert_eq!(document(&s).1["backlog_warning"], true);
        assert_eq!(document(&s).1["status"], "degraded");
    }

    #[test]
    fn a_refusing_plugin_is_an_error_and_says_which_status() {
        let s = stats();
        s.paheko_down_since.store(1_800_000_000, Relaxed);
        s.paheko_refusing.store(401, Relaxed);
        let (code, doc) = document(&s);
        assert_eq!(
            (
                code,
                doc["status"].as_str(),
                doc["push_worker"].as_str(),
                doc["paheko"].as_str(),
                doc["paheko_refusing_status"].as_u64()
            ),
            (
                503,
                Some("error"),
                Some("error"),
                Some("refusing"),
                Some(401)
            )
        );
    }

    #[test]
    fn redis_is_ok_only_when_both_connections_are() {
        let s = stats();
        s.redis_writes_failing.store(true, Relaxed);
        assert_eq!(document(&s).1["redis"], "error");
        s.redis_writes_failing.store(false, Relaxed);
        assert_eq!(document(&s).1["redis"], "ok");
    }
}
