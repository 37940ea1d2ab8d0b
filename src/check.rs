//! `paheko-push check`: what an operator runs after installing or changing the
//! configuration, before (or beside) the service. It says where the configuration came
//! from, validates it, pings Redis, reports the stream, the consumer group with its
//! backlog (the `lag` of XINFO GROUPS) and pending count, the lease and the dead letters
//! (and among them the records of tickets trimmed before they were read), says when the
//! Redis version cannot count such losses (before 7) or is too old to run with (before
//! 6.2), opens a TLS connection to the plugin's host to verify its certificate against
//! the roots the worker trusts, and ends with a round trip: a `ping` event, sent with
//! the headers of a ticket, which a plugin that knows it answers 2xx without storing
//! anything (issue 14). A 401/403 fails the check (the plugin refuses the secret, as it
//! would every ticket), a 404 too (no plugin at that URL); any other answer is a
//! warning that the secret could not be verified. It reads nothing from the stream and
//! changes nothing in Redis. One line per check on stdout (`ok`, `warn`, `FAIL` or
//! `skip`), secrets and URLs' secret parts masked; exit 0 when nothing failed, 1
//! otherwise (with a last line saying which checks failed), 2 for a configuration error.

use std::fmt;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use redis::streams::StreamInfoGroupsReply;

use crate::Error;
use crate::config::{Config, redact_url};
use crate::logging::Redactor;
use crate::store::{self, Redis, Support};

pub const USAGE: &str = "usage: paheko-push check
Checks the configuration, Redis (stream, group, backlog, pending, lease, dead letters),
the plugin's TLS certificate, and the secret with a ping the plugin stores nothing for.
Delivers nothing, changes nothing in Redis. Exit 0 when nothing failed, 1 otherwise.";

/// How long one Redis command may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Worth a look, but the worker would run: a stream not created yet, dead letters.
    Warn,
    Fail,
    /// Not checked because an earlier check failed.
    Skip,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub status: Status,
    pub what: &'static str,
    pub detail: String,
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match self.status {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        };
        write!(f, "{status:<5} {:<13} {}", self.what, self.detail)
    }
}

fn line(status: Status, what: &'static str, detail: impl Into<String>) -> Line {
    Line {
        status,
        what,
        detail: detail.into(),
    }
}

/// `paheko-push check …`: loads the configuration with `config`, runs every check and
/// prints one line each.
pub fn main(args: &[String], config: impl FnOnce() -> Result<Config, Error>) -> Result<(), Error> {
    if crate::help_asked("check", args, USAGE)? {
        return Ok(());
    }
    let config = config()?;
    let redactor = Redactor::new(config.secrets());
    let lines = run(&config);
    for l in &lines {
        println!("{}", redactor.redact(&l.to_string()));
    }
    let failed: Vec<&str> = lines
        .iter()
        .filter(|l| l.status == Status::Fail)
        .map(|l| l.what)
        .collect();
    if failed.is_empty() {
        println!("all checks passed");
        Ok(())
    } else {
        Err(Error::Command {
            code: 1,
            message: format!(
                "{} failed: {}; see the FAIL {} above",
                plural(failed.len() as u64, "check"),
                failed.join(", "),
                if failed.len() == 1 { "line" } else { "lines" }
            ),
        })
    }
}

/// "1 entry", "2 entries".
fn entries(n: u64) -> String {
    if n == 1 {
        "1 entry".into()
    } else {
        format!("{n} entries")
    }
}

