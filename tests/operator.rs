//! An operator's bad day (issue 14): what `check` and `--help` say when the secret was
//! rotated, the URL is wrong, Redis refuses the password, or the plugin answers
//! something else. `check` ends with a real round trip, a `ping` event sent with the
//! headers of a ticket, to a real HTTP sink answering what each test scripts.

use std::time::Duration;

use super::util::*;

const T: Duration = Duration::from_secs(20);

fn check(env: Vec<(String, String)>) -> Finished {
    Worker::run_to_end(&["check"], env)
}

/// The line of `check`'s output about `what`.
fn line<'a>(finished: &'a Finished, what: &str) -> &'a str {
    finished
        .stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(what))
        .unwrap_or_else(|| panic!("no {what} line:\n{finished:?}"))
}

/// A sink answering the ping with `status` and `body`, and 200 to anything else.
fn plugin(status: u16, body: &'static str) -> Sink {
    Sink::start(move |r| {
        if r.header("x-paheko-event") == Some("ping") {
            Reply::status(status).with_body(body)
        } else {
            Reply::status(200)
        }
    })
}

#[test]
fn check_pings_the_plugin_with_a_tickets_headers_and_says_it_accepted_the_secret() {
    let redis = RedisServer::start();
    let sink = plugin(200, r#"{"status":"pong"}"#);
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "cs-1", "sale-1");
    let env = base_env(&redis, &sink);
    let finished = check(env.clone());
    assert_eq!(finished.code(), Some(0), "{finished:?}");
    let ping = line(&finished, "ping");
    assert!(
        ping.starts_with("ok") && ping.contains("200 OK") && ping.contains("accepted the secret"),
        "{finished:?}"
    );
    assert!(
        finished.stdout.ends_with("all checks passed\n"),
        "{finished:?}"
    );
    let received = sink.received();
    assert_eq!(received.len(), 1, "one ping, nothing else");
    let ping = &received[0];
    assert_eq!(ping.method, "POST");
    assert_eq!(ping.body_text(), r#"{"ping":true}"#);
    assert_eq!(ping.header("x-paheko-event"), Some("ping"));
    assert_eq!(ping.header("x-paheko-secret"), Some(SECRET));
    let key = ping.idempotency_key().unwrap().to_string();
    assert!(
        key.len() == "ping-".len() + 16
            && key.starts_with("ping-")
            && key[5..].chars().all(|c| c.is_ascii_hexdigit()),
        "{key}"
    );
    assert_eq!(ping.header("x-request-id"), Some(key.as_str()));

    // The same header names as a ticket the worker delivers, with a fresh key each time.
    let again = check(env.clone());
    assert_eq!(again.code(), Some(0), "{again:?}");
    assert_ne!(sink.received()[1].idempotency_key(), Some(key.as_str()));
    let worker = Worker::spawn(&env);
    let delivered = wait_for("the ticket delivered", T, || {
        sink.received()
            .into_iter()
            .find(|r| r.header("x-paheko-event") != Some("ping"))
    });
    drop(worker);
    let names = |r: &Received| {
        let mut n: Vec<String> = r
            .headers
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| n != "content-length")
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(ping), names(&delivered));
    assert_eq!(
        pending_count(&mut conn, STREAM, GROUP),
        0,
        "the ticket, not the ping, was acknowledged"
    );
}

#[test]
fn a_signed_ping_carries_the_signature_and_not_the_secret() {
    let redis = RedisServer::start();
    let sink = plugin(204, "");
    let finished = check(env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PLUGIN_SECRET", "whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM="),
            ("PAHEKO_PUSH_AUTH", "signature"),
            ("PAHEKO_PUSH_ALLOW_HTTP", ""),
        ],
    ));
    assert_eq!(finished.code(), Some(0), "{finished:?}");
    let received = sink.received();
    assert_eq!(received[0].header("x-paheko-secret"), None);
    assert!(
        received[0]
            .header("webhook-signature")
            .is_some_and(|s| s.starts_with("v1,"))
    );
    assert_eq!(
        received[0].header("webhook-id"),
        received[0].idempotency_key()
    );
    // Plain http with signatures alone: allowed, and said what it costs.
    let warning = finished
        .stdout
        .lines()
        .find(|l| l.starts_with("warn  configuration"))
        .unwrap_or_else(|| panic!("no warning:\n{finished:?}"));
    assert!(
        warning.contains("the secret never travels") && warning.contains("replayed"),
        "{warning}"
    );
    // The worker says it too, once, at start-up, and delivers.
    let worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [
            ("PAHEKO_PLUGIN_SECRET", "whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM="),
            ("PAHEKO_PUSH_AUTH", "signature"),
            ("PAHEKO_PUSH_ALLOW_HTTP", ""),
        ],
    ));
    let said = worker.wait_for_log("the plain-http warning", T, |l| {
        l["level"] == "warn"
            && l["msg"]
                .as_str()
                .is_some_and(|m| m.contains("every ticket does"))
    });
    assert!(said["msg"].as_str().unwrap().contains("replayed"), "{said}");
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "cs-1", "sale-1");
    wait_until("delivered over plain http with signatures", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
}

