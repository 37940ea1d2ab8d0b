//! TLS (issue 4 §2): the plugin's certificate is verified against Mozilla's roots plus
//! `PAHEKO_PLUGIN_CA_FILE`, and refused, with a reason an operator can act on, when it
//! comes from a CA the worker was not told about; Redis is reached over `rediss://`
//! with `REDIS_CA_FILE` and an ACL user, and its password never reaches the log. The
//! certificates come from a private CA made with openssl for each test.

use std::net::TcpListener;
use std::time::Duration;

use serde_json::Value;

use super::util::*;
use crate::tls_sink::{TestPki, TlsSink};

const T: Duration = Duration::from_secs(20);
const REDIS_USER: &str = "pusher";
const REDIS_PASSWORD: &str = "Tls-Redis-Pa55word";

/// A worker's environment delivering to `plugin_url` over HTTPS only.
fn https_env(redis: &RedisServer, plugin_url: &str) -> Vec<(String, String)> {
    let unused = Sink::ok();
    env_with(
        base_env(redis, &unused),
        [
            ("PAHEKO_PLUGIN_URL", plugin_url),
            ("PAHEKO_PUSH_ALLOW_HTTP", "false"),
        ],
    )
}

#[test]
fn a_private_ca_given_in_plugin_ca_file_is_trusted() {
    let pki = TestPki::generate();
    let plugin = TlsSink::start(&pki);
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let id = publish_ticket(&mut conn, "cs-1", "sale-1");
    let ca = pki.ca_pem();
    let _worker = Worker::spawn(env_with(
        https_env(&redis, &plugin.url()),
        [("PAHEKO_PLUGIN_CA_FILE", ca.to_str().unwrap())],
    ));

    let received = plugin.wait_for_count(1, T);
    assert_eq!(received[0].idempotency_key(), Some(id.as_str()));
    assert_eq!(received[0].body_text(), ticket("cs-1", "sale-1"));
    assert_eq!(received[0].header("x-paheko-secret"), Some(SECRET));
    wait_until("the event acknowledged", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
    assert!(plugin.tls_errors().is_empty(), "{:?}", plugin.tls_errors());
}

#[test]
fn a_certificate_from_an_unknown_ca_is_refused_and_the_log_says_what_to_do() {
    let pki = TestPki::generate();
    let plugin = TlsSink::start(&pki);
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "cs-1", "sale-1");
    let worker = Worker::spawn(https_env(&redis, &plugin.url()));

    let line = worker.wait_for_log("a failed delivery", T, |l| {
        l["msg"] == "delivery failed, will retry"
    });
    let error = line["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("certificate is not signed by a trusted authority")
            && error.contains("PAHEKO_PLUGIN_CA_FILE")
            && error.contains("UnknownIssuer"),
        "{line}"
    );
    wait_until("the sink saw the refused handshake", T, || {
        !plugin.tls_errors().is_empty()
    });
    assert_eq!(plugin.handshakes(), 0);
    assert!(plugin.received().is_empty(), "nothing may be posted");
    // Not delivered, so neither acknowledged nor dead-lettered: it waits in Redis.
    assert_eq!(pending_count(&mut conn, STREAM, GROUP), 1);
    assert_eq!(xlen(&mut conn, DEAD), 0);
}

/// A port nobody listens on right now, for redis-server's TLS listener (it cannot take
/// a unix socket). Another process could take it before redis-server does; unlikely.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port");
    listener.local_addr().unwrap().port()
}

/// A redis-server with a TLS port (certificates of `pki`) besides its unix socket, and
/// an ACL user that may do anything.
fn redis_with_tls(pki: &TestPki) -> (RedisServer, u16) {
    let port = free_port().to_string();
    let password = format!(">{REDIS_PASSWORD}");
    let (cert, key, ca) = (pki.server_cert(), pki.server_key(), pki.ca_pem());
    let args = [
        "--tls-port",
        &port,
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
        "--tls-ca-cert-file",
        ca.to_str().unwrap(),
        "--tls-auth-clients",
        "no",
        "--user",
        REDIS_USER,
        "on",
        &password,
        "~*",
        "&*",
        "+@all",
    ];
    (RedisServer::start_with(&args), port.parse().unwrap())
}

fn rediss_url(port: u16) -> String {
    format!("rediss://{REDIS_USER}:{REDIS_PASSWORD}@127.0.0.1:{port}/0")
}