/// "1 consumer", "2 consumers".
pub fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Runs every check, in order.
pub fn run(config: &Config) -> Vec<Line> {
    let auth = match &config.plugin {
        Ok(p) => p.auth.name(),
        Err(_) => "-",
    };
    let mut lines = vec![line(
        if config.source.unreadable.is_some() {
            Status::Warn
        } else {
            Status::Ok
        },
        "configuration",
        format!(
            "from {}: stream {}, group {}, consumer {}, auth {auth}",
            config.source, config.stream, config.group, config.consumer
        ),
    )];
    lines.extend(
        config
            .warnings()
            .into_iter()
            .map(|w| line(Status::Warn, "configuration", w)),
    );
    lines.extend(redis_checks(config));
    let plugin = plugin_check(config);
    let reached = plugin.status == Status::Ok;
    lines.push(plugin);
    // In API mode the "plugin" is Paheko's API and its secret the API password: no ping.
    if matches!(config.target, crate::config::Target::Plugin) {
        if reached && let Ok(p) = &config.plugin {
            lines.push(ping_check(config, p));
        } else {
            lines.push(line(Status::Skip, "ping", "the plugin was not reached"));
        }
    }
    lines.extend(crate::paheko_api::check(config));
    lines
}

fn redis_checks(config: &Config) -> Vec<Line> {
    let url = redact_url(&config.redis_url);
    let skipped = |why: &str| {
        ["stream", "group", "dead letters"]
            .into_iter()
            .map(|what| line(Status::Skip, what, why))
            .collect::<Vec<_>>()
    };
    let mut redis =
        match Redis::open_with_ca(&config.redis_url, config.redis_ca.as_ref(), REDIS_TIMEOUT) {
            Ok(r) => r,
            Err(e) => {
                let mut lines = vec![line(Status::Fail, "redis", format!("{url}: {e}"))];
                lines.extend(skipped("Redis unreachable"));
                return lines;
            }
        };
    let version = match store::server_version(&mut redis) {
        Ok(version) => version,
        Err(e) if e.kind() == redis::ErrorKind::UnexpectedReturnType => {
            let mut lines = vec![line(
                Status::Fail,
                "redis",
                format!("{url}: cannot tell the server's version ({e})"),
            )];
            lines.extend(skipped("Redis version unknown"));
            return lines;
        }
        Err(e) => {
            let mut lines = vec![line(
                Status::Fail,
                "redis",
                format!("{url}: {}", redis_error(&e)),
            )];
            lines.extend(skipped(if refused_credentials(&e) {
                "Redis refused the credentials"
            } else {
                "Redis unreachable"
            }));
            return lines;
        }
    };
    let support = Support::of(version);
    let answers = format!("{url} answers (Redis {version})");
    let mut lines = vec![match support.warning(version) {
        None => line(Status::Ok, "redis", answers),
        Some(warning) if support == Support::TooOld => {
            line(Status::Fail, "redis", format!("{answers}: {warning}"))
        }
        Some(warning) => line(Status::Warn, "redis", format!("{answers}: {warning}")),
    }];

    let stream = &config.stream;
    match key_type(&mut redis, stream) {
        Err(e) => lines.push(line(Status::Fail, "stream", format!("{stream}: {e}"))),
        Ok(t) if t == "none" => {
            lines.push(line(
                Status::Warn,
                "stream",
                format!(
                    "{stream} does not exist yet: the worker creates it at its first start \
                     (is REDIS_STREAM_PUSH_CAISSE the name RecyClique writes to?)"
                ),
            ));
            lines.push(line(Status::Skip, "group", "no stream yet"));
        }
        Ok(t) if t != "stream" => {
            lines.push(line(
                Status::Fail,
                "stream",
                format!("{stream} is a Redis {t}, not a stream"),
            ));
            lines.push(line(Status::Skip, "group", "no stream"));
        }
        Ok(_) => {
            let length: Result<u64, _> = redis.query(redis::cmd("XLEN").arg(stream));
            match length {
                Ok(n) => lines.push(line(
                    Status::Ok,
                    "stream",
                    format!("{stream}: {}", entries(n)),
                )),
                Err(e) => lines.push(line(Status::Fail, "stream", format!("{stream}: {e}"))),
            }
            lines.push(group_check(&mut redis, config));
            lines.push(lease_check(&mut redis, config));
        }
    }

    let dead = &config.dead_letter_stream;
    let length: Result<u64, _> = redis.query(redis::cmd("XLEN").arg(dead));
    let trimmed = store::trimmed_records(&mut redis, dead, false);
    lines.push(match (length, trimmed) {
        (Ok(0), _) => line(Status::Ok, "dead letters", format!("{dead}: none")),
        (Ok(n), Ok(0)) => line(
            Status::Warn,
            "dead letters",
            format!(
                "{dead}: {} the plugin refused (see `paheko-push dead list`)",
                plural(n, "event")
            ),
        ),
        (Ok(n), Ok(t)) => line(
            Status::Warn,
            "dead letters",
            format!(
                "{dead}: {n} in all, of which {t} for tickets trimmed before they were read \
                 (lost: see `paheko-push dead list`)"
            ),
        ),
        (Err(e), _) | (_, Err(e)) => line(Status::Fail, "dead letters", format!("{dead}: {e}")),
    });
    lines
}

