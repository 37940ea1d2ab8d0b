//! GET /metrics in Prometheus' text format, and the /health fields added with it
//! (issue 4 §3): parsed as a scraper would, checked against what really happened.

use std::collections::HashMap;
use std::time::Duration;

use super::util::*;

const T: Duration = Duration::from_secs(20);

/// Parses the text exposition: every sample line is `name{labels} value`, every family
/// declared by `# TYPE` before its samples.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut declared = Vec::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            declared.push(parts.next().unwrap().to_owned());
            assert!(
                matches!(parts.next(), Some("counter" | "gauge" | "histogram")),
                "{line}"
            );
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line}"));
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
        assert!(
            declared.iter().any(|d| d == family || d == name),
            "{name} sampled before its # TYPE"
        );
        let value: f64 = value.parse().unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(
            samples.insert(series.to_owned(), value).is_none(),
            "{series} twice"
        );
    }
    samples
}

#[test]
fn metrics_count_what_happened() {
    let redis = RedisServer::start();
    let sink = Sink::start(|r| match (sale_of(r).as_str(), r.attempt) {
        ("retry", 1) => Reply::status(503),
        ("refused", _) => Reply::status(422),
        _ => Reply::status(204),
    });
    let mut conn = redis.conn();
    for sale in ["ok-1", "ok-2", "retry", "refused"] {
        publish_ticket(&mut conn, &format!("cs-{sale}"), sale);
    }
    xadd(
        &mut conn,
        STREAM,
        &[("event", "pos.ticket.created"), ("payload", "{broken")],
    );
    let worker = Worker::spawn(base_env(&redis, &sink));
    wait_until("all settled", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0 && sink.count() >= 5
    });

    let m = wait_for("the dead letters counted", T, || {
        let (code, text) = worker.get("/metrics");
        assert_eq!(code, 200);
        let m = parse(&text);
        (m["paheko_push_dead_letters"] == 2.0).then_some(m)
    });
    assert_eq!(m["paheko_push_events_total{outcome=\"acked\"}"], 3.0);
    assert_eq!(m["paheko_push_events_total{outcome=\"retried\"}"], 1.0);
    assert_eq!(
        m["paheko_push_events_total{outcome=\"dead_lettered\"}"],
        2.0
    );
    assert_eq!(m["paheko_push_events_total{outcome=\"invalid\"}"], 1.0);
    assert_eq!(
        m["paheko_push_request_duration_seconds_count"], 5.0,
        "five requests were made"
    );
    assert_eq!(
        m["paheko_push_request_duration_seconds_bucket{le=\"+Inf\"}"],
        5.0
    );
    assert!(m["paheko_push_request_duration_seconds_sum"] > 0.0);
    assert_eq!(m["paheko_push_redis_up"], 1.0);
    assert_eq!(m["paheko_push_paheko_up"], 1.0);
    assert_eq!(m["paheko_push_breaker_open"], 0.0);
    assert_eq!(m["paheko_push_pending"], 0.0);
    assert_eq!(m["paheko_push_backlog"], 0.0);
    assert!(m["paheko_push_last_success_timestamp_seconds"] > 1.7e9);
    assert_eq!(
        m[&format!(
            "paheko_push_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )],
        1.0
    );
    let (_, text) = worker.get("/metrics");
    assert!(!text.contains(SECRET));

    let h = worker.health().1;
    assert_eq!(h["dead_letters"], 2);
    assert_eq!(h["lag"], 0);
    assert_eq!(h["oldest_pending_age_seconds"], 0);
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn backlog_and_oldest_pending_age_show_a_stuck_queue() {
    let redis = RedisServer::start();
    let sink = Sink::start(|_| Reply::status(503));
    let mut conn = redis.conn();
    // An entry written two minutes ago (its ID carries the time), and a backlog.
    let two_minutes_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        - 120_000;
    let _: String = redis::cmd("XADD")
        .arg(STREAM)
        .arg(format!("{two_minutes_ago}-0"))
        .arg("event")
        .arg("pos.ticket.created")
        .arg("payload")
        .arg(ticket("cs-old", "old"))
        .query(&mut conn)
        .unwrap();
    for n in 0..3000 {
        publish_ticket(&mut conn, "cs-old", &format!("s-{n}"));
    }
    let worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [("PAHEKO_PUSH_LOG", "info")],
    ));
    let m = wait_for("the stuck queue shows", T, || {
        let m = parse(&worker.get("/metrics").1);
        (m["paheko_push_oldest_pending_age_seconds"] >= 119.0).then_some(m)
    });
    assert!(m["paheko_push_oldest_pending_age_seconds"] < 200.0);
    // Everything is one session behind a failing head: all of it pending or unread, and
    // only the head held in memory (the rest of the session is left in Redis, so other
    // sessions could be read: issue 13, 6).
    assert!(
        m["paheko_push_pending"] + m["paheko_push_backlog"] >= 3001.0,
        "{m:?}"
    );
    assert!(m["paheko_push_held"] <= 512.0, "{m:?}");
    let h = worker.health().1;
    assert!(h["oldest_pending_age_seconds"].as_u64().unwrap() >= 119);
}
