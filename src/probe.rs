//! `paheko-push health`: asks a running worker how it is, for a container's
//! `HEALTHCHECK`, a monitoring script or an operator's shell. It reads the configuration
//! as the worker does (only `PAHEKO_PUSH_HEALTH_ADDR` matters), sends `GET /health` to
//! that address and prints one line. Exit 0 when the worker answers with `status`
//! `ok`, 1 for anything else: degraded, error, no answer, no health server configured,
//! even a configuration error — a container runtime reserves exit status 2 for itself,
//! and a probe has one question to answer. It never touches Redis or the plugin.

use std::time::Duration;

use crate::Error;
use crate::config::Config;

pub const USAGE: &str = "usage: paheko-push health
Asks the worker running with this configuration for its /health (on
PAHEKO_PUSH_HEALTH_ADDR); prints one line; exit 0 when its status is ok, 1 otherwise.";

/// How long the worker's health server gets to answer: it reads counters only, so a
/// live worker answers in milliseconds. Below the 3 s a healthcheck usually allows.
const TIMEOUT: Duration = Duration::from_secs(2);

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `status` was `ok`.
    Healthy(String),
    /// The worker answered, with another status (or an unreadable document).
    Unhealthy(String),
    /// Nothing to ask, or nothing answered.
    Unreachable(String),
}

/// `paheko-push health …`: loads the configuration with `config`, asks the worker and
/// prints one line (stdout when healthy; otherwise the error, on stderr, says why).
pub fn main(args: &[String], config: impl FnOnce() -> Result<Config, Error>) -> Result<(), Error> {
    if crate::help_asked("health", args, USAGE)? {
        return Ok(());
    }
    let unhealthy = |message: String| Error::Command { code: 1, message };
    let config = config().map_err(|e| unhealthy(format!("unhealthy: {e}")))?;
    let Some(addr) = config.health_addr.as_deref() else {
        return Err(unhealthy(
            "unhealthy: PAHEKO_PUSH_HEALTH_ADDR is empty: the worker serves no /health to ask"
                .into(),
        ));
    };
    match probe(addr) {
        Verdict::Healthy(line) => {
            println!("{line}");
            Ok(())
        }
        Verdict::Unhealthy(line) | Verdict::Unreachable(line) => Err(unhealthy(line)),
    }
}

/// Asks the health server listening on `addr` (as configured: a wildcard address is
/// asked on loopback).
pub fn probe(addr: &str) -> Verdict {
    let target = match local_target(addr) {
        Ok(t) => t,
        Err(e) => return Verdict::Unreachable(format!("unhealthy: {e}")),
    };
    let url = format!("http://{target}/health");
    // No proxy: an HTTP_PROXY in the environment must not carry a local probe away.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .max_redirects(0)
        .timeout_global(Some(TIMEOUT))
        .build()
        .into();
    let mut response = match agent.get(&url).call() {
        Ok(r) => r,
        Err(e) => {
            return Verdict::Unreachable(format!("unhealthy: no answer from {url}: {e}"));
        }
    };
    let code = response.status().as_u16();
    let body = match response.body_mut().read_to_string() {
        Ok(b) => b,
        Err(e) => return Verdict::Unreachable(format!("unhealthy: {url}: {e}")),
    };
    judge(code, &body)
}

/// The verdict on one /health answer.
pub fn judge(code: u16, body: &str) -> Verdict {
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(body) else {
        return Verdict::Unhealthy(format!(
            "unhealthy: HTTP {code}, not a paheko-push /health document"
        ));
    };
    let Some(status) = doc["status"].as_str() else {
        return Verdict::Unhealthy(format!(
            "unhealthy: HTTP {code}, not a paheko-push /health document"
        ));
    };
    let field = |name: &str| match &doc[name] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    // What is wrong first, in words: the status /health carries and what it means.
    let mut why = Vec::new();
    if let Some(refusing) = doc["paheko_refusing_status"].as_u64() {
        why.push(format!(
            "the plugin refuses every ticket with HTTP {refusing}: {}; tickets wait in Redis",
            crate::retry::refusal_meaning(refusing as u16)
        ));
    } else if doc["paheko"] == "down" {
        let since = doc["paheko_down_since"]
            .as_u64()
            .map(|t| {
                format!(
                    " since {}",
                    crate::clock::rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(t))
                )
            })
            .unwrap_or_default();
        why.push(format!(
            "Paheko does not answer{since}, {} in a row; tickets wait in Redis",
            crate::check::plural(
                doc["consecutive_failures"].as_u64().unwrap_or(0),
                "failed attempt"
            )
        ));
    }
    if doc["redis"] == "error" {
        why.push("Redis is unreachable".into());
    }
    if doc["push_worker"] == "unconfigured" {
        why.push("the plugin URL or secret is not set: nothing is delivered".into());
    }
    if doc["lost_to_trim"].as_u64().unwrap_or(0) > 0 {
        why.push(format!(
            "{} trimmed before they were read (paheko-push dead list)",
            crate::check::plural(doc["lost_to_trim"].as_u64().unwrap_or(0), "ticket")
        ));
    }
    if doc["backlog_warning"] == true {
        why.push("the backlog nears the producer's MAXLEN".into());
    }
    let summary = format!(
        "redis {}, paheko {}, push_worker {}, role {}, pending {}, backlog {}, dead letters {}, lost to trim {}",
        field("redis"),
        field("paheko"),
        field("push_worker"),
        field("role"),
        field("pending"),
        field("lag"),
        field("dead_letters"),
        field("lost_to_trim"),
    );
    if status == "ok" && code == 200 {
        Verdict::Healthy(format!("healthy: {summary}"))
    } else if why.is_empty() {
        Verdict::Unhealthy(format!("unhealthy: status {status}: {summary}"))
    } else {
        Verdict::Unhealthy(format!(
            "unhealthy: status {status}: {} ({summary})",
            why.join("; ")
        ))
    }
}

