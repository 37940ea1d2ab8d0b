//! The pusher threads: each takes an event from the work channel, makes **one** attempt
//! to POST it to the plugin through the shared ureq agent (keep-alive, rustls), and
//! reports the answer on the done channel: status, Retry-After, the body's first
//! bytes, or why there was none, and how long it took. A pusher never waits, retries,
//! touches Redis or decides anything: the acker does, so a waiting retry never holds a
//! pusher.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::config::{CaFile, Plugin};
use crate::event::Event;
use crate::notify::Beat;
use crate::shutdown::Shutdown;
use crate::stats::Stats;

pub const USER_AGENT: &str = concat!("paheko-push/", env!("CARGO_PKG_VERSION"));

/// Kept-alive connections to the plugin; above the largest useful concurrency.
const MAX_IDLE_CONNECTIONS: usize = 256;
/// ureq's write buffer, per connection.
const BUFFER_SIZE: usize = 16 * 1024;
/// The largest response head (status line and headers) the worker reads: 32 KiB, four
/// times what nginx passes from a PHP backend by default (`fastcgi_buffer_size`, 4 or 8
/// KiB) and past Apache's 8 KiB per header line. ureq parses the head from its input
/// buffer, so that buffer must hold more than this: with a buffer no larger than the
/// bound, a longer head fills it and ureq reports "Peer disconnected", and a 2xx was
/// retried as no answer (issue 8 §7). One byte more makes it say "response header is
/// too big: 32769 > 32768".
const MAX_RESPONSE_HEAD: usize = 32 * 1024;
/// How long the plugin host's addresses are reused before asking the system again.
const RESOLVE_TTL: Duration = Duration::from_secs(30);

/// ureq resolves the plugin's host before every request, pooled connection or not,
/// and with a timeout set its default resolver does so on a new thread each time:
/// that thread per event was the worker's largest cost (docs/performance.md, change 1).
/// This one answers an IP literal at once and keeps a name's addresses for
/// [`RESOLVE_TTL`]. `ureq::unversioned` is exempt from semver: ureq is pinned to 3.5.
#[derive(Debug, Default)]
struct Resolver {
    system: ureq::unversioned::resolver::DefaultResolver,
    cache: std::sync::Mutex<
        Option<(
            String,
            Instant,
            ureq::unversioned::resolver::ResolvedSocketAddrs,
        )>,
    >,
}

impl ureq::unversioned::resolver::Resolver for Resolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let host = uri.host().unwrap_or("");
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            });
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
            let mut addrs = self.empty();
            addrs.push(std::net::SocketAddr::new(ip, port));
            return Ok(addrs);
        }
        let key = format!("{host}:{port}");
        if let Ok(cache) = self.cache.lock()
            && let Some((cached, at, addrs)) = cache.as_ref()
            && *cached == key
            && at.elapsed() < RESOLVE_TTL
        {
            return Ok(addrs.clone());
        }
        let addrs = self.system.resolve(uri, config, timeout)?;
        if let Ok(mut cache) = self.cache.lock() {
            *cache = Some((key, Instant::now(), addrs.clone()));
        }
        Ok(addrs)
    }
}

/// How much of a refusal's body is kept for the dead letter and the log.
const DETAIL_LIMIT: u64 = 2048;

/// The plugin's answer to one attempt, or why there was none.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Status {
        status: u16,
        /// The raw `Retry-After` header.
        retry_after: Option<String>,
        /// The body's first [`DETAIL_LIMIT`] bytes, the secret redacted.
        body: String,
    },
    /// No HTTP answer: a connection, TLS or timeout error, in words an operator can
    /// act on.
    NoAnswer(String),
    /// Not sent: the worker is stopping. The entry stays pending.
    NotSent,
    /// Not sent: its tenure ended, the lease may no longer be ours, or the breaker
    /// opened after the event was handed over. Back to the acker.
    HeldBack,
}

/// One attempt handed to a pusher: the event, whether it is the breaker's probe, and
/// the tenure it belongs to ([`crate::core`]).
#[derive(Debug)]
pub struct Attempt {
    pub event: Event,
    pub probe: bool,
    pub tenure: u64,
}

