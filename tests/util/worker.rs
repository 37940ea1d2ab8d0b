//! The real `paheko-push` binary as a child process.
//!
//! The child gets exactly the environment the test gives (nothing is inherited, not even
//! `PATH`), an empty working directory of its own (so a stray `.env` is never read), no
//! stdin, and its stdout and stderr in files that the test reads as often as it likes.
//! It is killed on drop; if the test is failing, its stderr is printed then.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use super::{EnvPair, POLL_INTERVAL, send_signal, tail};

/// The binary under test, built by cargo for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_paheko-push");

/// How long [`Worker::health_addr`] waits for the "health server listening" line.
const HEALTH_ADDR_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a [`Worker::run_to_end`] invocation may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`Worker::get`] waits for the health server to answer.
const GET_TIMEOUT: Duration = Duration::from_secs(5);
/// How many stderr lines a failing test gets to see.
const DUMP_LINES: usize = 200;

/// A running `paheko-push` process. SIGKILLed on drop.
pub struct Worker {
    child: Mutex<Child>,
    pid: u32,
    /// Holds `stdout`, `stderr` and the default working dir `cwd/`.
    files: TempDir,
    health_addr: OnceLock<String>,
    /// Set once a panic message has carried the stderr dump, so drop doesn't repeat it.
    dumped: AtomicBool,
}

