//! Signed requests (issue 4 §1): with `PAHEKO_PUSH_AUTH=signature` the secret never
//! travels and every request carries Standard Webhooks v1 headers; `both` sends both;
//! `header` (the default) sends what the Python worker sent. The signatures the worker
//! really sent are checked twice: here in Rust (ring, independently of the worker's
//! code), and by the PHP function of docs/plugin-contract.md, extracted from the
//! document at test time and run with php-cli, so the documentation cannot drift.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::util::*;

const T: Duration = Duration::from_secs(20);

/// A Standard Webhooks secret; its key is the base64-decoded part.
const WHSEC: &str = "whsec_cGFoZWtvLXB1c2ggc2lnbmluZyBrZXkgZm9yIHRlc3Rz";
const WHSEC_KEY: &[u8] = b"paheko-push signing key for tests";

/// The document whose PHP function the plugin's author copies.
const CONTRACT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/plugin-contract.md");
const BEGIN: &str = "<!-- verify.php: begin -->";
const END: &str = "<!-- verify.php: end -->";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Standard Webhooks v1, written here from the specification rather than taken from
/// the worker: one of the space-separated `v1,` signatures must be
/// base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).
fn rust_verifies(key: &[u8], r: &Received, body: &[u8]) -> bool {
    let (Some(id), Some(ts), Some(sigs)) = (
        r.header("webhook-id"),
        r.header("webhook-timestamp"),
        r.header("webhook-signature"),
    ) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut content = format!("{id}.{ts}.").into_bytes();
    content.extend_from_slice(body);
    let expected = STANDARD.encode(ring::hmac::sign(&key, &content).as_ref());
    sigs.split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
}

/// Delivers two tickets (one with non-ASCII text, byte for byte) with `auth` and
/// `secret`; returns the requests and the worker's stderr.
fn deliver_two(auth: &str, secret: &str) -> (Vec<Received>, String) {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "cs-1", "sale-1");
    let odd = r#"{ "sale_id":"sale-2", "cash_session_id":"cs-1", "label":"café à 2 €" }"#;
    xadd(
        &mut conn,
        STREAM,
        &[("event", "pos.ticket.created"), ("payload", odd)],
    );
    let worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [("PAHEKO_PUSH_AUTH", auth), ("PAHEKO_PLUGIN_SECRET", secret)],
    ));
    let received = sink.wait_for_count(2, T);
    wait_until("both acknowledged", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
    assert_eq!(
        received[1].body,
        odd.as_bytes(),
        "the body is sent as written"
    );
    (received, worker.stderr())
}

#[test]
fn signature_mode_signs_every_request_and_never_sends_the_secret() {
    let before = now();
    let (received, stderr) = deliver_two("signature", WHSEC);
    for r in &received {
        assert_eq!(r.header("x-paheko-secret"), None, "the secret travelled");
        assert!(
            !r.headers.iter().any(|(_, v)| v.contains(WHSEC)),
            "{:?}",
            r.headers
        );
        assert_eq!(r.header("webhook-id"), r.idempotency_key());
        let ts: u64 = r.header("webhook-timestamp").unwrap().parse().unwrap();
        assert!(
            (before..=now()).contains(&ts),
            "timestamp {ts} not in [{before}, {}]",
            now()
        );
        assert!(
            r.header("webhook-signature").unwrap().starts_with("v1,"),
            "{:?}",
            r.header("webhook-signature")
        );
        assert!(rust_verifies(WHSEC_KEY, r, &r.body), "{:?}", r.headers);
        // The key is the decoded secret, not the secret's text.
        assert!(!rust_verifies(WHSEC.as_bytes(), r, &r.body));
        let mut tampered = r.body.clone();
        tampered[1] ^= 0x01;
        assert!(!rust_verifies(WHSEC_KEY, r, &tampered));
    }
    assert!(!stderr.contains(WHSEC), "the secret is in the log");

    let Some(php) = Php::find() else { return };
    for r in &received {
        assert_eq!(php.verify(WHSEC, r, &r.body, None), "valid", "{r:?}");
        let mut tampered = r.body.clone();
        tampered.push(b' ');
        assert_eq!(php.verify(WHSEC, r, &tampered, None), "invalid");
        assert_eq!(
            php.verify("whsec_b3RoZXIga2V5", r, &r.body, None),
            "invalid"
        );
        let ts: u64 = r.header("webhook-timestamp").unwrap().parse().unwrap();
        assert_eq!(
            php.verify(WHSEC, r, &r.body, Some(ts + 299)),
            "valid",
            "within 5 minutes"
        );
        assert_eq!(
            php.verify(WHSEC, r, &r.body, Some(ts + 301)),
            "invalid",
            "a replay"
        );
        assert_eq!(
            php.verify(WHSEC, r, &r.body, Some(ts - 301)),
            "invalid",
            "a clock ahead"
        );
    }
}