/// One attempt's report to the acker.
#[derive(Debug)]
pub struct Done {
    pub event: Event,
    pub reply: Reply,
    pub took: Duration,
    pub tenure: u64,
}

/// What a pusher checks right before it starts a request; written by the acker alone
/// ([`crate::core::Command::Gate`]). An attempt of a tenure that ended, one after the
/// moment the lease may no longer be ours, or a non-probe while the breaker is open
/// goes back unsent (issue 13, 9): queued attempts never outlive the tenure.
#[derive(Debug)]
pub struct Gate {
    tenure: AtomicU64,
    /// Milliseconds after `base` past which no request starts; 0: none may.
    send_until_ms: AtomicU64,
    breaker_open: AtomicBool,
    base: Instant,
}

impl Default for Gate {
    fn default() -> Gate {
        Gate {
            tenure: AtomicU64::new(0),
            send_until_ms: AtomicU64::new(0),
            breaker_open: AtomicBool::new(false),
            base: Instant::now(),
        }
    }
}

impl Gate {
    pub fn set(&self, tenure: u64, send_until: Option<Instant>, breaker_open: bool) {
        // Rounded up: the coordinator decides on the exact moment, and an attempt it
        // hands over just before must not come back unsent (it would be handed over
        // again at once); the lease's last third is the margin.
        let until = send_until.map_or(0, |t| {
            let d = t.saturating_duration_since(self.base);
            d.as_millis() as u64 + u64::from(d.subsec_nanos() % 1_000_000 != 0)
        });
        // The moment first, so a new tenure is never seen with an old moment.
        self.send_until_ms.store(until, SeqCst);
        self.breaker_open.store(breaker_open, SeqCst);
        self.tenure.store(tenure, SeqCst);
    }

    /// Whether an attempt of `tenure` may start now.
    pub fn may_start(&self, tenure: u64, probe: bool, now: Instant) -> bool {
        let until = self.send_until_ms.load(SeqCst);
        let now_ms = now.saturating_duration_since(self.base).as_millis() as u64;
        tenure != 0
            && self.tenure.load(SeqCst) == tenure
            && now_ms < until
            && (probe || !self.breaker_open.load(SeqCst))
    }
}

pub struct Pusher {
    agent: ureq::Agent,
    plugin: Plugin,
    stats: Arc<Stats>,
    shutdown: Shutdown,
    gate: Arc<Gate>,
    /// `PAHEKO_PUSH_TARGET=paheko-api`: events go to Paheko's own API instead.
    api: Option<crate::paheko_api::Client>,
}

impl Pusher {
    pub fn new(
        agent: ureq::Agent,
        plugin: Plugin,
        stats: Arc<Stats>,
        shutdown: Shutdown,
        gate: Arc<Gate>,
    ) -> Pusher {
        Pusher {
            agent,
            plugin,
            stats,
            shutdown,
            gate,
            api: None,
        }
    }

    /// Delivers through Paheko's own API when the configuration says so (issue 16 §2).
    pub fn with_target(mut self, config: &crate::config::Config) -> Pusher {
        self.api = crate::paheko_api::Client::for_config(&self.agent, config);
        // A held session waits in the dead letters for a person (docs/paheko-api.md).
        self.stats
            .dead_letters_degrade
            .store(self.api.is_some(), std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// The agent every pusher shares: one connection pool, a global timeout per request
    /// (connect included), statuses returned rather than turned into errors, and no
    /// redirects (a POST must not wander off with the secret). Certificates are checked
    /// against [`trusted_roots`].
    pub fn agent(timeout: Duration, https_only: bool, ca: Option<&CaFile>) -> ureq::Agent {
        let roots = trusted_roots(ca)
            .into_iter()
            .map(|der| ureq::tls::Certificate::from_der(&der).to_owned());
        let config = ureq::Agent::config_builder()
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::from(roots))
                    .build(),
            )
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .https_only(https_only)
            .user_agent(USER_AGENT)
            // One kept-alive connection per pusher: ureq's pool keeps 10 in all by
            // default, whatever the per-host figure (docs/performance.md, change 2).
            .max_idle_connections(MAX_IDLE_CONNECTIONS)
            .max_idle_connections_per_host(MAX_IDLE_CONNECTIONS)
            // 128 KiB per connection and direction by default; requests are ~1 KB and a
            // 1 MB payload streams through (change 3). The input side holds a whole
            // response head, up to the bound, and one byte to tell it was passed.
            .input_buffer_size(MAX_RESPONSE_HEAD + 1)
            .output_buffer_size(BUFFER_SIZE)
            .max_response_header_size(MAX_RESPONSE_HEAD)
            .build();
        ureq::Agent::with_parts(
            config,
            ureq::unversioned::transport::DefaultConnector::default(),
            Resolver::default(),
        )
    }