/// `addr` as a client reaches it: `0.0.0.0` and `[::]` mean "every address", which a
/// client reaches on loopback.
fn local_target(addr: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let parsed: SocketAddr = addr.parse().map_err(|_| {
        format!("PAHEKO_PUSH_HEALTH_ADDR: expected an address such as 127.0.0.1:9187, got {addr:?}")
    })?;
    if parsed.port() == 0 {
        return Err(
            "PAHEKO_PUSH_HEALTH_ADDR has port 0 (any free port): set the port the worker listens on"
                .into(),
        );
    }
    let ip = match parsed.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(SocketAddr::new(ip, parsed.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_are_asked_on_loopback() {
        assert_eq!(
            local_target("0.0.0.0:9187").unwrap().to_string(),
            "127.0.0.1:9187"
        );
        assert_eq!(local_target("[::]:9187").unwrap().to_string(), "[::1]:9187");
        assert_eq!(
            local_target("10.0.0.5:80").unwrap().to_string(),
            "10.0.0.5:80"
        );
        assert!(local_target("127.0.0.1:0").unwrap_err().contains("port 0"));
        assert!(local_target("nowhere").unwrap_err().contains("nowhere"));
    }

    #[test]
    fn only_status_ok_is_healthy() {
        let ok = r#"{"status":"ok","redis":"ok","paheko":"up","push_worker":"ok","role":"active","pending":0,"lag":3,"dead_letters":0,"lost_to_trim":0}"#;
        assert_eq!(
            judge(200, ok),
            Verdict::Healthy(
                "healthy: redis ok, paheko up, push_worker ok, role active, pending 0, backlog 3, dead letters 0, lost to trim 0"
                    .into()
            )
        );
        let degraded = ok.replace(r#""status":"ok""#, r#""status":"degraded""#);
        assert!(
            matches!(judge(200, &degraded), Verdict::Unhealthy(l) if l.starts_with("unhealthy: status degraded: "))
        );
        let error = ok.replace(r#""status":"ok""#, r#""status":"error""#);
        assert!(matches!(judge(503, &error), Verdict::Unhealthy(_)));
        assert!(matches!(judge(503, ok), Verdict::Unhealthy(_)));
        assert!(
            matches!(judge(404, r#"{"error":"not found"}"#), Verdict::Unhealthy(l) if l.contains("not a paheko-push"))
        );
        assert!(matches!(judge(200, "<html>"), Verdict::Unhealthy(_)));
    }

    #[test]
    fn a_refusing_plugin_is_named_with_its_status_and_meaning() {
        let refusing = r#"{"status":"error","redis":"ok","paheko":"refusing","paheko_refusing_status":401,"push_worker":"ok","role":"active","pending":1,"lag":0,"dead_letters":0,"lost_to_trim":0}"#;
        let Verdict::Unhealthy(said) = judge(503, refusing) else {
            panic!("healthy?")
        };
        assert!(
            said.starts_with(
                "unhealthy: status error: the plugin refuses every ticket with HTTP 401: the plugin does not accept the secret"
            ),
            "{said}"
        );
        let down = r#"{"status":"degraded","redis":"ok","paheko":"down","paheko_down_since":1795824649,"consecutive_failures":4,"push_worker":"ok","pending":1}"#;
        let Verdict::Unhealthy(said) = judge(200, down) else {
            panic!("healthy?")
        };
        assert!(
            said.contains("Paheko does not answer since 2026-11-")
                && said.contains("4 failed attempts in a row"),
            "{said}"
        );
    }
}
