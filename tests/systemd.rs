//! systemd and operations (issue 4 §4): the notifications the worker sends over a
//! `$NOTIFY_SOCKET` of the test's own (READY=1 only once Redis answers and the group
//! exists, WATCHDOG=1 while `WATCHDOG_USEC` is set, STOPPING=1 on SIGTERM), the
//! hardening of scripts/paheko-push.service as `systemd-analyze security` rates it,
//! and `paheko-push check`.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::util::*;
use crate::tls_sink::{TestPki, TlsSink};

const T: Duration = Duration::from_secs(20);
const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/paheko-push.service");

/// A datagram socket standing in for systemd's: records every message with the time it
/// arrived.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    messages: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::Builder::new()
            .prefix("paheko-notify-")
            .tempdir_in("/tmp")
            .unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("binding the notify socket");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&messages);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends when the test process does; the socket file goes with the temp dir.
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().unwrap().push((Instant::now(), text));
            }
        });
        NotifySocket {
            _dir: dir,
            path,
            messages,
        }
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }

    fn messages(&self) -> Vec<String> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .map(|(_, m)| m.clone())
            .collect()
    }

    fn count(&self, message: &str) -> usize {
        self.messages().iter().filter(|m| *m == message).count()
    }
}

fn group_exists(conn: &mut redis::Connection) -> bool {
    let groups: Result<Vec<redis::Value>, _> =
        redis::cmd("XINFO").arg("GROUPS").arg(STREAM).query(conn);
    groups.is_ok_and(|g| !g.is_empty())
}

#[test]
fn ready_only_once_redis_answers_then_watchdog_then_stopping() {
    let notify = NotifySocket::bind();
    let mut redis = RedisServer::start();
    let sink = Sink::ok();
    redis.stop();
    let mut worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [
            ("NOTIFY_SOCKET", notify.path()),
            ("WATCHDOG_USEC", "2000000"),
        ],
    ));

    // Redis is down: the worker runs, pings the watchdog, but is not ready.
    worker.wait_for_msg("redis read failed: reconnecting", T);
    wait_until("a watchdog ping while Redis is down", T, || {
        notify.count("WATCHDOG=1") >= 1
    });
    assert_eq!(notify.count("READY=1"), 0, "{:?}", notify.messages());

    redis.restart();
    wait_until("READY=1", T, || notify.count("READY=1") == 1);
    let mut conn = redis.conn();
    assert!(group_exists(&mut conn), "READY=1 before the group existed");

    // The reader keeps pinging; at most once per half interval (1 s).
    let pings = notify.count("WATCHDOG=1");
    wait_until("two more watchdog pings", T, || {
        notify.count("WATCHDOG=1") >= pings + 2
    });
    let times: Vec<Instant> = notify
        .messages
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect();
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= Duration::from_millis(900), "pings {gap:?} apart");
    }

    worker.sigterm();
    assert!(worker.wait_exit(T).success());
    wait_until("STOPPING=1", T, || notify.count("STOPPING=1") == 1);
    let messages = notify.messages();
    assert_eq!(
        messages.last().map(String::as_str),
        Some("STOPPING=1"),
        "{messages:?}"
    );
    assert_eq!(notify.count("READY=1"), 1, "{messages:?}");
}

#[test]
fn without_watchdog_usec_there_is_no_watchdog_ping() {
    let notify = NotifySocket::bind();
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "cs-1", "sale-1");
    let worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [("NOTIFY_SOCKET", notify.path())],
    ));
    wait_until("READY=1", T, || notify.count("READY=1") == 1);
    // A delivery means the reader went round its loop a few times meanwhile.
    sink.wait_for_count(1, T);
    wait_until("acknowledged", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
    worker.sigterm();
    wait_until("STOPPING=1", T, || notify.count("STOPPING=1") == 1);
    assert_eq!(notify.count("WATCHDOG=1"), 0, "{:?}", notify.messages());
}

