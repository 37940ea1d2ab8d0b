//! Never losing a ticket (issue 3 §1–§4): entries of dead consumers taken over,
//! trimmed entries detected, Paheko down for a while, Redis restarted or emptied, and
//! several instances sharing one group.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::util::*;

const T: Duration = Duration::from_secs(30);

fn cmd(conn: &mut redis::Connection, args: &[&str]) -> redis::Value {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query(conn).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

#[test]
fn a_dead_consumers_entries_are_taken_over_in_order() {
    let redis = RedisServer::start();
    let down = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&down);
    let sink = Sink::start(move |r| {
        if sale_of(r) == "k0" && flag.load(Ordering::SeqCst) {
            Reply::status(503)
        } else {
            Reply::status(204)
        }
    });
    let mut conn = redis.conn();
    let ids: Vec<String> = (0..4)
        .map(|n| publish_ticket(&mut conn, "cs-k", &format!("k{n}")))
        .collect();
    // A crashed instance read everything; k0 and k3 were since handed to this worker.
    read_as(&mut conn, "crashed-instance");
    cmd(
        &mut conn,
        &[
            "XCLAIM",
            STREAM,
            GROUP,
            "test-worker",
            "0",
            &ids[0],
            &ids[3],
            "JUSTID",
        ],
    );
    let env = env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_CLAIM_IDLE_SECONDS", "3"),
            ("PAHEKO_PUSH_MAX_RETRIES", "2"),
        ],
    );
    let worker = Worker::spawn(env);
    // With the lease, every entry another consumer left pending is taken over at once
    // (issue 9), before anything else is read.
    let took = worker.wait_for_msg(
        "taking over every entry other consumers left pending, before reading anything new",
        T,
    );
    assert_eq!(took["entries"], 2);
    down.store(false, Ordering::SeqCst);
    let received = settle(&sink, &mut conn, T);
    // k1 and k2 came back after k3 was read, yet went out before it, each once the one
    // before was accepted.
    let report = assert_order_by_answers(&received, session_of, &[]);
    assert_eq!(report.accepted, ids.iter().cloned().collect());
}

