//! Order checks by answers, and waiting for settlement (issue 15 §1).
//!
//! The promise is per lane (tickets sharing an ordering key, e.g. one cash session):
//! the request for ticket n+1 leaves only after ticket n was taken (its 2xx written) or
//! given up (dead-lettered). Arrival order alone cannot show that — a worker that
//! released a lane when it *sent* n, not when n was *answered*, still delivers in arrival
//! order whenever the plugin answers at once — so the check compares each request's
//! arrival with the answer times the sink recorded ([`Received::at`],
//! [`Received::answered_at`]).
//!
//! A ticket is its `Idempotency-Key` (the stream entry ID), and the tickets of a lane
//! are ordered by that ID, which is stream order. Settlement ([`settle`]) means nothing
//! is pending *and* the sink has finished writing every answer, so a test reads final
//! answers instead of racing the worker's XACK against the sink's bookkeeping.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::{GROUP, Received, STREAM, Sink, pending_count, wait_for};

/// What [`assert_order_by_answers`] saw, for the checks a test adds on top.
#[derive(Debug, Default)]
pub struct OrderReport {
    /// Lanes with at least one request.
    pub lanes: usize,
    /// Tickets (distinct keys) with at least one request, in a lane.
    pub tickets: usize,
    /// The `Idempotency-Key` of every ticket accepted at least once.
    pub accepted: HashSet<String>,
    /// Tickets accepted more than once (a repeat the plugin recognises by its key).
    pub duplicates: usize,
}

