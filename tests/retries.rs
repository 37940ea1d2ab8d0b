//! Retries owned by the acker (issue 8 §1–§3): a waiting retry never holds a pusher, a
//! parked ticket keeps the capped backoff, a stop is quiet, a plugin-wide refusal
//! dead-letters nothing, and a ticket failing alone is given up so its session goes on.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::util::*;

const T: Duration = Duration::from_secs(20);

/// Every ticket in `tickets` (each session's sale IDs in stream order) was accepted or
/// dead-lettered (`dead_lettered`: entry IDs), and each was sent only once the ticket
/// before it in its session was answered 2xx or given up
/// ([`assert_order_by_answers`], issue 15 §1).
pub fn assert_sessions_in_order(
    received: &[Received],
    tickets: &[Vec<String>],
    dead_lettered: &[String],
) {
    let listed = |r: &Received| tickets.iter().any(|s| s.contains(&sale_of(r)));
    let report = assert_order_by_answers(
        received,
        |r| listed(r).then(|| session_of(r)).flatten(),
        dead_lettered,
    );
    let done: HashSet<String> = received
        .iter()
        .filter(|r| {
            r.idempotency_key().is_some_and(|k| {
                report.accepted.contains(k) || dead_lettered.iter().any(|d| d == k)
            })
        })
        .map(sale_of)
        .collect();
    let missing: Vec<&String> = tickets
        .iter()
        .flatten()
        .filter(|s| !done.contains(*s))
        .collect();
    assert!(
        missing.is_empty(),
        "never accepted nor dead-lettered: {missing:?}"
    );
}

/// CPU seconds (user + system) the process has used so far, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[test]
fn a_waiting_retry_never_holds_a_pusher() {
    let redis = RedisServer::start();
    let sink = Sink::start(|r| match sale_of(r).as_str() {
        "a1" | "b1" => Reply::status(500),
        "c1" | "d1" => Reply::status(503).with_header("Retry-After", "300"),
        _ => Reply::status(204),
    });
    let mut conn = redis.conn();
    for (session, sale) in [("A", "a1"), ("B", "b1"), ("C", "c1"), ("D", "d1")] {
        publish_ticket(&mut conn, session, sale);
    }
    let env = env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_CONCURRENCY", "4"),
            ("PAHEKO_PUSH_BACKOFF_SECONDS", "5"),
        ],
    );
    let worker = Worker::spawn(env);
    sink.wait_for_count(4, T);
    // Four heads failed and wait 5 s (or 300 s): a fifth session goes at once.
    let id = publish_ticket(&mut conn, "E", "e1");
    // From the clocks of Redis (the entry ID's milliseconds) and the worker (its log),
    // not from when this test got to look.
    let delivered = worker.wait_for_log("e1 delivered", T, |l| {
        l["msg"] == "delivered" && l["correlation_id"] == id.as_str()
    });
    let published_ms: u64 = id.split_once('-').unwrap().0.parse().unwrap();
    let waited = log_time(&delivered)
        .duration_since(std::time::UNIX_EPOCH + Duration::from_millis(published_ms))
        .unwrap_or_default();
    let e1 = wait_for("e1 at the sink", T, || {
        sink.received().into_iter().find(|r| sale_of(r) == "e1")
    });
    eprintln!("four failing heads, four pushers: e1 delivered {waited:?} after it was published");
    assert!(
        waited < Duration::from_secs(2),
        "e1 waited {waited:?} for a pusher"
    );
    let retries_before_e1 = sink
        .received()
        .iter()
        .filter(|r| r.attempt > 1 && r.at < e1.at)
        .count();
    assert_eq!(retries_before_e1, 0, "no retry was due yet");
    wait_until("e1 acknowledged", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 4
    });
    assert_eq!(worker.health().1["parked"], 4, "{}", worker.stderr());
}

