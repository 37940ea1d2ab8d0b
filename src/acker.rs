//! The acker thread: the single owner of what happens to an entry after it is read. It
//! admits what the reader sends into the per-key lanes ([`crate::order`]), hands the
//! events that may go out to the pushers, and settles what they report: XACK after a
//! delivery (batched), dead letter after a refusal, parking after retries ran out. An
//! acknowledgement or dead letter that Redis could not take is kept and written again
//! after a reconnect, never dropped. On stop it waits for the requests in flight, writes
//! what they settled, and returns.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, never, select};

use crate::event::{Event, Incoming, StreamId};
use crate::order::Lanes;
use crate::pusher::{Done, Outcome};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::store::{self, DeadLetter, Names, Redis};

/// The most events held in memory at once (in flight, parked or waiting behind their
/// lane's head). Past it the reader is held back; the rest stays in Redis.
/// 512 keeps four reads in hand and the peak RSS of a drain near 8 MB
/// (docs/performance.md, change 4).
pub const MAX_HELD: usize = 512;
/// How long a stop waits for Redis to take the last acknowledgements before giving
/// up on them (they stay pending, and are delivered again on the next start).
const STOP_GRACE: Duration = Duration::from_secs(10);

pub struct Acker {
    pub redis: Redis,
    pub names: Names,
    pub claim_idle: Duration,
    /// Redis deliveries after which an entry is dead-lettered; 0 = no limit.
    pub max_deliveries: u64,
    pub stats: Arc<Stats>,
    pub shutdown: Shutdown,
}

/// A dead letter waiting to be written, and the lane it unblocks once it is.
struct Settling {
    dead: DeadLetter,
    key: Option<String>,
}

#[derive(Default)]
struct State {
    lanes: Lanes,
    in_flight: usize,
    to_ack: Vec<StreamId>,
    to_dead: Vec<Settling>,
    redis_failures: u32,
    retry_redis_at: Option<Instant>,
    /// When the idle time of the held entries is next reset (see [`store::touch`]).
    touch_at: Option<Instant>,
}

impl Acker {
    pub fn run(
        mut self,
        incoming: Receiver<Vec<Incoming>>,
        done: Receiver<Done>,
        work: Sender<Event>,
    ) {
        let mut s = State::default();
        let mut reader_gone = false;
        let mut stopping_since: Option<Instant> = None;
        loop {
            let stopping = stopping_since.is_some();
            let take_more = !stopping && !reader_gone && s.lanes.held() < MAX_HELD;
            let wake_at = [s.lanes.next_due(), s.retry_redis_at, s.touch_at]
                .into_iter()
                .flatten()
                .min();
            let timeout = wake_at.map_or(Duration::from_secs(3600), |t| {
                t.saturating_duration_since(Instant::now())
            });
            let from_reader = if take_more { incoming.clone() } else { never() };
            let stop_signal = if stopping {
                never()
            } else {
                self.shutdown.signal().clone()
            };
            select! {
                recv(from_reader) -> batch => match batch {
                    Ok(batch) => self.admit(&mut s, batch, &work),
                    Err(_) => reader_gone = true,
                },
                recv(done) -> d => if let Ok(d) = d { self.settle(&mut s, d, &work) },
                recv(stop_signal) -> _ => {},
                default(timeout) => {},
            }
            // Settle everything already reported before writing to Redis, so the
            // acknowledgements go out as one batch.
            while let Ok(d) = done.try_recv() {
                self.settle(&mut s, d, &work);
            }
            if s.retry_redis_at.is_none_or(|t| t <= Instant::now()) {
                self.write(&mut s, &work);
            }
            let stopping = self.shutdown.is_stopping();
            if stopping && stopping_since.is_none() {
                stopping_since = Some(Instant::now());
            }
            self.touch(&mut s);
            if !stopping {
                for event in s.lanes.due(Instant::now()) {
                    self.stats.parked.fetch_sub(1, Relaxed);
                    dispatch(&mut s, event, &work);
                }
            }
            if stopping && s.in_flight == 0 {
                let settled = s.to_ack.is_empty() && s.to_dead.is_empty();
                if settled || stopping_since.is_some_and(|t| t.elapsed() > STOP_GRACE) {
                    if !settled {
                        log::error!(acks = s.to_ack.len(), dead_letters = s.to_dead.len();
                            "stopping with writes Redis did not take: those entries stay pending and will be delivered again");
                    }
                    return;
                }
            }
        }
    }