/// The outcome of a [`Worker::run_to_end`] invocation.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Worker {
    /// Starts the worker (no arguments) with exactly `env`, in an empty temp dir.
    /// Later entries of `env` override earlier ones with the same name.
    pub fn spawn(env: impl IntoIterator<Item = impl EnvPair>) -> Worker {
        Worker::spawn_with(&[], None, env)
    }

    /// Like [`spawn`](Self::spawn), with `dir` as the working directory (e.g. one holding
    /// a `.env` file).
    pub fn spawn_in(dir: &Path, env: impl IntoIterator<Item = impl EnvPair>) -> Worker {
        Worker::spawn_with(&[], Some(dir), env)
    }

    /// Starts the binary with `args`, in `dir` (an empty temp dir if `None`), with
    /// exactly `env`.
    pub fn spawn_with(
        args: &[&str],
        dir: Option<&Path>,
        env: impl IntoIterator<Item = impl EnvPair>,
    ) -> Worker {
        // PAHEKO_PUSH_TEST_BINARY runs the tests against another build (an older
        // release, to see a new test fail on it).
        let bin = std::env::var("PAHEKO_PUSH_TEST_BINARY").unwrap_or_else(|_| BIN.to_string());
        Worker::spawn_program(Path::new(&bin), args, dir, env)
    }

    /// Like [`spawn_with`](Self::spawn_with), running `program` instead of the binary
    /// cargo built: the one from the Debian package, or `unshare` running the static
    /// one in a root of its own (give it absolute paths: the child has no `PATH`).
    pub fn spawn_program(
        program: &Path,
        args: &[&str],
        dir: Option<&Path>,
        env: impl IntoIterator<Item = impl EnvPair>,
    ) -> Worker {
        let files = tempfile::Builder::new()
            .prefix("paheko-worker-")
            .tempdir()
            .expect("creating the worker's temp dir");
        let cwd = match dir {
            Some(dir) => dir.to_path_buf(),
            None => {
                let cwd = files.path().join("cwd");
                fs::create_dir(&cwd).expect("creating the worker's working dir");
                cwd
            }
        };
        let stdout = fs::File::create(files.path().join("stdout")).expect("creating stdout file");
        let stderr = fs::File::create(files.path().join("stderr")).expect("creating stderr file");

        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .current_dir(&cwd)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        for pair in env {
            let (name, value) = pair.pair();
            command.env(name, value);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        Worker {
            pid: child.id(),
            child: Mutex::new(child),
            files,
            health_addr: OnceLock::new(),
            dumped: AtomicBool::new(false),
        }
    }

    /// Runs the binary with `args` and `env` in an empty temp dir until it exits (for
    /// subcommands and start-up failures); panics if it takes more than 20 s.
    pub fn run_to_end(args: &[&str], env: impl IntoIterator<Item = impl EnvPair>) -> Finished {
        Worker::spawn_with(args, None, env).finish()
    }

    /// Like [`run_to_end`](Self::run_to_end), in `dir`.
    pub fn run_to_end_in(
        dir: &Path,
        args: &[&str],
        env: impl IntoIterator<Item = impl EnvPair>,
    ) -> Finished {
        Worker::spawn_with(args, Some(dir), env).finish()
    }

    fn finish(mut self) -> Finished {
        let status = self.wait_exit(RUN_TIMEOUT);
        Finished {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status if the process has exited, `None` while it runs.
    pub fn try_status(&self) -> Option<ExitStatus> {
        self.lock_child()
            .try_wait()
            .unwrap_or_else(|e| panic!("polling worker {}: {e}", self.pid))
    }

    /// Everything the worker has written to stderr so far (its log).
    pub fn stderr(&self) -> String {
        self.read_file("stderr")
    }

    /// Everything the worker has written to stdout so far.
    pub fn stdout(&self) -> String {
        self.read_file("stdout")
    }

    /// Each stderr line that is a JSON object, in order; other lines are skipped.
    pub fn log_lines(&self) -> Vec<Value> {
        json_lines(&self.stderr())
    }

    /// Waits until a log line satisfies `pred`, and returns it. Panics, with the
    /// worker's stderr, on timeout or if the worker exits without logging such a line.
    pub fn wait_for_log(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            // Check the status before the log, so lines written just before exiting count.
            let exited = self.try_status();
            if let Some(line) = self.log_lines().into_iter().find(|line| pred(line)) {
                return line;
            }
            if let Some(status) = exited {
                self.fail(&format!("worker exited ({status}) without logging: {what}"));
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "timed out after {timeout:?} waiting for log: {what}"
                ));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits for a log line whose `msg` field is exactly `msg`.
    pub fn wait_for_msg(&self, msg: &str, timeout: Duration) -> Value {
        self.wait_for_log(&format!("msg {msg:?}"), timeout, |line| line["msg"] == msg)
    }

    /// The `host:port` of the health server, from the worker's
    /// `{"msg":"health server listening","addr":"127.0.0.1:43123",…}` log line (start
    /// it with `PAHEKO_PUSH_HEALTH_ADDR=127.0.0.1:0`). Waits up to 10 s for that line.
    pub fn health_addr(&self) -> String {
        self.health_addr
            .get_or_init(|| {
                let line = self.wait_for_msg("health server listening", HEALTH_ADDR_TIMEOUT);
                match line["addr"].as_str() {
                    Some(addr) => addr.to_owned(),
                    None => self.fail(&format!("health line without a string addr: {line}")),
                }
            })
            .clone()
    }

    /// `GET path` on the health server: status and body. Panics if it cannot connect.
    pub fn get(&self, path: &str) -> (u16, String) {
        self.try_get(path)
            .unwrap_or_else(|e| self.fail(&format!("GET {path} on the health server: {e}")))
    }

    /// `GET path` on the health server, or the transport error (e.g. once it has stopped).
    pub fn try_get(&self, path: &str) -> Result<(u16, String), String> {
        let url = format!("http://{}{path}", self.health_addr());
        // No proxy: ureq would otherwise honour the test runner's HTTP_PROXY.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_global(Some(GET_TIMEOUT))
            .build()
            .into();
        let mut response = agent.get(&url).call().map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|e| e.to_string())?;
        Ok((status, body))
    }

    /// `GET /health`: status and the body parsed as JSON.
    pub fn health(&self) -> (u16, Value) {
        let (status, body) = self.get("/health");
        match serde_json::from_str(&body) {
            Ok(json) => (status, json),
            Err(e) => self.fail(&format!(
                "/health answered {status} with non-JSON ({e}): {body}"
            )),
        }
    }

    /// Sends SIGTERM (no-op if the worker has already exited and been reaped).
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends SIGINT (no-op if the worker has already exited and been reaped).
    pub fn sigint(&self) {
        self.signal("INT");
    }

    /// Pauses the worker (SIGSTOP), as a frozen VM or a long GC pause would: it neither
    /// renews its lease nor notices it lost it until [`Worker::sigcont`].
    pub fn sigstop(&self) {
        self.signal("STOP");
    }

    /// Resumes a worker paused by [`Worker::sigstop`].
    pub fn sigcont(&self) {
        self.signal("CONT");
    }

    /// Kills the worker with SIGKILL, as a crash or an OOM kill would, and reaps it.
    pub fn kill9(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits for the worker to exit and returns its status; panics, with the worker's
    /// stderr, if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            if Instant::now() >= deadline {
                self.fail(&format!("worker still running after {timeout:?}"));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Panics with `message` followed by the worker's output.
    fn fail(&self, message: &str) -> ! {
        self.dumped.store(true, Ordering::SeqCst);
        panic!("{message}\n{}", self.dump());
    }

    fn dump(&self) -> String {
        let mut out = format!(
            "--- paheko-push stderr (pid {}, last {DUMP_LINES} lines) ---\n{}",
            self.pid,
            tail(&self.stderr(), DUMP_LINES)
        );
        let stdout = self.stdout();
        if !stdout.is_empty() {
            out.push_str("--- paheko-push stdout ---\n");
            out.push_str(&tail(&stdout, 50));
        }
        out
    }

    fn signal(&self, signal: &str) {
        // Holding the lock keeps the child from being reaped (and its pid reused) between
        // the check and the kill.
        let mut child = self.lock_child();
        if let Ok(None) = child.try_wait() {
            send_signal(self.pid, signal);
        }
    }

    fn lock_child(&self) -> MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_file(&self, name: &str) -> String {
        let path: PathBuf = self.files.path().join(name);
        let bytes = fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() && !self.dumped.load(Ordering::SeqCst) {
            eprintln!("{}", self.dump());
        }
    }
}

impl Finished {
    /// The exit code, `None` if killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Each stderr line that is a JSON object, in order.
    pub fn log_lines(&self) -> Vec<Value> {
        json_lines(&self.stderr)
    }
}

/// Shows the whole output readably, for `assert!(…, "{finished:?}")`.
impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "paheko-push exited with {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.status,
            tail(&self.stdout, DUMP_LINES),
            tail(&self.stderr, DUMP_LINES)
        )
    }
}

