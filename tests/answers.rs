//! Unusual answers from the plugin (issue 8 §7): a 2xx whose headers are large is still
//! a 2xx, and one past the worker's bound is reported naming that bound.

use std::time::Duration;

use super::util::*;

const T: Duration = Duration::from_secs(20);

/// A header value of `n` bytes, as a plugin (or a proxy in front of it) might add: a
/// large cookie, a debug trace.
fn big_header(n: usize) -> String {
    "x".repeat(n)
}

#[test]
fn a_2xx_with_20_kb_of_headers_is_acknowledged_once_not_retried() {
    let redis = RedisServer::start();
    let sink = Sink::start(|_| Reply::status(204).with_header("X-Debug-Trace", big_header(20_000)));
    let mut conn = redis.conn();
    let id = publish_ticket(&mut conn, "cs-1", "sale-1");
    let worker = Worker::spawn(base_env(&redis, &sink));
    let delivered = worker.wait_for_log("the ticket delivered", T, |l| {
        l["msg"] == "delivered" && l["correlation_id"] == id.as_str()
    });
    assert_eq!(delivered["status"], 204);
    wait_until("acknowledged", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
    assert_eq!(sink.keys(), [id], "sent once, not retried");
    assert_eq!(worker.health().1["delivered"], 1);
    assert!(
        !worker.stderr().contains("delivery failed"),
        "{}",
        worker.stderr()
    );
}

#[test]
fn headers_past_the_bound_are_reported_naming_it_and_the_ticket_stays_pending() {
    let redis = RedisServer::start();
    let sink = Sink::start(|_| Reply::status(204).with_header("X-Debug-Trace", big_header(40_000)));
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "cs-1", "sale-1");
    let worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [("PAHEKO_PUSH_BACKOFF_SECONDS", "5")],
    ));
    let failed = worker.wait_for_msg("delivery failed, will retry", T);
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("response header is too big") && error.contains("32768"),
        "the error names the limit: {failed}"
    );
    assert_eq!(pending_count(&mut conn, STREAM, GROUP), 1);
    assert_eq!(xlen(&mut conn, DEAD), 0);
}
