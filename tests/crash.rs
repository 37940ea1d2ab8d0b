//! Targeted crash windows (issue 8 §8): each test puts the worker, or Redis, down at one
//! precise moment and checks what the plugin and the stream show afterwards. The chaos
//! runs (`chaos.rs`) hit such moments at random; these hit each one for sure.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::util::*;

const T: Duration = Duration::from_secs(30);

/// A worker killed while the plugin was still working on its request: the sink finds
/// the connection closed when it comes to answer, so nothing counts as accepted, and the
/// ticket goes out again, under the same key, from the next start.
#[test]
fn kill_9_while_the_plugin_answers_is_not_an_acceptance_and_the_ticket_is_sent_again() {
    let redis = RedisServer::start();
    let sink = Sink::start(|r| {
        Reply::status(204).after(if r.attempt == 1 {
            Duration::from_millis(800)
        } else {
            Duration::ZERO
        })
    });
    let mut conn = redis.conn();
    let id = publish_ticket(&mut conn, "cs-1", "sale-1");
    let env = base_env(&redis, &sink);
    let mut worker = Worker::spawn(&env);
    sink.wait_for_count(1, T);
    worker.kill9();
    let settled = sink.wait_settled(T);
    assert_eq!(settled.len(), 1);
    assert_eq!(
        settled[0].answered, None,
        "the answer came after the worker died: nobody got it"
    );
    assert_eq!(
        pending_ids(&mut conn, STREAM, GROUP),
        std::slice::from_ref(&id)
    );

    let _again = Worker::spawn(&env);
    let received = settle(&sink, &mut conn, T);
    let keys: Vec<&str> = received
        .iter()
        .filter_map(Received::idempotency_key)
        .collect();
    assert_eq!(keys, [id.as_str(), id.as_str()]);
    let accepted: Vec<&str> = received
        .iter()
        .filter(|r| r.accepted())
        .filter_map(Received::idempotency_key)
        .collect();
    assert_eq!(accepted, [id.as_str()], "accepted once, on the second try");
}

/// The window between the plugin's 2xx and the XACK: writes to Redis are paused (CLIENT
/// PAUSE WRITE) from the moment the plugin answers, so the acknowledgement cannot land,
/// and the worker is killed there. The ticket must stay pending and go out again under
/// the same Idempotency-Key, for the plugin to recognise it, then be acknowledged.
#[test]
fn kill_9_between_the_2xx_and_the_xack_sends_the_same_key_again_then_acks() {
    let redis = RedisServer::start();
    let pauser = Arc::new(Mutex::new(redis.conn()));
    let sink = {
        let pauser = Arc::clone(&pauser);
        Sink::start(move |r| {
            if r.attempt == 1 {
                let _: () = redis::cmd("CLIENT")
                    .arg("PAUSE")
                    .arg(60_000)
                    .arg("WRITE")
                    .query(&mut *pauser.lock().unwrap())
                    .expect("CLIENT PAUSE WRITE");
            }
            Reply::status(204)
        })
    };
    let mut conn = redis.conn();
    let id = publish_ticket(&mut conn, "cs-1", "sale-1");
    let env = base_env(&redis, &sink);
    let mut worker = Worker::spawn(&env);
    worker.wait_for_log("the worker got the 2xx", T, |l| {
        l["msg"] == "delivered" && l["correlation_id"] == id.as_str()
    });
    let answered: Vec<String> = sink
        .wait_settled(T)
        .iter()
        .filter(|r| r.accepted())
        .filter_map(|r| r.idempotency_key().map(str::to_owned))
        .collect();
    assert_eq!(answered, std::slice::from_ref(&id));
    worker.kill9();
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query(&mut *pauser.lock().unwrap())
        .unwrap();
    assert_eq!(
        pending_ids(&mut conn, STREAM, GROUP),
        std::slice::from_ref(&id),
        "the XACK did not land before the kill"
    );

    let again = Worker::spawn(&env);
    let received = settle(&sink, &mut conn, T);
    let keys: Vec<(&str, u32, bool)> = received
        .iter()
        .map(|r| (r.idempotency_key().unwrap(), r.attempt, r.accepted()))
        .collect();
    assert_eq!(
        keys,
        [(id.as_str(), 1, true), (id.as_str(), 2, true)],
        "the same key twice, both accepted: the plugin sees a repeat it can recognise"
    );
    assert_eq!(again.health().1["delivered"], 1);
    assert_eq!(xlen(&mut conn, DEAD), 0);
}

