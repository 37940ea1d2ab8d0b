//! The acker thread: the coordinator, and the single owner of every decision about an
//! entry after it is read. It admits what the reader sends into the per-key lanes
//! ([`crate::order`]), hands one attempt at a time to the pushers, and decides what
//! their answers mean ([`crate::retry`]): XACK after a delivery (batched), a dead
//! letter after a per-ticket refusal or a ticket failing alone, the time of the next
//! attempt otherwise, and — through the [`Breaker`] it owns — when requests may go out
//! at all. Every wait is a timer in its loop (the next deadline is its `select!`
//! timeout); no thread sleeps while work waits, and no lock is shared. An
//! acknowledgement or dead letter that Redis could not take is kept and written again
//! after a reconnect, never dropped. On stop it sends nothing more, waits for the
//! requests in flight, writes what they settled, and returns.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, never, select};

use crate::breaker::{Breaker, Cause, Change, Permit, Signal};
use crate::budget::{self, Budget};
use crate::config::RetryConfig;
use crate::event::{Event, Incoming, StreamId};
use crate::lease::{self, Role, Standing};
use crate::notify::Beat;
use crate::order::Lanes;
use crate::pusher::{Attempt, Done, Reply};
use crate::retry::{Next, Tries, Verdict};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::store::{self, DeadLetter, Names, Redis};

/// How long a stop waits for Redis to take the last acknowledgements before giving
/// up on them (they stay pending, and are delivered again on the next start).
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the loop waits when no timer is set.
const IDLE_WAIT: Duration = Duration::from_secs(3600);

pub struct Acker {
    pub redis: Redis,
    pub names: Names,
    pub claim_idle: Duration,
    /// Redis deliveries after which an entry is dead-lettered; 0 = no limit.
    pub max_deliveries: u64,
    pub retry: RetryConfig,
    /// The 4xx statuses that dead-letter a ticket; other 4xx are plugin-wide.
    pub dead_letter_statuses: Vec<u16>,
    /// Rounds failed alone before a ticket is dead-lettered; 0 = never.
    pub give_up_after_parks: u32,
    /// Consecutive transient failures that open the circuit breaker; 0: only a
    /// plugin-wide refusal opens it.
    pub breaker_threshold: u32,
    /// Attempts handed to the pushers at once: eight per pusher, so a pusher finds its
    /// next event waiting instead of waiting for this thread to be scheduled (a drain
    /// at concurrency 1 ran at a third of the speed with one). When the breaker opens,
    /// those not started yet come back ([`Reply::HeldBack`]).
    pub window: usize,
    pub stats: Arc<Stats>,
    pub shutdown: Shutdown,
    /// Tells the watchdog whether this thread is waiting or busy on a step.
    pub beat: Beat,
    /// What the reader may still read: the acker gives back what it settled.
    pub budget: Arc<Budget>,
    /// Whether this instance holds the lease, and its timers (issue 9).
    pub standing: Standing,
    /// Tells the reader to read (everything pending first) or to read nothing.
    pub roles: Sender<Role>,
    /// The breaker's state as the pushers see it.
    pub breaker_signal: Arc<Signal>,
}

/// A dead letter waiting to be written, and the lane it unblocks once it is.
struct Settling {
    dead: DeadLetter,
    key: Option<String>,
}