#[test]
fn pending_entries_trimmed_before_delivery_are_reported_as_lost() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    let mine = publish_ticket(&mut conn, "cs-1", "mine");
    read_as(&mut conn, "test-worker");
    let theirs = publish_ticket(&mut conn, "cs-2", "theirs");
    read_as(&mut conn, "crashed-instance");
    let kept = publish_ticket(&mut conn, "cs-3", "kept");
    // The producer's MAXLEN trims both before anyone delivered them.
    cmd(&mut conn, &["XTRIM", STREAM, "MAXLEN", "1"]);
    let env = env_with(
        base_env(&redis, &sink),
        [("PAHEKO_PUSH_CLAIM_IDLE_SECONDS", "3")],
    );
    let worker = Worker::spawn(env);
    sink.wait_for_count(1, T);
    assert_eq!(sink.received()[0].idempotency_key(), Some(kept.as_str()));
    let (code, h) = wait_for("both losses counted", T, || {
        let (code, h) = worker.health();
        (h["lost_to_trim"] == 2).then_some((code, h))
    });
    assert_eq!((code, h["status"].as_str()), (200, Some("degraded")));
    let lost: HashSet<String> = worker
        .log_lines()
        .iter()
        .filter(|l| {
            l["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("entry vanished from the stream"))
        })
        .map(|l| {
            assert_eq!(l["level"], "error");
            l["correlation_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(lost, HashSet::from([mine, theirs]));
    wait_until("nothing left pending", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
}

#[test]
fn paheko_down_opens_the_breaker_probes_then_drains_when_back() {
    let redis = RedisServer::start();
    let down = Arc::new(AtomicBool::new(true));
    let sink = Sink::down_while(&down);
    let mut conn = redis.conn();
    for n in 0..30 {
        publish_ticket(&mut conn, &format!("cs-{}", n % 10), &format!("sale-{n}"));
    }
    let env = env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_BREAKER_THRESHOLD", "3"),
            ("PAHEKO_PUSH_BACKOFF_SECONDS", "0.3"),
            ("PAHEKO_PUSH_BACKOFF_FACTOR", "1.0"),
            ("PAHEKO_PUSH_CONCURRENCY", "4"),
            ("PAHEKO_PUSH_LOG", "info"),
        ],
    );
    let worker = Worker::spawn(env);
    worker.wait_for_msg(
        "paheko looks down: circuit open, sending one probe per backoff interval until it answers",
        T,
    );
    let at_open = sink.count();
    let h = worker.health().1;
    assert_eq!(h["paheko"], "down");
    assert!(h["paheko_down_since"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(h["status"], "degraded");
    wait_until("three failed probes", T, || {
        worker
            .log_lines()
            .iter()
            .filter(|l| l["msg"] == "paheko still down: probe failed")
            .count()
            >= 3
    });
    let during = sink.count() - at_open;
    // Three probes, plus at most the four requests already under way when it opened;
    // without the breaker four pushers retrying every 0.3 s would have sent far more.
    assert!(
        during <= 3 + 4,
        "{during} requests while the breaker was open"
    );
    assert_eq!(
        xlen(&mut conn, DEAD),
        0,
        "transient failures are never dead-lettered"
    );

    down.store(false, Ordering::SeqCst);
    worker.wait_for_msg(
        "paheko answers again: circuit closed, delivering at full speed",
        T,
    );
    wait_until("the backlog drained", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
    let h = worker.health().1;
    assert_eq!(
        (h["paheko"].as_str(), h["status"].as_str()),
        (Some("up"), Some("ok"))
    );
    assert!(h["paheko_down_since"].is_null());
}

#[test]
fn redis_stopped_and_restarted_with_aof_mid_run_loses_nothing() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let sink = Sink::start(|_| Reply::status(204).after(Duration::from_millis(30)));
    let mut conn = redis.conn();
    let mut ids: Vec<String> = (0..30)
        .map(|n| publish_ticket(&mut conn, &format!("cs-{}", n % 3), &format!("a-{n}")))
        .collect();
    let worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [("PAHEKO_PUSH_LOG", "info")],
    ));
    wait_until("some delivered", T, || sink.count() >= 5);
    redis.stop();
    wait_until("health shows Redis down", T, || worker.health().0 == 503);
    assert_eq!(worker.health().1["redis"], "error");
    redis.restart();
    let mut conn = redis.conn();
    ids.extend((0..10).map(|n| publish_ticket(&mut conn, "cs-new", &format!("b-{n}"))));
    wait_until("everything acknowledged", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
            && xlen(&mut conn, STREAM) == 40
            && sink.count() >= 40
    });
    let delivered: HashSet<String> = sink.keys().into_iter().collect();
    assert!(ids.iter().all(|id| delivered.contains(id)));
    wait_until("health back to ok", T, || {
        worker.health().1["redis"] == "ok"
    });
    assert!(
        worker
            .log_lines()
            .iter()
            .any(|l| l["msg"] == "redis read failed: reconnecting")
    );
}

#[test]
fn a_destroyed_group_is_recreated_and_delivery_goes_on() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "cs-1", "before");
    let worker = Worker::spawn(base_env(&redis, &sink));
    sink.wait_for_count(1, T);
    cmd(&mut conn, &["XGROUP", "DESTROY", STREAM, GROUP]);
    let after = publish_ticket(&mut conn, "cs-1", "after");
    let warned = worker.wait_for_msg(
        "the stream or its consumer group is gone (Redis restarted empty?): recreating it",
        T,
    );
    assert_eq!(warned["level"], "warn");
    let received = wait_for("the new ticket", T, || {
        let r = sink.received();
        r.iter()
            .any(|r| r.idempotency_key() == Some(after.as_str()))
            .then_some(r)
    });
    assert!(received.len() <= 3, "{}", received.len());
    wait_until("acknowledged in the new group", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });

    // Redis emptied altogether (restarted without persistence): stream and group come back.
    cmd(&mut conn, &["FLUSHALL"]);
    let fresh = publish_ticket(&mut conn, "cs-2", "fresh");
    wait_until("delivered after the flush", T, || {
        sink.received()
            .iter()
            .any(|r| r.idempotency_key() == Some(fresh.as_str()))
    });
}

/// XAUTOCLAIM by idle time still guards against entries that appear under another
/// consumer while this instance is active: read by a tool, or by an older worker that
/// knows nothing of the lease. They are taken over after CLAIM_IDLE, in order.
#[test]
fn entries_a_tool_left_pending_meanwhile_are_taken_over_after_claim_idle() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    let worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_CLAIM_IDLE_SECONDS", "3"),
            ("PAHEKO_PUSH_LOG", "info"),
        ],
    ));
    wait_until("active", T, || worker.health().1["role"] == "active");
    // An old Python worker, still running somewhere, grabs two tickets as they are
    // written (one transaction, so this worker cannot read them first) and dies.
    let mut grab = redis::pipe();
    grab.atomic();
    for n in 0..2 {
        grab.cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("event")
            .arg("pos.ticket.created")
            .arg("payload")
            .arg(ticket("cs-1", &format!("grabbed-{n}")));
    }
    grab.cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("python-worker")
        .arg("COUNT")
        .arg(2)
        .arg("STREAMS")
        .arg(STREAM)
        .arg(">")
        .ignore();
    let ids: Vec<String> = grab.query(&mut conn).unwrap();
    let took = worker.wait_for_msg(
        "taking over entries another consumer left pending (a stopped or dead instance?)",
        Duration::from_secs(20),
    );
    assert_eq!(took["entries"], 2);
    let received = settle_when(&sink, "both delivered", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0 && sink.accepted().len() == 2
    });
    let report = assert_order_by_answers(&received, session_of, &[]);
    assert_eq!(
        report.accepted,
        ids.iter().cloned().collect(),
        "both, in stream order"
    );
}

