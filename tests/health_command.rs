//! `paheko-push health` (issue 10 §3): the container's HEALTHCHECK, and an operator's
//! one-line question to a running worker. Exit 0 and one line on stdout when /health
//! says ok; exit 1 and one line on stderr for anything else, never 2.

use std::time::Duration;

use super::util::*;

const T: Duration = Duration::from_secs(20);

fn health(env: Vec<(String, String)>) -> Finished {
    Worker::run_to_end(&["health"], env)
}

/// The worker's environment, with the health address it actually listens on.
fn asking(worker: &Worker, env: Vec<(String, String)>) -> Vec<(String, String)> {
    let addr = worker.health_addr();
    env_with(env, [("PAHEKO_PUSH_HEALTH_ADDR", addr.as_str())])
}

#[test]
fn a_healthy_worker_says_so_in_one_line_and_exit_0() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "cs-1", "sale-1");
    let env = base_env(&redis, &sink);
    let worker = Worker::spawn(&env);
    sink.wait_for_count(1, T);
    wait_until("acknowledged", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
    let finished = health(asking(&worker, env));
    assert_eq!(finished.code(), Some(0), "{finished:?}");
    assert_eq!(finished.stdout.lines().count(), 1, "{finished:?}");
    assert!(
        finished
            .stdout
            .starts_with("healthy: redis ok, paheko up, push_worker ok, role active, pending 0"),
        "{finished:?}"
    );
    assert!(finished.stderr.is_empty(), "{finished:?}");
}

#[test]
fn a_worker_without_redis_or_plugin_is_unhealthy_with_exit_1() {
    // Redis down: /health answers 503, status error.
    let mut redis = RedisServer::start();
    let sink = Sink::ok();
    let env = base_env(&redis, &sink);
    let worker = Worker::spawn(&env);
    worker.wait_for_msg("health server listening", T);
    redis.stop();
    let env = asking(&worker, env);
    let finished = wait_for("health to see Redis down", T, || {
        let f = health(env.clone());
        (f.code() != Some(0)).then_some(f)
    });
    assert_eq!(finished.code(), Some(1), "{finished:?}");
    assert!(finished.stdout.is_empty(), "{finished:?}");
    assert_eq!(finished.stderr.lines().count(), 1, "{finished:?}");
    assert!(
        finished
            .stderr
            .starts_with("paheko-push: unhealthy: status error: Redis is unreachable (redis error"),
        "{finished:?}"
    );

    // No plugin configured: degraded, so not healthy either.
    let redis = RedisServer::start();
    let env = env_without(base_env(&redis, &sink), &["PAHEKO_PLUGIN_URL"]);
    let worker = Worker::spawn(&env);
    let finished = health(asking(&worker, env));
    assert_eq!(finished.code(), Some(1), "{finished:?}");
    assert!(
        finished.stderr.contains("status degraded")
            && finished.stderr.contains("push_worker unconfigured"),
        "{finished:?}"
    );
    assert!(!finished.stderr.contains(SECRET));
}

#[test]
fn nothing_to_ask_is_unhealthy_with_exit_1_not_a_crash() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    // Nothing listens there: the port of a listener just closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let finished = health(env_with(
        base_env(&redis, &sink),
        [("PAHEKO_PUSH_HEALTH_ADDR", addr.as_str())],
    ));
    assert_eq!(finished.code(), Some(1), "{finished:?}");
    assert!(
        finished.stderr.starts_with(&format!(
            "paheko-push: unhealthy: no answer from http://{addr}/health"
        )),
        "{finished:?}"
    );

    let finished = health(env_with(
        base_env(&redis, &sink),
        [("PAHEKO_PUSH_HEALTH_ADDR", "")],
    ));
    assert_eq!(finished.code(), Some(1), "{finished:?}");
    assert!(
        finished.stderr.contains("PAHEKO_PUSH_HEALTH_ADDR is empty"),
        "{finished:?}"
    );

    // A configuration error is exit 1 too: a container runtime reserves 2.
    let finished = health(env_with(
        base_env(&redis, &sink),
        [("PAHEKO_PUSH_MAX_RETRIES", "abc")],
    ));
    assert_eq!(finished.code(), Some(1), "{finished:?}");
    assert!(
        finished
            .stderr
            .contains("unhealthy: configuration: PAHEKO_PUSH_MAX_RETRIES"),
        "{finished:?}"
    );
}

#[test]
fn a_refusing_plugin_is_named_with_its_status_and_what_it_means() {
    let redis = RedisServer::start();
    let sink = Sink::start(|_| Reply::status(401));
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "cs-1", "sale-1");
    let env = base_env(&redis, &sink);
    let worker = Worker::spawn(&env);
    let env = asking(&worker, env);
    let finished = wait_for("health to see the refusal", T, || {
        let f = health(env.clone());
        f.stderr.contains("refuses").then_some(f)
    });
    assert_eq!(finished.code(), Some(1), "{finished:?}");
    assert_eq!(finished.stderr.lines().count(), 1, "{finished:?}");
    assert!(
        finished.stderr.starts_with(
            "paheko-push: unhealthy: status error: the plugin refuses every ticket with HTTP 401: \
             the plugin does not accept the secret or the signature"
        ) && finished.stderr.contains("tickets wait in Redis"),
        "{finished:?}"
    );
    assert!(!finished.stderr.contains(SECRET));
}
