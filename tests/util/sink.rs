//! A real HTTP server standing in for the Paheko plugin.
//!
//! It records every request the moment it arrives (before any scripted delay), then
//! answers what the test's responder decides: a status, headers, a body, after a delay,
//! or no answer at all (the connection is closed). Eight handler threads share the
//! server, so a slow reply to one request does not hold up the others.
//!
//! What it answered is recorded too ([`Received::answered`]): a request counts as
//! accepted, as a plugin would have committed it, only once its 2xx was written whole
//! to a client that was still there. A worker killed while the sink waited to answer
//! has closed its socket; the sink sees that and writes nothing (issue 8 §8).
//!
//! Both moments are kept as `Instant`s: when a request arrived ([`Received::at`]) and
//! when its answer was written ([`Received::answered_at`]), so order checks can compare
//! a request with the answers before it (`util::lanes`, issue 15 §1).

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tiny_http::{Header, Request, Response, Server};

use super::POLL_INTERVAL;

/// How many requests the sink can be handling at once.
const HANDLER_THREADS: usize = 8;

/// The path the sink's URL points at; any path is accepted and recorded.
const PUSH_PATH: &str = "/paheko/push";

/// One request as the sink received it.
#[derive(Clone, Debug)]
pub struct Received {
    /// When the request (headers and body) had been read.
    pub at: Instant,
    /// The same moment on the wall clock, to compare with the worker's log times
    /// (`util::log_time`).
    pub at_wall: std::time::SystemTime,
    pub method: String,
    /// The request target, query string included.
    pub path: String,
    /// In arrival order, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// 1 for the first request carrying this `Idempotency-Key`, 2 for the second, …
    /// Requests without the header share one count of their own.
    pub attempt: u32,
    /// The status the sink wrote whole to the client, once it has; `None` while the
    /// answer is pending, and for good when the connection was dropped, the client had
    /// gone before the answer (a worker killed mid-request), or the write failed.
    pub answered: Option<u16>,
    /// When the answer in `answered` was written, set together with it (so `None` in the
    /// same cases). The instant is taken just *before* the first byte is written and kept
    /// only once the last byte was written without error: no client can have read the
    /// whole answer before it, so a request that arrived before this instant was sent
    /// while its sender still waited for this answer. (A time taken after the write
    /// would race the client: it can read the answer and send its next request before
    /// this thread gets to call the clock.)
    pub answered_at: Option<Instant>,
}

impl Received {
    /// The first value of header `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the plugin took this request: a 2xx was written whole to the client.
    pub fn accepted(&self) -> bool {
        self.answered.is_some_and(|s| (200..300).contains(&s))
    }

    /// When the plugin took this request (its 2xx was written whole), if it did.
    pub fn accepted_at(&self) -> Option<Instant> {
        self.answered_at.filter(|_| self.accepted())
    }

    /// The `Idempotency-Key` header, if any.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.header("idempotency-key")
    }

    /// The body as text (invalid UTF-8 replaced), for messages and substring checks.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics, showing the body, if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("sink body is not JSON ({e}): {}", self.body_text()))
    }
}

/// What the sink answers to one request. Build with [`Reply::status`] or
/// [`Reply::drop_connection`], then refine with the `with_*`/`after` methods.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// How long to wait before answering (or hanging up); the request is recorded first.
    pub delay: Duration,
    pub body: String,
    /// Close the connection without writing a single byte instead of answering.
    pub drop_connection: bool,
}

