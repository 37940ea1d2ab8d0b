//! Configuration (issue 2 §1): bad values stop the program before Redis is touched,
//! with one line naming the variable; a missing URL or secret keeps the worker up,
//! consuming nothing; `.env` and secret files are read, the real environment wins.

use std::time::Duration;

use super::util::*;

const T: Duration = Duration::from_secs(20);
const BIN: &str = env!("CARGO_BIN_EXE_paheko-push");

#[test]
fn a_bad_value_stops_the_program_before_redis_with_one_line_naming_it() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    let connections_before = connections_received(&mut conn);
    for (var, value, says) in [
        (
            "PAHEKO_PUSH_MAX_RETRIES",
            "abc",
            "expected a whole number from 1 to 1000, got \"abc\"",
        ),
        (
            "PAHEKO_PUSH_BACKOFF_FACTOR",
            "-2",
            "expected a number above 0",
        ),
        (
            "PAHEKO_PUSH_BACKOFF_FACTOR",
            "0",
            "expected a number above 0",
        ),
        (
            "PAHEKO_PLUGIN_URL",
            "ftp://paheko.example/push",
            "expected an https:// URL",
        ),
        ("PAHEKO_PLUGIN_URL", "not a url", "expected an https:// URL"),
        ("PAHEKO_PUSH_CONCURRENCY", "many", "whole number"),
        ("PAHEKO_PUSH_TIMEOUT_SECONDS", "-1", "seconds"),
        (
            "PAHEKO_PUSH_LOG",
            "verbose",
            "expected error, warn, info, debug or trace",
        ),
        ("REDIS_URL", "http://127.0.0.1:6379", "expected a redis://"),
    ] {
        let env = env_with(base_env(&redis, &sink), [(var, value)]);
        let done = Worker::run_to_end(&[], env);
        assert_eq!(done.code(), Some(2), "{var}={value}: {done:?}");
        let lines: Vec<&str> = done.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{var}={value}: {done:?}");
        assert!(
            lines[0].starts_with(&format!("paheko-push: configuration: {var}: ")),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains(says), "{var}={value}: {}", lines[0]);
    }
    // http:// without the allow flag: refused, naming the way out.
    let env = env_without(base_env(&redis, &sink), &["PAHEKO_PUSH_ALLOW_HTTP"]);
    let done = Worker::run_to_end(&[], env);
    assert_eq!(done.code(), Some(2));
    assert!(
        done.stderr.contains("PAHEKO_PLUGIN_URL")
            && done.stderr.contains("PAHEKO_PUSH_ALLOW_HTTP=true"),
        "{done:?}"
    );
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert!(keys.is_empty(), "Redis was touched: {keys:?}");
    // Not even connected to (a PING or an INFO writes no key): Redis's own count of the
    // connections it accepted did not move (issue 15 §13).
    assert_eq!(
        connections_received(&mut conn),
        connections_before,
        "the worker connected to Redis before refusing its configuration"
    );
}

/// Redis's `total_connections_received` (INFO stats).
fn connections_received(conn: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query(conn).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_connections_received in INFO stats")
}

#[test]
fn without_a_plugin_url_the_worker_stays_up_unconfigured_and_consumes_nothing() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "cs-1", "sale-1");
    let mut worker = Worker::spawn(env_without(base_env(&redis, &sink), &["PAHEKO_PLUGIN_URL"]));
    let said = worker.wait_for_msg(
        "PAHEKO_PLUGIN_URL is not set: nothing is delivered until it is set; events stay queued in Redis",
        T,
    );
    assert_eq!(said["level"], "error");
    let (code, health) = wait_for("health shows Redis checked", T, || {
        let (code, h) = worker.health();
        (h["redis"] == "ok").then_some((code, h))
    });
    assert_eq!(code, 200);
    assert_eq!(health["push_worker"], "unconfigured");
    assert_eq!(health["status"], "degraded");
    let groups: Result<Vec<redis::Value>, _> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(STREAM)
        .query(&mut conn);
    assert_eq!(groups.unwrap().len(), 0, "no group created, nothing read");
    assert_eq!(sink.count(), 0);
    worker.sigterm();
    assert_eq!(worker.wait_exit(T).code(), Some(0));

    let worker = Worker::spawn(env_without(
        base_env(&redis, &sink),
        &["PAHEKO_PLUGIN_SECRET"],
    ));
    worker.wait_for_msg(
        "PAHEKO_PLUGIN_SECRET is not set: nothing is delivered until it is set; events stay queued in Redis",
        T,
    );
    assert_eq!(worker.health().1["push_worker"], "unconfigured");
}

