//! Self-tests of the harness itself; they do not run the binary.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread;
use std::time::{Duration, Instant};

use super::util::*;

const T: Duration = Duration::from_secs(10);

fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(T))
        .build()
        .into()
}

fn post(url: &str, key: &str, body: &str) -> (u16, Option<String>, String) {
    let mut response = client()
        .post(url)
        .header("Idempotency-Key", key)
        .header("X-Custom", "Mixed Case Value")
        .content_type("application/json")
        .send(body)
        .expect("POST to the sink");
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.body_mut().read_to_string().unwrap();
    (response.status().as_u16(), retry_after, text)
}

#[test]
fn redis_with_aof_keeps_streams_and_pending_entries_across_restart() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes"]);
    assert!(redis.url().starts_with("redis+unix:///"), "{}", redis.url());
    let mut conn = redis.conn();

    assert_eq!(xlen(&mut conn, "events"), 0);
    assert_eq!(pending_count(&mut conn, "events", "g"), 0, "no stream yet");
    let first = xadd(
        &mut conn,
        "events",
        &[("type", "sale"), ("payload", "{\"a\":1}")],
    );
    let second = xadd_bytes(&mut conn, "events", &[("payload", b"\xff\x00raw")]);
    assert!(first < second, "{first} then {second}");
    assert_eq!(xlen(&mut conn, "events"), 2);
    assert_eq!(pending_count(&mut conn, "events", "g"), 0, "no group yet");

    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("events")
        .arg("g")
        .arg("0")
        .query(&mut conn)
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("c")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg("events")
        .arg(">")
        .query(&mut conn)
        .unwrap();
    assert_eq!(pending_count(&mut conn, "events", "g"), 1);
    let before = stream_entries(&mut conn, "events");
    drop(conn);

    redis.restart();
    let mut conn = redis.conn();
    let after = stream_entries(&mut conn, "events");
    assert_eq!(after, before);
    assert_eq!(
        after,
        vec![
            (
                first,
                vec![
                    ("type".to_owned(), b"sale".to_vec()),
                    ("payload".to_owned(), b"{\"a\":1}".to_vec()),
                ],
            ),
            (
                second,
                vec![("payload".to_owned(), b"\xff\x00raw".to_vec())]
            ),
        ]
    );
    assert_eq!(pending_count(&mut conn, "events", "g"), 1);

    // A crash now loses nothing either: it was all written before the clean stop.
    redis.kill();
    redis.restart();
    assert_eq!(xlen(&mut redis.conn(), "events"), 2);
}

#[test]
fn redis_url_carries_the_password() {
    let redis = RedisServer::start_with(&["--requirepass", "p&ss word+?"]);
    assert!(
        redis.url().contains("?pass=p%26ss%20word%2B%3F"),
        "{}",
        redis.url()
    );
    xadd(&mut redis.conn(), "s", &[("k", "v")]);

    let anonymous = redis::Client::open(redis.url_with_password(None)).unwrap();
    let mut conn = anonymous.get_connection().unwrap();
    let err = redis::cmd("XLEN")
        .arg("s")
        .query::<u64>(&mut conn)
        .unwrap_err();
    assert_eq!(err.code(), Some("NOAUTH"), "{err}");
}