/// Who holds the lease (the active instance), since when and for how long still.
fn lease_check(redis: &mut Redis, config: &Config) -> Line {
    let names = config.names();
    let key = crate::lease::key(&names);
    match crate::lease::describe(redis, &names) {
        Err(e) => line(Status::Fail, "lease", format!("{key}: {e}")),
        Ok(None) => line(
            Status::Ok,
            "lease",
            format!("{key}: free, no instance delivers now (the next one started takes it)"),
        ),
        Ok(Some((holder, ttl))) if holder.free => line(
            Status::Ok,
            "lease",
            format!(
                "{key}: released by {} at a clean stop, {} s ago at most; free",
                holder.consumer,
                config.lease.saturating_sub(ttl).as_secs()
            ),
        ),
        Ok(Some((holder, ttl))) => {
            let since = crate::clock::rfc3339(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(holder.since),
            );
            let me = if holder.consumer == config.consumer {
                " (this consumer name)"
            } else {
                ""
            };
            line(
                Status::Ok,
                "lease",
                format!(
                    "{key}: held by {}{me} since {since}, {:.1} s left before it expires unless renewed",
                    holder.consumer,
                    ttl.as_secs_f64()
                ),
            )
        }
    }
}

/// A Redis error, with what to do when it is the server's certificate or the password.
fn redis_error(e: &redis::RedisError) -> String {
    let text = e.to_string();
    if text.contains("UnknownIssuer") {
        format!("{text} (if Redis uses a private CA, set REDIS_CA_FILE to that CA's PEM file)")
    } else if refused_credentials(e) {
        format!(
            "Redis answers but refuses the credentials: a wrong or missing password (or \
             user) in REDIS_URL ({text})"
        )
    } else {
        text
    }
}

/// NOAUTH (a password is required and none was given), WRONGPASS (wrong user or
/// password), or the client's own "authentication failed".
fn refused_credentials(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"))
        || e.to_string().contains("NOAUTH")
        || e.to_string().contains("WRONGPASS")
}

fn key_type(redis: &mut Redis, key: &str) -> Result<String, redis::RedisError> {
    redis.query(redis::cmd("TYPE").arg(key))
}

fn group_check(redis: &mut Redis, config: &Config) -> Line {
    let name = &config.group;
    let reply: Result<StreamInfoGroupsReply, _> =
        redis.query(redis::cmd("XINFO").arg("GROUPS").arg(&config.stream));
    match reply {
        Err(e) => line(Status::Fail, "group", format!("{name}: {e}")),
        Ok(reply) => match reply.groups.iter().find(|g| &g.name == name) {
            None => line(
                Status::Warn,
                "group",
                format!(
                    "{name} does not exist yet: the worker creates it at its first start and \
                     delivers the stream from its beginning"
                ),
            ),
            Some(g) => {
                let names = config.names();
                // The worker's own count when it has one (exact after a trimmed gap).
                let lag = store::group_lag(redis, &names).unwrap_or(g.lag.map(|l| l as u64));
                let backlog = match lag {
                    Some(lag) => format!("backlog {lag}"),
                    None => "backlog unknown (entries were deleted)".to_string(),
                };
                line(
                    Status::Ok,
                    "group",
                    format!(
                        "{name}: {backlog}, {} pending, {}, last delivered {}",
                        g.pending,
                        plural(g.consumers as u64, "consumer"),
                        g.last_delivered_id
                    ),
                )
            }
        },
    }
}

