//! /health in each state and the logs (issue 2 §6): JSON lines with the fields an
//! operator filters on, and the secret absent at every level, the libraries' included.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::util::*;

const T: Duration = Duration::from_secs(20);

#[test]
fn health_follows_paheko_and_redis() {
    let mut redis = RedisServer::start();
    let refusing = Arc::new(AtomicBool::new(false));
    let sink = Sink::down_while(&refusing);
    let mut conn = redis.conn();
    let worker = Worker::spawn(base_env(&redis, &sink));

    // Right after the start it may still say `starting` (see the next test).
    let (code, h) = wait_for("/health past starting", T, || {
        let (code, h) = worker.health();
        (h["status"] != "starting").then_some((code, h))
    });
    assert_eq!(
        (code, h["status"].as_str(), h["push_worker"].as_str()),
        (200, Some("ok"), Some("ok"))
    );
    assert!(h["last_success_at"].is_null());
    publish_ticket(&mut conn, "cs-1", "sale-1");
    let h = wait_for("a delivery shows", T, || {
        let (_, h) = worker.health();
        (h["delivered"] == 1).then_some(h)
    });
    assert!(h["last_success_at"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(h["consecutive_failures"], 0);
    for key in [
        "status",
        "redis",
        "push_worker",
        "last_success_at",
        "pending",
        "consecutive_failures",
    ] {
        assert!(h.get(key).is_some(), "/health lacks {key}: {h}");
    }

    // Paheko failing everything shows within seconds.
    refusing.store(true, Ordering::SeqCst);
    for n in 0..3 {
        publish_ticket(&mut conn, &format!("cs-{n}"), "sale-x");
    }
    let (code, h) = wait_for("push_worker error", T, || {
        let (code, h) = worker.health();
        (h["push_worker"] == "error").then_some((code, h))
    });
    assert_eq!(code, 200);
    assert_eq!(h["status"], "degraded");
    assert!(h["consecutive_failures"].as_u64().unwrap() >= 3, "{h}");
    wait_until("pending shows the stuck events", T, || {
        worker.health().1["pending"] == 3
    });

    // Redis gone: 503 and redis error.
    redis.kill();
    let (code, h) = wait_for("redis error", T, || {
        let (code, h) = worker.health();
        (h["redis"] == "error").then_some((code, h))
    });
    assert_eq!((code, h["status"].as_str()), (503, Some("error")));
    assert_eq!(worker.get("/nope").0, 404);
}

/// Before the worker has heard from Redis, /health says `starting` (503: not healthy
/// yet), not `error`: a probe polling at start must not see an outage nobody has seen.
/// The "Redis" here accepts connections and never answers, so the first attempt lasts
/// the connection timeout (5 s); once it fails, /health says `error`.
#[test]
fn health_says_starting_until_redis_was_tried() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let held = Arc::clone(&held);
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                held.lock().unwrap().push(conn);
            }
        });
    }
    let sink = Sink::ok();
    let env = env_with(
        base_env(&RedisServer::start(), &sink),
        [("REDIS_URL", format!("redis+unix://{}", socket.display()))],
    );
    let worker = Worker::spawn(env);
    wait_until("the worker connected to the silent Redis", T, || {
        !held.lock().unwrap().is_empty()
    });
    let (code, h) = worker.health();
    assert_eq!(
        (
            code,
            h["status"].as_str(),
            h["redis"].as_str(),
            h["role"].as_str()
        ),
        (503, Some("starting"), Some("starting"), Some("starting")),
        "{h}"
    );
    let (_, metrics) = worker.get("/metrics");
    assert!(metrics.contains("\npaheko_push_healthy 0\n"), "{metrics}");
    let (code, h) = wait_for("/health past starting", T, || {
        let (code, h) = worker.health();
        (h["status"] != "starting").then_some((code, h))
    });
    assert_eq!(
        (code, h["status"].as_str(), h["redis"].as_str()),
        (503, Some("error"), Some("error")),
        "{h}"
    );
    let records = worker.log_lines();
    let failed = worker.wait_for_msg("redis read failed: reconnecting", T);
    eprintln!(
        "starting lasted {:?}: {}",
        log_gap(&records[0], &failed),
        failed["error"]
    );
}

