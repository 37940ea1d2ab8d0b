//! The coordinator's twelve reproductions of issue 13, each against the real binary, a
//! real Redis and the recording sink: Redis stalls (DEBUG SLEEP) past the lease, a lease
//! key with no expiry, two processes under one consumer name, `Retry-After: 0`, one
//! ticket answered 404, one session filling the memory budget, a step-down and re-take
//! with a ticket in flight, the old holder's queued attempts, held tickets trimmed from
//! the stream, vanished entries and the budget, a take-over refused once, and the
//! settings that would loop on one ticket.
//! Order is checked by answers ([`assert_order_by_answers`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::util::*;

const T: Duration = Duration::from_secs(30);

/// Blocks Redis for `secs` seconds from another thread (DEBUG SLEEP), as a stalled
/// server, a full disk or a long fork would.
fn stall(redis: &RedisServer, secs: f64) -> std::thread::JoinHandle<()> {
    let mut conn = redis.conn();
    std::thread::spawn(move || {
        let _: redis::Value = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(secs)
            .query(&mut conn)
            .expect("DEBUG SLEEP");
    })
}

fn enable_debug(redis: &RedisServer) {
    let mut conn = redis.conn();
    // Redis 7 refuses DEBUG unless enabled at start; the test servers allow it.
    let _: redis::RedisResult<redis::Value> =
        redis::cmd("DEBUG").arg("SLEEP").arg(0).query(&mut conn);
}

fn msgs(worker: &Worker, msg: &str) -> usize {
    worker
        .log_lines()
        .iter()
        .filter(|l| l["msg"] == msg)
        .count()
}

const HOLDS: &str =
    "this instance holds the lease: it delivers, taking over every pending entry first";

/// Issue 13, 1: A probe out when the instance steps down: after the re-take, a new tenure starts
/// with a fresh breaker, and the ticket is delivered once the plugin answers.
#[test]
fn a_probe_lost_in_a_step_down_does_not_stop_delivery() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    enable_debug(&redis);
    let down = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&down);
    // Slow 503s while down, so the probe is still out when Redis stalls.
    let sink = Sink::start(move |_| {
        if flag.load(Ordering::SeqCst) {
            Reply::status(503).after(Duration::from_millis(2500))
        } else {
            Reply::status(200)
        }
    });
    let mut conn = redis.conn();
    let worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_LEASE_SECONDS", "3"),
            ("PAHEKO_PUSH_TIMEOUT_SECONDS", "5"),
            ("PAHEKO_PUSH_CLAIM_IDLE_SECONDS", "10"),
            ("PAHEKO_PUSH_BREAKER_THRESHOLD", "1"),
            ("PAHEKO_PUSH_BACKOFF_SECONDS", "0.2"),
        ],
    ));
    worker.wait_for_msg(HOLDS, T);
    publish_ticket(&mut conn, "cs-1", "s-1");
    worker.wait_for_msg("probing the plugin with one ticket", T);
    // The probe is at the plugin: Redis stalls past the lease.
    stall(&redis, 4.0).join().unwrap();
    worker.wait_for_log("the step-down", T, |l| {
        l["msg"].as_str().unwrap_or("").starts_with("stepping down")
    });
    down.store(false, Ordering::SeqCst);
    settle(&sink, &mut conn, T);
    assert_eq!(sink.accepted_keys().len(), 1, "the ticket was delivered");
    assert!(msgs(&worker, HOLDS) >= 2, "the lease was taken again");
}

/// Issue 13, 2: A lease key with no expiry (restored from a dump) is repaired, with one error line.
#[test]
fn a_lease_key_with_no_expiry_is_repaired() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    let _: () = redis::cmd("SET")
        .arg(format!("{STREAM}:{GROUP}:active"))
        .arg(r#"{"consumer":"restored-box","token":"abc","since":1}"#)
        .query(&mut conn)
        .unwrap();
    for n in 0..3 {
        publish_ticket(&mut conn, "cs-1", &format!("s-{n}"));
    }
    let worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_LEASE_SECONDS", "3"),
            ("PAHEKO_PUSH_TIMEOUT_SECONDS", "1"),
        ],
    ));
    settle(&sink, &mut conn, T);
    assert_eq!(sink.accepted_keys().len(), 3);
    let repaired = worker
        .log_lines()
        .into_iter()
        .filter(|l| l["level"] == "error" && l["msg"].as_str().unwrap_or("").contains("no expiry"))
        .count();
    assert_eq!(repaired, 1, "one error line says the key had no expiry");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("{STREAM}:{GROUP}:active"))
        .query(&mut conn)
        .unwrap();
    assert!(ttl > 0, "the lease has an expiry again: {ttl}");
}

