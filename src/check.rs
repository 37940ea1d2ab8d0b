//! `paheko-push check`: what an operator runs after installing or changing the
//! configuration, before (or beside) the service. It validates the configuration, pings
//! Redis, reports the stream, the consumer group with its backlog (the `lag` of XINFO
//! GROUPS) and pending count, and the dead letters (and among them the records of
//! tickets trimmed before they were read), says when the Redis version cannot count
//! such losses (before 7) or is too old to run with (before 6.2), and opens a TLS
//! connection to the plugin's host to verify its certificate against the roots the
//! worker trusts — without posting anything, reading nothing from the stream and
//! changing nothing in Redis. One
//! line per check on stdout (`ok`, `warn`, `FAIL` or `skip`), secrets redacted; exit 0
//! when nothing failed, 1 otherwise, 2 for a configuration error.

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
Checks the configuration, Redis (stream, group, backlog, pending, dead letters) and the
plugin's TLS certificate, without delivering anything. Exit 0 when nothing failed.";

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
        Err(Error::Startup(format!(
            "check failed: {}",
            failed.join(", ")
        )))
    }
}

/// Runs every check, in order.
pub fn run(config: &Config) -> Vec<Line> {
    let auth = match &config.plugin {
        Ok(p) => p.auth.name(),
        Err(_) => "-",
    };
    let mut lines = vec![line(
        Status::Ok,
        "configuration",
        format!(
            "stream {}, group {}, consumer {}, auth {auth}",
            config.stream, config.group, config.consumer
        ),
    )];
    lines.extend(redis_checks(config));
    lines.push(plugin_check(config));
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
            lines.extend(skipped("Redis unreachable"));
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
                Ok(n) => lines.push(line(Status::Ok, "stream", format!("{stream}: {n} entries"))),
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
            format!("{dead}: {n} events the plugin refused (see `paheko-push dead list`)"),
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

/// A Redis error, with what to do when it is the server's certificate.
fn redis_error(e: &redis::RedisError) -> String {
    let text = e.to_string();
    if text.contains("UnknownIssuer") {
        format!("{text} (if Redis uses a private CA, set REDIS_CA_FILE to that CA's PEM file)")
    } else {
        text
    }
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
                        "{name}: {backlog}, {} pending, {} consumers, last delivered {}",
                        g.pending, g.consumers, g.last_delivered_id
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
    let url = &plugin.url;
    let Some(target) = Target::parse(url) else {
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
            format!(
                "{url}: certificate valid for {} ({version}), nothing posted",
                target.host
            ),
        ),
        Err(e) => line(Status::Fail, "plugin", format!("{url}: {e}")),
    }
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