#[test]
fn the_unit_file_is_rated_2_or_lower_by_systemd_analyze() {
    let unit = std::fs::read_to_string(UNIT).expect("reading the unit file");
    for directive in [
        "Type=notify",
        "WatchdogSec=",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
        "MemoryDenyWriteExecute=yes",
        "LoadCredential=paheko-secret:/etc/paheko-push/secret",
        "Environment=PAHEKO_PLUGIN_SECRET_FILE=%d/paheko-secret",
        "EnvironmentFile=-/etc/paheko-push/paheko-push.env",
        "Restart=always",
    ] {
        assert!(
            unit.lines().any(|l| l.starts_with(directive)),
            "{directive} missing"
        );
    }
    if !have_tool(
        "systemd-analyze",
        "the unit's verification and its security rating",
        "ensure_systemd_analyze",
    ) {
        return;
    }
    // `verify` warns about unknown or misspelt directives, and still exits 0: any output
    // is a defect. It also wants ExecStart's binary to exist.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("paheko-push.service");
    std::fs::write(
        &copy,
        unit.replace(
            "ExecStart=/usr/local/bin/paheko-push",
            &format!("ExecStart={}", env!("CARGO_BIN_EXE_paheko-push")),
        ),
    )
    .unwrap();
    let verified = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        verified.status.success() && verified.stdout.is_empty() && verified.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager", UNIT])
        .output()
        .expect("running systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let score = text
        .lines()
        .find_map(|l| {
            let rest = l
                .split("Overall exposure level for paheko-push.service:")
                .nth(1)?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in the output ({}):\n{text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{text}");
}

/// `paheko-push check` with `env`.
fn check(env: Vec<(String, String)>) -> Finished {
    Worker::run_to_end(&["check"], env)
}

/// The line of `check`'s output about `what`.
fn check_line<'a>(finished: &'a Finished, what: &str) -> &'a str {
    finished
        .stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(what))
        .unwrap_or_else(|| panic!("no {what} line:\n{finished:?}"))
}

#[test]
fn check_reports_redis_the_group_and_a_valid_certificate() {
    let pki = TestPki::generate();
    let plugin = TlsSink::start(&pki);
    let redis = RedisServer::start_with(&["--requirepass", "Check-Redis-Pa55"]);
    let mut conn = redis.conn();
    for sale in ["sale-1", "sale-2", "sale-3"] {
        publish_ticket(&mut conn, "cs-1", sale);
    }
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg(GROUP)
        .arg("0")
        .query(&mut conn)
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("elsewhere")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(STREAM)
        .arg(">")
        .query(&mut conn)
        .unwrap();
    let sink = Sink::ok();
    let ca = pki.ca_pem();
    let finished = check(env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PLUGIN_URL", plugin.url_for("localhost").as_str()),
            ("PAHEKO_PUSH_ALLOW_HTTP", "false"),
            ("PAHEKO_PLUGIN_CA_FILE", ca.to_str().unwrap()),
        ],
    ));

    assert_eq!(finished.code(), Some(0), "{finished:?}");
    assert!(
        check_line(&finished, "redis").starts_with("ok"),
        "{finished:?}"
    );
    let stream = check_line(&finished, "stream");
    assert!(
        stream.starts_with("ok") && stream.contains("3 entries"),
        "{finished:?}"
    );
    let group = check_line(&finished, "group");
    assert!(
        group.starts_with("ok") && group.contains("backlog 2") && group.contains("1 pending"),
        "{finished:?}"
    );
    let line = check_line(&finished, "plugin");
    assert!(
        line.starts_with("ok") && line.contains("certificate valid for localhost"),
        "{finished:?}"
    );
    assert!(
        finished.stdout.contains("all checks passed"),
        "{finished:?}"
    );
    // The certificate check, then the ping (issue 14): one request, a ping.
    assert_eq!(plugin.handshakes(), 2, "two TLS connections");
    let posted = plugin.received();
    assert_eq!(posted.len(), 1, "check posted more than its ping");
    assert_eq!(posted[0].header("x-paheko-event"), Some("ping"));
    assert!(
        check_line(&finished, "ping").starts_with("ok"),
        "{finished:?}"
    );
    assert_eq!(sink.count(), 0);
    assert_eq!(
        pending_count(&mut conn, STREAM, GROUP),
        1,
        "check changed nothing"
    );
    let output = format!("{}{}", finished.stdout, finished.stderr);
    assert!(!output.contains("Check-Redis-Pa55") && !output.contains(SECRET));
}

#[test]
fn check_fails_when_redis_is_down() {
    let mut redis = RedisServer::start();
    let sink = Sink::ok();
    redis.stop();
    let finished = check(base_env(&redis, &sink));

    assert_eq!(finished.code(), Some(1), "{finished:?}");
    let line = check_line(&finished, "redis");
    assert!(
        line.starts_with("FAIL") && line.contains(&redis.url()),
        "{finished:?}"
    );
    assert!(
        check_line(&finished, "group").starts_with("skip"),
        "{finished:?}"
    );
    // The plugin (plain HTTP here) is still checked.
    assert!(
        check_line(&finished, "plugin").starts_with("ok"),
        "{finished:?}"
    );
    assert!(
        finished.stderr.contains("check failed: redis"),
        "{finished:?}"
    );
}