#[test]
fn a_parked_ticket_keeps_the_capped_backoff_not_the_claim_idle_time() {
    let redis = RedisServer::start();
    let sink = Sink::start(|r| match (sale_of(r).as_str(), r.attempt) {
        ("a1", 1..=6) => Reply::status(503),
        _ => Reply::status(204),
    });
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "A", "a1");
    publish_ticket(&mut conn, "A", "a2");
    let env = env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_MAX_RETRIES", "2"),
            ("PAHEKO_PUSH_BACKOFF_SECONDS", "0.1"),
            ("PAHEKO_PUSH_MAX_BACKOFF_SECONDS", "0.4"),
            ("PAHEKO_PUSH_CLAIM_IDLE_SECONDS", "60"),
            ("PAHEKO_PUSH_BREAKER_THRESHOLD", "0"),
        ],
    );
    let worker = Worker::spawn(env);
    // Three rounds of two attempts, each round parked; the 7th attempt is accepted.
    wait_until("a1 and a2 acknowledged", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0 && sink.count() == 8
    });
    let a1: Vec<Instant> = sink
        .received()
        .iter()
        .filter(|r| sale_of(r) == "a1")
        .map(|r| r.at)
        .collect();
    assert_eq!(a1.len(), 7);
    let gaps: Vec<Duration> = a1.windows(2).map(|w| w[1] - w[0]).collect();
    // 0.1, 0.2, then capped at 0.4 s (±10 % jitter): never CLAIM_IDLE's 60 s.
    for gap in &gaps {
        assert!(
            *gap >= Duration::from_millis(80) && *gap < Duration::from_secs(2),
            "{gaps:?}"
        );
    }
    let parked = worker
        .log_lines()
        .into_iter()
        .filter(|l| {
            l["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("not delivered after"))
        })
        .count();
    assert_eq!(parked, 3, "one park per round of two attempts");
}

#[test]
fn a_stop_with_a_retry_falling_due_is_quiet() {
    let redis = RedisServer::start();
    let sink = Sink::start(|r| match sale_of(r).as_str() {
        "slow" => Reply::status(204).after(Duration::from_millis(7800)),
        _ => Reply::status(503),
    });
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "A", "failing");
    // MAX_RETRIES 1: the failing ticket is parked after each attempt; it falls due
    // (after 0.2 s here, after CLAIM_IDLE's 8.5 s before issue 8, where the loop then
    // spun until the stop ended) while the stop waits for the slow request.
    let env = env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_MAX_RETRIES", "1"),
            ("PAHEKO_PUSH_BACKOFF_SECONDS", "0.2"),
            ("PAHEKO_PUSH_BACKOFF_FACTOR", "1"),
            ("PAHEKO_PUSH_TIMEOUT_SECONDS", "8"),
            ("PAHEKO_PUSH_CLAIM_IDLE_SECONDS", "8.5"),
            ("PAHEKO_PUSH_BREAKER_THRESHOLD", "0"),
        ],
    );
    let mut worker = Worker::spawn(env);
    sink.wait_for_count(1, T);
    std::thread::sleep(Duration::from_millis(3000));
    publish_ticket(&mut conn, "B", "slow");
    let slow = wait_for("the slow request in flight", T, || {
        sink.received().into_iter().find(|r| sale_of(r) == "slow")
    });
    worker.sigterm();
    let stopped = Instant::now();
    let cpu_at_stop = cpu_seconds(worker.pid());
    let sent_at_stop = sink.count();
    // Sampled while the slow request is still under way (it ends 7.8 s after it came).
    let sample_at = slow.at + Duration::from_millis(7400);
    std::thread::sleep(sample_at.saturating_duration_since(Instant::now()));
    let used = cpu_seconds(worker.pid()) - cpu_at_stop;
    eprintln!(
        "stop with a retry falling due: {used:.2} CPU seconds in the {:?} after SIGTERM",
        stopped.elapsed()
    );
    assert!(
        worker.try_status().is_none(),
        "still waiting for the slow request"
    );
    let status = worker.wait_exit(T);
    assert_eq!(status.code(), Some(0), "{}", worker.stderr());
    assert!(used < 0.3, "{used} CPU seconds while waiting to stop");
    assert!(
        sink.count() <= sent_at_stop + 1,
        "nothing new is sent once stopping"
    );
    assert_eq!(
        pending_count(&mut conn, STREAM, GROUP),
        1,
        "the failing one"
    );
}

/// The sink answers `status` to everything while `refusing` is set, 204 after.
fn refusing_sink(refusing: &Arc<AtomicBool>, status: u16) -> Sink {
    let flag = Arc::clone(refusing);
    Sink::start(move |_| {
        if flag.load(Ordering::SeqCst) {
            Reply::status(status).with_body(format!("{{\"error\":\"{status}\"}}"))
        } else {
            Reply::status(204)
        }
    })
}

fn publish_sessions(
    conn: &mut redis::Connection,
    sessions: usize,
    each: usize,
) -> Vec<Vec<String>> {
    let mut tickets = vec![Vec::new(); sessions];
    for n in 0..each {
        for (s, list) in tickets.iter_mut().enumerate() {
            let sale = format!("s{s}-{n:02}");
            publish_ticket(conn, &format!("cs-{s}"), &sale);
            list.push(sale);
        }
    }
    tickets
}