/// Where the plugin listens, from its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    https: bool,
    host: String,
    port: u16,
}

impl Target {
    fn parse(url: &str) -> Option<Target> {
        let (scheme, rest) = url.split_once("://")?;
        let https = match scheme.to_ascii_lowercase().as_str() {
            "https" => true,
            "http" => false,
            _ => return None,
        };
        let authority = rest.split(['/', '?', '#']).next()?;
        let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']')?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(p) => p.parse().ok()?,
            None if https => 443,
            None => 80,
        };
        (!host.is_empty()).then(|| Target {
            https,
            host: host.to_string(),
            port,
        })
    }
}

fn plugin_check(config: &Config) -> Line {
    let plugin = match &config.plugin {
        Ok(p) => p,
        Err(missing) => {
            return line(
                Status::Fail,
                "plugin",
                format!("{missing}: nothing would be delivered"),
            );
        }
    };
    let url = &redact_url(&plugin.url);
    let Some(target) = Target::parse(&plugin.url) else {
        return line(
            Status::Fail,
            "plugin",
            format!("{url}: cannot tell the host"),
        );
    };
    let tcp = match connect(&target, config.timeout) {
        Ok(tcp) => tcp,
        Err(e) => return line(Status::Fail, "plugin", format!("{url}: {e}")),
    };
    if !target.https {
        return line(
            Status::Ok,
            "plugin",
            format!("{url}: reachable (plain HTTP, no certificate to check)"),
        );
    }
    match handshake(tcp, &target, config) {
        Ok(version) => line(
            Status::Ok,
            "plugin",
            format!("{url}: certificate valid for {} ({version})", target.host),
        ),
        Err(e) => line(Status::Fail, "plugin", format!("{url}: {e}")),
    }
}

/// The round trip: a `ping` event with a ticket's headers (the secret and/or the
/// signature, a fresh `Idempotency-Key`), which tells a rotated secret (401/403) and a
/// wrong URL (404) from a plugin that accepts the worker.
fn ping_check(config: &Config, plugin: &crate::config::Plugin) -> Line {
    let url = redact_url(&plugin.url);
    let key = match random_hex(8) {
        Ok(hex) => format!("ping-{hex}"),
        Err(e) => return line(Status::Fail, "ping", format!("no random key: {e}")),
    };
    let agent = crate::pusher::Pusher::agent(
        config.timeout,
        !config.allow_http,
        config.plugin_ca.as_ref(),
    );
    let body = br#"{"ping":true}"#;
    let sent = crate::pusher::request(&agent, plugin, &key, &key, "ping", body).send(&body[..]);
    let mut response = match sent {
        Ok(r) => r,
        Err(e) => {
            return line(
                Status::Fail,
                "ping",
                format!(
                    "{url}: no answer to a ping ({}): the secret could not be verified",
                    crate::pusher::describe(&e)
                ),
            );
        }
    };
    let status = response.status();
    let code = status.as_u16();
    let reason = status.canonical_reason().unwrap_or("");
    let answer = response
        .body_mut()
        .with_config()
        .limit(4096)
        .read_to_string()
        .unwrap_or_default()
        .replace(&plugin.secret, "[redacted]");
    let answer: String = answer.trim().chars().take(120).collect();
    let said = if answer.is_empty() {
        String::new()
    } else {
        format!(", {answer:?}")
    };
    match code {
        200..=299 => line(
            Status::Ok,
            "ping",
            format!("{url}: {code} {reason}{said}: the plugin accepted the secret"),
        ),
        401 | 403 => line(
            Status::Fail,
            "ping",
            format!(
                "{url}: {code} {reason}{said}: the plugin refuses the {}; it would refuse \
                 every ticket (a secret rotated on one side only?). Tickets would wait in Redis",
                match plugin.auth {
                    crate::config::Auth::Header => "secret (X-Paheko-Secret)",
                    crate::config::Auth::Signature { .. } => "signature",
                    crate::config::Auth::Both { .. } => "secret or the signature",
                }
            ),
        ),
        404 => line(
            Status::Fail,
            "ping",
            format!(
                "{url}: 404 {reason}: nothing at this URL: PAHEKO_PLUGIN_URL is wrong, or the \
                 plugin is not installed or not enabled in Paheko"
            ),
        ),
        _ => line(
            Status::Warn,
            "ping",
            format!(
                "{url}: {code} {reason}{said}: could not verify the secret (a plugin that \
                 does not answer ping events, or one failing now)"
            ),
        ),
    }
}