    /// Runs a pusher until the work channel closes: one attempt per event received.
    pub fn run(&self, work: Receiver<Attempt>, done: Sender<Done>, beat: Beat) {
        for Attempt {
            event,
            probe,
            tenure,
        } in work
        {
            beat.busy();
            let started = Instant::now();
            #[cfg(debug_assertions)]
            test_hooks::pause_before_send();
            let reply = if self.shutdown.is_stopping() {
                Reply::NotSent
            } else if !self.gate.may_start(tenure, probe, Instant::now()) {
                Reply::HeldBack
            } else {
                let reply = match &self.api {
                    Some(api) => api.deliver(&event),
                    None => self.post(&event),
                };
                self.stats.request_duration.observe(started.elapsed());
                reply
            };
            let took = started.elapsed();
            beat.idle();
            let done_now = Done {
                event,
                reply,
                took,
                tenure,
            };
            if done.send(done_now).is_err() {
                return;
            }
        }
    }

    fn post(&self, event: &Event) -> Reply {
        let request = request(
            &self.agent,
            &self.plugin,
            &event.idempotency_key,
            &event.request_id,
            &event_type(event).unwrap_or_default(),
            event.body(),
        );
        match request.send(event.body()) {
            Ok(mut response) => {
                let status = response.status().as_u16();
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                let retry_after = header("retry-after");
                let location = header("location");
                // Read the body to the end so the connection goes back to the pool.
                let body = response
                    .body_mut()
                    .with_config()
                    .limit(DETAIL_LIMIT * 32)
                    .read_to_vec()
                    .unwrap_or_default();
                // A plugin may echo the request back: the secret must not be kept.
                let mut body =
                    String::from_utf8_lossy(&body).replace(&self.plugin.secret, "[redacted]");
                let mut end = body.len().min(DETAIL_LIMIT as usize);
                while !body.is_char_boundary(end) {
                    end -= 1;
                }
                body.truncate(end);
                let body = self.explain(event, status, location.as_deref(), body);
                Reply::Status {
                    status,
                    retry_after,
                    body,
                }
            }
            Err(e) => Reply::NoAnswer(describe(&e)),
        }
    }
}

/// The POST of one delivery, every header set, ready to send `body`: what the pushers
/// send for a ticket and `check` for its ping, so the two cannot differ.
pub fn request(
    agent: &ureq::Agent,
    plugin: &Plugin,
    id: &str,
    request_id: &str,
    kind: &str,
    body: &[u8],
) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
    let mut request = agent
        .post(&plugin.url)
        .header("Content-Type", "application/json")
        .header("Idempotency-Key", id)
        .header("X-Request-Id", request_id);
    if plugin.auth.sends_secret() {
        request = request.header("X-Paheko-Secret", &plugin.secret);
    }
    if let Some(key) = plugin.auth.signing_key() {
        let timestamp = crate::clock::unix_now();
        request = request
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                crate::sign::signature(key, id, timestamp, body),
            );
    }
    if !kind.is_empty() {
        request = request.header("X-Paheko-Event", kind);
    }
    request
}