#[test]
fn dotenv_is_read_from_the_working_directory_and_the_environment_wins() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "# as RecyClique's .env\nPAHEKO_PLUGIN_SECRET=\"from-dotenv\"\nPAHEKO_PUSH_CONSUMER=dotenv-name\n",
    )
    .unwrap();
    let env = env_with(
        env_without(base_env(&redis, &sink), &["PAHEKO_PLUGIN_SECRET"]),
        [("PAHEKO_PUSH_CONSUMER", "env-name")],
    );
    let _worker = Worker::spawn_in(dir.path(), env);
    publish_ticket(&mut conn, "cs-1", "sale-1");
    let received = sink.wait_for_count(1, T);
    assert_eq!(received[0].header("x-paheko-secret"), Some("from-dotenv"));
    assert_eq!(consumer_names(&mut conn), ["env-name"]);
}

/// The group's consumers, by name.
fn consumer_names(conn: &mut redis::Connection) -> Vec<String> {
    let consumers: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(STREAM)
        .arg(GROUP)
        .query(conn)
        .unwrap();
    consumers
        .iter()
        .map(|c| redis::from_redis_value_ref(&c["name"]).unwrap())
        .collect()
}

/// RecyClique's `.env` is written for python-dotenv and docker compose (issue 8 §7): an
/// inline comment after a value is not part of it, quotes keep `#` and spaces, and
/// escapes inside double quotes are decoded.
#[test]
fn dotenv_is_read_as_docker_compose_and_python_dotenv_read_it() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        format!(
            "# RecyClique's .env\n\
             export REDIS_URL={}  # internal\n\
             PAHEKO_PLUGIN_SECRET=\"s3#cr\\\"et \\\\ x\"   # quoted: the # stays, \\\" and \\\\ decoded\n\
             PAHEKO_PUSH_CONSUMER='single # quoted'\n\
             PAHEKO_PUSH_CONCURRENCY=2 # two pushers\n",
            redis.url()
        ),
    )
    .unwrap();
    let env = env_without(
        base_env(&redis, &sink),
        &[
            "REDIS_URL",
            "PAHEKO_PLUGIN_SECRET",
            "PAHEKO_PUSH_CONSUMER",
            "PAHEKO_PUSH_CONCURRENCY",
        ],
    );
    let worker = Worker::spawn_in(dir.path(), env);
    publish_ticket(&mut conn, "cs-1", "sale-1");
    let received = sink.wait_for_count(1, T);
    assert_eq!(
        received[0].header("x-paheko-secret"),
        Some(r#"s3#cr"et \ x"#),
        "{}",
        worker.stderr()
    );
    assert_eq!(consumer_names(&mut conn), ["single # quoted"]);
}

#[test]
fn a_dotenv_line_that_cannot_be_read_stops_the_start_naming_the_line_not_the_value() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "# comment\nPAHEKO_PUSH_CONSUMER=ok\n\nPAHEKO_PLUGIN_SECRET=two Secret-Words\n",
    )
    .unwrap();
    let finished = Worker::run_to_end_in(
        dir.path(),
        &[],
        env_without(base_env(&redis, &sink), &["PAHEKO_PLUGIN_SECRET"]),
    );
    assert_eq!(finished.code(), Some(2), "{finished:?}");
    assert!(
        finished
            .stderr
            .contains(".env: line 4 (PAHEKO_PLUGIN_SECRET)"),
        "{finished:?}"
    );
    assert!(!finished.stderr.contains("Secret-Words"), "{finished:?}");
}

