//! Test harness for the `paheko-push` integration tests.
//!
//! Every test gets its own real collaborators, so tests can run in parallel and never
//! touch anything shared:
//!
//! * [`RedisServer`]: a private `redis-server` listening only on a unix socket inside
//!   the test's own temp dir (no TCP port, so no port races and never the shared Redis
//!   on 6379);
//! * [`Sink`]: a real HTTP server standing in for the Paheko plugin, recording every
//!   request and answering what the test scripts;
//! * [`Worker`]: the real `paheko-push` binary, run with a scrubbed environment in an
//!   empty working directory, its output captured to files.
//!
//! Synchronisation is always "poll for the condition with a deadline" ([`wait_until`],
//! [`wait_for`]); nothing here sleeps a fixed time hoping something has happened.
//! When a test panics, dropping a [`Worker`] prints what the child wrote on stderr, and
//! dropping a [`RedisServer`] prints the tail of its log, so a failure explains itself.
//!
//! This module must not depend on the library crate: it drives the program from the
//! outside, exactly as an operator would.

// Not every helper is used by every test (or by any test yet).
#![allow(dead_code)]

mod lanes;
mod paheko;
mod redis_server;
mod sink;
mod worker;

use std::thread;
use std::time::{Duration, Instant};

// Re-exported whole; the tests use different subsets.
#[allow(unused_imports)]
pub use lanes::{
    OrderReport, all_read, assert_one_in_flight_per_lane, assert_order_by_answers,
    dead_lettered_ids, session_of, settle, settle_when,
};
#[allow(unused_imports)]
pub use paheko::{Entry, EntryLine, Paheko, PahekoOptions, euros_to_cents, quote, skip_paheko};
#[allow(unused_imports)]
pub use redis_server::{
    REDIS62_VAR, RedisServer, SERVER_VAR, group_info, group_lag, pending_count, pending_ids,
    redis62_binary, server_binary, server_major, stream_entries, xadd, xadd_bytes, xlen,
};
#[allow(unused_imports)]
pub use sink::{Received, Reply, Sink};
#[allow(unused_imports)]
pub use worker::{Finished, Worker, log_gap, log_time};

/// The plugin secret every test worker is configured with (see [`base_env`]); tests
/// assert that it is sent, and that it never shows up in logs.
pub const SECRET: &str = "s3cr3t-Paheko-Token-xyz";

/// How often [`wait_until`] and [`wait_for`] re-check their condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `cond` every [`POLL_INTERVAL`] until it returns true.
///
/// Panics with `timed out after {timeout:?}: {what}` if it is still false once `timeout`
/// has elapsed, so `what` should read as the expectation, e.g. "3 requests at the sink".
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    wait_for(what, timeout, || cond().then_some(()))
}

/// Polls `probe` every [`POLL_INTERVAL`] until it returns `Some`, and returns that value.
///
/// Panics like [`wait_until`] on timeout. The probe is always called at least once, and
/// once more after the deadline, so a slow machine never fails a condition that holds.
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?}: {what}");
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// One environment variable given to a child process.
///
/// Implemented for `(K, V)` with `K, V: AsRef<str>` and for references to such pairs, so
/// spawn functions accept `base_env(..)`, `&base_env(..)`, `[("K", "v")]` and
/// `&[("K", "v")]` alike.
pub trait EnvPair {
    fn pair(&self) -> (&str, &str);
}

impl<K: AsRef<str>, V: AsRef<str>> EnvPair for (K, V) {
    fn pair(&self) -> (&str, &str) {
        (self.0.as_ref(), self.1.as_ref())
    }
}

impl<T: EnvPair + ?Sized> EnvPair for &T {
    fn pair(&self) -> (&str, &str) {
        (**self).pair()
    }
}