fn random_hex(bytes: usize) -> Result<String, String> {
    use ring::rand::SecureRandom as _;
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| "the system's random source failed".to_string())?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn connect(target: &Target, timeout: Duration) -> Result<TcpStream, String> {
    let addrs = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|e| format!("host not found: {} does not resolve ({e})", target.host))?;
    let mut last = format!("host not found: {} has no address", target.host);
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = format!("connection failed: nothing answered at {addr} ({e})"),
        }
    }
    Err(last)
}

/// A TLS handshake with the worker's roots and nothing else: returns the protocol
/// version, or why the certificate was refused.
fn handshake(mut tcp: TcpStream, target: &Target, config: &Config) -> Result<String, String> {
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(
        crate::pusher::trusted_roots(config.plugin_ca.as_ref())
            .into_iter()
            .map(CertificateDer::from),
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(target.host.clone())
        .map_err(|e| format!("tls: {:?} is not a valid server name ({e})", target.host))?;
    let mut conn = rustls::ClientConnection::new(Arc::new(tls), name)
        .map_err(|e| crate::pusher::describe_tls(&e))?;
    let _ = tcp.set_read_timeout(Some(config.timeout));
    let _ = tcp.set_write_timeout(Some(config.timeout));
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut tcp) {
            // Tell the server why, as a client that refuses a certificate does.
            let _ = conn.write_tls(&mut tcp);
            return Err(
                match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    Some(tls) => crate::pusher::describe_tls(tls),
                    None if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                    {
                        "timeout: the TLS handshake did not complete (PAHEKO_PUSH_TIMEOUT_SECONDS)"
                            .to_string()
                    }
                    None => format!("tls: the handshake failed ({e})"),
                },
            );
        }
    }
    let version = conn
        .protocol_version()
        .map_or("TLS".to_string(), |v| format!("{v:?}"));
    conn.send_close_notify();
    let _ = conn.write_tls(&mut tcp);
    Ok(version.replace('_', "."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_read_from_urls() {
        let t = |url| Target::parse(url).map(|t| (t.https, t.host, t.port));
        assert_eq!(
            t("https://paheko.example/p?x"),
            Some((true, "paheko.example".into(), 443))
        );
        assert_eq!(
            t("HTTPS://u@paheko.example:8443/p"),
            Some((true, "paheko.example".into(), 8443))
        );
        assert_eq!(
            t("http://127.0.0.1:8080"),
            Some((false, "127.0.0.1".into(), 8080))
        );
        assert_eq!(t("https://[::1]:9443/x"), Some((true, "::1".into(), 9443)));
        assert_eq!(t("https://[::1]/x"), Some((true, "::1".into(), 443)));
        assert_eq!(t("ftp://x"), None);
        assert_eq!(t("https://:443/x"), None);
        assert_eq!(t("https://h:port/x"), None);
    }

    #[test]
    fn lines_read_as_a_table() {
        assert_eq!(
            line(Status::Fail, "redis", "down").to_string(),
            "FAIL  redis         down"
        );
        assert_eq!(
            line(Status::Ok, "group", "g").to_string(),
            "ok    group         g"
        );
    }
}