/// Redis killed with SIGKILL in the middle of a drain (AOF, fsync every second), then
/// started again: every ticket still reaches the plugin, in order per session, and
/// nothing stays pending. The tickets are written to disk before the worker starts (so
/// what Redis itself may lose, the last second of writes, is only the worker's reads
/// and acknowledgements, which must cost duplicates at most).
#[test]
fn redis_killed_mid_run_with_aof_everysec_loses_nothing() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "everysec"]);
    let sink = Sink::start(|_| Reply::status(204).after(Duration::from_millis(5)));
    let mut conn = redis.conn();
    let config = |conn: &mut redis::Connection, value: &str| {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("appendfsync")
            .arg(value)
            .query(conn)
            .unwrap();
    };
    config(&mut conn, "always");
    let ids: Vec<String> = (0..300)
        .map(|n| publish_ticket(&mut conn, &format!("cs-{}", n % 3), &format!("sale-{n:03}")))
        .collect();
    config(&mut conn, "everysec");
    let env = env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PUSH_LOG", "info"),
            ("PAHEKO_PUSH_CONCURRENCY", "3"),
        ],
    );
    let worker = Worker::spawn(&env);
    wait_until("a third delivered", T, || sink.accepted().len() >= 100);
    redis.kill();
    let at_kill = sink.accepted_keys();
    assert!(
        at_kill.len() < ids.len(),
        "the kill hit a drain in progress: {} of {} accepted",
        at_kill.len(),
        ids.len()
    );
    redis.restart();
    let mut conn = redis.conn();
    let received = settle_when(
        &sink,
        "everything acknowledged after the restart",
        T,
        || pending_count(&mut conn, STREAM, GROUP) == 0 && worker.health().1["lag"] == 0,
    );
    let report = assert_order_by_answers(&received, session_of, &[]);
    let lost: Vec<&String> = ids
        .iter()
        .filter(|id| !report.accepted.contains(*id))
        .collect();
    assert!(lost.is_empty(), "never accepted: {lost:?}");
    assert_eq!(xlen(&mut conn, DEAD), 0);
}

/// A second SIGTERM or SIGINT while the worker is stopping (here, waiting for a request
/// the plugin holds for 30 s) exits at once with status 130; the ticket stays pending.
#[test]
fn a_second_stop_signal_exits_130_at_once() {
    for (first, second) in [("TERM", "TERM"), ("INT", "INT"), ("TERM", "INT")] {
        let redis = RedisServer::start();
        let sink = Sink::start(|_| Reply::status(204).after(Duration::from_secs(30)));
        let mut conn = redis.conn();
        publish_ticket(&mut conn, "cs-1", "sale-1");
        let mut worker = Worker::spawn(env_with(
            base_env(&redis, &sink),
            [
                ("PAHEKO_PUSH_TIMEOUT_SECONDS", "60"),
                ("PAHEKO_PUSH_CLAIM_IDLE_SECONDS", "120"),
            ],
        ));
        sink.wait_for_count(1, T);
        let signal = |worker: &Worker, name: &str| match name {
            "TERM" => worker.sigterm(),
            _ => worker.sigint(),
        };
        signal(&worker, first);
        worker.wait_for_msg("stop signal received: finishing the requests in flight", T);
        assert_eq!(
            worker.try_status(),
            None,
            "the first signal waits for the request"
        );
        let asked = Instant::now();
        signal(&worker, second);
        let status = worker.wait_exit(Duration::from_secs(10));
        let took = asked.elapsed();
        assert_eq!(status.code(), Some(130), "SIG{first} then SIG{second}");
        assert!(took < Duration::from_secs(2), "SIG{second} took {took:?}");
        assert_eq!(pending_count(&mut conn, STREAM, GROUP), 1);
    }
}