/// The lane of a request: the body's `cash_session_id`, else its `session_id` — the
/// worker's default `PAHEKO_PUSH_ORDER_KEYS`.
pub fn session_of(r: &Received) -> Option<String> {
    let body: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
    ["cash_session_id", "session_id"]
        .iter()
        .find_map(|k| match &body[k] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
}

/// Asserts, for every lane (`key_of`; requests it maps to `None` are not checked), that
/// every request for ticket n+1 arrived after ticket n was released:
/// - after the *first* 2xx for n was written (a later repeat of n does not matter);
/// - or, when n was never accepted and its key is in `dead_lettered`, after n's last
///   request arrived and after that request's answer, if any, was written.
///
/// A ticket followed by another in its lane that was neither accepted nor dead-lettered
/// fails the check too. Tickets that never reached the sink are invisible here: check
/// completeness with [`OrderReport::accepted`].
pub fn assert_order_by_answers(
    received: &[Received],
    key_of: impl Fn(&Received) -> Option<String>,
    dead_lettered: &[String],
) -> OrderReport {
    let origin = received.iter().map(|r| r.at).min();
    let ms = |t: Instant| {
        origin.map_or(0.0, |o| {
            t.saturating_duration_since(o).as_secs_f64() * 1000.0
        })
    };
    let mut lanes: HashMap<String, BTreeMap<(u64, u64), Vec<&Received>>> = HashMap::new();
    for r in received {
        let Some(lane) = key_of(r) else { continue };
        let key = r
            .idempotency_key()
            .unwrap_or_else(|| panic!("a request in lane {lane} without Idempotency-Key"));
        lanes
            .entry(lane)
            .or_default()
            .entry(stream_id(key))
            .or_default()
            .push(r);
    }
    let mut report = OrderReport {
        lanes: lanes.len(),
        ..OrderReport::default()
    };
    for (lane, tickets) in &lanes {
        report.tickets += tickets.len();
        let mut released: Option<(String, Instant, &str)> = None;
        for requests in tickets.values() {
            let key = requests[0].idempotency_key().unwrap_or_default().to_owned();
            if let Some((before, at, how)) = &released {
                for r in requests {
                    assert!(
                        r.at > *at,
                        "lane {lane}: {key} (attempt {}) arrived at {:.1} ms, before {before} \
                         was {how} at {:.1} ms: sent while the ticket before it was still \
                         out\n{}",
                        r.attempt,
                        ms(r.at),
                        ms(*at),
                        describe(tickets, ms)
                    );
                }
            }
            let accepted: Vec<Instant> = requests.iter().filter_map(|r| r.accepted_at()).collect();
            report.duplicates += usize::from(accepted.len() > 1);
            released = if let Some(first) = accepted.iter().min() {
                report.accepted.insert(key.clone());
                Some((key, *first, "accepted"))
            } else if dead_lettered.contains(&key) {
                let last = requests
                    .iter()
                    .map(|r| r.answered_at.unwrap_or(r.at).max(r.at))
                    .max()
                    .expect("a ticket in the map has a request");
                Some((key, last, "last answered before its dead letter"))
            } else {
                // Fine if it is the lane's last ticket; the next one trips over this.
                Some((key, far_future(), "neither accepted nor dead-lettered"))
            };
        }
    }
    report
}

/// Asserts that no two requests of one lane (`key_of`) were at the plugin at once: each
/// arrived after the answers to every earlier request of its lane were written. This is
/// "at most one request in flight per session", across instances too when `received`
/// merges several sinks (their `Instant`s share one clock). Requests left without an
/// answer (hung up on, client gone) do not count; nor use it where the worker gives up
/// on a request (its timeout) while the plugin still holds it.
pub fn assert_one_in_flight_per_lane(
    received: &[Received],
    key_of: impl Fn(&Received) -> Option<String>,
) {
    let mut by_arrival: Vec<&Received> = received.iter().collect();
    by_arrival.sort_by_key(|r| r.at);
    let origin = by_arrival.first().map(|r| r.at);
    let ms = |t: Instant| origin.map_or(0.0, |o| t.duration_since(o).as_secs_f64() * 1000.0);
    let mut busy_until: HashMap<String, (Instant, String)> = HashMap::new();
    for r in by_arrival {
        let Some(lane) = key_of(r) else { continue };
        let key = r.idempotency_key().unwrap_or("-").to_owned();
        if let Some((until, before)) = busy_until.get(&lane) {
            assert!(
                r.at > *until,
                "lane {lane}: a request for {key} arrived at {:.1} ms while the request for \
                 {before} was still at the plugin (answered at {:.1} ms): two in flight",
                ms(r.at),
                ms(*until)
            );
        }
        if let Some(answered) = r.answered_at {
            let slot = busy_until.entry(lane).or_insert((answered, key.clone()));
            if answered >= slot.0 {
                *slot = (answered, key);
            }
        }
    }
}

/// An instant no request can come after, for a ticket that was never released.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

/// A lane's requests, for the failure message.
fn describe(tickets: &BTreeMap<(u64, u64), Vec<&Received>>, ms: impl Fn(Instant) -> f64) -> String {
    let mut out = String::from("the lane, ticket by ticket (arrival → answer):");
    for requests in tickets.values() {
        for r in requests {
            out.push_str(&format!(
                "\n  {} attempt {}: {:.1} ms → {}",
                r.idempotency_key().unwrap_or("-"),
                r.attempt,
                ms(r.at),
                match (r.answered, r.answered_at) {
                    (Some(s), Some(t)) => format!("{s} at {:.1} ms", ms(t)),
                    _ => "no answer".to_owned(),
                }
            ));
        }
    }
    out
}

/// `ms-seq` as numbers, so IDs compare in stream order.
fn stream_id(key: &str) -> (u64, u64) {
    key.split_once('-')
        .and_then(|(ms, seq)| Some((ms.parse().ok()?, seq.parse().ok()?)))
        .unwrap_or_else(|| panic!("Idempotency-Key {key:?} is not a stream entry ID"))
}

/// The `original_id` of every dead letter in `dead` (the entry IDs given up), for
/// [`assert_order_by_answers`].
pub fn dead_lettered_ids(conn: &mut redis::Connection, dead: &str) -> Vec<String> {
    super::stream_entries(conn, dead)
        .into_iter()
        .filter_map(|(_, fields)| {
            fields
                .into_iter()
                .find(|(name, _)| name == "original_id")
                .map(|(_, value)| String::from_utf8_lossy(&value).into_owned())
        })
        .collect()
}

/// Waits until `cond` holds and, after that, the sink has finished every request it
/// received (so each [`Received::answered`] is final); returns what the sink received.
/// `cond` is checked first because the worker acknowledges an entry only once it has
/// read the answer, which the sink records a moment after writing it.
pub fn settle_when(
    sink: &Sink,
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> Vec<Received> {
    wait_for(
        &format!("{what}, and every answer at the sink written"),
        timeout,
        || (cond() && sink.all_handled()).then(|| sink.received()),
    )
}

/// [`settle_when`] everything in the default stream was read by the default group and
/// none of it is pending: delivered (or dead-lettered) and acknowledged.
pub fn settle(sink: &Sink, conn: &mut redis::Connection, timeout: Duration) -> Vec<Received> {
    settle_when(sink, "every entry read and acknowledged", timeout, || {
        all_read(conn, STREAM, GROUP) && pending_count(conn, STREAM, GROUP) == 0
    })
}

/// Whether `group` has read up to the last entry ever added to `stream` (Redis 6.2 and
/// 7 both report `last-generated-id` and `last-delivered-id`).
pub fn all_read(conn: &mut redis::Connection, stream: &str, group: &str) -> bool {
    let field = |info: &HashMap<String, redis::Value>, name: &str| {
        info.get(name)
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
    };
    let Ok(info) = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(stream)
        .query::<HashMap<String, redis::Value>>(conn)
    else {
        return false;
    };
    let generated = field(&info, "last-generated-id");
    super::group_info(conn, stream, group)
        .is_some_and(|g| generated.is_some() && field(&g, "last-delivered-id") == generated)
}