/// The environment of a worker that works: it reads `redis`, pushes to `sink`, logs
/// JSON at debug level on stderr, serves health on an ephemeral port and retries fast.
///
/// Extend or override it with [`env_with`] (later entries win), or drop variables with
/// [`env_without`] to test configuration errors.
pub fn base_env(redis: &RedisServer, sink: &Sink) -> Vec<(String, String)> {
    [
        ("REDIS_URL", redis.url()),
        ("PAHEKO_PLUGIN_URL", sink.url()),
        ("PAHEKO_PLUGIN_SECRET", SECRET.to_owned()),
        ("PAHEKO_PUSH_ALLOW_HTTP", "true".to_owned()),
        ("PAHEKO_PUSH_HEALTH_ADDR", "127.0.0.1:0".to_owned()),
        ("PAHEKO_PUSH_CONSUMER", "test-worker".to_owned()),
        ("PAHEKO_PUSH_LOG", "debug".to_owned()),
        ("PAHEKO_PUSH_LOG_FORMAT", "json".to_owned()),
        ("PAHEKO_PUSH_BACKOFF_SECONDS", "0.05".to_owned()),
        ("PAHEKO_PUSH_CLAIM_IDLE_SECONDS", "5".to_owned()),
        ("PAHEKO_PUSH_TIMEOUT_SECONDS", "2".to_owned()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect()
}

/// `base` with `overrides` applied: a variable already in `base` takes the new value in
/// place, a new one is appended.
pub fn env_with(
    base: Vec<(String, String)>,
    overrides: impl IntoIterator<Item = impl EnvPair>,
) -> Vec<(String, String)> {
    let mut env = base;
    for pair in overrides {
        let (name, value) = pair.pair();
        match env.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value.to_owned(),
            None => env.push((name.to_owned(), value.to_owned())),
        }
    }
    env
}

/// `base` without the variables named in `names`.
///
/// Careful: the worker has defaults for some variables, and the default `REDIS_URL` is
/// `redis://127.0.0.1:6379`, the machine's shared Redis, which tests must never touch;
/// the default health address is a fixed port too. Drop those only in tests that exit
/// before connecting (e.g. on another configuration error).
pub fn env_without(base: Vec<(String, String)>, names: &[&str]) -> Vec<(String, String)> {
    let mut env = base;
    env.retain(|(name, _)| !names.contains(&name.as_str()));
    env
}

/// Sends `signal` (a name `kill` understands: "TERM", "INT", "KILL", …) to `pid`.
///
/// Goes through `kill(1)` so the harness needs no `libc`; the child must not have been
/// reaped yet, or the pid could belong to someone else (callers check `try_wait` first).
fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap_or_else(|e| panic!("running kill -{signal} {pid}: {e}"));
    assert!(status.success(), "kill -{signal} {pid} failed: {status}");
}

