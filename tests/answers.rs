//! Unusual answers from the plugin (issue 8 §7): a 2xx whose headers are large is still
//! a 2xx, and one past the worker's bound is reported naming that bound; a redirect is
//! not followed (issue 15 §6).

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

/// A redirect is not followed (issue 15 §6): the request carries the plugin secret, and
/// a POST sent on to wherever `Location` points would take it along. The second server
/// here records what would have arrived; it must get nothing. The ticket is retried
/// at the plugin's own URL and delivered once the plugin answers 2xx.
#[test]
fn a_redirect_is_not_followed_and_the_secret_goes_nowhere_else() {
    let redis = RedisServer::start();
    let elsewhere = Sink::ok();
    let target = elsewhere.url();
    let sink = Sink::start(move |r| match r.attempt {
        1 => Reply::status(302).with_header("Location", target.as_str()),
        2 => Reply::status(307).with_header("Location", target.as_str()),
        _ => Reply::status(204),
    });
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "cs-1", "sale-1");
    let _worker = Worker::spawn(base_env(&redis, &sink));
    let received = settle(&sink, &mut conn, T);
    let leaked: Vec<Option<String>> = elsewhere
        .received()
        .iter()
        .map(|r| r.header("x-paheko-secret").map(str::to_owned))
        .collect();
    assert!(
        leaked.is_empty(),
        "the redirect was followed, secret headers sent: {leaked:?}"
    );
    let statuses: Vec<Option<u16>> = received.iter().map(|r| r.answered).collect();
    assert_eq!(statuses, [Some(302), Some(307), Some(204)]);
}