#[test]
fn a_rotated_secret_dead_letters_nothing_and_everything_drains_once_it_matches() {
    let redis = RedisServer::start();
    let refusing = Arc::new(AtomicBool::new(true));
    let sink = refusing_sink(&refusing, 401);
    let mut conn = redis.conn();
    let tickets = publish_sessions(&mut conn, 4, 10);
    let env = env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_CONCURRENCY", "4"),
            ("PAHEKO_PUSH_BACKOFF_SECONDS", "0.1"),
            ("PAHEKO_PUSH_BACKOFF_FACTOR", "1"),
        ],
    );
    let worker = Worker::spawn(env);
    wait_until("several probes refused", T, || {
        worker
            .log_lines()
            .iter()
            .filter(|l| l["msg"] == "the plugin still refuses every ticket: probe refused")
            .count()
            >= 5
    });
    let (code, h) = worker.health();
    assert_eq!(
        (
            code,
            h["status"].as_str(),
            h["push_worker"].as_str(),
            h["paheko"].as_str(),
            h["paheko_refusing_status"].as_u64()
        ),
        (
            503,
            Some("error"),
            Some("error"),
            Some("refusing"),
            Some(401)
        ),
        "{h}"
    );
    assert_eq!(xlen(&mut conn, DEAD), 0, "nothing dead-lettered");
    assert_eq!(pending_count(&mut conn, STREAM, GROUP), 40);
    let (_, metrics) = worker.get("/metrics");
    assert!(
        metrics.contains("\npaheko_push_paheko_refusing 1\n"),
        "{metrics}"
    );
    let errors: Vec<_> = worker
        .log_lines()
        .into_iter()
        .filter(|l| l["level"] == "error")
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "one error line per change of state: {errors:?}"
    );
    let said = errors[0]["msg"].as_str().unwrap();
    assert!(
        said.contains("HTTP 401") && said.contains("PAHEKO_PLUGIN_SECRET"),
        "{said}"
    );
    // At most one request per pusher after the first refusal, then one per probe.
    let sent = sink.count();
    let probes = worker
        .log_lines()
        .iter()
        .filter(|l| l["msg"] == "probing the plugin with one ticket")
        .count();
    assert!(sent <= 4 + probes, "{sent} requests for {probes} probes");

    refusing.store(false, Ordering::SeqCst);
    wait_until("everything drained", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
    assert_eq!(xlen(&mut conn, DEAD), 0, "nothing dead-lettered");
    assert_sessions_in_order(&sink.wait_settled(T), &tickets, &[]);
    let h = worker.health().1;
    assert_eq!(
        (h["status"].as_str(), h["paheko"].as_str()),
        (Some("ok"), Some("up"))
    );
}

#[test]
fn a_wrong_url_says_so_and_keeps_the_tickets() {
    let redis = RedisServer::start();
    let refusing = Arc::new(AtomicBool::new(true));
    let sink = refusing_sink(&refusing, 404);
    let mut conn = redis.conn();
    publish_sessions(&mut conn, 2, 3);
    let worker = Worker::spawn(base_env(&redis, &sink));
    let line = worker.wait_for_log("the refusal explained", T, |l| {
        l["level"] == "error" && l["status"] == 404
    });
    assert!(
        line["msg"]
            .as_str()
            .unwrap()
            .contains("PAHEKO_PLUGIN_URL is wrong"),
        "{line}"
    );
    assert_eq!(worker.health().1["paheko_refusing_status"], 404);
    assert_eq!(xlen(&mut conn, DEAD), 0);
    assert_eq!(pending_count(&mut conn, STREAM, GROUP), 6);
}

#[test]
fn per_ticket_statuses_are_configurable_and_still_dead_letter() {
    let redis = RedisServer::start();
    let sink = Sink::start(|r| match sale_of(r).as_str() {
        "bad" => Reply::status(422),
        "forbidden" => Reply::status(403),
        _ => Reply::status(204),
    });
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "A", "bad");
    publish_ticket(&mut conn, "B", "forbidden");
    publish_ticket(&mut conn, "C", "fine");
    let env = env_with(
        base_env(&redis, &sink),
        [("PAHEKO_PUSH_DEAD_LETTER_STATUSES", "403, 422")],
    );
    let worker = Worker::spawn(env);
    wait_until("two dead letters, the third delivered", T, || {
        xlen(&mut conn, DEAD) == 2
            && sink.count() == 3
            && pending_count(&mut conn, STREAM, GROUP) == 0
    });
    let h = worker.health().1;
    // Two tickets refused on their content are not failures of the plugin.
    assert_eq!(
        (
            h["status"].as_str(),
            h["push_worker"].as_str(),
            h["consecutive_failures"].as_u64()
        ),
        (Some("ok"), Some("ok"), Some(0)),
        "{h}"
    );
}