/// Issue 13, 3: Two live processes under one consumer name: the token decides, one delivers, the
/// other stands by saying why; no ping-pong, order kept, nothing left pending.
#[test]
fn two_processes_under_one_consumer_name_do_not_share_the_lease() {
    let redis = RedisServer::start();
    let sink = Sink::start(|_| Reply::status(200).after(Duration::from_millis(20)));
    let mut conn = redis.conn();
    let env = env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_CONSUMER", "compose-worker"),
            ("PAHEKO_PUSH_LEASE_SECONDS", "3"),
        ],
    );
    let a = Worker::spawn(env.clone());
    a.wait_for_msg(HOLDS, T);
    let b = Worker::spawn(env);
    b.wait_for_log("b stands by, saying why", T, |l| {
        l["msg"]
            .as_str()
            .unwrap_or("")
            .contains("under this instance's consumer name")
    });
    for n in 0..60 {
        publish_ticket(&mut conn, &format!("cs-{}", n % 6), &format!("s-{n}"));
    }
    let received = settle(&sink, &mut conn, T);
    assert_order_by_answers(&received, session_of, &[]);
    assert_one_in_flight_per_lane(&received, session_of);
    assert_eq!(sink.accepted_keys().len(), 60);
    assert_eq!(
        msgs(&a, HOLDS) + msgs(&b, HOLDS),
        1,
        "one take, no ping-pong"
    );
}

/// Issue 13, 4: `Retry-After: 0` on every answer to one ticket: retried no faster than the floor.
#[test]
fn retry_after_zero_does_not_make_a_hot_loop() {
    let redis = RedisServer::start();
    let sink = Sink::start(|_| Reply::status(503).with_header("Retry-After", "0"));
    let mut conn = redis.conn();
    let worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_BACKOFF_SECONDS", "0"),
            ("PAHEKO_PUSH_BREAKER_THRESHOLD", "0"),
        ],
    ));
    worker.wait_for_msg(HOLDS, T);
    publish_ticket(&mut conn, "cs-1", "s-1");
    sink.wait_for_count(1, T);
    let first = sink.count();
    std::thread::sleep(Duration::from_secs(3)); // a window in which only the floor paces it
    let sent = sink.count() - first;
    assert!(
        sent <= 31,
        "{sent} attempts in 3 s: no more than one per 100 ms"
    );
    assert!(sent >= 3, "{sent} attempts in 3 s: it is retried");
}

/// Issue 13, 5: One ticket answered 404 while the plugin accepts the others: that ticket is
/// dead-lettered, the others all go.
#[test]
fn a_ticket_answered_404_alone_does_not_block_the_others() {
    let redis = RedisServer::start();
    let sink = Sink::start(|r| {
        if sale_of(r) == "odd-one" {
            Reply::status(404).with_body("no such sale")
        } else {
            Reply::status(200)
        }
    });
    let mut conn = redis.conn();
    let odd = publish_ticket(&mut conn, "cs-0", "odd-one");
    for n in 1..=12 {
        publish_ticket(&mut conn, &format!("cs-{n}"), &format!("s-{n}"));
    }
    let _worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [("PAHEKO_PUSH_BACKOFF_SECONDS", "0.2")],
    ));
    settle(&sink, &mut conn, T);
    assert_eq!(
        sink.accepted_keys().len(),
        12,
        "the 12 others were delivered"
    );
    let dead = stream_entries(&mut conn, DEAD);
    assert_eq!(dead.len(), 1);
    let field = |name: &str| {
        dead[0]
            .1
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).to_string())
            .unwrap_or_default()
    };
    assert_eq!(field("original_id"), odd);
    assert_eq!(field("reason"), "rejected");
    assert_eq!(field("status"), "404");
}

/// Issue 13, 6: One session's failing head and 600 tickets behind it do not keep the other
/// sessions from being read and delivered; memory stays within the budget.
#[test]
fn one_session_cannot_fill_the_memory_budget() {
    let redis = RedisServer::start();
    let sink = Sink::start(|r| {
        if session_of(r).as_deref() == Some("cs-stuck") {
            Reply::status(503)
        } else {
            Reply::status(200)
        }
    });
    let mut conn = redis.conn();
    for n in 0..601 {
        publish_ticket(&mut conn, "cs-stuck", &format!("stuck-{n}"));
    }
    for n in 0..5 {
        publish_ticket(&mut conn, &format!("cs-{n}"), &format!("s-{n}"));
    }
    let worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_BACKOFF_SECONDS", "0.2"),
            ("PAHEKO_PUSH_GIVE_UP_AFTER_PARKS", "0"),
        ],
    ));
    wait_until("the other sessions delivered", T, || {
        sink.accepted_keys().len() == 5
    });
    let (_, h) = worker.health();
    assert!(h["held"].as_u64().unwrap() <= 512, "{h}");
}