impl Reply {
    /// Answer `status` with an empty body, at once.
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            delay: Duration::ZERO,
            body: String::new(),
            drop_connection: false,
        }
    }

    /// Close the connection without answering, as a crashing or restarting plugin would.
    pub fn drop_connection() -> Reply {
        Reply {
            drop_connection: true,
            ..Reply::status(0)
        }
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn with_body(mut self, body: impl Into<String>) -> Reply {
        self.body = body.into();
        self
    }

    /// Answer (or hang up) only after `delay`, e.g. to trip the worker's timeout.
    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

type Responder = Box<dyn Fn(&Received) -> Reply + Send + Sync>;

/// A recording HTTP server on `127.0.0.1` and an ephemeral port. Stops on drop.
pub struct Sink {
    port: u16,
    server: Arc<Server>,
    shared: Arc<Shared>,
    handlers: Vec<JoinHandle<()>>,
}

struct Shared {
    port: u16,
    responder: Responder,
    log: Mutex<Log>,
    /// Set on drop; wakes handlers out of their scripted delays.
    stopping: Mutex<bool>,
    stop_signal: Condvar,
}

#[derive(Default)]
struct Log {
    received: Vec<Received>,
    /// Requests whose handling is over: answered, hung up on, or given up.
    handled: usize,
    /// Per request, in the order of `received`: whether its handling is over.
    settled: Vec<bool>,
    attempts: HashMap<Option<String>, u32>,
}

impl Sink {
    /// Starts a sink that answers each request with `responder(&received)`.
    ///
    /// A responder that panics gets the request answered 500 (the panic is printed).
    pub fn start(responder: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Sink {
        let server = Server::http("127.0.0.1:0").expect("binding the sink on 127.0.0.1:0");
        let port = server
            .server_addr()
            .to_ip()
            .map(|addr| addr.port())
            .expect("the sink listens on TCP");
        let server = Arc::new(server);
        let shared = Arc::new(Shared {
            port,
            responder: Box::new(responder),
            log: Mutex::new(Log::default()),
            stopping: Mutex::new(false),
            stop_signal: Condvar::new(),
        });
        let handlers = (0..HANDLER_THREADS)
            .map(|i| {
                let server = Arc::clone(&server);
                let shared = Arc::clone(&shared);
                thread::Builder::new()
                    .name(format!("sink-handler-{i}"))
                    .spawn(move || shared.serve(&server))
                    .expect("spawning a sink handler thread")
            })
            .collect();
        Sink {
            port,
            server,
            shared,
            handlers,
        }
    }

    /// A plugin that is down while `down` is set: 503 to everything, else 204.
    pub fn down_while(down: &std::sync::Arc<std::sync::atomic::AtomicBool>) -> Sink {
        let down = std::sync::Arc::clone(down);
        Sink::start(move |_| {
            if down.load(std::sync::atomic::Ordering::SeqCst) {
                Reply::status(503)
            } else {
                Reply::status(204)
            }
        })
    }

    /// A sink that answers 204 No Content to everything.
    pub fn ok() -> Sink {
        Sink::start(|_| Reply::status(204))
    }

    /// The URL to give the worker as `PAHEKO_PLUGIN_URL`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}{PUSH_PATH}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Everything received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.log.lock().unwrap().received.clone()
    }

    /// The `Idempotency-Key` (the stream entry ID) of every request, in arrival order.
    pub fn keys(&self) -> Vec<String> {
        self.received()
            .iter()
            .map(|r| r.idempotency_key().unwrap_or_default().to_owned())
            .collect()
    }

    /// How many requests have been received so far, accepted or not.
    pub fn count(&self) -> usize {
        self.shared.log.lock().unwrap().received.len()
    }

    /// Waits until every request received so far has been dealt with (answered, hung up
    /// on, or found without a client), so that [`Received::answered`] is final for each.
    pub fn wait_settled(&self, timeout: Duration) -> Vec<Received> {
        super::wait_for("every request at the sink dealt with", timeout, || {
            let log = self.shared.log.lock().unwrap();
            (log.handled == log.received.len()).then(|| log.received.clone())
        })
    }

    /// Whether every request received so far has been dealt with, so that the answers
    /// recorded are final (see [`Sink::wait_settled`]).
    pub fn all_handled(&self) -> bool {
        let log = self.shared.log.lock().unwrap();
        log.handled == log.received.len()
    }

    /// The requests the sink is still working on (waiting out a scripted delay, or
    /// writing the answer): in flight for the client that sent them.
    pub fn in_progress(&self) -> Vec<Received> {
        let log = self.shared.log.lock().unwrap();
        log.received
            .iter()
            .zip(&log.settled)
            .filter(|(_, settled)| !**settled)
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// The requests accepted so far ([`Received::accepted`]), in arrival order.
    pub fn accepted(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(Received::accepted)
            .collect()
    }

    /// The `Idempotency-Key` of every accepted request, in arrival order.
    pub fn accepted_keys(&self) -> Vec<String> {
        self.accepted()
            .iter()
            .map(|r| r.idempotency_key().unwrap_or_default().to_owned())
            .collect()
    }

    /// Waits until at least `n` requests have been accepted, and returns them.
    pub fn wait_for_accepted(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let accepted = self.accepted();
            if accepted.len() >= n {
                return accepted;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?}: {n} requests accepted at the sink (got {} of \
                     {} received)",
                    accepted.len(),
                    self.count()
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits until at least `n` requests have been received, and returns them all.
    /// On timeout the panic lists what did arrive.
    pub fn wait_for_count(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let received = self.received();
            if received.len() >= n {
                return received;
            }
            if Instant::now() >= deadline {
                let list: String = received
                    .iter()
                    .map(|r| {
                        let key = r.idempotency_key().unwrap_or("-");
                        format!(
                            "\n  {} {} key={key} attempt={}",
                            r.method, r.path, r.attempt
                        )
                    })
                    .collect();
                panic!(
                    "timed out after {timeout:?}: {n} requests at the sink (got {}){list}",
                    received.len()
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        *self.shared.stopping.lock().unwrap() = true;
        self.shared.stop_signal.notify_all();
        // Each unblock() releases exactly one thread blocked in recv().
        for _ in &self.handlers {
            self.server.unblock();
        }
        for handler in self.handlers.drain(..) {
            let _ = handler.join();
        }
    }
}

impl Shared {
    fn serve(&self, server: &Server) {
        loop {
            match server.recv() {
                Ok(request) => self.handle(request),
                Err(_) if *self.stopping.lock().unwrap() => return,
                Err(_) => continue,
            }
        }
    }

    fn handle(&self, mut request: Request) {
        let mut body = Vec::new();
        // A client that goes away mid-body still gets recorded with what it sent.
        let _ = request.as_reader().read_to_end(&mut body);
        let headers: Vec<(String, String)> = request
            .headers()
            .iter()
            .map(|h| {
                (
                    h.field.as_str().as_str().to_ascii_lowercase(),
                    h.value.as_str().to_owned(),
                )
            })
            .collect();
        let (index, received) = self.record(Received {
            at: Instant::now(),
            at_wall: std::time::SystemTime::now(),
            method: request.method().as_str().to_owned(),
            path: request.url().to_owned(),
            headers,
            body,
            attempt: 0,
            answered: None,
            answered_at: None,
        });
        self.answer(request, index, &received);
        let mut log = self.log.lock().unwrap();
        log.handled += 1;
        log.settled[index] = true;
    }

    /// Answers as the responder says, and records what was written.
    fn answer(&self, request: Request, index: usize, received: &Received) {
        let reply = catch_unwind(AssertUnwindSafe(|| (self.responder)(received)))
            .unwrap_or_else(|_| Reply::status(500).with_body("sink responder panicked"));
        if !self.pause(reply.delay) {
            return; // the sink is being dropped: tiny_http answers 500 to a dropped request
        }
        if reply.drop_connection {
            self.hang_up(request);
            return;
        }
        // A client that went away meanwhile (killed while it waited) gets nothing: an
        // answer written now would land in a closed socket's buffer, and count.
        if !self.client_still_there(&request) {
            self.hang_up(request);
            return;
        }
        let mut response =
            Response::from_data(reply.body.into_bytes()).with_status_code(reply.status);
        for (name, value) in &reply.headers {
            let header = Header::from_bytes(name.as_bytes(), value.as_bytes())
                .unwrap_or_else(|()| panic!("invalid reply header {name}: {value}"));
            response.add_header(header);
        }
        let writing = Instant::now();
        if request.respond(response).is_ok() {
            let mut log = self.log.lock().unwrap();
            log.received[index].answered = Some(reply.status);
            log.received[index].answered_at = Some(writing);
        }
    }

    /// Numbers the attempt and appends the request to the log, under one lock so two
    /// concurrent attempts of one key never get the same number.
    /// Returns its index in the log, where its answer is written later.
    fn record(&self, mut received: Received) -> (usize, Received) {
        let mut log = self.log.lock().unwrap();
        let key = received.idempotency_key().map(str::to_owned);
        let attempt = log.attempts.entry(key).or_insert(0);
        *attempt += 1;
        received.attempt = *attempt;
        log.received.push(received.clone());
        log.settled.push(false);
        (log.received.len() - 1, received)
    }

    /// Whether the request's client still holds its end of the connection: its socket
    /// is neither at end of file (the client closed it, or the kernel did for a killed
    /// process) nor reset. Peeks without waiting and without consuming anything.
    fn client_still_there(&self, request: &Request) -> bool {
        let Some(socket) = request.remote_addr().and_then(|&peer| self.socket_of(peer)) else {
            return false;
        };
        let mut byte = 0u8;
        // SAFETY: a valid descriptor (owned by `socket` for the call) and a 1-byte buffer.
        let n = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => false,
            n if n > 0 => true,
            _ => std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock,
        }
    }

    /// A duplicate of the server's socket for the connection from `peer`.
    fn socket_of(&self, peer: SocketAddr) -> Option<TcpStream> {
        open_fds()
            .into_iter()
            .filter_map(tcp_socket)
            .find(|socket| {
                socket.local_addr().map(|a| a.port()).ok() == Some(self.port)
                    && socket.peer_addr().ok() == Some(peer)
            })
    }

    /// Sleeps `delay` unless the sink is dropped meanwhile; false if it was.
    fn pause(&self, delay: Duration) -> bool {
        let stopping = self.stopping.lock().unwrap();
        let (stopping, _) = self
            .stop_signal
            .wait_timeout_while(stopping, delay, |stopping| !*stopping)
            .unwrap();
        !*stopping
    }

    /// Closes the request's connection without writing anything.
    ///
    /// tiny_http offers no way to do this: dropping a `Request` answers 500, and dropping
    /// its `into_writer()` leaves the socket open, since the connection's reader half
    /// keeps it alive waiting for the next request. So we find the socket itself among
    /// this process's descriptors (the one whose local port is ours and whose peer is
    /// this client) and shut it down both ways: the client reads EOF, and tiny_http's
    /// connection thread sees EOF too and ends.
    fn hang_up(&self, request: Request) {
        if let Some(socket) = request.remote_addr().and_then(|&peer| self.socket_of(peer)) {
            let _ = socket.shutdown(Shutdown::Both);
        }
        drop(request.into_writer());
    }
}

/// The descriptors open in this process (Linux: `/proc/self/fd`).
fn open_fds() -> Vec<RawFd> {
    std::fs::read_dir("/proc/self/fd")
        .expect("listing /proc/self/fd")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// A duplicate of `fd` as a `TcpStream`, if `fd` is still open and is a TCP socket.
/// Closing the duplicate leaves `fd` alone; shutting it down shuts the socket down.
fn tcp_socket(fd: RawFd) -> Option<TcpStream> {
    // SAFETY: the borrow lives only for the dup() below. If another thread closed `fd`
    // since it was listed, dup() fails with EBADF; if the number was reused, the
    // address checks in `hang_up` reject the unrelated descriptor.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let owned = borrowed.try_clone_to_owned().ok()?;
    let stream = TcpStream::from(owned);
    stream.peer_addr().ok().map(|_: SocketAddr| stream)
}