impl Pusher {
    /// What an answer's body becomes in the logs and dead letters (issue 16 §1): a
    /// redirect says where to point PAHEKO_PLUGIN_URL; an HTML error page (a PHP crash,
    /// a proxy's page) is reduced to its title; a 2xx that says the plugin holds a
    /// session (`"status":"held"`) is one warning with its code, and counted.
    fn explain(&self, event: &Event, status: u16, location: Option<&str>, body: String) -> String {
        if (300..=399).contains(&status) {
            let target = location.map(|l| absolute(&self.plugin.url, l));
            let text = match &target {
                Some(t) => format!("redirects to {t}: use PAHEKO_PLUGIN_URL={t}"),
                None => {
                    "redirects, without a Location: PAHEKO_PLUGIN_URL is not the plugin's address"
                        .into()
                }
            };
            log::error!(status = status, location = target.as_deref().unwrap_or("");
                "the plugin answers HTTP {status}: it {text}");
            return text;
        }
        if let Some(title) = html_title(&body) {
            return format!("HTML page: {title}");
        }
        let held = (status / 100 == 2 && body.contains("\"held\""))
            .then(|| serde_json::from_str::<serde_json::Value>(&body).ok())
            .flatten()
            .filter(|json| json["status"] == "held");
        if let Some(json) = held {
            let code = json["code"].as_str().unwrap_or("unknown");
            let session = json["session_id"].as_str().unwrap_or("");
            self.stats
                .held_sessions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            log::warn!(code = code, session_id = session, event = event.kind.as_str(),
                correlation_id = event.idempotency_key.as_str();
                "the plugin holds this session ({code}): nothing is booked until the treasurer decides on the plugin's page");
        }
        body
    }
}

/// The event type for X-Paheko-Event: the entry's `event` field, else the payload's
/// own `event` (only tickets carry one), else none (the plugin then refuses it).
fn event_type(event: &Event) -> Option<String> {
    if !event.kind.is_empty() {
        return Some(event.kind.clone());
    }
    let json: serde_json::Value = serde_json::from_slice(event.body()).ok()?;
    json["event"]
        .as_str()
        .filter(|k| !k.is_empty() && k.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)))
        .map(str::to_string)
}

/// `location` made absolute against `base` (a Location may be a path).
fn absolute(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let origin_end = base
        .find("://")
        .and_then(|i| base[i + 3..].find('/').map(|j| i + 3 + j))
        .unwrap_or(base.len());
    if location.starts_with('/') {
        format!("{}{location}", &base[..origin_end])
    } else {
        let dir_end = base
            .rfind('/')
            .filter(|&i| i >= origin_end)
            .unwrap_or(origin_end);
        format!("{}/{location}", &base[..dir_end])
    }
}

/// The `<title>` of an HTML page, whitespace collapsed; None when `body` is not HTML.
fn html_title(body: &str) -> Option<String> {
    let lower = body.to_ascii_lowercase();
    let head = lower.trim_start();
    if !(head.starts_with("<!doctype html")
        || head.starts_with("<html")
        || lower.contains("<title"))
    {
        return None;
    }
    let start = lower.find("<title")?;
    let open_end = start + lower[start..].find('>')? + 1;
    let close = open_end
        + lower[open_end..]
            .find("</title")
            .unwrap_or(lower.len() - open_end);
    let title = body[open_end..close]
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    Some(if title.is_empty() {
        "(untitled)".into()
    } else {
        title
    })
}

/// A transport error in words an operator can act on, naming the timeout that fired.
pub fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(which) => format!("timeout: {which:?} timeout fired"),
        ureq::Error::ConnectionFailed => {
            "connection failed: nothing answered at the plugin's address".into()
        }
        ureq::Error::HostNotFound => {
            "host not found: the plugin's host name does not resolve".into()
        }
        ureq::Error::Rustls(tls) => describe_tls(tls),
        ureq::Error::Io(io) => match io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
            Some(tls) => describe_tls(tls),
            None => format!("network error: {io}"),
        },
        other => format!("request failed: {other}"),
    }
}

/// A TLS failure in words an operator can act on, with rustls's own words after it.
pub fn describe_tls(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let what = match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            "the plugin's certificate is not signed by a trusted authority; if the plugin \
             uses a private CA, set PAHEKO_PLUGIN_CA_FILE to that CA's PEM file"
        }
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => "the plugin's certificate is not valid for the host name of PAHEKO_PLUGIN_URL",
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the plugin's certificate has expired"
        }
        rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "the plugin's certificate is not valid yet (is this machine's clock right?)"
        }
        rustls::Error::InvalidCertificate(_) => "the plugin's certificate was refused",
        _ => "the TLS handshake with the plugin failed",
    };
    format!("tls: {what} ({e})")
}