/// Issue 13, 7: a ticket in flight when the instance steps down and takes the lease
/// again (a Redis stall as long as the lease): the new tenure does not send a second
/// copy while the first is still at the plugin, and the old answer does not release the
/// lane; one request per session at a time throughout.
#[test]
fn an_answer_from_before_a_step_down_does_not_release_the_lane() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let sink = Sink::start(|_| Reply::status(200).after(Duration::from_millis(6000)));
    let mut conn = redis.conn();
    for n in 0..3 {
        publish_ticket(&mut conn, "cs-1", &format!("s-{n}"));
    }
    let worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_LEASE_SECONDS", "3"),
            ("PAHEKO_PUSH_TIMEOUT_SECONDS", "8"),
            ("PAHEKO_PUSH_CLAIM_IDLE_SECONDS", "12"),
        ],
    ));
    sink.wait_for_count(1, T);
    // The first ticket is at the plugin for 6 s; Redis stalls for longer than the lease,
    // so the instance steps down and takes the lease again before that answer.
    stall(&redis, 3.5).join().unwrap();
    let received = settle(&sink, &mut conn, Duration::from_secs(90));
    assert_one_in_flight_per_lane(&received, session_of);
    assert_order_by_answers(&received, session_of, &[]);
    let accepted: std::collections::BTreeSet<String> = sink.accepted_keys().into_iter().collect();
    assert_eq!(accepted.len(), 3);
    assert!(
        msgs(&worker, HOLDS) >= 2,
        "it stepped down and took the lease again"
    );
}

/// Issue 13, 8: a take-over that fails (XCLAIM refused by an ACL here, as a dropped
/// connection would fail it) is asked again: the dead instance's tickets still go before
/// the newer ones of their session.
#[test]
fn a_failed_take_over_is_asked_again_before_anything_new_is_read() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    for n in 0..2 {
        publish_ticket(&mut conn, "cs-1", &format!("old-{n}"));
    }
    read_as(&mut conn, "dead-box");
    for n in 0..3 {
        publish_ticket(&mut conn, "cs-1", &format!("new-{n}"));
    }
    let acl = |conn: &mut redis::Connection, rule: &str| {
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg("worker")
            .arg("on")
            .arg(">worker-pw")
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .arg(rule)
            .query(conn)
            .unwrap();
    };
    acl(&mut conn, "-xclaim");
    let url = format!("{}?user=worker&pass=worker-pw", redis.url());
    let worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [
            ("REDIS_URL", url.as_str()),
            ("PAHEKO_PUSH_CLAIM_IDLE_SECONDS", "3"),
        ],
    ));
    worker.wait_for_log("the take-over refused", T, |l| {
        l["msg"]
            .as_str()
            .unwrap_or("")
            .starts_with("redis read failed")
    });
    acl(&mut conn, "+xclaim");
    let received = settle(&sink, &mut conn, T);
    assert_order_by_answers(&received, session_of, &[]);
    assert_eq!(sink.accepted_keys().len(), 5);
}

/// Issue 13, 9: Attempts queued for the pushers when the instance steps down are not sent: no
/// request starts once the lease may be another's.
#[test]
fn no_request_starts_after_the_renewal_deadline() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let sink = Sink::start(|_| Reply::status(200).after(Duration::from_millis(700)));
    let mut conn = redis.conn();
    for n in 0..40 {
        publish_ticket(&mut conn, &format!("cs-{n}"), &format!("s-{n}"));
    }
    let _worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_LEASE_SECONDS", "3"),
            ("PAHEKO_PUSH_CONCURRENCY", "1"),
            ("PAHEKO_PUSH_TIMEOUT_SECONDS", "2"),
        ],
    ));
    sink.wait_for_count(2, T);
    let stalled_at = Instant::now();
    let stalling = stall(&redis, 6.0);
    // The last renewal was sent before the stall: no request may start 2 s (the
    // renewal deadline) after it, however long Redis keeps the acker waiting.
    std::thread::sleep(Duration::from_millis(2600));
    let quiet_from = Instant::now();
    stalling.join().unwrap();
    let late: Vec<_> = sink
        .received()
        .into_iter()
        .filter(|r| r.at > quiet_from && r.at < stalled_at + Duration::from_millis(5900))
        .map(|r| sale_of(&r))
        .collect();
    assert!(
        late.is_empty(),
        "requests started after the deadline: {late:?}"
    );
    settle(&sink, &mut conn, Duration::from_secs(90));
}