#[test]
fn an_entry_delivered_too_many_times_is_dead_lettered() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    let id = publish_ticket(&mut conn, "cs-1", "poison");
    read_as(&mut conn, "test-worker");
    for _ in 0..2 {
        cmd(
            &mut conn,
            &[
                "XREADGROUP",
                "GROUP",
                GROUP,
                "test-worker",
                "STREAMS",
                STREAM,
                "0",
            ],
        );
    }
    // Delivered three times to consumers: once read, twice re-read with XREADGROUP.
    let env = env_with(
        base_env(&redis, &sink),
        [("PAHEKO_PUSH_MAX_DELIVERIES", "2")],
    );
    let _worker = Worker::spawn(env);
    wait_until("dead-lettered", T, || xlen(&mut conn, DEAD) == 1);
    let (_, fields) = stream_entries(&mut conn, DEAD).remove(0);
    let get = |n: &str| {
        String::from_utf8_lossy(&fields.iter().find(|(k, _)| k == n).unwrap().1).into_owned()
    };
    assert_eq!(get("reason"), "max_deliveries");
    assert_eq!(get("original_id"), id);
    assert!(
        get("detail").contains("delivered 3 times"),
        "{}",
        get("detail")
    );
    assert_eq!(sink.count(), 0);
    wait_until("acknowledged", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
}

#[test]
fn a_large_backlog_warns_before_the_producer_trims() {
    let redis = RedisServer::start();
    let sink = Sink::start(|_| Reply::status(503));
    let mut conn = redis.conn();
    for n in 0..12 {
        publish_ticket(&mut conn, "cs-1", &format!("s-{n}"));
    }
    let env = env_with(
        base_env(&redis, &sink),
        [("PAHEKO_PUSH_BACKLOG_WARN", "10")],
    );
    let worker = Worker::spawn(env);
    let warned = worker.wait_for_msg(
        "backlog is large: the producer trims its stream at 10000 entries, undelivered tickets will be lost past that",
        T,
    );
    assert_eq!(warned["level"], "warn");
    let h = wait_for("health warns", T, || {
        let h = worker.health().1;
        (h["backlog_warning"] == true).then_some(h)
    });
    assert_eq!(h["status"], "degraded");
}

#[test]
fn an_acknowledgement_redis_could_not_take_is_written_after_it_returns() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let sink = Sink::start(|_| Reply::status(204).after(Duration::from_millis(1500)));
    let mut conn = redis.conn();
    let id = publish_ticket(&mut conn, "cs-1", "sale-1");
    let worker = Worker::spawn(base_env(&redis, &sink));
    sink.wait_for_count(1, T);
    // Redis goes away while the plugin is still answering: the 2xx cannot be acked.
    redis.stop();
    let kept = worker.wait_for_msg(
        "redis did not take acknowledgements: keeping them to write again",
        T,
    );
    assert_eq!(kept["waiting_acks"], 1);
    redis.restart();
    let mut conn = redis.conn();
    wait_until("the acknowledgement written after the restart", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
    worker.wait_for_msg("redis takes acknowledgements again", T);
    // Acked, not delivered a second time.
    let keys: Vec<String> = sink.keys().into_iter().collect();
    assert_eq!(keys, [id]);
}

