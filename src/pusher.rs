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
        }
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
                let reply = self.post(&event);
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
            &event.kind,
            event.body(),
        );
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
                let mut body =
                    String::from_utf8_lossy(&body).replace(&self.plugin.secret, "[redacted]");
                let mut end = body.len().min(DETAIL_LIMIT as usize);
                while !body.is_char_boundary(end) {
                    end -= 1;
                }
                body.truncate(end);
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