#[test]
fn both_mode_sends_the_header_and_a_signature_keyed_by_a_plain_secret() {
    let (received, _) = deliver_two("both", SECRET);
    for r in &received {
        assert_eq!(r.header("x-paheko-secret"), Some(SECRET));
        assert!(rust_verifies(SECRET.as_bytes(), r, &r.body), "{r:?}");
    }
    let Some(php) = Php::find() else { return };
    for r in &received {
        assert_eq!(php.verify(SECRET, r, &r.body, None), "valid", "{r:?}");
        assert_eq!(
            php.verify(SECRET, r, b"{\"sale_id\":\"forged\"}", None),
            "invalid"
        );
    }
}

#[test]
fn header_mode_is_the_default_and_signs_nothing() {
    let (received, _) = deliver_two("", SECRET);
    for r in &received {
        assert_eq!(r.header("x-paheko-secret"), Some(SECRET));
        for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            assert_eq!(r.header(name), None, "{name}");
        }
    }
}

#[test]
fn a_whsec_secret_that_is_not_base64_stops_the_worker_without_showing_it() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let bad = "whsec_Not*Base64*Secret";
    let finished = Worker::run_to_end(
        &[],
        env_with(
            base_env(&redis, &sink),
            [
                ("PAHEKO_PUSH_AUTH", "signature"),
                ("PAHEKO_PLUGIN_SECRET", bad),
            ],
        ),
    );
    assert_eq!(finished.code(), Some(2), "{finished:?}");
    assert!(
        finished.stderr.contains("PAHEKO_PLUGIN_SECRET") && finished.stderr.contains("base64"),
        "{finished:?}"
    );
    assert!(!finished.stderr.contains("Not*Base64"), "{finished:?}");
    assert_eq!(sink.count(), 0);
}

/// php-cli running the verification function of docs/plugin-contract.md.
struct Php {
    dir: tempfile::TempDir,
}

impl Php {
    /// The PHP runner, or `None` (with a loud message) when php is not installed and CI
    /// is not set; under CI a missing php fails the test, since scripts/test installs it
    /// (see `have_tool`).
    fn find() -> Option<Php> {
        if !have_tool(
            "php",
            "the PHP snippet of docs/plugin-contract.md",
            "ensure_php",
        ) {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("paheko-php-")
            .tempdir()
            .unwrap();
        std::fs::write(dir.path().join("verify.php"), snippet()).unwrap();
        std::fs::write(
            dir.path().join("run.php"),
            r#"<?php
require __DIR__ . '/verify.php';
$h = json_decode(file_get_contents($argv[1]), true);
$body = file_get_contents($argv[2]);
$now = $argv[3] === '' ? null : (int) $argv[3];
echo paheko_push_verify(getenv('SECRET'), $h['webhook-id'] ?? null,
    $h['webhook-timestamp'] ?? null, $h['webhook-signature'] ?? null, $body, $now)
    ? 'valid' : 'invalid';
"#,
        )
        .unwrap();
        Some(Php { dir })
    }

    /// "valid" or "invalid", as the documented function says of `r`'s headers with
    /// `body`, at `now` (the real time when `None`).
    fn verify(&self, secret: &str, r: &Received, body: &[u8], now: Option<u64>) -> String {
        let dir = self.dir.path();
        let headers: serde_json::Map<String, serde_json::Value> = r
            .headers
            .iter()
            .map(|(n, v)| (n.clone(), v.clone().into()))
            .collect();
        std::fs::write(
            dir.join("headers.json"),
            serde_json::Value::Object(headers).to_string(),
        )
        .unwrap();
        std::fs::write(dir.join("body"), body).unwrap();
        let out = Command::new("php")
            .arg(dir.join("run.php"))
            .arg(dir.join("headers.json"))
            .arg(dir.join("body"))
            .arg(now.map(|n| n.to_string()).unwrap_or_default())
            .env_clear()
            .env("SECRET", secret)
            .output()
            .expect("running php");
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "php failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// The PHP between the markers of docs/plugin-contract.md, without the code fence.
pub(crate) fn snippet() -> String {
    let doc = std::fs::read_to_string(Path::new(CONTRACT)).expect("reading the contract");
    let start = doc.find(BEGIN).expect("begin marker") + BEGIN.len();
    let end = doc[start..].find(END).expect("end marker") + start;
    let block = doc[start..end].trim();
    let code = block
        .strip_prefix("```php")
        .and_then(|b| b.strip_suffix("```"))
        .expect("a ```php block between the markers");
    assert!(code.contains("hash_hmac") && code.contains("hash_equals"));
    code.trim_start().to_string()
}
