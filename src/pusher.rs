//! The pusher threads: each takes events from the work channel, POSTs them to the
//! plugin through one shared ureq agent (keep-alive, rustls), retries in line according
//! to [`crate::retry`], and reports the outcome on the done channel. A pusher never
//! touches Redis and never decides an acknowledgement: the acker does.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::config::{Plugin, RetryConfig};
use crate::event::Event;
use crate::health::Stats;
use crate::retry::{Verdict, classify};
use crate::shutdown::Shutdown;

pub const USER_AGENT: &str = concat!("paheko-push/", env!("CARGO_PKG_VERSION"));

/// How much of a refusal's body is kept for the dead letter and the log.
const DETAIL_LIMIT: u64 = 2048;

/// What became of an event handed to a pusher.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered,
    /// The plugin refused it with a 4xx: to be dead-lettered.
    Refused {
        status: u16,
        detail: String,
    },
    /// The in-line attempts ran out on transient failures: to be tried again later.
    Parked,
    /// Not sent, or not retried, because the worker is stopping: stays pending.
    Abandoned,
}

#[derive(Debug)]
pub struct Done {
    pub event: Event,
    pub outcome: Outcome,
}

pub struct Pusher {
    agent: ureq::Agent,
    plugin: Plugin,
    retry: RetryConfig,
    stats: Arc<Stats>,
    shutdown: Shutdown,
}

/// One HTTP attempt's result, before the retry policy is applied.
enum Answer {
    Status {
        status: u16,
        retry_after: Option<String>,
        body: String,
    },
    NoAnswer(ureq::Error),
}

impl Pusher {
    pub fn new(
        agent: ureq::Agent,
        plugin: Plugin,
        retry: RetryConfig,
        stats: Arc<Stats>,
        shutdown: Shutdown,
    ) -> Pusher {
        Pusher {
            agent,
            plugin,
            retry,
            stats,
            shutdown,
        }
    }

    /// The agent every pusher shares: one connection pool, a global timeout per request
    /// (connect included), statuses returned rather than turned into errors, and no
    /// redirects (a POST must not wander off with the secret).
    pub fn agent(timeout: Duration, https_only: bool) -> ureq::Agent {
        ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .https_only(https_only)
            .user_agent(USER_AGENT)
            .max_idle_connections_per_host(64)
            .build()
            .into()
    }

    /// Runs a pusher until the work channel closes.
    pub fn run(&self, work: Receiver<Event>, done: Sender<Done>) {
        for mut event in work {
            let outcome = if self.shutdown.is_stopping() {
                Outcome::Abandoned
            } else {
                self.deliver(&mut event)
            };
            if done.send(Done { event, outcome }).is_err() {
                return;
            }
        }
    }

    /// Attempts delivery up to the configured number of times.
    pub fn deliver(&self, event: &mut Event) -> Outcome {
        for attempt in 1..=self.retry.max_attempts {
            event.attempts += 1;
            let started = Instant::now();
            let answer = self.post(event);
            let duration_ms = started.elapsed().as_millis() as u64;
            let id = event.id.to_string();
            let (verdict, status) = match &answer {
                Answer::Status {
                    status,
                    retry_after,
                    ..
                } => (
                    classify(*status, retry_after.as_deref(), crate::clock::unix_now()),
                    *status,
                ),
                Answer::NoAnswer(_) => (Verdict::Transient { retry_after: None }, 0),
            };
            match verdict {
                Verdict::Delivered => {
                    self.stats.record_success();
                    log::info!(
                        correlation_id = id.as_str(), request_id = event.request_id.as_str(),
                        event = event.kind.as_str(), attempt = event.attempts, status = status,
                        duration_ms = duration_ms;
                        "delivered"
                    );
                    return Outcome::Delivered;
                }
                Verdict::Refused => {
                    self.stats.record_failure();
                    let detail = match answer {
                        Answer::Status { body, .. } => body,
                        Answer::NoAnswer(_) => String::new(),
                    };
                    log::error!(
                        correlation_id = id.as_str(), request_id = event.request_id.as_str(),
                        event = event.kind.as_str(), attempt = event.attempts, status = status,
                        duration_ms = duration_ms, detail = detail.as_str();
                        "refused by the plugin: moving it to the dead letters"
                    );
                    return Outcome::Refused { status, detail };
                }
                Verdict::Transient { retry_after } => {
                    self.stats.record_failure();
                    let error = match &answer {
                        Answer::Status { status, .. } => format!("http status {status}"),
                        Answer::NoAnswer(e) => describe(e),
                    };
                    if attempt == self.retry.max_attempts {
                        log::error!(
                            correlation_id = id.as_str(), request_id = event.request_id.as_str(),
                            event = event.kind.as_str(), attempt = event.attempts, status = status,
                            duration_ms = duration_ms, error = error.as_str();
                            "not delivered after {attempt} attempts: parked, stays pending and is tried again later"
                        );
                        return Outcome::Parked;
                    }
                    let delay = self.retry.delay_for(attempt, retry_after);
                    log::warn!(
                        correlation_id = id.as_str(), request_id = event.request_id.as_str(),
                        event = event.kind.as_str(), attempt = event.attempts, status = status,
                        duration_ms = duration_ms, error = error.as_str(),
                        retry_in_ms = delay.as_millis() as u64,
                        attempts_left = self.retry.max_attempts - attempt;
                        "delivery failed, will retry"
                    );
                    self.stats.retried.fetch_add(1, Relaxed);
                    if !self.shutdown.sleep(delay) {
                        return Outcome::Abandoned;
                    }
                }
            }
        }
        Outcome::Parked
    }

    fn post(&self, event: &Event) -> Answer {
        let id = event.id.to_string();
        let mut request = self
            .agent
            .post(&self.plugin.url)
            .header("Content-Type", "application/json")
            .header("X-Paheko-Secret", &self.plugin.secret)
            .header("Idempotency-Key", &id)
            .header("X-Request-Id", &event.request_id);
        if !event.kind.is_empty() {
            request = request.header("X-Paheko-Event", &event.kind);
        }
        match request.send(event.body()) {
            Ok(mut response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                // Read the body to the end so the connection goes back to the pool.
                let body = response
                    .body_mut()
                    .with_config()
                    .limit(DETAIL_LIMIT * 32)
                    .read_to_vec()
                    .unwrap_or_default();
                // A plugin may echo the request back: the secret must not be kept.
                let mut body = String::from_utf8_lossy(&body).replace(&self.plugin.secret, "[redacted]");
                let mut end = body.len().min(DETAIL_LIMIT as usize);
                while !body.is_char_boundary(end) {
                    end -= 1;
                }
                body.truncate(end);
                Answer::Status {
                    status,
                    retry_after,
                    body,
                }
            }
            Err(e) => Answer::NoAnswer(e),
        }
    }
}

/// A transport error in words an operator can act on, naming the timeout that fired.
fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(which) => format!("timeout: {which:?} timeout fired"),
        ureq::Error::ConnectionFailed => {
            "connection failed: nothing answered at the plugin's address".into()
        }
        ureq::Error::HostNotFound => {
            "host not found: the plugin's host name does not resolve".into()
        }
        ureq::Error::Io(io) => format!("network error: {io}"),
        other => format!("request failed: {other}"),
    }
}