/// The same for a dead letter (issue 15 §13): Redis goes away while the plugin refuses
/// a ticket; the move cannot be written, is kept, and is written once Redis is back —
/// once, with its reason, and the ticket is not sent again.
#[test]
fn a_dead_letter_redis_could_not_take_is_written_after_it_returns() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let sink = Sink::start(|_| {
        Reply::status(422)
            .with_body("unknown account")
            .after(Duration::from_millis(1500))
    });
    let mut conn = redis.conn();
    let id = publish_ticket(&mut conn, "cs-1", "sale-1");
    let worker = Worker::spawn(base_env(&redis, &sink));
    sink.wait_for_count(1, T);
    redis.stop();
    let kept = worker.wait_for_msg(
        "redis did not take acknowledgements: keeping them to write again",
        T,
    );
    assert_eq!(kept["waiting_dead_letters"], 1);
    redis.restart();
    let mut conn = redis.conn();
    wait_until("the dead letter written after the restart", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
    let dead = stream_entries(&mut conn, DEAD);
    assert_eq!(dead.len(), 1, "{dead:?}");
    let field = |name: &str| {
        dead[0]
            .1
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(field("original_id"), Some(id.clone()));
    assert_eq!(field("reason").as_deref(), Some("rejected"));
    assert_eq!(field("status").as_deref(), Some("422"));
    assert_eq!(sink.keys(), [id], "not sent again");
}

/// A live instance keeps its parked entries from being taken over (issue 15 §8): while
/// an entry waits for its next attempt, the holder refreshes its idle time (a third of
/// CLAIM_IDLE apart), so anything that takes over entries idle for CLAIM_IDLE — a worker
/// of an older version that knows nothing of the lease, a tool — never finds it idle.
/// Checked from Redis itself: over more than three claim-idle periods, XPENDING never
/// lists the entry as idle for CLAIM_IDLE.
#[test]
fn a_live_instance_keeps_its_parked_entries_from_the_other() {
    let redis = RedisServer::start();
    let down = Arc::new(AtomicBool::new(true));
    let sink = Sink::down_while(&down);
    let mut conn = redis.conn();
    let holder = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_CONSUMER", "instance-a"),
            ("PAHEKO_PUSH_CLAIM_IDLE_SECONDS", "3"),
            ("PAHEKO_PUSH_MAX_RETRIES", "2"),
            ("PAHEKO_PUSH_BACKOFF_SECONDS", "1"),
            ("PAHEKO_PUSH_BACKOFF_FACTOR", "4"),
            ("PAHEKO_PUSH_MAX_BACKOFF_SECONDS", "20"),
            ("PAHEKO_PUSH_BREAKER_THRESHOLD", "0"),
        ],
    ));
    let id = publish_ticket(&mut conn, "cs-1", "stuck");
    holder.wait_for_msg(
        "not delivered after 2 attempts: parked, stays pending and is tried again later",
        T,
    );
    // Parked for 4 s, then 16 s: no attempt touches the entry for most of the window, only
    // the refresh. (Nothing must happen here: the window's length is the point.)
    let idle_for_claim = |conn: &mut redis::Connection| -> Vec<(String, String, u64, u64)> {
        redis::cmd("XPENDING")
            .arg(STREAM)
            .arg(GROUP)
            .arg("IDLE")
            .arg(3000)
            .arg("-")
            .arg("+")
            .arg(10)
            .query(conn)
            .unwrap()
    };
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < until {
        let idle = idle_for_claim(&mut conn);
        assert!(
            idle.is_empty(),
            "a parked entry of a live instance idle for CLAIM_IDLE: {idle:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(pending_ids(&mut conn, STREAM, GROUP), [id]);
    down.store(false, Ordering::SeqCst);
    wait_until("delivered", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
}

/// Issue 8 §7: re-reading its own pending entries after a restart is not a delivery.
/// With MAX_DELIVERIES=2 and the worker killed three times while a ticket stays
/// pending (the plugin is down), the ticket is delivered once the plugin is back, not
/// dead-lettered as `max_deliveries`.
#[test]
fn restarts_do_not_count_as_deliveries() {
    let redis = RedisServer::start();
    let down = Arc::new(AtomicBool::new(true));
    let sink = Sink::down_while(&down);
    let mut conn = redis.conn();
    let id = publish_ticket(&mut conn, "cs-1", "unlucky");
    let env = env_with(
        base_env(&redis, &sink),
        [("PAHEKO_PUSH_MAX_DELIVERIES", "2")],
    );
    let deliveries = |conn: &mut redis::Connection| -> u64 {
        let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(STREAM)
            .arg(GROUP)
            .arg("-")
            .arg("+")
            .arg(10)
            .query(conn)
            .unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        rows[0].3
    };
    for run in 1..=3 {
        let before = sink.count();
        let mut worker = Worker::spawn(&env);
        if run > 1 {
            worker.wait_for_msg("taking back this consumer's pending entries", T);
        }
        // Tried again by this run: it was read (or re-read), and is in hand.
        sink.wait_for_count(before + 1, T);
        worker.kill9();
        assert_eq!(deliveries(&mut conn), 1, "after run {run}");
    }
    down.store(false, Ordering::SeqCst);
    let worker = Worker::spawn(&env);
    wait_until("delivered", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
    assert_eq!(xlen(&mut conn, DEAD), 0, "{}", worker.stderr());
    assert_eq!(sink.keys().last(), Some(&id));
}