#[test]
fn logs_are_json_lines_with_event_fields_and_never_the_secret_even_at_trace() {
    // Secrets of their own, chosen so that no piece of them turns up in a log by chance
    // (see `is_distinctive`): the search below looks for every piece and its hex.
    let plugin_secret = "kZ7vJm9WoR3nLq2YjN8xMz";
    let redis_password = "Rk7ZmQ2oLw9J";
    assert!(is_distinctive(plugin_secret) && is_distinctive(redis_password));
    let redis = RedisServer::start_with(&["--requirepass", redis_password]);
    let sink = Sink::start(|r| match (sale_of(r).as_str(), r.attempt) {
        ("sale-retry", 1) => Reply::status(503),
        // A plugin echoing what it got: the secret must not reach logs or dead letters.
        ("sale-refused", _) => Reply::status(400).with_body(format!(
            "bad secret {}",
            r.header("x-paheko-secret").unwrap_or("")
        )),
        _ => Reply::status(204),
    });
    let mut conn = redis.conn();
    let env = env_with(
        base_env(&redis, &sink),
        [
            (
                "REDIS_URL",
                redis.url_with_password(Some(redis_password)).as_str(),
            ),
            ("PAHEKO_PLUGIN_SECRET", plugin_secret),
            ("PAHEKO_PUSH_LOG", "trace"),
        ],
    );
    let worker = Worker::spawn(env);
    let ok = publish_ticket(&mut conn, "cs-1", "sale-ok");
    publish_ticket(&mut conn, "cs-2", "sale-retry");
    publish_ticket(&mut conn, "cs-3", "sale-refused");
    wait_until("all settled", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0 && sink.count() >= 4
    });
    worker.wait_for_msg("moved to the dead letters", T);
    assert_eq!(worker.health().1["dead_lettered"], 1);
    assert!(
        sink.received()
            .iter()
            .all(|r| r.header("x-paheko-secret") == Some(plugin_secret)),
        "the secret did travel, so the logs had a chance to show it"
    );

    let stderr = worker.stderr();
    let leaked = leaks(&stderr, plugin_secret);
    assert!(
        leaked.is_empty(),
        "the plugin secret leaked into the logs: {leaked:?}"
    );
    let leaked = leaks(&stderr, redis_password);
    assert!(
        leaked.is_empty(),
        "the Redis password leaked into the logs: {leaked:?}"
    );
    let dead: String = stream_entries(&mut conn, DEAD)
        .iter()
        .flat_map(|(_, fields)| {
            fields
                .iter()
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        })
        .collect();
    let leaked = leaks(&dead, plugin_secret);
    assert!(
        leaked.is_empty(),
        "the secret leaked into a dead letter: {leaked:?}"
    );
    assert!(dead.contains("bad secret [redacted]"), "{dead}");
    let lines = worker.log_lines();
    assert_eq!(
        lines.len(),
        stderr.lines().count(),
        "every line is one JSON object"
    );
    let library = |l: &serde_json::Value| {
        l["target"]
            .as_str()
            .is_some_and(|t| !t.starts_with("paheko_push"))
    };
    assert!(
        lines
            .iter()
            .any(|l| l["target"].as_str().is_some_and(|t| t.starts_with("ureq"))),
        "the HTTP library's records are there too"
    );
    // No library's record below debug: that is where wire dumps are (ureq-proto's hex
    // dump of each request, rustls's handshake messages).
    let traced: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| library(l) && l["level"] == "trace")
        .take(3)
        .collect();
    assert!(traced.is_empty(), "library records at trace: {traced:?}");
    let delivered = lines
        .iter()
        .find(|l| l["msg"] == "delivered" && l["correlation_id"] == ok.as_str())
        .expect("a delivered line");
    assert_eq!(delivered["event"], "pos.ticket.created");
    assert_eq!(delivered["attempt"], 1);
    assert_eq!(delivered["status"], 204);
    assert!(delivered["duration_ms"].is_u64());
    assert!(delivered["ts"].as_str().unwrap().ends_with('Z'));
    assert_eq!(delivered["level"], "info");
}