#[test]
fn three_refused_tickets_do_not_make_health_degraded() {
    let redis = RedisServer::start();
    let sink = Sink::start(|_| Reply::status(422));
    let mut conn = redis.conn();
    for n in 0..3 {
        publish_ticket(&mut conn, &format!("cs-{n}"), &format!("sale-{n}"));
    }
    let worker = Worker::spawn(base_env(&redis, &sink));
    wait_until("all dead-lettered", T, || xlen(&mut conn, DEAD) == 3);
    let h = worker.health().1;
    assert_eq!(
        (h["push_worker"].as_str(), h["status"].as_str()),
        (Some("ok"), Some("ok")),
        "{h}"
    );
}

#[test]
fn a_ticket_failing_alone_is_given_up_and_its_session_goes_on() {
    let redis = RedisServer::start();
    let sink = Sink::start(move |r| match sale_of(r).as_str() {
        "poison" => Reply::status(500).with_body("Fatal error: Uncaught TypeError in sync.php"),
        _ => Reply::status(204),
    });
    let mut conn = redis.conn();
    let session = ["a0", "poison", "a2", "a3"];
    for sale in session {
        publish_ticket(&mut conn, "A", sale);
    }
    let env = env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_MAX_RETRIES", "2"),
            ("PAHEKO_PUSH_BACKOFF_SECONDS", "0.1"),
            ("PAHEKO_PUSH_BACKOFF_FACTOR", "1"),
            ("PAHEKO_PUSH_GIVE_UP_AFTER_PARKS", "2"),
        ],
    );
    let worker = Worker::spawn(env);
    // The shop goes on selling in another session: the plugin accepts those.
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (stop, mut conn) = (Arc::clone(&stop), redis.conn());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && n < 200 {
                publish_ticket(&mut conn, "B", &format!("b{n}"));
                n += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let dead = worker.wait_for_msg(
        "failing alone: the plugin accepts other tickets but keeps failing on this one; moving it to the dead letters so its session goes on",
        T,
    );
    assert_eq!(dead["status"], 500);
    wait_until("a2 and a3 delivered after it", T, || {
        let sales: Vec<String> = sink.received().iter().map(sale_of).collect();
        sales.contains(&"a3".to_owned())
    });
    stop.store(true, Ordering::SeqCst);
    producer.join().unwrap();
    let entries = stream_entries(&mut conn, DEAD);
    assert_eq!(entries.len(), 1);
    let fields = &entries[0].1;
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    assert_eq!(field("reason"), "failing_alone");
    assert_eq!(field("status"), "500");
    assert!(field("detail").contains("Uncaught TypeError"), "{fields:?}");
    assert_eq!(field("attempts"), "4");
    // The poison is in the check: a2 must have waited for its last answer (issue 15 §3).
    let a_session: Vec<String> = session.iter().map(|s| s.to_string()).collect();
    assert_sessions_in_order(
        &sink.wait_settled(T),
        &[a_session],
        &dead_lettered_ids(&mut conn, DEAD),
    );
}

#[test]
fn a_plugin_down_for_everyone_never_gives_up_a_ticket() {
    let redis = RedisServer::start();
    let down = Arc::new(AtomicBool::new(true));
    let sink = Sink::down_while(&down);
    let mut conn = redis.conn();
    publish_sessions(&mut conn, 3, 4);
    let env = env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_MAX_RETRIES", "1"),
            ("PAHEKO_PUSH_BACKOFF_SECONDS", "0.05"),
            ("PAHEKO_PUSH_BACKOFF_FACTOR", "1"),
            ("PAHEKO_PUSH_GIVE_UP_AFTER_PARKS", "1"),
            ("PAHEKO_PUSH_BREAKER_THRESHOLD", "0"),
        ],
    );
    let worker = Worker::spawn(env);
    wait_until("many rounds failed", T, || sink.count() >= 60);
    assert_eq!(xlen(&mut conn, DEAD), 0, "{}", worker.stderr());
    down.store(false, Ordering::SeqCst);
    wait_until("everything delivered", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
    assert_eq!(xlen(&mut conn, DEAD), 0);
}