/// The last `n` lines of `text`, for failure dumps.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("[… {start} earlier lines]\n"));
    }
    for line in &lines[start..] {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The stream, group and dead-letter stream the worker uses by default.
pub const STREAM: &str = "recyclic:push:caisse";
pub const GROUP: &str = "recyclic-push";
pub const DEAD: &str = "recyclic:push:caisse:dead";

/// A `pos.ticket.created` payload as RecyClique writes it.
pub fn ticket(session: &str, sale: &str) -> String {
    format!(
        r#"{{"event":"pos.ticket.created","sale_id":"{sale}","cash_session_id":"{session}","operator_id":"op-1","items":[{{"category":"Livres","quantity":2,"weight":1.2,"unit_price":150,"total_price":300}}],"payments":[{{"method":"cash","amount":300}}],"total_amount":300}}"#
    )
}

/// Publishes a ticket the way the producer does; returns the entry ID.
pub fn publish_ticket(conn: &mut redis::Connection, session: &str, sale: &str) -> String {
    xadd(
        conn,
        STREAM,
        &[
            ("event", "pos.ticket.created"),
            ("payload", &ticket(session, sale)),
        ],
    )
}

/// The `sale_id` or `session_id` a received body names, for order checks.
pub fn sale_of(r: &Received) -> String {
    let body = r.json();
    body["sale_id"]
        .as_str()
        .or(body["session_id"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Has `consumer` read every entry now in the stream (creating the group at 0 if
/// needed), leaving them pending, as a crashed instance would have.
pub fn read_as(conn: &mut redis::Connection, consumer: &str) {
    let _ = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg(GROUP)
        .arg("0")
        .query::<redis::Value>(conn);
    redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(consumer)
        .arg("STREAMS")
        .arg(STREAM)
        .arg(">")
        .query::<redis::Value>(conn)
        .unwrap_or_else(|e| panic!("XREADGROUP as {consumer}: {e}"));
}

/// Every trace of `secret` in `text`: the secret whole, any piece of 4 characters or
/// more, and the hex of any piece of 4 bytes or more, with or without spaces and in
/// either case (a wire dump prints 16 bytes a line as `7833 6372 …` plus their ASCII,
/// so a secret comes out in pieces that a search for the whole misses). Empty when
/// nothing leaked. Each 4-character or 4-byte window is enough: a longer piece contains
/// one.
pub fn leaks(text: &str, secret: &str) -> Vec<String> {
    let bytes = secret.as_bytes();
    assert!(bytes.len() >= 4, "a secret of at least 4 bytes: {secret:?}");
    let squeezed: String = text
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    let mut found = Vec::new();
    for piece in bytes.windows(4) {
        let plain = String::from_utf8_lossy(piece);
        if text.contains(plain.as_ref()) {
            found.push(format!("piece {plain:?}"));
        }
        let hex: String = piece.iter().map(|b| format!("{b:02x}")).collect();
        if squeezed.contains(&hex) {
            found.push(format!("hex {hex} of {plain:?}"));
        }
    }
    found
}

/// Whether no 4-byte window of `secret` could turn up in a log by chance, as pieces or
/// as hex: each window holds an upper-case letter (so no lower-case word or number
/// matches it) and a byte whose hex has a letter (so no run of digits matches its hex).
/// The leak tests check their secrets with it, so that [`leaks`] cannot fire on noise.
pub fn is_distinctive(secret: &str) -> bool {
    secret.as_bytes().windows(4).all(|w| {
        w.iter().any(u8::is_ascii_uppercase)
            && w.iter()
                .any(|b| format!("{b:02x}").bytes().any(|h| h.is_ascii_alphabetic()))
    })
}

/// Whether CI is running the tests (`CI` set, and not empty, `0` or `false`), as on the
/// project's CI (`.ci/run` exports `CI=true`), where `scripts/test` installs every tool a
/// test needs. The one place that decides it (issue 15 §11).
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// Where [`skip`] lists the checks that did not run, one line each, for `scripts/test`
/// to count in its summary (it empties the file first).
pub const SKIPPED_LIST: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/skipped");

/// Says that a check did not run, loudly, and records it in [`SKIPPED_LIST`]; under CI
/// ([`under_ci`]) it fails the test instead, with the reason: skipped means failed
/// there. A test that skips returns early and libtest reports it "ok", so the SKIPPED
/// line on stderr (not captured) and the list are what tell.
pub fn skip(what: &str) {
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    assert!(
        !under_ci(),
        "under CI nothing may be skipped ({test}): {what}"
    );
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!!!!! SKIPPED {test}: {what} !!!!!!!!\n"
    );
    if let Ok(mut list) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(SKIPPED_LIST)
    {
        let _ = writeln!(list, "{test}: {what}");
    }
}

/// Whether `tool` runs (`tool --version` succeeds). When it does not, the test skips
/// the part that needs it ([`skip`]: loud, counted, a failure under CI, where
/// `scripts/test` installs the tool with `install`, a `scripts/lib.sh` function).
pub fn have_tool(tool: &str, skipped: &str, install: &str) -> bool {
    let runs = std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !runs {
        skip(&format!(
            "{tool} is not installed, so NOT checked: {skipped} (scripts/test installs it: \
             {install} in scripts/lib.sh)"
        ));
    }
    runs
}

/// The absolute path of `command` on PATH (children here get no PATH of their own).
pub fn which(command: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([
            std::path::PathBuf::from("/usr/sbin"),
            std::path::PathBuf::from("/sbin"),
        ])
        .map(|dir| dir.join(command))
        .find(|p| p.is_file())
}

/// `command`'s path, or `None` after [`skip`] (scripts/test installs it from `package`).
pub fn need(command: &str, package: &str) -> Option<std::path::PathBuf> {
    let found = which(command);
    if found.is_none() {
        skip(&format!(
            "{command} is not installed (scripts/test installs the {package} package)"
        ));
    }
    found
}