#[test]
fn a_rotated_secret_or_a_wrong_url_fails_check_saying_which() {
    let redis = RedisServer::start();
    for (status, says) in [(401, "401 Unauthorized"), (403, "403 Forbidden")] {
        let sink = plugin(status, "wrong secret");
        let finished = check(base_env(&redis, &sink));
        assert_eq!(finished.code(), Some(1), "{finished:?}");
        let ping = line(&finished, "ping");
        assert!(
            ping.starts_with("FAIL")
                && ping.contains(says)
                && ping.contains("refuses the secret (X-Paheko-Secret)")
                && ping.contains("rotated"),
            "{finished:?}"
        );
        assert!(!finished.stdout.contains("all checks passed"));
        assert_eq!(
            finished.stderr, "paheko-push: 1 check failed: ping; see the FAIL line above\n",
            "{finished:?}"
        );
    }
    let sink = plugin(404, "");
    let finished = check(base_env(&redis, &sink));
    assert_eq!(finished.code(), Some(1), "{finished:?}");
    let ping = line(&finished, "ping");
    assert!(
        ping.starts_with("FAIL")
            && ping.contains("404")
            && ping.contains("PAHEKO_PLUGIN_URL is wrong, or the plugin is not installed"),
        "{finished:?}"
    );
}

#[test]
fn a_plugin_without_ping_leaves_the_secret_unverified_said_plainly() {
    let redis = RedisServer::start();
    for status in [422, 500] {
        let sink = plugin(status, "unknown event type");
        let finished = check(base_env(&redis, &sink));
        assert_eq!(finished.code(), Some(0), "{finished:?}");
        let ping = line(&finished, "ping");
        assert!(
            ping.starts_with("warn")
                && ping.contains(&status.to_string())
                && ping.contains("could not verify the secret"),
            "{finished:?}"
        );
    }
}

#[test]
fn a_wrong_redis_password_is_named_as_such_and_not_as_unreachable() {
    let redis = RedisServer::start_with(&["--requirepass", "Right-Pa55"]);
    let sink = plugin(200, "");
    for (url, code) in [
        (redis.url_with_password(None), "NOAUTH"),
        (
            redis.url_with_password(Some("Wrong-Pa55")),
            "AuthenticationFailed",
        ),
    ] {
        let finished = check(env_with(
            base_env(&redis, &sink),
            [("REDIS_URL", url.as_str())],
        ));
        assert_eq!(finished.code(), Some(1), "{finished:?}");
        let redis_line = line(&finished, "redis");
        assert!(
            redis_line.starts_with("FAIL")
                && redis_line.contains("refuses the credentials")
                && redis_line.contains(code),
            "{code}: {finished:?}"
        );
        assert!(
            !finished.stdout.contains("unreachable"),
            "{code}: {finished:?}"
        );
        assert!(
            line(&finished, "stream").contains("Redis refused the credentials"),
            "{finished:?}"
        );
        assert!(!format!("{finished:?}").contains("Wrong-Pa55"));
    }
}

#[test]
fn the_plugin_url_is_masked_in_check_and_in_the_log() {
    let redis = RedisServer::start();
    let sink = plugin(200, "");
    let url =
        sink.url().replacen("http://", "http://bob:Plugin-Pa55@", 1) + "?token=Query-T0ken-123&v=2";
    let env = env_with(
        base_env(&redis, &sink),
        [("PAHEKO_PLUGIN_URL", url.as_str())],
    );
    let finished = check(env.clone());
    assert_eq!(finished.code(), Some(0), "{finished:?}");
    let plugin_line = line(&finished, "plugin");
    assert!(
        plugin_line.contains("http://bob:***@127.0.0.1:")
            && plugin_line.contains("?token=***&v=***"),
        "{finished:?}"
    );
    let worker = Worker::spawn(&env);
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "cs-1", "sale-1");
    wait_until("delivered", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
    let log = worker.stderr();
    drop(worker);
    for shown in [format!("{finished:?}"), log] {
        assert!(
            !shown.contains("Plugin-Pa55") && !shown.contains("Query-T0ken-123"),
            "{shown}"
        );
    }
}

#[test]
fn help_lists_every_command_and_help_is_a_command() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    for args in [&["--help"][..], &["help"], &["-h"]] {
        let finished = Worker::run_to_end(args, base_env(&redis, &sink));
        assert_eq!(finished.code(), Some(0), "{args:?}: {finished:?}");
        for command in ["run", "check", "health", "dead", "help"] {
            assert!(
                finished.stdout.lines().any(|l| l
                    .trim_start()
                    .starts_with(&format!("paheko-push {command}"))
                    || l.trim_start().starts_with(&format!("{command} "))),
                "{args:?} does not list {command}:\n{finished:?}"
            );
        }
    }
    let finished = Worker::run_to_end(&["help", "health"], base_env(&redis, &sink));
    assert_eq!(finished.code(), Some(0), "{finished:?}");
    assert!(finished.stdout.starts_with("usage: paheko-push health"));
    let finished = Worker::run_to_end(&["help", "nothing"], base_env(&redis, &sink));
    assert_eq!(finished.code(), Some(2), "{finished:?}");
}
