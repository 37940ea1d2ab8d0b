//! Crash and stop (issue 2 §5): kill -9 loses nothing, SIGTERM finishes what is in
//! flight and exits 0, and a restart takes back its own pending entries first.

use std::collections::HashSet;
use std::time::Duration;

use super::util::*;

const T: Duration = Duration::from_secs(30);

#[test]
fn kill_9_at_any_moment_loses_nothing() {
    let redis = RedisServer::start();
    let sink = Sink::start(|_| Reply::status(204).after(Duration::from_millis(40)));
    let mut conn = redis.conn();
    let mut ids = Vec::new();
    for n in 0..60 {
        ids.push(publish_ticket(
            &mut conn,
            &format!("cs-{}", n % 5),
            &format!("sale-{n}"),
        ));
    }
    let env = env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_CONCURRENCY", "3"),
            ("PAHEKO_PUSH_LOG", "info"),
        ],
    );
    // Each kill waits for a moment with a request at the plugin, and counts it as a hit
    // when that entry is still pending afterwards: sent, not acknowledged.
    let mut hits = 0;
    for round in 1..=3 {
        let mut worker = Worker::spawn(&env);
        let target = round * 12;
        let in_flight = wait_for("some deliveries, and a request in flight", T, || {
            let in_flight = sink.in_progress();
            (sink.accepted().len() >= target && !in_flight.is_empty()).then_some(in_flight)
        });
        worker.kill9();
        let pending = pending_ids(&mut conn, STREAM, GROUP);
        if in_flight.iter().any(|r| {
            pending
                .iter()
                .any(|p| Some(p.as_str()) == r.idempotency_key())
        }) {
            hits += 1;
        }
    }
    assert!(hits > 0, "no kill hit a request in flight");
    let _last = Worker::spawn(&env);
    settle(&sink, &mut conn, T);
    let delivered: HashSet<String> = sink.accepted_keys().into_iter().collect();
    let missing: Vec<&String> = ids.iter().filter(|id| !delivered.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "never accepted by the plugin: {missing:?}"
    );
    assert_eq!(
        group_lag(&mut conn, STREAM, GROUP),
        Some(0),
        "every entry read by the group"
    );
}

#[test]
fn sigterm_finishes_the_requests_in_flight_acks_them_and_exits_0() {
    let redis = RedisServer::start();
    let sink = Sink::start(|_| Reply::status(204).after(Duration::from_millis(1500)));
    let mut conn = redis.conn();
    let ids: Vec<String> = (0..10)
        .map(|n| publish_ticket(&mut conn, &format!("cs-{n}"), "sale"))
        .collect();
    let env = env_with(base_env(&redis, &sink), [("PAHEKO_PUSH_CONCURRENCY", "2")]);
    let mut worker = Worker::spawn(&env);
    sink.wait_for_count(2, T);
    worker.sigterm();
    let status = worker.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", worker.stderr());
    let took = stop_time(&worker);
    // The two requests in flight were answered after 1.5 s; the reader's BLOCK is 2 s.
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");
    assert_eq!(sink.count(), 2, "nothing new is sent once the stop began");
    worker.wait_for_msg("stopped", T);

    let delivered: Vec<String> = sink.keys().into_iter().collect();
    // What was sent is acknowledged; what was read but not sent stays pending.
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(STREAM)
        .arg(GROUP)
        .arg("-")
        .arg("+")
        .arg(100)
        .query(&mut conn)
        .unwrap();
    let pending_ids: HashSet<String> = pending.into_iter().map(|p| p.0).collect();
    assert!(
        delivered.iter().all(|id| !pending_ids.contains(id)),
        "delivered but not acked: {delivered:?}"
    );

    // The next start sends the rest, and nothing twice.
    let _again = Worker::spawn(&env);
    wait_until("the rest delivered", T, || {
        sink.count() >= 10 && pending_count(&mut conn, STREAM, GROUP) == 0
    });
    let keys: Vec<String> = sink.keys().into_iter().collect();
    let unique: HashSet<&String> = keys.iter().collect();
    assert_eq!(unique.len(), 10, "{keys:?}");
    assert_eq!(keys.len(), 10, "no duplicates after a clean stop: {keys:?}");
    assert!(ids.iter().all(|id| unique.contains(id)));
}

#[test]
fn sigint_also_stops_cleanly_while_a_retry_is_waiting() {
    let redis = RedisServer::start();
    let sink = Sink::start(|_| Reply::status(503));
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "cs-1", "sale-1");
    // A 60 s backoff: the stop must not wait it out.
    let env = env_with(
        base_env(&redis, &sink),
        [("PAHEKO_PUSH_BACKOFF_SECONDS", "60")],
    );
    let mut worker = Worker::spawn(&env);
    worker.wait_for_msg("delivery failed, will retry", T);
    worker.sigint();
    assert_eq!(worker.wait_exit(Duration::from_secs(15)).code(), Some(0));
    let took = stop_time(&worker);
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(
        pending_count(&mut conn, STREAM, GROUP),
        1,
        "the failed event stays pending"
    );
}

#[test]
fn a_restart_takes_back_its_own_pending_entries_first_in_order() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    // Entries this consumer read before a crash, never acknowledged.
    let old: Vec<String> = (0..3)
        .map(|n| publish_ticket(&mut conn, "cs-1", &format!("old-{n}")))
        .collect();
    read_as(&mut conn, "test-worker");
    let new = publish_ticket(&mut conn, "cs-1", "new");
    let _worker = Worker::spawn(base_env(&redis, &sink));
    let received = sink.wait_for_count(4, T);
    let order: Vec<&str> = received
        .iter()
        .map(|r| r.idempotency_key().unwrap())
        .collect();
    let expected: Vec<&str> = old
        .iter()
        .map(String::as_str)
        .chain([new.as_str()])
        .collect();
    assert_eq!(order, expected);
    // And each sent only once the one before was answered (one session).
    let received = settle(&sink, &mut conn, T);
    assert_order_by_answers(&received, session_of, &[]);
}

/// From the worker's own records: the stop signal received to "stopped".
fn stop_time(worker: &Worker) -> Duration {
    let records = worker.log_lines();
    let find = |msg: &str| {
        records
            .iter()
            .find(|l| l["msg"] == msg)
            .unwrap_or_else(|| panic!("no {msg:?} in\n{}", worker.stderr()))
    };
    log_gap(
        find("stop signal received: finishing the requests in flight"),
        find("stopped"),
    )
}