/// The lines of `text` that are JSON objects (log records); anything else is skipped.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(Value::is_object)
        .collect()
}

/// The time a log record was written, from its `ts` (`2026-11-30T06:39:34.770Z`, UTC):
/// durations between the worker's own records do not include how late a test (on a
/// busy machine) noticed them.
pub fn log_time(line: &Value) -> std::time::SystemTime {
    let ts = line["ts"]
        .as_str()
        .unwrap_or_else(|| panic!("a log record without ts: {line}"));
    let parse = |range: std::ops::Range<usize>| -> i64 {
        ts.get(range)
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("ts {ts:?} is not YYYY-MM-DDTHH:MM:SS.mmmZ"))
    };
    let (y, m, d) = (parse(0..4), parse(5..7), parse(8..10));
    let (hh, mm, ss, ms) = (parse(11..13), parse(14..16), parse(17..19), parse(20..23));
    // Days from the civil date (Howard Hinnant's algorithm), 1970-01-01 = 0.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let millis = (((days * 24 + hh) * 60 + mm) * 60 + ss) * 1000 + ms;
    std::time::UNIX_EPOCH + Duration::from_millis(millis as u64)
}

/// How long after `from` the record `to` was written, from their `ts`.
pub fn log_gap(from: &Value, to: &Value) -> Duration {
    log_time(to)
        .duration_since(log_time(from))
        .unwrap_or_else(|_| panic!("{to} is before {from}"))
}
