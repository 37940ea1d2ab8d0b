//! Writes RecyClique-shaped `pos.ticket.created` entries to a Redis stream, for
//! `scripts/bench`. Each payload is about 0.5 KB, like a real ticket of three lines, and
//! its `cash_session_id` cycles over `--sessions` sessions.
//!
//! ```text
//! bench_producer preload URL STREAM COUNT SESSIONS
//!     XADD STREAM MAXLEN max(10000, COUNT) * event pos.ticket.created payload <json>,
//!     pipelined by 500: the backlog a worker finds after a day offline. The producer's
//!     own MAXLEN 10000 would trim a backlog above 10,000, so the bound is raised to COUNT.
//! bench_producer paced URL STREAM RATE SECONDS SESSIONS
//!     one XADD MAXLEN 10000 at a time, on a fixed schedule of RATE per second; each
//!     payload carries `"sent_ns"`, the Unix time in nanoseconds just before its XADD.
//! ```
//! It prints what it wrote: `written=N seconds=S`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PRODUCER_MAXLEN: usize = 10_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["preload", url, stream, count, sessions] => {
            preload(url, stream, number(count), number(sessions))
        }
        ["paced", url, stream, rate, seconds, sessions] => {
            paced(url, stream, number(rate), number(seconds), number(sessions))
        }
        _ => {
            eprintln!(
                "usage: bench_producer preload URL STREAM COUNT SESSIONS\n       \
                 bench_producer paced URL STREAM RATE SECONDS SESSIONS"
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("bench_producer: {e}");
        std::process::exit(1);
    }
}

fn number(s: &str) -> usize {
    s.parse().unwrap_or_else(|_| {
        eprintln!("bench_producer: not a whole number: {s:?}");
        std::process::exit(2);
    })
}

fn preload(url: &str, stream: &str, count: usize, sessions: usize) -> redis::RedisResult<()> {
    let mut conn = redis::Client::open(url)?.get_connection()?;
    let started = Instant::now();
    let maxlen = count.max(PRODUCER_MAXLEN);
    let mut n = 0;
    while n < count {
        let mut pipe = redis::pipe();
        for i in n..count.min(n + 500) {
            pipe.add_command(xadd(stream, maxlen, &ticket(i, sessions, None)))
                .ignore();
        }
        pipe.query::<()>(&mut conn)?;
        n = count.min(n + 500);
    }
    println!(
        "written={count} seconds={:.3}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn paced(
    url: &str,
    stream: &str,
    rate: usize,
    seconds: usize,
    sessions: usize,
) -> redis::RedisResult<()> {
    let mut conn = redis::Client::open(url)?.get_connection()?;
    let total = rate * seconds;
    let step = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    for i in 0..total {
        // A fixed schedule, not a fixed gap: a late XADD does not push the next ones back.
        let due = started + step * i as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let payload = ticket(i, sessions, Some(unix_ns()));
        xadd(stream, PRODUCER_MAXLEN, &payload).query::<()>(&mut conn)?;
    }
    println!(
        "written={total} seconds={:.3}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn xadd(stream: &str, maxlen: usize, payload: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream)
        .arg("MAXLEN")
        .arg(maxlen)
        .arg("*")
        .arg("event")
        .arg("pos.ticket.created")
        .arg("payload")
        .arg(payload);
    cmd
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Ticket `i`: three item lines and one payment, amounts in cents, weights in kg.
fn ticket(i: usize, sessions: usize, sent_ns: Option<u64>) -> String {
    const CATEGORIES: [&str; 5] = ["Vaisselle", "Livres", "Textile", "Mobilier", "Jouets"];
    let price = |k: usize| 50 + ((i * 7 + k * 13) % 40) * 25;
    let items: Vec<serde_json::Value> = (0..3)
        .map(|k| {
            serde_json::json!({
                "category": CATEGORIES[(i + k) % CATEGORIES.len()],
                "quantity": 1 + (i + k) % 3,
                "weight": ((i + k) % 50 + 2) as f64 / 10.0,
                "unit_price": price(k),
                "total_price": price(k) * (1 + (i + k) % 3),
            })
        })
        .collect();
    let total: usize = (0..3).map(|k| price(k) * (1 + (i + k) % 3)).sum();
    let mut payload = serde_json::json!({
        "event": "pos.ticket.created",
        "sale_id": format!("0b6f1c2e-4d7a-4f1e-9c3b-{i:012}"),
        "cash_session_id": format!("5e0c9a7d-2b1f-4c8e-a6d4-{:012}", i % sessions.max(1)),
        "operator_id": format!("op-{}", i % 7),
        "register_id": "reg-1",
        "site_id": "site-1",
        "items": items,
        "payments": [{"method": if i.is_multiple_of(3) { "card" } else { "cash" }, "amount": total}],
        "total_amount": total,
        "donation": 0,
        "created_at": "2025-11-27T10:15:00Z",
    });
    if let Some(ns) = sent_ns {
        payload["sent_ns"] = ns.into();
    }
    payload.to_string()
}