/// Issue 13, 10: A ticket held while the plugin fails, then trimmed from the stream by the
/// producer's MAXLEN, still gets its dead letter when the plugin refuses it; and one
/// held when the worker is killed is recorded as trimmed after the restart.
#[test]
fn a_held_ticket_trimmed_from_the_stream_is_never_lost_without_a_trace() {
    let redis = RedisServer::start();
    let refuse = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&refuse);
    let sink = Sink::start(move |_| {
        if flag.load(Ordering::SeqCst) {
            Reply::status(422).with_body("bad sale")
        } else {
            Reply::status(503)
        }
    });
    let mut conn = redis.conn();
    let held = publish_ticket(&mut conn, "cs-1", "held");
    let env = env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_BACKOFF_SECONDS", "0.5"),
            ("PAHEKO_PUSH_CLAIM_IDLE_SECONDS", "3"),
            ("PAHEKO_PUSH_TIMEOUT_SECONDS", "1"),
        ],
    );
    let worker = Worker::spawn(env.clone());
    sink.wait_for_count(1, T);
    // The producer writes on with MAXLEN 1: the held ticket leaves the stream.
    let _: String = redis::cmd("XADD")
        .arg(STREAM)
        .arg("MAXLEN")
        .arg(1)
        .arg("*")
        .arg("event")
        .arg("pos.session.opened")
        .arg("payload")
        .arg(r#"{"session_id":"cs-2"}"#)
        .query(&mut conn)
        .unwrap();
    // Longer than the old idle refresh (claim idle / 3), which dropped it from the PEL.
    std::thread::sleep(Duration::from_millis(1500));
    refuse.store(true, Ordering::SeqCst);
    wait_until("the held ticket dead-lettered", T, || {
        dead_lettered_ids(&mut conn, DEAD).contains(&held)
    });
    drop(worker);

    // Killed while holding one that the producer then trims: recorded after the restart.
    refuse.store(false, Ordering::SeqCst);
    let second = publish_ticket(&mut conn, "cs-3", "held-2");
    let mut worker = Worker::spawn(env.clone());
    wait_until("the second ticket tried", T, || {
        sink.received().iter().any(|r| sale_of(r) == "held-2")
    });
    worker.kill9();
    let _: i64 = redis::cmd("XTRIM")
        .arg(STREAM)
        .arg("MAXLEN")
        .arg(0)
        .query(&mut conn)
        .unwrap();
    let worker = Worker::spawn(env);
    wait_until("a trimmed record for it", T, || {
        stream_entries(&mut conn, DEAD).iter().any(|(_, f)| {
            let get = |name: &str| {
                f.iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| String::from_utf8_lossy(v).to_string())
            };
            get("reason").as_deref() == Some("trimmed")
                && get("original_id").as_deref() == Some(second.as_str())
                && get("count").as_deref() == Some("1")
        })
    });
    wait_until("nothing pending", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
    // Counted: the second ticket (and the open of part one, when it was still pending).
    let (_, h) = worker.health();
    assert!(h["lost_to_trim"].as_u64().unwrap() >= 1, "{h}");
}

/// Issue 13, 11: Entries another consumer left pending, gone from the stream, are recorded and do
/// not enlarge the budget: with the plugin down, memory held stays within it.
#[test]
fn vanished_entries_do_not_enlarge_the_budget() {
    let redis = RedisServer::start();
    let sink = Sink::start(|_| Reply::status(503));
    let mut conn = redis.conn();
    for n in 0..300 {
        publish_ticket(&mut conn, &format!("old-{n}"), &format!("o-{n}"));
    }
    read_as(&mut conn, "dead-box");
    let _: i64 = redis::cmd("XTRIM")
        .arg(STREAM)
        .arg("MAXLEN")
        .arg(0)
        .query(&mut conn)
        .unwrap();
    for n in 0..900 {
        publish_ticket(&mut conn, &format!("cs-{n}"), &format!("s-{n}"));
    }
    let worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [("PAHEKO_PUSH_BACKOFF_SECONDS", "0.5")],
    ));
    wait_until("300 trimmed records", T, || {
        stream_entries(&mut conn, DEAD).len() == 300
    });
    let mut most = 0;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let (_, h) = worker.health();
        most = most.max(h["held"].as_u64().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        most <= 512 + 128,
        "held {most} entries with a budget of 512 (+ one read)"
    );
    let pending: u64 = pending_count(&mut conn, STREAM, GROUP);
    assert!(pending <= 900, "{pending}");
}

/// Issue 13, 12: Settings that would loop on one ticket are refused at start, naming the variable.
#[test]
fn settings_that_loop_on_one_ticket_are_refused_at_start() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    for (var, value, says) in [
        ("PAHEKO_PUSH_DEAD_LETTER_STREAM", STREAM, "must differ"),
        ("PAHEKO_PUSH_DEAD_LETTER_STATUSES", ",", "lists no status"),
    ] {
        let mut worker = Worker::spawn(env_with(base_env(&redis, &sink), [(var, value)]));
        let status = worker.wait_exit(T);
        assert_eq!(status.code(), Some(2), "{var}={value}");
        let stderr = worker.stderr();
        assert!(stderr.contains(var) && stderr.contains(says), "{stderr}");
    }
    assert_eq!(sink.count(), 0);
}