struct State {
    lanes: Lanes,
    breaker: Breaker,
    /// Events that may go out now (lane heads and keyless events), first come first
    /// served, waiting for a pusher or the breaker.
    ready: VecDeque<Event>,
    in_flight: usize,
    /// The event sent as the breaker's probe, while it is out.
    probe: Option<StreamId>,
    /// The tickets that failed since the plugin last answered: the breaker's run.
    failing: HashSet<StreamId>,
    /// What is known of the events that failed at least once.
    tries: HashMap<StreamId, Tries>,
    /// Tickets the plugin accepted since the start: tells a ticket failing alone from
    /// an outage.
    accepted: u64,
    to_ack: Vec<StreamId>,
    /// Redis refused the last acknowledgements: nothing more is sent until it takes
    /// them, since every delivery meanwhile would only be sent again later.
    acks_failing: bool,
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
        work: Sender<Attempt>,
    ) {
        let mut s = State {
            lanes: Lanes::default(),
            breaker: Breaker::new(self.breaker_threshold, self.retry),
            ready: VecDeque::new(),
            in_flight: 0,
            probe: None,
            failing: HashSet::new(),
            tries: HashMap::new(),
            accepted: 0,
            to_ack: Vec::new(),
            acks_failing: false,
            to_dead: Vec::new(),
            redis_failures: 0,
            retry_redis_at: None,
            touch_at: None,
        };
        let mut reader_gone = false;
        let mut stopping_since: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let stopping = stopping_since.is_some();
            // A standby does not take the lease while stopping; a holder keeps it
            // renewed while its last requests finish.
            if (!stopping || self.standing.is_active())
                && let Some(change) = self.standing.step(&mut self.redis, &self.names, now)
            {
                self.standing_changed(&mut s, change);
            }
            if !stopping && !s.acks_failing && self.standing.may_send(now) {
                s.ready.extend(s.lanes.due(now));
                self.dispatch(&mut s, &work, now);
            }
            self.stats.parked.store(s.lanes.parked() as u64, Relaxed);
            let (held, held_bytes) = self.budget.held();
            self.stats.held.store(held, Relaxed);
            self.stats.held_bytes.store(held_bytes, Relaxed);
            // While stopping nothing more goes out, so the retry and probe timers are
            // not waited for: a due one would otherwise wake the loop at once, forever.
            let timers = [
                s.lanes.next_due().filter(|_| !stopping),
                s.breaker
                    .next_probe()
                    .filter(|_| !stopping && !s.ready.is_empty()),
                s.retry_redis_at,
                s.touch_at,
                Some(self.standing.next_timer(now))
                    .filter(|_| !stopping || self.standing.is_active()),
            ];
            // A deadline already past that the step above could not act on (the
            // pushers are all busy) waits for their answers, not for a zero timeout.
            let timeout = timers
                .into_iter()
                .flatten()
                .filter(|t| *t > now)
                .min()
                .map_or(IDLE_WAIT, |t| t - now);
            // What the reader may send is bounded by the budget it takes from.
            let take_more = !stopping && !reader_gone;
            let from_reader = if take_more { incoming.clone() } else { never() };
            let stop_signal = if stopping {
                never()
            } else {
                self.shutdown.signal().clone()
            };
            self.beat.idle();
            select! {
                recv(from_reader) -> batch => match batch {
                    Ok(batch) => self.admit(&mut s, batch),
                    Err(_) => reader_gone = true,
                },
                recv(done) -> d => if let Ok(d) = d { self.settle(&mut s, d) },
                recv(stop_signal) -> _ => {},
                default(timeout) => {},
            }
            self.beat.busy();
            #[cfg(debug_assertions)]
            test_hooks::stall_once_delivered(s.accepted, &self.shutdown);
            // Settle everything already reported before writing to Redis, so the
            // acknowledgements go out as one batch; and hand the pushers their next
            // events first, so none waits for that round trip.
            while let Ok(d) = done.try_recv() {
                self.settle(&mut s, d);
            }
            if !self.shutdown.is_stopping()
                && !s.acks_failing
                && self.standing.may_send(Instant::now())
            {
                self.dispatch(&mut s, &work, Instant::now());
            }
            if s.retry_redis_at.is_none_or(|t| t <= Instant::now()) {
                self.write(&mut s);
            }
            let stopping = self.shutdown.is_stopping();
            if stopping && stopping_since.is_none() {
                stopping_since = Some(Instant::now());
            }
            self.touch(&mut s);
            if stopping && s.in_flight == 0 {
                let settled = s.to_ack.is_empty() && s.to_dead.is_empty();
                if settled || stopping_since.is_some_and(|t| t.elapsed() > STOP_GRACE) {
                    if !settled {
                        log::error!(acks = s.to_ack.len(), dead_letters = s.to_dead.len();
                            "stopping with writes Redis did not take: those entries stay pending and will be delivered again");
                    }
                    self.standing.release(&mut self.redis);
                    return;
                }
            }
        }
    }

    /// Hands ready events to idle pushers, as far as the breaker allows: all of them
    /// while it is closed, the one probe while it is open.
    fn dispatch(&self, s: &mut State, work: &Sender<Attempt>, now: Instant) {
        while s.in_flight < self.window && !s.ready.is_empty() {
            let Some(permit) = s.breaker.permit(now) else {
                return;
            };
            let Some(mut event) = s.ready.pop_front() else {
                return;
            };
            event.attempts += 1;
            if permit == Permit::Probe {
                log::info!(correlation_id = event.id.to_string().as_str(), attempt = event.attempts;
                    "probing the plugin with one ticket");
                s.probe = Some(event.id);
            }
            let probe = permit == Permit::Probe;
            if work.send(Attempt { event, probe }).is_err() {
                // The pushers are gone: only at the very end of a stop.
                s.breaker.release(permit);
                return;
            }
            s.in_flight += 1;
        }
    }

    fn admit(&self, s: &mut State, batch: Vec<Incoming>) {
        let active = self.standing.is_active();
        for item in batch {
            let id = item.id();
            let bytes = match &item {
                Incoming::Event(e) => budget::size(&e.fields),
                Incoming::Rejected(r) => budget::size(&r.fields),
                Incoming::Vanished(_) => 0,
            };
            if !active {
                // Read just before this instance stepped down: it stays pending for
                // the holder, which takes every pending entry over.
                self.budget.give(bytes);
                continue;
            }
            if s.lanes.finished(id) || s.lanes.is_held(id) {
                // A copy read again: only a finished one needs acknowledging again.
                if s.lanes.finished(id) {
                    s.to_ack.push(id);
                }
                self.budget.give(bytes);
                continue;
            }
            match item {
                Incoming::Event(event)
                    if self.max_deliveries > 0 && event.deliveries > self.max_deliveries =>
                {
                    s.lanes.hold(id, bytes);
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
                        s.ready.push_back(event);
                    }
                }
                Incoming::Rejected(r) => {
                    s.lanes.hold(id, bytes);
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
                    s.lanes.hold(id, bytes);
                    self.stats.lost_to_trim.fetch_add(1, Relaxed);
                    log::error!(correlation_id = id.to_string().as_str();
                        "entry vanished from the stream before it was delivered (trimmed by the producer's MAXLEN?): it is lost");
                    s.to_ack.push(id);
                }
            }
        }
    }

    /// Decides what one attempt's answer means for its event.
    fn settle(&mut self, s: &mut State, d: Done) {
        s.in_flight -= 1;
        let Done { event, reply, took } = d;
        let permit = if s.probe == Some(event.id) {
            s.probe = None;
            Permit::Probe
        } else {
            Permit::Send
        };
        let (status, retry_after, answer) = match reply {
            // Stays pending in Redis; the next start reads it again.
            Reply::NotSent => {
                s.breaker.release(permit);
                return;
            }
            // Handed over before the breaker opened: still its lane's head, it waits
            // for the plugin to take tickets again.
            Reply::HeldBack => {
                let mut event = event;
                event.attempts -= 1;
                s.ready.push_front(event);
                return;
            }
            Reply::Status {
                status,
                retry_after,
                body,
            } => (status, retry_after, body),
            Reply::NoAnswer(error) => (0, None, error),
        };
        if !self.standing.is_active() && status / 100 != 2 {
            // Stepped down meanwhile: the entry stays pending for the new holder.
            return;
        }
        let verdict = match status {
            0 => Verdict::Transient { retry_after: None },
            _ => crate::retry::classify(
                status,
                retry_after.as_deref(),
                crate::clock::unix_now(),
                &self.dead_letter_statuses,
            ),
        };
        let now = Instant::now();
        let id = event.id.to_string();
        let duration_ms = took.as_millis() as u64;
        macro_rules! attempt_log {
            ($level:expr, $($message:tt)+) => {
                log::log!($level,
                    correlation_id = id.as_str(), request_id = event.request_id.as_str(),
                    event = event.kind.as_str(), attempt = event.attempts, status = status,
                    duration_ms = duration_ms;
                    $($message)+)
            };
        }
        match verdict {
            Verdict::Delivered => {
                s.accepted += 1;
                s.tries.remove(&event.id);
                self.stats.record_success();
                s.failing.clear();
                let change = s.breaker.on_answer();
                self.breaker_changed(s, change);
                attempt_log!(log::Level::Info, "delivered");
                s.to_ack.push(event.id);
                if let Some(next) = s.lanes.release(event.key.as_deref()) {
                    s.ready.push_back(next);
                }
            }
            Verdict::Rejected => {
                // An answer: the plugin is up. Not a failure of the plugin either.
                s.failing.clear();
                let change = s.breaker.on_answer();
                self.breaker_changed(s, change);
                s.tries.remove(&event.id);
                log::error!(
                    correlation_id = id.as_str(), request_id = event.request_id.as_str(),
                    event = event.kind.as_str(), attempt = event.attempts, status = status,
                    duration_ms = duration_ms, detail = answer.as_str();
                    "refused by the plugin: moving it to the dead letters"
                );
                self.dead_letter(s, event, "rejected", Some(status), answer);
            }
            Verdict::Refusing => {
                self.stats.record_failure();
                let change = s.breaker.on_refusal(status, permit, now);
                self.breaker_changed(s, change);
                attempt_log!(
                    log::Level::Debug,
                    "refused by the plugin, as every ticket: stays pending"
                );
                // Still its lane's head: it goes first once the plugin accepts again.
                s.ready.push_front(event);
            }
            Verdict::Transient { retry_after } => {
                self.stats.record_failure();
                self.stats.retried.fetch_add(1, Relaxed);
                // The breaker counts tickets, not attempts: one ticket failing again and
                // again on its own backoff is not Paheko down.
                if permit == Permit::Probe || s.failing.insert(event.id) {
                    let change = s.breaker.on_failure(permit, now);
                    self.breaker_changed(s, change);
                }
                let error = match status {
                    0 => answer.clone(),
                    _ => format!("http status {status}"),
                };
                let accepted = s.accepted;
                let tries = s
                    .tries
                    .entry(event.id)
                    .or_insert_with(|| Tries::new(accepted));
                match tries.failed(&self.retry, self.give_up_after_parks, accepted, retry_after) {
                    Next::Retry { after, parked } => {
                        let retry_in_ms = after.as_millis() as u64;
                        if parked {
                            log::error!(
                                correlation_id = id.as_str(), request_id = event.request_id.as_str(),
                                event = event.kind.as_str(), attempt = event.attempts, status = status,
                                duration_ms = duration_ms, error = error.as_str(), retry_in_ms = retry_in_ms;
                                "not delivered after {} attempts: parked, stays pending and is tried again later",
                                tries.failed
                            );
                        } else {
                            let attempts_left =
                                self.retry.max_attempts - tries.failed % self.retry.max_attempts;
                            log::warn!(
                                correlation_id = id.as_str(), request_id = event.request_id.as_str(),
                                event = event.kind.as_str(), attempt = event.attempts, status = status,
                                duration_ms = duration_ms, error = error.as_str(), retry_in_ms = retry_in_ms,
                                attempts_left = attempts_left;
                                "delivery failed, will retry"
                            );
                        }
                        s.lanes.park(event, now + after);
                    }
                    Next::GiveUp => {
                        s.tries.remove(&event.id);
                        let detail = if status == 0 || answer.is_empty() {
                            error
                        } else {
                            format!("{error}: {answer}")
                        };
                        log::error!(
                            correlation_id = id.as_str(), request_id = event.request_id.as_str(),
                            event = event.kind.as_str(), attempt = event.attempts, status = status,
                            detail = detail.as_str(), rounds = self.give_up_after_parks;
                            "failing alone: the plugin accepts other tickets but keeps failing on this one; moving it to the dead letters so its session goes on"
                        );
                        let status = (status != 0).then_some(status);
                        self.dead_letter(s, event, "failing_alone", status, detail);
                    }
                }
            }
        }
    }

    fn dead_letter(
        &self,
        s: &mut State,
        event: Event,
        reason: &str,
        status: Option<u16>,
        detail: String,
    ) {
        let dead = DeadLetter {
            id: event.id,
            reason: reason.into(),
            status,
            attempts: event.attempts,
            detail,
            fields: event.fields,
        };
        s.to_dead.push(Settling {
            dead,
            key: event.key,
        });
    }

    /// Acts on taking or losing the lease: a new holder tells the reader to take over
    /// every pending entry first; one that steps down sends nothing more, forgets what
    /// it holds (it stays pending in Redis for the holder) and tells the reader to stop.
    fn standing_changed(&self, s: &mut State, change: lease::Change) {
        match change {
            lease::Change::Took { how, fence } => {
                self.stats.active.store(true, Relaxed);
                let previous = match &how {
                    lease::Taken::Clean { previous } => previous.consumer.as_str(),
                    _ => "",
                };
                log::info!(fence_ms = fence.as_millis() as u64, previous = previous, how = format!("{how:?}").as_str();
                    "this instance holds the lease: it delivers, taking over every pending entry first");
                let _ = self.roles.send(Role::Active);
            }
            lease::Change::SteppedDown { why } => {
                self.stats.active.store(false, Relaxed);
                log::error!(reason = why.as_str(), in_flight = s.in_flight;
                    "stepping down: {why}; no new request starts, what is held stays pending for the holder");
                let _ = self.roles.send(Role::Standby);
                for bytes in s.lanes.clear() {
                    self.budget.give(bytes);
                }
                s.ready.clear();
                s.tries.clear();
                s.failing.clear();
                s.to_dead.clear();
            }
        }
    }

    /// Logs a change of the breaker's state and shows it on /health; when the plugin
    /// takes tickets again, the events parked meanwhile go at once.
    fn breaker_changed(&self, s: &mut State, change: Option<Change>) {
        let Some(change) = change else {
            return;
        };
        let refusing = |cause| match cause {
            Cause::Refusing(status) => u64::from(status),
            Cause::Down => 0,
        };
        match change {
            Change::Opened {
                cause,
                failures,
                next_probe_in,
            } => {
                let _ = self.stats.paheko_down_since.compare_exchange(
                    0,
                    crate::clock::unix_now(),
                    Relaxed,
                    Relaxed,
                );
                self.stats.paheko_refusing.store(refusing(cause), Relaxed);
                self.breaker_signal.set(true);
                let next_probe_in_ms = next_probe_in.as_millis() as u64;
                match cause {
                    Cause::Down => {
                        log::error!(consecutive_failures = failures, next_probe_in_ms = next_probe_in_ms;
                        "paheko looks down: circuit open, sending one probe per backoff interval until it answers")
                    }
                    Cause::Refusing(status) => {
                        log::error!(status = status, next_probe_in_ms = next_probe_in_ms;
                        "the plugin refuses every ticket with HTTP {status}: {}. Nothing is dead-lettered: tickets stay pending, one probe per backoff interval until it accepts",
                        crate::retry::refusal_meaning(status))
                    }
                }
            }
            Change::StillOpen {
                cause,
                probes,
                down_for,
                next_probe_in,
            } => {
                self.stats.paheko_refusing.store(refusing(cause), Relaxed);
                let message = match cause {
                    Cause::Down => "paheko still down: probe failed",
                    Cause::Refusing(_) => "the plugin still refuses every ticket: probe refused",
                };
                log::warn!(probes = probes, next_probe_in_ms = next_probe_in.as_millis() as u64,
                    down_for_s = down_for.as_secs(), refusing = refusing(cause);
                    "{message}");
            }
            Change::Closed {
                was,
                down_for,
                probes,
            } => {
                self.stats.paheko_down_since.store(0, Relaxed);
                self.stats.paheko_refusing.store(0, Relaxed);
                self.breaker_signal.set(false);
                log::info!(down_for_s = down_for.as_secs(), probes = probes, was_refusing = refusing(was);
                    "paheko answers again: circuit closed, delivering at full speed");
                s.ready.extend(s.lanes.unpark_all());
            }
        }
    }

    /// Writes the batched acknowledgements and the dead letters. On a Redis error, keeps
    /// them and schedules another try.
    fn write(&mut self, s: &mut State) {
        let result = self.write_all(s);
        match result {
            Ok(()) => {
                if s.redis_failures > 0 {
                    log::info!("redis takes acknowledgements again");
                    self.stats.redis_writes_failing.store(false, Relaxed);
                }
                s.redis_failures = 0;
                s.retry_redis_at = None;
            }
            Err(e) => {
                self.stats.redis_writes_failing.store(true, Relaxed);
                let delay = store::reconnect_delay(s.redis_failures);
                log::error!(error = e.to_string().as_str(), waiting_acks = s.to_ack.len(),
                    waiting_dead_letters = s.to_dead.len(), retry_in_ms = delay.as_millis() as u64;
                    "redis did not take acknowledgements: keeping them to write again");
                s.redis_failures += 1;
                s.retry_redis_at = Some(Instant::now() + delay);
            }
        }
    }

    fn write_all(&mut self, s: &mut State) -> Result<(), redis::RedisError> {
        if !s.to_ack.is_empty() {
            s.acks_failing = true;
            if !self.standing.ack(&mut self.redis, &self.names, &s.to_ack)? {
                log::warn!(entries = s.to_ack.len();
                    "delivered, but the lease is another instance's now: left pending for it (it sends them again, under the same Idempotency-Key)");
            }
            s.acks_failing = false;
            for id in s.to_ack.drain(..) {
                if let Some(bytes) = s.lanes.forget(id) {
                    self.budget.give(bytes);
                }
            }
        }
        while let Some(settling) = s.to_dead.first() {
            let moved = store::dead_letter(&mut self.redis, &self.names, &settling.dead)?;
            let Settling { dead, key } = s.to_dead.remove(0);
            match moved {
                store::DeadLettered::Moved => {
                    self.stats.dead_lettered.fetch_add(1, Relaxed);
                    log::warn!(correlation_id = dead.id.to_string().as_str(), reason = dead.reason.as_str(),
                        dead_letter_stream = self.names.dead_letters.as_str();
                        "moved to the dead letters");
                }
                // A repeat after a lost reply, or an entry another instance settled.
                store::DeadLettered::WasNotPending => {
                    log::info!(correlation_id = dead.id.to_string().as_str();
                        "no longer pending: its dead letter was already written, nothing to move");
                }
            }
            if let Some(bytes) = s.lanes.forget(dead.id) {
                self.budget.give(bytes);
            }
            if let Some(next) = s.lanes.release(key.as_deref()) {
                s.ready.push_back(next);
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

/// What the integration tests need to fake a fault that cannot be caused from outside;
/// compiled in debug builds only (the release binary has none of it), and inert unless
/// the variable is set, as cargo's `__CARGO_TEST_*` hooks.
#[cfg(debug_assertions)]
mod test_hooks {
    /// `__PAHEKO_PUSH_TEST_STALL_ACKER=1`: once a ticket was accepted, the acker hangs
    /// (until the stop), as a wedged thread would, so the watchdog test can see the
    /// pings stop.
    pub fn stall_once_delivered(accepted: u64, shutdown: &crate::shutdown::Shutdown) {
        if accepted > 0 && std::env::var_os("__PAHEKO_PUSH_TEST_STALL_ACKER").is_some() {
            while shutdown.sleep(std::time::Duration::from_secs(1)) {}
        }
    }
}
