//! Logs on stderr, one record per line: a JSON object (`ts`, `level`, `msg`, `target`
//! and the record's key-values) or plain text. Every record — ours and those of the
//! HTTP, TLS and Redis libraries — passes through [`Redactor`], which replaces the
//! configured secrets wherever they appear, so no secret reaches a log.
//!
//! The redactor only sees text, so it cannot catch a secret cut into pieces or printed
//! as hex: that is what a wire dump does (ureq-proto logs every request and response
//! 16 bytes a record, as hex and ASCII, at trace; issue 8 §7). So the libraries' records
//! are never let through below [`LIBRARY_LEVEL`], whatever `PAHEKO_PUSH_LOG` says:
//! trace applies to this crate only.

use std::fmt::Write as _;
use std::time::SystemTime;

use log::kv::{self, VisitSource};

use crate::config::LogFormat;

/// Replaces every occurrence of a secret by `[redacted]`.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    pub fn new(secrets: Vec<String>) -> Redactor {
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| !s.is_empty()).collect();
        // Longest first, so a secret containing another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Redactor { secrets }
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "[redacted]");
            }
        }
        out
    }
}

/// The most detailed level at which the libraries' records (ureq, ureq-proto, rustls,
/// redis, tiny_http, …) are logged. Their wire dumps are at trace; at debug ureq prints
/// a request's headers with all but a fixed list of harmless ones left out.
pub const LIBRARY_LEVEL: log::LevelFilter = log::LevelFilter::Debug;

/// This crate's records, as `log` targets them; the binary's too (same crate name).
const OWN_TARGET: &str = "paheko_push";

/// Installs the global logger. Call once, before any thread starts. `level` applies
/// to this crate; other crates get at most [`LIBRARY_LEVEL`].
pub fn init(
    level: log::LevelFilter,
    format: LogFormat,
    redactor: Redactor,
) -> Result<(), log::SetLoggerError> {
    fern::Dispatch::new()
        .level(level.min(LIBRARY_LEVEL))
        .level_for(OWN_TARGET, level)
        .format(move |out, message, record| {
            let line = match format {
                LogFormat::Json => json_line(record, message, &redactor),
                LogFormat::Text => text_line(record, message, &redactor),
            };
            out.finish(format_args!("{line}"))
        })
        // Written by hand rather than through fern's stderr output, which panics when
        // stderr is gone (a closed pipe): a lost log line must never stop a thread.
        .chain(fern::Output::call(|record| {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr().lock(), "{}", record.args());
        }))
        .apply()
}

fn json_line(record: &log::Record, message: &std::fmt::Arguments, redactor: &Redactor) -> String {
    let mut object = serde_json::Map::new();
    object.insert("ts".into(), crate::clock::rfc3339(SystemTime::now()).into());
    object.insert(
        "level".into(),
        record.level().as_str().to_ascii_lowercase().into(),
    );
    object.insert("msg".into(), redactor.redact(&message.to_string()).into());
    if !record.target().starts_with(OWN_TARGET) {
        object.insert("target".into(), record.target().into());
    }
    let mut visitor = JsonPairs {
        object: &mut object,
        redactor,
    };
    let _ = record.key_values().visit(&mut visitor);
    serde_json::Value::Object(object).to_string()
}

struct JsonPairs<'a> {
    object: &'a mut serde_json::Map<String, serde_json::Value>,
    redactor: &'a Redactor,
}

impl<'kvs> VisitSource<'kvs> for JsonPairs<'_> {
    fn visit_pair(&mut self, key: kv::Key<'kvs>, value: kv::Value<'kvs>) -> Result<(), kv::Error> {
        let json = if let Some(n) = value.to_u64() {
            n.into()
        } else if let Some(n) = value.to_i64() {
            n.into()
        } else if let Some(b) = value.to_bool() {
            b.into()
        } else if let Some(f) = value.to_f64() {
            f.into()
        } else {
            self.redactor.redact(&value.to_string()).into()
        };
        self.object.insert(key.as_str().to_string(), json);
        Ok(())
    }
}

fn text_line(record: &log::Record, message: &std::fmt::Arguments, redactor: &Redactor) -> String {
    let mut line = format!(
        "{} {:<5} {}",
        crate::clock::rfc3339(SystemTime::now()),
        record.level(),
        message
    );
    struct TextPairs<'a>(&'a mut String);
    impl<'kvs> VisitSource<'kvs> for TextPairs<'_> {
        fn visit_pair(
            &mut self,
            key: kv::Key<'kvs>,
            value: kv::Value<'kvs>,
        ) -> Result<(), kv::Error> {
            let _ = write!(self.0, " {key}={value}");
            Ok(())
        }
    }
    let _ = record.key_values().visit(&mut TextPairs(&mut line));
    if !record.target().starts_with(OWN_TARGET) {
        let _ = write!(line, " target={}", record.target());
    }
    redactor.redact(&line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_every_secret_longest_first() {
        let r = Redactor::new(vec!["abc".into(), "abcdef".into(), String::new()]);
        assert_eq!(r.redact("x-abcdef-abc-ab"), "x-[redacted]-[redacted]-ab");
        assert_eq!(Redactor::default().redact("abc"), "abc");
    }

    #[test]
    fn json_lines_carry_key_values_and_hide_secrets() {
        let r = Redactor::new(vec!["hunter2".into()]);
        let kvs: &[(&str, kv::Value)] = &[
            ("correlation_id", kv::Value::from("1-1")),
            ("status", kv::Value::from(503u16)),
            ("url", kv::Value::from("redis://:hunter2@h")),
        ];
        let record = log::Record::builder()
            .level(log::Level::Warn)
            .target("paheko_push::pusher")
            .key_values(&kvs)
            .args(format_args!("secret is hunter2"))
            .build();
        let line = json_line(&record, record.args(), &r);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "warn");
        assert_eq!(v["msg"], "secret is [redacted]");
        assert_eq!(v["correlation_id"], "1-1");
        assert_eq!(v["status"], 503);
        assert_eq!(v["url"], "redis://:[redacted]@h");
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
        assert!(!line.contains("hunter2"));
        let text = text_line(&record, record.args(), &r);
        assert!(
            text.contains("WARN  secret is [redacted] correlation_id=1-1 status=503"),
            "{text}"
        );
        assert!(!text.contains("hunter2"));
    }
}