#[test]
fn the_secret_can_come_from_a_file() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("paheko-secret");
    std::fs::write(&file, "secret-from-a-file\n").unwrap();
    let env = env_with(
        env_without(base_env(&redis, &sink), &["PAHEKO_PLUGIN_SECRET"]),
        [("PAHEKO_PLUGIN_SECRET_FILE", file.to_str().unwrap())],
    );
    let _worker = Worker::spawn(env);
    publish_ticket(&mut conn, "cs-1", "sale-1");
    let received = sink.wait_for_count(1, T);
    assert_eq!(
        received[0].header("x-paheko-secret"),
        Some("secret-from-a-file")
    );

    let env = env_with(
        base_env(&redis, &sink),
        [("PAHEKO_PLUGIN_SECRET_FILE", "/nonexistent/secret")],
    );
    let done = Worker::run_to_end(&[], env);
    assert_eq!(done.code(), Some(2));
    assert!(
        done.stderr
            .contains("set either PAHEKO_PLUGIN_SECRET or PAHEKO_PLUGIN_SECRET_FILE"),
        "{done:?}"
    );
}

/// Runs `BIN args` with nothing but PATH in its environment, in a mount namespace whose
/// /etc is an empty tmpfs holding only `files` under /etc/paheko-push: the package's
/// layout, without touching the machine's /etc.
fn with_package_files(
    files: &[(&str, &str)],
    env: &[&str],
    args: &[&str],
) -> Option<std::process::Output> {
    let unshare = crate::packaging::need("unshare", "util-linux")?;
    let staged = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(staged.path().join(name), text).unwrap();
    }
    let script = r#"set -e