/// The certificate authorities trusted for HTTPS (the plugin) and `rediss://` (Redis):
/// Mozilla's, as the webpki-root-certs crate ships them, plus those of `ca`, if any.
pub fn trusted_roots(ca: Option<&CaFile>) -> Vec<Vec<u8>> {
    let mut roots: Vec<Vec<u8>> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
        .iter()
        .map(|c| c.to_vec())
        .collect();
    if let Some(ca) = ca {
        roots.extend(ca.certs.iter().cloned());
    }
    roots
}

/// `pem` followed by Mozilla's roots in PEM, for the redis crate, whose root
/// certificates replace the built-in ones rather than add to them.
pub fn with_mozilla_roots_pem(pem: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let mut out = pem.to_vec();
    if !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    for der in trusted_roots(None) {
        out.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
        for line in b64.as_bytes().chunks(64) {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        out.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    out
}

/// What the integration tests need to fake a fault that cannot be caused from outside;
/// compiled in debug builds only, and inert unless the variable is set.
#[cfg(debug_assertions)]
mod test_hooks {
    /// `__PAHEKO_PUSH_TEST_PUSHER_DELAY_MS=N`: a pusher waits N ms between taking an
    /// attempt and checking the gate, as a pusher descheduled for that long would; the
    /// step-down test uses it to show queued attempts are revoked (issue 13, 9).
    pub fn pause_before_send() {
        if let Some(ms) = std::env::var_os("__PAHEKO_PUSH_TEST_PUSHER_DELAY_MS")
            .and_then(|v| v.to_str().and_then(|s| s.parse::<u64>().ok()))
        {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redirect_is_made_absolute_against_the_plugin_url() {
        let base = "https://paheko.example.org/p/recyclique";
        assert_eq!(
            absolute(base, "/p/recyclique/"),
            "https://paheko.example.org/p/recyclique/"
        );
        assert_eq!(
            absolute(base, "https://other.example.org/p/recyclique/"),
            "https://other.example.org/p/recyclique/"
        );
        assert_eq!(
            absolute("http://h:8080/p/x/push.php", "index.php"),
            "http://h:8080/p/x/index.php"
        );
        assert_eq!(absolute("http://h", "/p/x/"), "http://h/p/x/");
    }

    #[test]
    fn the_event_type_comes_from_the_entry_else_from_the_payload() {
        let parse = |fields: &[(&str, &str)]| {
            let fields = fields
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect();
            let keys = vec!["cash_session_id".to_string(), "session_id".to_string()];
            Event::parse("1700000000000-1".parse().unwrap(), fields, &keys).unwrap()
        };
        let ticket = r#"{"event":"pos.ticket.created","sale_id":"s1","cash_session_id":"c1"}"#;
        let e = parse(&[("event", "pos.session.closed"), ("payload", ticket)]);
        assert_eq!(event_type(&e).as_deref(), Some("pos.session.closed"));
        let e = parse(&[("payload", ticket)]);
        assert_eq!(event_type(&e).as_deref(), Some("pos.ticket.created"));
        let e = parse(&[("payload", r#"{"session_id":"c1"}"#)]);
        assert_eq!(event_type(&e), None);
        let e = parse(&[("payload", r#"{"event":"bad\nvalue","session_id":"c1"}"#)]);
        assert_eq!(event_type(&e), None, "never a header value with a newline");
    }

    #[test]
    fn an_html_page_is_reduced_to_its_title() {
        let page = "<!DOCTYPE html>\n<html><head><meta charset=utf-8>\n<TITLE>\n  Erreur\n interne </title></head><body><pre>SQLite3Exception: database is locked in /var/www/…</pre></body></html>";
        assert_eq!(html_title(page).as_deref(), Some("Erreur interne"));
        assert_eq!(
            html_title("<html><body>no title</body></html>").as_deref(),
            None
        );
        assert_eq!(html_title(r#"{"error":"database_busy"}"#), None);
        assert_eq!(html_title("plain text"), None);
    }
}