#[test]
fn sink_records_requests_and_replies_as_scripted() {
    let sink = Sink::start(|req| match req.path.as_str() {
        "/slow" => Reply::status(200).after(Duration::from_millis(300)),
        "/hang-up" => Reply::drop_connection(),
        _ if req.attempt <= 2 => Reply::status(503).with_header("Retry-After", "7"),
        _ => Reply::status(200).with_body("done"),
    });
    let url = sink.url();
    assert!(url.starts_with("http://127.0.0.1:") && url.ends_with("/paheko/push"));

    assert_eq!(
        post(&url, "k1", "{\"n\":1}"),
        (503, Some("7".into()), String::new())
    );
    assert_eq!(post(&url, "k2", "{\"n\":2}").0, 503);
    assert_eq!(post(&url, "k1", "{\"n\":1}").0, 503);
    assert_eq!(post(&url, "k1", "{\"n\":1}"), (200, None, "done".into()));

    let got = sink.wait_for_count(4, T);
    let summary: Vec<(&str, u32)> = got
        .iter()
        .map(|r| (r.idempotency_key().unwrap(), r.attempt))
        .collect();
    assert_eq!(summary, [("k1", 1), ("k2", 1), ("k1", 2), ("k1", 3)]);
    // What the sink wrote is recorded once it is written: only the 200 is an acceptance.
    let answered: Vec<Option<u16>> = sink.wait_settled(T).iter().map(|r| r.answered).collect();
    assert_eq!(answered, [Some(503), Some(503), Some(503), Some(200)]);
    assert_eq!(sink.accepted_keys(), ["k1"]);
    let first = &got[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/paheko/push");
    assert_eq!(first.json(), serde_json::json!({"n": 1}));
    assert_eq!(first.header("X-CUSTOM"), Some("Mixed Case Value"));
    assert!(first.headers.iter().any(|(n, _)| n == "content-type"));

    // A slow reply is recorded on arrival and does not hold up other requests.
    let base = url.trim_end_matches("/paheko/push").to_owned();
    let slow = {
        let base = base.clone();
        thread::spawn(move || {
            let response = client().get(format!("{base}/slow")).call().unwrap();
            (response.status().as_u16(), Instant::now())
        })
    };
    let recorded = sink.wait_for_count(5, T)[4].clone();
    assert_eq!(recorded.path, "/slow");
    assert_eq!(post(&url, "k3", "{}").0, 503, "answered while /slow waits");
    let (status, answered_at) = slow.join().unwrap();
    assert_eq!(status, 200);
    assert!(answered_at - recorded.at >= Duration::from_millis(300));

    // drop_connection closes the socket without a single byte of answer.
    let mut stream =
        TcpStream::connect(url.trim_start_matches("http://").split('/').next().unwrap()).unwrap();
    stream.set_read_timeout(Some(T)).unwrap();
    stream
        .write_all(b"POST /hang-up HTTP/1.1\r\nHost: sink\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    let mut answer = Vec::new();
    let read = stream.read_to_end(&mut answer);
    assert!(
        answer.is_empty(),
        "got {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert!(read.is_ok() || read.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset));
    assert_eq!(sink.received().last().unwrap().body, b"{}");
    assert_eq!(sink.wait_settled(T).last().unwrap().answered, None);
}

#[test]
fn wait_until_times_out_naming_what_it_waited_for() {
    let mut calls = 0;
    let start = Instant::now();
    let panic = catch_unwind(AssertUnwindSafe(|| {
        wait_until("the moon to turn blue", Duration::from_millis(200), || {
            calls += 1;
            false
        })
    }))
    .expect_err("wait_until should panic");
    let message = panic.downcast_ref::<String>().expect("a formatted message");
    assert_eq!(message, "timed out after 200ms: the moon to turn blue");
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert!(calls >= 2, "polled {calls} times");

    let mut n = 0;
    let got = wait_for("n to reach 3", T, || {
        n += 1;
        (n == 3).then_some(n * 10)
    });
    assert_eq!(got, 30);
}

/// The worker's log times are read right: a record's `ts` is within a second of the
/// wall clock when it was read (the worker and the test share the clock).
#[test]
fn log_times_are_read_as_utc() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let worker = Worker::spawn(base_env(&redis, &sink));
    let before = std::time::SystemTime::now() - Duration::from_secs(1);
    let line = worker.wait_for_msg("health server listening", Duration::from_secs(10));
    let after = std::time::SystemTime::now() + Duration::from_secs(1);
    let at = log_time(&line);
    assert!(
        before - Duration::from_secs(10) <= at && at <= after,
        "{line}"
    );
    assert_eq!(
        log_time(&serde_json::json!({"ts": "2026-03-01T00:00:01.250Z"}))
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap(),
        Duration::from_millis(1_772_323_201_250)
    );
}