#[test]
fn redis_over_tls_with_an_acl_user_delivers_and_never_logs_the_password() {
    let pki = TestPki::generate();
    let (redis, port) = redis_with_tls(&pki);
    let sink = Sink::ok();
    let mut conn = redis.conn();
    let id = publish_ticket(&mut conn, "cs-1", "sale-1");
    let ca = pki.ca_pem();
    let env = env_with(
        base_env(&redis, &sink),
        [
            ("REDIS_URL", rediss_url(port).as_str()),
            ("REDIS_CA_FILE", ca.to_str().unwrap()),
        ],
    );
    let mut worker = Worker::spawn(&env);

    let received = sink.wait_for_count(1, T);
    assert_eq!(received[0].idempotency_key(), Some(id.as_str()));
    wait_until("the event acknowledged over TLS", T, || {
        pending_count(&mut conn, STREAM, GROUP) == 0
    });
    let clients: String = redis::cmd("CLIENT").arg("LIST").query(&mut conn).unwrap();
    assert!(
        clients.contains(&format!("user={REDIS_USER}")),
        "the worker is not connected as {REDIS_USER}:\n{clients}"
    );
    let started = worker.wait_for_msg("paheko-push starting", T);
    assert_eq!(
        started["redis"],
        Value::from(format!("rediss://{REDIS_USER}:***@127.0.0.1:{port}/0"))
    );

    // `check` goes the same way, and shows the URL without its password.
    let checked = Worker::run_to_end(&["check"], &env);
    assert_eq!(checked.code(), Some(0), "{checked:?}");
    assert!(
        checked.stdout.contains(&format!(
            "ok    redis         rediss://{REDIS_USER}:***@127.0.0.1:{port}/0 answers"
        )),
        "{checked:?}"
    );
    assert!(
        !format!("{checked:?}").contains(REDIS_PASSWORD),
        "{checked:?}"
    );

    worker.sigterm();
    assert!(worker.wait_exit(T).success());
    let stderr = worker.stderr();
    assert!(
        !stderr.contains(REDIS_PASSWORD),
        "the Redis password is in the log:\n{stderr}"
    );
}

#[test]
fn redis_over_tls_without_its_ca_is_refused_and_retried() {
    let pki = TestPki::generate();
    let (redis, port) = redis_with_tls(&pki);
    let sink = Sink::ok();
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "cs-1", "sale-1");
    let worker = Worker::spawn(env_with(
        base_env(&redis, &sink),
        [("REDIS_URL", rediss_url(port).as_str())],
    ));

    let line = worker.wait_for_log("a refused Redis connection", T, |l| {
        l["msg"] == "redis read failed: reconnecting"
    });
    let error = line["error"].as_str().unwrap_or_default();
    assert!(error.contains("UnknownIssuer"), "{line}");
    let (status, health) = worker.health();
    assert_eq!(health["redis"], Value::from("error"), "{status} {health}");
    assert_eq!(sink.count(), 0);
    assert_eq!(xlen(&mut conn, STREAM), 1);
    assert!(
        !worker.stderr().contains(REDIS_PASSWORD),
        "{}",
        worker.stderr()
    );
}

/// A certificate from the trusted CA but for another name (issue 15 §13): the worker
/// checks the name too, refuses the handshake, says why, and posts nothing. The same
/// setup with the name in the certificate delivers (so the refusal is the name's).
#[test]
fn a_certificate_for_another_name_is_refused_even_from_a_trusted_ca() {
    for (san, delivers) in [("DNS:paheko.example.org", false), ("DNS:localhost", true)] {
        let pki = TestPki::generate_with_san(san);
        let plugin = TlsSink::start(&pki);
        let redis = RedisServer::start();
        let mut conn = redis.conn();
        publish_ticket(&mut conn, "cs-1", "sale-1");
        let ca = pki.ca_pem();
        let worker = Worker::spawn(env_with(
            https_env(&redis, &plugin.url_for("localhost")),
            [("PAHEKO_PLUGIN_CA_FILE", ca.to_str().unwrap())],
        ));
        if delivers {
            plugin.wait_for_count(1, T);
            continue;
        }
        let line = worker.wait_for_log("a failed delivery", T, |l| {
            l["msg"] == "delivery failed, will retry"
        });
        let error = line["error"].as_str().unwrap_or_default().to_owned();
        assert!(
            error.contains("not valid for the host name of PAHEKO_PLUGIN_URL"),
            "{line}"
        );
        wait_until("the sink saw the refused handshake", T, || {
            !plugin.tls_errors().is_empty()
        });
        assert_eq!(plugin.handshakes(), 0);
        assert!(plugin.received().is_empty(), "nothing may be posted");
        assert_eq!(pending_count(&mut conn, STREAM, GROUP), 1);
    }
}
