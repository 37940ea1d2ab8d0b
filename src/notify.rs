//! systemd's notification protocol (`sd_notify(3)`), spoken with the standard library
//! alone: one datagram per message to the unix socket `$NOTIFY_SOCKET` names (a path, or
//! an abstract socket written `@name`). The worker says `READY=1` once Redis answered
//! and the consumer group exists, `WATCHDOG=1` when systemd set `WATCHDOG_USEC` (at
//! most once per half interval, asked for by the reader's loop) but only while every
//! thread makes progress ([`Liveness`]: a wedged acker or pusher stops the pings, and
//! systemd restarts the worker), and `STOPPING=1` when a stop begins.
//! Without `$NOTIFY_SOCKET` every call here does nothing, so the worker runs the same
//! outside systemd. A message that cannot be sent is logged once and never stops the
//! worker. The variables are left in the environment (removing them from a running
//! multi-threaded program is not sound), so a child process would inherit them; the
//! worker starts none.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::shutdown::Shutdown;

/// The process-wide notifier, read from the environment on first use.
static NOTIFIER: OnceLock<Option<Notifier>> = OnceLock::new();
/// The threads the watchdog vouches for, once the worker registered them.
static THREADS: OnceLock<Arc<Liveness>> = OnceLock::new();

/// Makes the watchdog ping only while every thread of `liveness` makes progress.
pub fn watch_threads(liveness: Arc<Liveness>) {
    let _ = THREADS.set(liveness);
}

fn notifier() -> Option<&'static Notifier> {
    NOTIFIER.get_or_init(Notifier::from_env).as_ref()
}

/// True when the worker runs under a service manager that listens.
pub fn enabled() -> bool {
    notifier().is_some()
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), if any.
pub fn watchdog_timeout() -> Option<Duration> {
    notifier().and_then(|n| n.ping_every).map(|half| half * 2)
}

/// `READY=1`, sent once however often it is called.
pub fn ready() {
    if let Some(n) = notifier() {
        n.ready();
    }
}

/// `WATCHDOG=1`, when the watchdog is on, half its interval has passed since the
/// last one, and no registered thread is stuck. Cheap enough to call on every turn of
/// a loop.
pub fn watchdog() {
    if let Some(n) = notifier() {
        let now = Instant::now();
        match THREADS.get().map(|t| t.stuck(now)) {
            Some(Some(stuck)) => n.withhold_watchdog(stuck),
            _ => n.watchdog(now),
        }
    }
}

/// What each long-lived thread is doing, for the watchdog: waiting for work (fine for
/// ever), or busy on one step since some moment (fine within its own limit: a request
/// within the request timeout, an acker step within a few Redis timeouts). Atomics
/// only; a thread stamps its own slot.
#[derive(Debug)]
pub struct Liveness {
    started: Instant,
    slots: Vec<Slot>,
}

#[derive(Debug)]
struct Slot {
    name: String,
    limit: Duration,
    /// Milliseconds since `started` + 1 when the current step began; 0 while waiting.
    busy_since: AtomicU64,
}

/// One thread's handle on its slot.
#[derive(Debug, Clone)]
pub struct Beat {
    liveness: Arc<Liveness>,
    slot: usize,
}

impl Liveness {
    /// One slot per `(thread name, longest step)`.
    pub fn new(threads: Vec<(String, Duration)>) -> Arc<Liveness> {
        let slots = threads
            .into_iter()
            .map(|(name, limit)| Slot {
                name,
                limit,
                busy_since: AtomicU64::new(0),
            })
            .collect();
        Arc::new(Liveness {
            started: Instant::now(),
            slots,
        })
    }

    /// The handle of slot `n`, in the order given to [`Liveness::new`].
    pub fn beat(self: &Arc<Self>, n: usize) -> Beat {
        Beat {
            liveness: Arc::clone(self),
            slot: n,
        }
    }

    /// The name of a thread busy on one step for longer than its limit, if any.
    pub fn stuck(&self, now: Instant) -> Option<&str> {
        let now_ms = now.saturating_duration_since(self.started).as_millis() as u64;
        self.slots.iter().find_map(|slot| {
            let since = slot.busy_since.load(Ordering::Relaxed);
            let busy_for = Duration::from_millis(now_ms.saturating_sub(since.saturating_sub(1)));
            (since != 0 && busy_for > slot.limit).then_some(slot.name.as_str())
        })
    }
}

