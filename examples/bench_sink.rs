//! A fast stand-in for the Paheko plugin, for `scripts/bench`: an HTTP/1.1 keep-alive
//! server on `std::net`, one thread per connection, that answers every POST with 204 at
//! once. It only understands `Content-Length` bodies, which is what the worker (ureq) and
//! wrk send.
//!
//! For latency, a body carrying `"sent_ns":<unix nanoseconds>` (the bench producer's
//! clock when it wrote the entry to Redis) is timed: receive time minus that stamp.
//! `GET /stats` answers `{"posts":…,"connections":…,"timed":…,"p50_us":…,"p99_us":…,
//! "max_us":…}` and `POST /reset` clears them (the connection that asks counts as one). tiny_http was not used: its accept thread, message queue
//! and per-request allocations would make the sink, not the worker, the thing measured.
//!
//! With `--delay-ms N` it stands in for a slow plugin instead: each POST is answered N
//! ms after it was read (the connection's thread sleeps), as a PHP plugin that takes N
//! ms per ticket would; `scripts/bench`'s slow-plugin scenario uses 20 ms.
//!
//! With `--fail-percent P` it answers 503 to P % of the POSTs, at random, as an
//! overloaded php-fpm would (issue 8's flaky-plugin drain).
//!
//! ```text
//! bench_sink [--port-file PATH] [--delay-ms N] [--fail-percent P]   # listens on 127.0.0.1:0
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Default)]
struct Counters {
    posts: AtomicU64,
    /// Connections accepted: more than the client's concurrency means it reconnects.
    connections: AtomicU64,
    /// Receive time minus the producer's stamp, in nanoseconds.
    delays_ns: Mutex<Vec<u64>>,
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut port_file = None;
    let mut delay = Duration::ZERO;
    let mut fail_percent = 0u64;
    let usage = || -> ! {
        eprintln!("usage: bench_sink [--port-file PATH] [--delay-ms N] [--fail-percent P]");
        std::process::exit(2);
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match (flag.as_str(), it.next()) {
            ("--port-file", Some(path)) => port_file = Some(path.clone()),
            ("--delay-ms", Some(ms)) => {
                delay = Duration::from_millis(ms.parse().unwrap_or_else(|_| usage()));
            }
            ("--fail-percent", Some(p)) => fail_percent = p.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    match port_file {
        // Written whole under another name then renamed, so a reader never sees half.
        Some(path) => {
            let tmp = format!("{path}.tmp");
            std::fs::write(&tmp, format!("{port}\n"))?;
            std::fs::rename(&tmp, &path)?;
        }
        None => println!("{port}"),
    }
    let counters = Arc::new(Counters::default());
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        counters.connections.fetch_add(1, Relaxed);
        let counters = Arc::clone(&counters);
        std::thread::spawn(move || {
            let _ = serve(stream, &counters, delay, fail_percent);
        });
    }
    Ok(())
}

/// Serves one keep-alive connection until the client closes it.
fn serve(
    stream: TcpStream,
    counters: &Counters,
    delay: Duration,
    fail_percent: u64,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(16 * 1024, stream);
    let mut line = String::new();
    let mut body = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let request_line = line.trim_end().to_string();
        if request_line.is_empty() {
            continue;
        }
        let mut length = 0usize;
        let mut close = false;
        let mut chunked = false;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = true;
            }
        }
        if chunked {
            writer.write_all(
                b"HTTP/1.1 411 Length Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            return Ok(());
        }
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
        let received_ns = now_ns();
        let mut parts = request_line.split(' ');
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        match (method, path) {
            ("GET", "/stats") => {
                let doc = stats(counters);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    doc.len()
                );
                writer.write_all(format!("{head}{doc}").as_bytes())?;
            }
            ("POST", "/reset") => {
                counters.posts.store(0, Relaxed);
                counters.connections.store(0, Relaxed);
                lock(counters).clear();
                writer.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")?;
            }
            _ => {
                if let Some(sent) = sent_ns(&body) {
                    lock(counters).push(received_ns.saturating_sub(sent));
                }
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                counters.posts.fetch_add(1, Relaxed);
                if fail_percent > 0 && random_percent() < fail_percent {
                    writer.write_all(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
                    )?;
                } else {
                    writer.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")?;
                }
            }
        }
        if close {
            return Ok(());
        }
    }
}

/// 0 to 99, from the standard library's randomly seeded hasher.
fn random_percent() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(now_ns() as u128);
    h.finish() % 100
}

fn lock(counters: &Counters) -> std::sync::MutexGuard<'_, Vec<u64>> {
    counters
        .delays_ns
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The digits after `"sent_ns":` in the body, if any.
fn sent_ns(body: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"sent_ns\":";
    let at = body.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits: Vec<u8> = body[at..]
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

fn stats(counters: &Counters) -> String {
    let mut delays = lock(counters).clone();
    delays.sort_unstable();
    let pick = |q: f64| -> f64 {
        if delays.is_empty() {
            return 0.0;
        }
        // Nearest rank: the smallest value with at least q of the sample at or below it.
        let rank = ((q * delays.len() as f64).ceil() as usize).clamp(1, delays.len());
        delays[rank - 1] as f64 / 1000.0
    };
    serde_json::json!({
        "posts": counters.posts.load(Relaxed),
        "connections": counters.connections.load(Relaxed),
        "timed": delays.len(),
        "p50_us": pick(0.50),
        "p99_us": pick(0.99),
        "max_us": pick(1.0),
    })
    .to_string()
}