#[test]
fn check_fails_on_a_certificate_it_cannot_verify() {
    let pki = TestPki::generate();
    let plugin = TlsSink::start(&pki);
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let finished = check(env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PLUGIN_URL", plugin.url().as_str()),
            ("PAHEKO_PUSH_ALLOW_HTTP", "false"),
        ],
    ));

    assert_eq!(finished.code(), Some(1), "{finished:?}");
    let line = check_line(&finished, "plugin");
    assert!(
        line.starts_with("FAIL")
            && line.contains("not signed by a trusted authority")
            && line.contains("PAHEKO_PLUGIN_CA_FILE"),
        "{finished:?}"
    );
    assert!(
        check_line(&finished, "redis").starts_with("ok"),
        "{finished:?}"
    );
    // The stream does not exist yet: worth a warning, not a failure.
    assert!(
        check_line(&finished, "stream").starts_with("warn"),
        "{finished:?}"
    );
    assert!(
        finished.stderr.contains("check failed: plugin"),
        "{finished:?}"
    );
    assert!(plugin.received().is_empty());
}

/// The pings that arrived in the last `window`.
fn pings_within(notify: &NotifySocket, window: Duration) -> usize {
    let now = Instant::now();
    notify
        .messages
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, m)| m == "WATCHDOG=1" && now.duration_since(*t) < window)
        .count()
}

#[test]
fn a_slow_plugin_does_not_stop_the_watchdog() {
    let notify = NotifySocket::bind();
    let redis = RedisServer::start();
    // Each request takes longer than the watchdog interval, within the request timeout.
    let sink = Sink::start(|_| Reply::status(204).after(Duration::from_millis(3500)));
    let mut conn = redis.conn();
    for n in 0..3 {
        publish_ticket(&mut conn, "cs-1", &format!("sale-{n}"));
    }
    let worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [
            ("NOTIFY_SOCKET", notify.path()),
            ("WATCHDOG_USEC", "3000000"),
            ("PAHEKO_PUSH_TIMEOUT_SECONDS", "5"),
            ("PAHEKO_PUSH_CLAIM_IDLE_SECONDS", "6"),
        ],
    ));
    sink.wait_for_count(2, T);
    // The second request is under way: pings go on at least every 1.5 s.
    assert!(pings_within(&notify, Duration::from_secs(3)) >= 1);
    sink.wait_for_count(3, T);
    assert!(pings_within(&notify, Duration::from_secs(3)) >= 1);
    assert!(!worker.stderr().contains("is stuck"), "{}", worker.stderr());
}

#[test]
fn a_stuck_acker_stops_the_watchdog_pings() {
    let notify = NotifySocket::bind();
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "cs-1", "sale-1");
    let mut worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [
            ("NOTIFY_SOCKET", notify.path()),
            ("WATCHDOG_USEC", "2000000"),
            // A debug-build hook: the acker hangs once a ticket was accepted.
            ("__PAHEKO_PUSH_TEST_STALL_ACKER", "1"),
        ],
    ));
    sink.wait_for_count(1, T);
    let line = worker.wait_for_log("the stuck thread named", T, |l| {
        l["level"] == "error" && l["thread"] == "acker"
    });
    assert_eq!(
        line["msg"],
        "the acker thread is stuck: no more watchdog pings, systemd will restart the worker"
    );
    let before = notify.count("WATCHDOG=1");
    // Two whole ping periods (1 s each) and more: none while the acker is stuck, though
    // the reader goes on asking for them.
    thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        notify.count("WATCHDOG=1"),
        before,
        "{:?}",
        notify.messages()
    );
    worker.sigterm();
    assert!(worker.wait_exit(T).success());
}

/// A standby is ready too (issue 15 §13): READY=1 once Redis answers, although another
/// instance holds the lease, or systemd would count its start as failed (TimeoutStartSec)
/// and kill it. It stays a standby meanwhile.
#[test]
fn a_standby_says_ready() {
    let notify = NotifySocket::bind();
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let active = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [("PAHEKO_PUSH_CONSUMER", "box-a")],
    ));
    wait_until("box-a active", T, || active.health().1["role"] == "active");
    let standby = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_CONSUMER", "box-b"),
            ("NOTIFY_SOCKET", notify.path()),
        ],
    ));
    wait_until("READY=1 from the standby", T, || {
        notify.count("READY=1") == 1
    });
    assert_eq!(standby.health().1["role"], "standby");
    assert_eq!(active.health().1["role"], "active");
}