mount -t tmpfs tmpfs /etc
mkdir /etc/paheko-push
cp "$STAGED"/* /etc/paheko-push/
cd "$WORKDIR"
exec env -u STAGED -u WORKDIR "$@""#;
    let mut command = std::process::Command::new(unshare);
    command
        .args(["-r", "-m", "sh", "-c", script, "sh"])
        .args(env)
        .arg(BIN)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("STAGED", staged.path())
        .env("WORKDIR", cwd.path());
    Some(crate::packaging::output(&mut command))
}

/// Issue 14 §2: after `apt install` and editing /etc/paheko-push/paheko-push.env, the
/// README's `paheko-push check` (and `health`, `dead`) read that file and the secret
/// beside it, and say so; the worker itself does not (systemd hands it the file).
#[test]
fn check_health_and_dead_read_the_packages_env_file_and_its_secret() {
    let redis = RedisServer::start();
    let sink = Sink::ok();
    let mut conn = redis.conn();
    publish_ticket(&mut conn, "cs-1", "sale-1");
    let worker = Worker::spawn(base_env(&redis, &sink));
    sink.wait_for_count(1, T);
    let conffile = format!(
        "# as the package ships it, uncommented and set\nREDIS_URL={}\nPAHEKO_PLUGIN_URL={}\n\
         PAHEKO_PUSH_ALLOW_HTTP=true\nPAHEKO_PUSH_HEALTH_ADDR={}\n",
        redis.url(),
        sink.url(),
        worker.health_addr()
    );
    let files = [
        ("paheko-push.env", conffile.as_str()),
        ("secret", "package-secret-from-file\n"),
    ];
    let Some(checked) = with_package_files(&files, &[], &["check"]) else {
        return;
    };
    let stdout = String::from_utf8_lossy(&checked.stdout);
    let stderr = String::from_utf8_lossy(&checked.stderr);
    assert!(checked.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.starts_with(
            "ok    configuration from /etc/paheko-push/paheko-push.env and the secret \
             /etc/paheko-push/secret: "
        ),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("ok    stream") && l.ends_with(": 1 entry")),
        "{stdout}"
    );
    let ping = sink
        .received()
        .into_iter()
        .find(|r| r.header("x-paheko-event") == Some("ping"))
        .expect("no ping");
    assert_eq!(
        ping.header("x-paheko-secret"),
        Some("package-secret-from-file")
    );
    assert!(!stdout.contains("package-secret-from-file"));

    let Some(probed) = with_package_files(&files, &[], &["health"]) else {
        return;
    };
    let said = String::from_utf8_lossy(&probed.stdout);
    assert!(
        probed.status.success() && said.starts_with("healthy: "),
        "{said}{}",
        String::from_utf8_lossy(&probed.stderr)
    );
    let Some(listed) = with_package_files(&files, &[], &["dead", "list"]) else {
        return;
    };
    assert!(listed.status.success(), "{listed:?}");
    assert!(
        String::from_utf8_lossy(&listed.stderr).starts_with(
            "paheko-push: configuration from /etc/paheko-push/paheko-push.env and the secret \
             /etc/paheko-push/secret\n"
        ),
        "{listed:?}"
    );

    // A variable in the environment means the operator configured it there: the
    // package's file is not mixed in. PAHEKO_PUSH_ENV_FILE names another file.
    let Some(shop) = with_package_files(
        &[
            ("paheko-push.env", "PAHEKO_PUSH_GROUP=wrong-file\n"),
            ("shop.env", conffile.as_str()),
            ("shop.secret", "shop-secret"),
        ],
        &["PAHEKO_PUSH_ENV_FILE=/etc/paheko-push/shop.env"],
        &["check"],
    ) else {
        return;
    };
    let stdout = String::from_utf8_lossy(&shop.stdout);
    assert!(
        shop.status.success()
            && stdout.starts_with(
                "ok    configuration from /etc/paheko-push/shop.env and the secret \
                 /etc/paheko-push/shop.secret: "
            )
            && stdout.contains("group recyclic-push"),
        "{stdout}{}",
        String::from_utf8_lossy(&shop.stderr)
    );
    drop(worker);
}

/// A user the package's file is not for (root's, 0640), such as a monitoring script
/// running `paheko-push health`, goes on with the environment alone, and `check` says
/// why it did not read the file. Run as root in namespaces of its own: an empty /etc
/// holding the package's file, and a network where nothing answers (the defaults then
/// reach no one's Redis), as the user nobody.
#[test]
fn a_user_who_may_not_read_the_packages_file_is_told_and_goes_on_without_it() {
    // SAFETY: geteuid takes nothing and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        crate::util::skip("the unreadable package file test: it needs root");
        return;
    }
    let (Some(unshare), Some(setpriv)) = (
        crate::packaging::need("unshare", "util-linux"),
        crate::packaging::need("setpriv", "util-linux"),
    ) else {
        return;
    };
    let cwd = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        cwd.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let script = r#"set -e
mount -t tmpfs tmpfs /etc
mkdir /etc/paheko-push
echo REDIS_URL=redis://127.0.0.1:1/0 > /etc/paheko-push/paheko-push.env
chmod 0640 /etc/paheko-push/paheko-push.env
ip link set lo up 2>/dev/null || true
cd "$WORKDIR"
exec env -u WORKDIR "$SETPRIV" --reuid=65534 --regid=65534 --clear-groups "$BIN" check"#;
    let out = crate::packaging::output(
        std::process::Command::new(unshare)
            .args(["-m", "-n", "sh", "-c", script])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("WORKDIR", cwd.path())
            .env("SETPRIV", setpriv)
            .env("BIN", BIN),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stdout.starts_with(
            "warn  configuration from the environment alone (/etc/paheko-push/paheko-push.env \
             is there, but this user may not read it: run as root)"
        ),
        "{out:?}"
    );
    assert!(
        stdout.contains("redis://127.0.0.1:6379/0"),
        "the defaults, not the file: {out:?}"
    );
}