impl Beat {
    /// The thread starts a step of work.
    pub fn busy(&self) {
        let l = &self.liveness;
        let ms = l.started.elapsed().as_millis() as u64 + 1;
        l.slots[self.slot].busy_since.store(ms, Ordering::Relaxed);
    }

    /// The thread waits for work: it cannot be stuck meanwhile.
    pub fn idle(&self) {
        self.liveness.slots[self.slot]
            .busy_since
            .store(0, Ordering::Relaxed);
    }
}

/// `STOPPING=1`, sent once however often it is called; no watchdog ping follows it.
pub fn stopping() {
    if let Some(n) = notifier() {
        n.stopping();
    }
}

/// Sends `STOPPING=1` as soon as `shutdown` is triggered, from a thread of its own (none
/// is started when nobody listens).
pub fn stopping_on(shutdown: &Shutdown) -> io::Result<()> {
    if !enabled() {
        return Ok(());
    }
    let shutdown = shutdown.clone();
    std::thread::Builder::new()
        .name("notify".into())
        .spawn(move || {
            // Returns once the stop closes the channel.
            let _ = shutdown.signal().recv();
            stopping();
        })
        .map(|_| ())
}

/// Where the messages go, and the watchdog's state.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// Half of `WATCHDOG_USEC`: the longest the worker lets pass between two pings.
    ping_every: Option<Duration>,
    last_ping: Mutex<Option<Instant>>,
    ready_sent: AtomicBool,
    stopping_sent: AtomicBool,
    failure_logged: AtomicBool,
    /// A ping is being withheld because a thread is stuck (logged once per episode).
    withholding: AtomicBool,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`; `None` without a socket.
    fn from_env() -> Option<Notifier> {
        let socket = std::env::var("NOTIFY_SOCKET").ok()?;
        let watchdog = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        match Notifier::new(&socket, watchdog) {
            Ok(n) => Some(n),
            Err(e) => {
                log::warn!(error = e.to_string().as_str(), socket = socket.as_str();
                    "NOTIFY_SOCKET is set but unusable: systemd will not hear from the worker");
                None
            }
        }
    }

    /// A notifier for the socket `path` (`@name` for an abstract socket) and the
    /// watchdog interval systemd asked for, if any.
    pub fn new(path: &str, watchdog: Option<Duration>) -> io::Result<Notifier> {
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            addr: socket_addr(path)?,
            ping_every: watchdog.map(|w| w / 2),
            last_ping: Mutex::new(None),
            ready_sent: AtomicBool::new(false),
            stopping_sent: AtomicBool::new(false),
            failure_logged: AtomicBool::new(false),
            withholding: AtomicBool::new(false),
        })
    }

    pub fn ready(&self) {
        if !self.ready_sent.swap(true, Ordering::SeqCst) {
            self.send("READY=1");
        }
    }

    pub fn stopping(&self) {
        if !self.stopping_sent.swap(true, Ordering::SeqCst) {
            self.send("STOPPING=1");
        }
    }

    /// Pings if the watchdog is on, the stop has not begun, and the last ping is at least
    /// half an interval old.
    pub fn watchdog(&self, now: Instant) {
        let Some(every) = self.ping_every else {
            return;
        };
        if self.stopping_sent.load(Ordering::SeqCst) {
            return;
        }
        if self.withholding.swap(false, Ordering::SeqCst) {
            log::info!("every thread makes progress again: watchdog pings resume");
        }
        let mut last = self.last_ping.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| now.saturating_duration_since(t) >= every) {
            *last = Some(now);
            drop(last);
            self.send("WATCHDOG=1");
        }
    }

    /// A thread is stuck: no ping, so that systemd restarts the worker once the
    /// watchdog interval runs out (the entries stay pending and are delivered by the
    /// next start).
    pub fn withhold_watchdog(&self, stuck: &str) {
        if self.ping_every.is_some() && !self.withholding.swap(true, Ordering::SeqCst) {
            log::error!(thread = stuck;
                "the {stuck} thread is stuck: no more watchdog pings, systemd will restart the worker");
        }
    }

    pub fn send(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.addr)
            && !self.failure_logged.swap(true, Ordering::SeqCst)
        {
            log::warn!(error = e.to_string().as_str(), message;
                "cannot notify systemd (NOTIFY_SOCKET); further failures are not logged");
        }
    }
}

/// The watchdog interval, when `WATCHDOG_USEC` is a positive number and `WATCHDOG_PID`,
/// if set, is this process (systemd sets it so a child does not ping for its parent).
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    match usec?.trim().parse::<u64>() {
        Ok(0) | Err(_) => None,
        Ok(usec) => Some(Duration::from_micros(usec)),
    }
}

fn socket_addr(path: &str) -> io::Result<SocketAddr> {
    match path.strip_prefix('@') {
        Some(name) => abstract_addr(name),
        None if path.starts_with('/') => SocketAddr::from_pathname(path),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("expected an absolute path or @name, got {path:?}"),
        )),
    }
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &str) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name.as_bytes())
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_: &str) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist on Linux only",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> (UnixDatagram, String, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "paheko-push-notify-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_nonblocking(true).unwrap();
        (socket, path.to_str().unwrap().to_string(), dir)
    }

    fn messages(socket: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = socket.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    #[test]
    fn ready_once_and_watchdog_at_most_every_half_interval() {
        let (socket, path, dir) = listener();
        let n = Notifier::new(&path, Some(Duration::from_secs(10))).unwrap();
        n.ready();
        n.ready();
        let t0 = Instant::now();
        n.watchdog(t0);
        n.watchdog(t0 + Duration::from_secs(4));
        n.watchdog(t0 + Duration::from_secs(5));
        n.watchdog(t0 + Duration::from_secs(6));
        n.watchdog(t0 + Duration::from_secs(10));
        n.stopping();
        n.stopping();
        n.watchdog(t0 + Duration::from_secs(20));
        assert_eq!(
            messages(&socket),
            [
                "READY=1",
                "WATCHDOG=1",
                "WATCHDOG=1",
                "WATCHDOG=1",
                "STOPPING=1"
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn no_watchdog_unless_asked_for_this_process() {
        assert_eq!(
            watchdog_interval(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
        let (socket, path, dir) = listener();
        let n = Notifier::new(&path, None).unwrap();
        n.watchdog(Instant::now());
        assert!(messages(&socket).is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_thread_busy_past_its_limit_is_stuck_one_waiting_never() {
        let l = Liveness::new(vec![
            ("acker".into(), Duration::from_secs(30)),
            ("pusher-0".into(), Duration::from_secs(40)),
        ]);
        let (acker, pusher) = (l.beat(0), l.beat(1));
        let t0 = Instant::now();
        assert_eq!(l.stuck(t0 + Duration::from_secs(3600)), None, "both wait");
        acker.busy();
        pusher.busy();
        assert_eq!(l.stuck(Instant::now() + Duration::from_secs(29)), None);
        assert_eq!(
            l.stuck(Instant::now() + Duration::from_secs(31)),
            Some("acker")
        );
        acker.idle();
        assert_eq!(
            l.stuck(Instant::now() + Duration::from_secs(41)),
            Some("pusher-0")
        );
        pusher.idle();
        assert_eq!(l.stuck(Instant::now() + Duration::from_secs(3600)), None);
    }

    #[test]
    fn a_stuck_thread_withholds_the_ping() {
        let (socket, path, dir) = listener();
        let n = Notifier::new(&path, Some(Duration::from_secs(10))).unwrap();
        let t0 = Instant::now();
        n.watchdog(t0);
        n.withhold_watchdog("acker");
        n.withhold_watchdog("acker");
        n.watchdog(t0 + Duration::from_secs(6));
        assert_eq!(messages(&socket), ["WATCHDOG=1", "WATCHDOG=1"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_sockets_are_understood() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("paheko-push-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        socket.set_nonblocking(true).unwrap();
        Notifier::new(&format!("@{name}"), None).unwrap().ready();
        assert_eq!(messages(&socket), ["READY=1"]);
        assert!(Notifier::new("relative/path", None).is_err());
    }
}