    fn admit(&self, s: &mut State, batch: Vec<Incoming>, work: &Sender<Event>) {
        for item in batch {
            if s.lanes.finished(item.id()) {
                s.to_ack.push(item.id());
                continue;
            }
            match item {
                Incoming::Event(event)
                    if self.max_deliveries > 0 && event.deliveries > self.max_deliveries =>
                {
                    if !s.lanes.hold(event.id) {
                        continue;
                    }
                    let detail = format!(
                        "delivered {} times to consumers, more than PAHEKO_PUSH_MAX_DELIVERIES={}",
                        event.deliveries, self.max_deliveries
                    );
                    log::error!(correlation_id = event.id.to_string().as_str(), deliveries = event.deliveries;
                        "{detail}: moving it to the dead letters");
                    let dead = DeadLetter {
                        id: event.id,
                        reason: "max_deliveries".into(),
                        status: None,
                        attempts: event.attempts,
                        detail,
                        fields: event.fields,
                    };
                    s.to_dead.push(Settling { dead, key: None });
                }
                Incoming::Event(event) => {
                    if let Some(event) = s.lanes.admit(event) {
                        dispatch(s, event, work);
                    }
                }
                Incoming::Rejected(r) => {
                    if !s.lanes.hold(r.id) {
                        continue;
                    }
                    self.stats.invalid.fetch_add(1, Relaxed);
                    log::error!(correlation_id = r.id.to_string().as_str(), reason = r.reason, detail = r.detail.as_str();
                        "entry cannot be delivered: moving it to the dead letters");
                    let dead = DeadLetter {
                        id: r.id,
                        fields: r.fields,
                        reason: r.reason.to_string(),
                        status: None,
                        attempts: 0,
                        detail: r.detail,
                    };
                    s.to_dead.push(Settling { dead, key: None });
                }
                Incoming::Vanished(id) => {
                    if !s.lanes.hold(id) {
                        continue;
                    }
                    self.stats.lost_to_trim.fetch_add(1, Relaxed);
                    log::error!(correlation_id = id.to_string().as_str();
                        "entry vanished from the stream before it was delivered (trimmed by the producer's MAXLEN?): it is lost");
                    s.to_ack.push(id);
                }
            }
        }
    }

    fn settle(&self, s: &mut State, d: Done, work: &Sender<Event>) {
        s.in_flight -= 1;
        let Done { event, outcome } = d;
        match outcome {
            Outcome::Delivered => {
                s.to_ack.push(event.id);
                if let Some(next) = s.lanes.release(event.key.as_deref()) {
                    dispatch_unless_stopping(s, next, work, &self.shutdown);
                }
            }
            Outcome::Refused { status, detail } => {
                let dead = DeadLetter {
                    id: event.id,
                    reason: "rejected".into(),
                    status: Some(status),
                    attempts: event.attempts,
                    detail,
                    fields: event.fields,
                };
                s.to_dead.push(Settling {
                    dead,
                    key: event.key,
                });
            }
            Outcome::Parked => {
                self.stats.parked.fetch_add(1, Relaxed);
                s.lanes.park(event, Instant::now() + self.claim_idle);
            }
            // Stays pending in Redis; the next start reads it again.
            Outcome::Abandoned => {}
        }
    }

    /// Writes the batched acknowledgements and the dead letters. On a Redis error, keeps
    /// them and schedules another try.
    fn write(&mut self, s: &mut State, work: &Sender<Event>) {
        let result = self.write_all(s, work);
        match result {
            Ok(()) => {
                if s.redis_failures > 0 {
                    log::info!("redis takes acknowledgements again");
                }
                s.redis_failures = 0;
                s.retry_redis_at = None;
            }
            Err(e) => {
                self.stats.set_redis_ok(false);
                let delay = store::reconnect_delay(s.redis_failures);
                log::error!(error = e.to_string().as_str(), waiting_acks = s.to_ack.len(),
                    waiting_dead_letters = s.to_dead.len(), retry_in_ms = delay.as_millis() as u64;
                    "redis did not take acknowledgements: keeping them to write again");
                s.redis_failures += 1;
                s.retry_redis_at = Some(Instant::now() + delay);
            }
        }
    }

    fn write_all(&mut self, s: &mut State, work: &Sender<Event>) -> Result<(), redis::RedisError> {
        if !s.to_ack.is_empty() {
            store::ack(&mut self.redis, &self.names, &s.to_ack)?;
            for id in s.to_ack.drain(..) {
                s.lanes.forget(id);
            }
        }
        while let Some(settling) = s.to_dead.first() {
            store::dead_letter(&mut self.redis, &self.names, &settling.dead)?;
            let Settling { dead, key } = s.to_dead.remove(0);
            self.stats.dead_lettered.fetch_add(1, Relaxed);
            log::warn!(correlation_id = dead.id.to_string().as_str(), reason = dead.reason.as_str(),
                dead_letter_stream = self.names.dead_letters.as_str();
                "moved to the dead letters");
            s.lanes.forget(dead.id);
            if let Some(next) = s.lanes.release(key.as_deref()) {
                dispatch_unless_stopping(s, next, work, &self.shutdown);
            }
        }
        Ok(())
    }
}

impl Acker {
    /// Resets the idle time of every entry held here, a third of the claim idle time
    /// apart, so no other instance takes over an entry this one is still working on.
    /// The timer runs only while something is held, so an idle worker does not wake
    /// for it.
    fn touch(&mut self, s: &mut State) {
        let now = Instant::now();
        let next = now + self.claim_idle / 3;
        match s.touch_at {
            None if s.lanes.held() > 0 => s.touch_at = Some(next),
            Some(due) if due <= now => {
                let ids: Vec<StreamId> = s.lanes.held_ids().collect();
                s.touch_at = (!ids.is_empty()).then_some(next);
                if ids.is_empty() {
                    return;
                }
                if let Err(e) = store::touch(&mut self.redis, &self.names, &ids) {
                    log::warn!(error = e.to_string().as_str(), entries = ids.len();
                        "could not refresh the idle time of the entries held here");
                }
            }
            _ => {}
        }
    }
}

fn dispatch(s: &mut State, event: Event, work: &Sender<Event>) {
    if work.send(event).is_ok() {
        s.in_flight += 1;
    }
}

fn dispatch_unless_stopping(
    s: &mut State,
    event: Event,
    work: &Sender<Event>,
    shutdown: &Shutdown,
) {
    if !shutdown.is_stopping() {
        dispatch(s, event, work);
    }
}
