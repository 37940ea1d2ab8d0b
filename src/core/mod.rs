//! The coordinator's decisions as a state machine that does no I/O and reads no clock
//! (issue 13): what to read, what to send and when, what an answer means, what to
//! acknowledge or dead-letter, the breaker, the memory budget, and the lease with its
//! tenures. Inputs are events with the time they happened ([`Core::handle`]); outputs
//! are commands ([`Core::poll`]) and the next time something is due
//! ([`Core::poll_timeout`]). The acker thread drives it against Redis and the pushers
//! ([`crate::acker`]); the simulation (`sim`, in the tests) drives it against a model of
//! Redis and of the plugin, with faults, thousands of seeds at a time. The shape is
//! quinn-proto's (QUIC with no sockets) and rustls' `Connection`.
//!
//! **Tenures.** Each time this instance takes the lease a new tenure starts: a number
//! that only grows, drawn from Redis with the lease ([`crate::lease`]), so tenures of
//! different instances compare too. Every read, attempt and answer carries its tenure.
//! Ending a tenure revokes what is queued (a pusher checks the gate right before it
//! starts a request, [`Command::Gate`]); an answer of a past tenure changes nothing of
//! the current one — a 2xx is still acknowledged, lease-checked, to spare a repeat; the
//! rest is forgotten (the entry is still pending, and the holder owns it). A new tenure
//! sends only once every earlier request can no longer be in flight: this instance's
//! own ones have all answered, and another instance's ones are waited out by the fence.
//! The breaker, the probe, the try counts and the lanes belong to a tenure.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::breaker::{Breaker, Cause, Change, Permit};
use crate::config::RetryConfig;
use crate::event::{Event, IdMap, IdSet, Incoming, StreamId};
use crate::lease::{Holder, Taken};
use crate::order::{Admitted, Lanes};
use crate::retry::{Next, Rng, Tries, Verdict};
use crate::store::DeadLetter;

#[cfg(test)]
mod sim;

/// How often a standby asks for the lease, at most (client-go's RetryPeriod).
pub const LEASE_RETRY: Duration = Duration::from_secs(2);
/// How long a stop waits for Redis to take the last writes.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often the holder looks for entries other programs left idle, at most (a guard:
/// the standbys read nothing, and a new holder takes every pending entry over at once);
/// every claim idle time when that is shorter. An idle worker's coordinator wakes for
/// this and its lease only.
pub const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(30);
/// How often the holder deletes consumers that hold nothing.
pub const FORGET_EVERY: Duration = Duration::from_secs(600);
/// The first wait after a Redis error; it doubles to [`REDIS_RETRY_MAX`].
const REDIS_RETRY_MIN: Duration = Duration::from_millis(100);
const REDIS_RETRY_MAX: Duration = Duration::from_secs(5);
/// A renewal that failed with an error is tried again this soon (within the deadline).
const RENEW_RETRY: Duration = Duration::from_secs(1);

/// What the core is set up with; plain values from [`crate::config::Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub retry: RetryConfig,
    /// The 4xx statuses that dead-letter a ticket; other 4xx are plugin-wide.
    pub dead_letter_statuses: Vec<u16>,
    /// Rounds failed alone before a ticket is dead-lettered; 0 = never.
    pub give_up_after_parks: u32,
    pub breaker_threshold: u32,
    /// Redis deliveries after which an entry is dead-lettered; 0 = no limit.
    pub max_deliveries: u64,
    /// Attempts handed to the pushers at once.
    pub window: usize,
    pub lease_ttl: Duration,
    pub request_timeout: Duration,
    /// The memory budget: entries and field bytes held at once (besides one read).
    pub max_held: usize,
    pub max_held_bytes: usize,
    /// Entries per read.
    pub read_count: usize,
    /// Held entries are touched a third of this apart ([`Write::Touch`]).
    pub claim_idle: Duration,
    /// Seeds the jitter.
    pub seed: u64,
    /// Bugs of v0.2 put back, for the simulation to show it finds them (issue 13).
    #[cfg(test)]
    pub bugs: sim::Bugs,
}

impl Settings {
    /// A renewal is tried this often.
    pub fn renew_every(&self) -> Duration {
        self.lease_ttl / 3
    }

    /// The holder starts no request when no renewal succeeded for this long: the key
    /// still has a third of its TTL to live, so nobody else can hold it yet.
    pub fn deadline(&self) -> Duration {
        self.lease_ttl * 2 / 3
    }

    /// How long a new holder that found the lease absent waits before its first
    /// request when other consumers hold pending entries: the previous holder's key
    /// expired at the latest when it was found absent, so its last renewal was one TTL
    /// earlier at least; it started no request after that renewal's deadline, and one
    /// started just before ends within the request timeout.
    pub fn fence(&self) -> Duration {
        (self.deadline() + self.request_timeout).saturating_sub(self.lease_ttl)
    }
}

/// An input: something that happened, at the `now` given with it.
#[derive(Debug)]
pub enum Input {
    /// Time passed (a timer fell due, or the driver woke for another reason).
    Tick,
    /// SIGTERM or SIGINT: send nothing more, finish what is out, release the lease.
    Stop,
    Lease(LeaseReply),
    Read(ReadReply),
    Answer(Answer),
    Wrote(WriteReply),
}

/// What Redis answered to a [`LeaseOp`].
#[derive(Debug)]
pub enum LeaseReply {
    /// The lease is ours, in a new tenure. `others_pending`: entries are pending that a
    /// previous holder may still be sending (asked when the lease was found absent, or
    /// taken from our consumer name's dead process).
    Took {
        tenure: u64,
        value: String,
        how: Taken,
        others_pending: bool,
        /// When the take was sent: the lease runs from then at the latest.
        sent_at: Instant,
    },
    /// Someone holds it. `same_name_dead`: it is held under this consumer name by a
    /// process of this host that no longer runs (a restart): `Some(true)`; under this
    /// name by another live process: `Some(false)`; by another name: `None`.
    Held {
        holder: Holder,
        value: String,
        ttl_left: Duration,
        same_name_dead: Option<bool>,
    },
    /// A renewal sent at `sent_at`: `ok` when the lease was still ours.
    Renewed {
        sent_at: Instant,
        ok: bool,
    },
    Released,
    /// Redis did not answer the operation.
    Failed {
        error: String,
    },
}

/// A read's result.
#[derive(Debug)]
pub enum ReadReply {
    /// Every pending entry of the group is ours now; these were gone from the stream.
    TookOver {
        tenure: u64,
        gone: Vec<StreamId>,
    },
    /// Entries read, in stream order. `end`: a pending-list scan reached its end.
    /// `trimmed`: entries the producer trimmed before the group read them, already
    /// recorded as one dead letter by the read itself.
    Batch {
        tenure: u64,
        source: Source,
        items: Vec<Incoming>,
        end: bool,
        trimmed: u64,
    },
    /// A read that brings no entries is done (forgetting idle consumers).
    Done {
        tenure: u64,
    },
    Failed {
        tenure: u64,
        error: String,
    },
}

/// Where a batch comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// This consumer's pending list, re-read in stream order from a cursor.
    Scan,
    /// New entries of the stream.
    New,
    /// Entries other consumers left idle, taken over.
    Claimed,
}

/// A pusher's report on one attempt.
#[derive(Debug)]
pub struct Answer {
    pub tenure: u64,
    pub event: Event,
    pub reply: Reply,
    /// How long the attempt took, for the log.
    pub took: Duration,
}

/// What became of an attempt, as the core needs it.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// An HTTP answer; `retry_after` already turned into a wait.
    Status {
        status: u16,
        retry_after: Option<Duration>,
        body: String,
    },
    /// No HTTP answer: connection, TLS or timeout.
    NoAnswer(String),
    /// Not sent: its tenure ended, the breaker opened, or the worker stops.
    Unsent,
}

/// What Redis did with a [`Write`].
#[derive(Debug)]
pub enum WriteReply {
    /// `ids` acknowledged; `held`: the lease was ours (else nothing was written).
    Acked {
        ids: Vec<StreamId>,
        held: bool,
    },
    DeadLettered {
        id: StreamId,
        outcome: Moved,
    },
    Touched,
    Failed {
        error: String,
    },
}

/// What a dead-letter or trimmed-record write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// Written and acknowledged.
    Moved,
    /// Not pending any more: nothing written (a repeat, or settled elsewhere).
    WasNotPending,
    /// The lease is another's: nothing written, the entry stays pending for it.
    NotHolder,
}

/// A command for the drivers.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Lease(LeaseOp),
    Read(ReadOp),
    /// Hand one attempt to the pushers.
    Send {
        event: Event,
        probe: bool,
        tenure: u64,
    },
    /// What the pushers check right before starting a request: the tenure an attempt
    /// must belong to (0: none), and the moment after which none may start.
    Gate {
        tenure: u64,
        send_until: Option<Instant>,
        breaker_open: bool,
    },
    Write(Write),
    /// Everything is settled after a stop: the driver returns.
    Exit,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LeaseOp {
    Take,
    /// Take a lease held under our consumer name by a process that is gone: only if
    /// it still holds exactly `value`.
    TakeFromDead {
        value: String,
    },
    Renew {
        value: String,
    },
    Release {
        value: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum ReadOp {
    /// Make every pending entry of the group ours, while the lease holds `lease_value`
    /// (a holder that lost the lease meanwhile must not take the new one's entries).
    TakeOver { tenure: u64, lease_value: String },
    /// This consumer's pending entries after `after`, in stream order.
    Scan {
        tenure: u64,
        after: Option<StreamId>,
        count: usize,
    },
    /// New entries, read only while the lease holds `lease_value` (Redis 7). Caught up,
    /// the reader waits for some up to `wait` (until the next housekeeping).
    New {
        tenure: u64,
        count: usize,
        lease_value: String,
        wait: Duration,
    },
    /// Entries of other consumers idle longer than the claim idle time.
    ClaimIdle { tenure: u64, count: usize },
    /// Delete consumers that hold nothing and were idle for long.
    Forget { tenure: u64 },
}

impl ReadOp {
    pub fn tenure(&self) -> u64 {
        match self {
            ReadOp::TakeOver { tenure, .. }
            | ReadOp::Scan { tenure, .. }
            | ReadOp::New { tenure, .. }
            | ReadOp::ClaimIdle { tenure, .. }
            | ReadOp::Forget { tenure } => *tenure,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// XACK while the lease holds `lease_value`.
    Ack {
        ids: Vec<StreamId>,
        lease_value: String,
    },
    /// Move an entry to the dead letters (checks it is pending, and the lease).
    DeadLetter {
        dead: DeadLetter,
        lease_value: String,
    },
    /// A held entry that vanished from the stream (trimmed while pending): one
    /// `trimmed` record (count 1, its ID), then its acknowledgement.
    Trimmed { id: StreamId, lease_value: String },
    /// Reset the idle time of the entries held, so no other program takes them over.
    Touch { ids: Vec<StreamId> },
}

/// Counters the driver copies into [`crate::stats::Stats`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counters {
    pub delivered: u64,
    pub retried: u64,
    pub failures: u64,
    pub dead_lettered: u64,
    pub invalid: u64,
    pub lost_to_trim: u64,
    pub requests: u64,
}

/// Where this instance stands with the lease.
#[derive(Debug, Clone)]
enum Standing {
    Standby {
        next_try: Instant,
        asking: bool,
    },
    Active {
        renewed: Instant,
        next_renew: Instant,
        renewing: bool,
        fence_until: Instant,
    },
}

/// The holder's reading, in order: take every pending entry over, re-read the pending
/// list from the start, then read new entries (with the idle look and the forgetting
/// now and then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    TakeOver,
    Scan(Option<StreamId>),
    New,
}

/// A dead letter or trimmed record waiting to be written, and the lane it unblocks.
#[derive(Debug, Clone)]
struct Settling {
    write: Write,
    id: StreamId,
    key: Option<String>,
}

/// The decisions; see the module doc.
pub struct Core {
    s: Settings,
    rng: Rng,
    out: VecDeque<Command>,
    standing: Standing,
    /// The current tenure, 0 when none.
    tenure: u64,
    /// The lease value of the current (or last) tenure: acknowledgements check it.
    lease_value: String,
    /// Attempts out per tenure (current and past), until their answer comes back.
    out_by_tenure: HashMap<u64, usize>,
    last_gate: Option<(u64, Option<Instant>, bool)>,
    /// The entries out in the current tenure.
    in_flight: IdSet,
    lanes: Lanes,
    ready: VecDeque<Event>,
    breaker: Breaker,
    probe: Option<StreamId>,
    failing: IdSet,
    tries: IdMap<Tries>,
    /// Tickets accepted in this tenure: tells a ticket failing alone from an outage.
    accepted: u64,
    to_ack: Vec<StreamId>,
    /// The entries delivered in the current tenure whose acknowledgement is on its way:
    /// held until it is written. (A past tenure's 2xx is acknowledged too, but what the
    /// current tenure holds of that entry is not its to forget.)
    acking: IdSet,
    to_settle: VecDeque<Settling>,
    /// A write is out; the next waits for its reply.
    writing: Option<Write>,
    /// Redis refused the last acknowledgements: nothing more is sent until it takes
    /// them, since every delivery meanwhile would only be sent again later.
    acks_failing: bool,
    write_failures: u32,
    write_retry_at: Option<Instant>,
    phase: Phase,
    /// A read is out: the entries it may bring are reserved in the budget.
    reading: Option<usize>,
    read_failures: u32,
    read_retry_at: Option<Instant>,
    housekeeping_at: Option<Instant>,
    forget_at: Option<Instant>,
    /// When the held entries' idle time is next reset: only while something is held.
    touch_at: Option<Instant>,
    /// The largest entry seen, in bytes: bounds a read by the bytes left.
    largest: usize,
    /// A shed lane ran dry: scan the pending list once the current phase allows.
    rescan: bool,
    stopping_since: Option<Instant>,
    exited: bool,
    /// The time given with the last input: [`Core::poll`] plans the next write at it.
    now: Instant,
    pub counters: Counters,
    /// What v0.2's separate budget counter drifted by (a bug put back: issue 13, 11).
    #[cfg(test)]
    drift: i64,
}

impl Core {
    pub fn new(s: Settings, now: Instant) -> Core {
        let seed = s.seed;
        let breaker = Breaker::new(s.breaker_threshold, s.retry, seed ^ 1);
        Core {
            rng: Rng::new(seed),
            out: VecDeque::new(),
            standing: Standing::Standby {
                next_try: now,
                asking: false,
            },
            tenure: 0,
            lease_value: String::new(),
            out_by_tenure: HashMap::new(),
            last_gate: None,
            in_flight: IdSet::default(),
            lanes: Lanes::default(),
            ready: VecDeque::new(),
            breaker,
            probe: None,
            failing: IdSet::default(),
            tries: IdMap::default(),
            accepted: 0,
            to_ack: Vec::new(),
            acking: IdSet::default(),
            to_settle: VecDeque::new(),
            writing: None,
            acks_failing: false,
            write_failures: 0,
            write_retry_at: None,
            phase: Phase::TakeOver,
            reading: None,
            read_failures: 0,
            read_retry_at: None,
            housekeeping_at: None,
            forget_at: None,
            touch_at: None,
            largest: 0,
            rescan: false,
            stopping_since: None,
            exited: false,
            now,
            counters: Counters::default(),
            #[cfg(test)]
            drift: 0,
            s,
        }
    }

    /// Takes one input, then decides what follows from it.
    pub fn handle(&mut self, now: Instant, input: Input) {
        match input {
            Input::Tick => {}
            Input::Stop => {
                if self.stopping_since.is_none() {
                    self.stopping_since = Some(now);
                    log::info!(in_flight = self.in_flight_all(); "stopping: nothing more is sent; waiting for the requests in flight");
                }
            }
            Input::Lease(reply) => self.on_lease(now, reply),
            Input::Read(reply) => self.on_read(now, reply),
            Input::Answer(answer) => self.on_answer(now, answer),
            Input::Wrote(reply) => self.on_wrote(now, reply),
        }
        self.now = now;
        self.step(now);
    }

    /// The next command, if any. A write is planned only when nothing else is to be
    /// done, that is once the driver has handed in every input it had: the
    /// acknowledgements of a whole batch of answers then go in one write, where
    /// planning it after the first answer sent them in two (XACKs per 1,000 events at
    /// concurrency 16: 55 before this, 42 after, 29 with v0.2's acker; docs/performance.md).
    pub fn poll(&mut self) -> Option<Command> {
        if self.out.is_empty() && !self.exited {
            self.plan_write(self.now);
        }
        self.out.pop_front()
    }

    /// When the core next has something to do by itself.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let stopping = self.stopping_since.is_some();
        let active = self.tenure != 0;
        let mut timers = vec![
            self.write_retry_at,
            self.stopping_since.map(|t| t + STOP_GRACE),
        ];
        match &self.standing {
            Standing::Standby { next_try, asking } if !stopping && !asking => {
                timers.push(Some(*next_try))
            }
            Standing::Active {
                renewed,
                next_renew,
                renewing,
                fence_until,
            } => {
                timers.push(Some(*renewed + self.s.deadline()));
                if !renewing {
                    timers.push(Some(*next_renew));
                }
                timers.push(Some(*fence_until));
            }
            _ => {}
        }
        if active {
            timers.push(self.touch_at);
        }
        if active && !stopping {
            timers.push(self.lanes.next_due());
            if !self.ready.is_empty() {
                timers.push(self.breaker.next_probe());
            }
            if self.reading.is_none() {
                timers.push(self.read_retry_at);
                if self.phase == Phase::New {
                    timers.push(self.housekeeping_at);
                    timers.push(self.forget_at);
                }
            }
        }
        // A deadline already past that the core could not act on (the pushers are all
        // busy) waits for their answers, not for a zero timeout.
        timers.into_iter().flatten().filter(|t| *t > now).min()
    }

    /// Whether the driver should return: stopped, and everything settled.
    pub fn exited(&self) -> bool {
        self.exited
    }

    pub fn is_active(&self) -> bool {
        self.tenure != 0
    }

    /// Entries held in memory and their field bytes (the budget), with a read out.
    pub fn held(&self) -> (usize, usize) {
        #[cfg(test)]
        let entries = (self.lanes.held() as i64 + self.drift).max(0) as usize;
        #[cfg(not(test))]
        let entries = self.lanes.held();
        (entries, self.lanes.held_bytes())
    }

    /// Whether the core is writing a `trimmed` record for `id` (it vanished, its fields
    /// are gone: it can never be sent again).
    #[cfg(test)]
    pub fn recording_vanished(&self, id: StreamId) -> bool {
        self.to_settle
            .iter()
            .any(|s| s.id == id && matches!(s.write, Write::Trimmed { .. }))
    }

    /// What the core knows of `key`'s lane, for a failing simulation's message.
    #[cfg(test)]
    pub fn lane_debug(&self, key: &str, id: StreamId) -> String {
        format!(
            "{}; {id}: held {}, finished {}, ready {}, in flight {}, settling {}, phase {:?}",
            self.lanes.debug(key),
            self.lanes.is_held(id),
            self.lanes.finished(id),
            self.ready.iter().any(|e| e.id == id),
            self.in_flight.contains(&id),
            self.to_settle.iter().any(|s| s.id == id),
            self.phase,
        )
    }

    /// Checks the budget against what is really held: every entry the budget counts
    /// is in exactly one place (ready, waiting in its lane, parked, in flight, or being
    /// acknowledged or written), and every such entry is counted. For the simulation.
    pub fn audit(&self) -> Result<(), String> {
        let mut places: HashMap<StreamId, &str> = HashMap::new();
        let mut put = |id: StreamId, place: &'static str| -> Result<(), String> {
            match places.insert(id, place) {
                Some(other) => Err(format!("{id} is both {other} and {place}")),
                None => Ok(()),
            }
        };
        for e in &self.ready {
            put(e.id, "ready")?;
        }
        for id in self.lanes.waiting_ids() {
            put(id, "waiting")?;
        }
        for id in self.lanes.parked_ids() {
            put(id, "parked")?;
        }
        for id in &self.in_flight {
            put(*id, "in flight")?;
        }
        for s in &self.to_settle {
            put(s.id, "settling")?;
        }
        for id in &self.acking {
            put(*id, "being acknowledged")?;
        }
        let (held, bytes) = self.held();
        let counted = places.len();
        for (id, place) in &places {
            if !self.lanes.is_held(*id) {
                return Err(format!("{id} is {place} but not counted in the budget"));
            }
        }
        if held != counted {
            return Err(format!(
                "the budget counts {held} entries held, {counted} are really held"
            ));
        }
        if bytes != self.lanes.held_bytes_recounted() {
            return Err(format!("the budget counts {bytes} bytes, not what is held"));
        }
        // A take-over reports every vanished entry at once: those are IDs only, on their
        // way to a `trimmed` record, outside the budget of entries with fields.
        let vanished = self
            .to_settle
            .iter()
            .filter(|s| matches!(s.write, Write::Trimmed { .. }))
            .count();
        if held - vanished > self.s.max_held + self.s.read_count {
            return Err(format!("{held} entries held, over the budget"));
        }
        Ok(())
    }

    pub fn parked(&self) -> usize {
        self.lanes.parked()
    }

    /// The breaker as /health shows it.
    pub fn breaker_cause(&self) -> Option<Cause> {
        self.breaker.cause()
    }

    pub fn redis_writes_failing(&self) -> bool {
        self.write_failures > 0
    }

    /// Attempts out in every tenure.
    pub fn in_flight_all(&self) -> usize {
        self.out_by_tenure.values().sum()
    }

    fn in_flight_current(&self) -> usize {
        self.out_by_tenure.get(&self.tenure).copied().unwrap_or(0)
    }

    fn in_flight_past(&self) -> usize {
        self.out_by_tenure
            .iter()
            .filter(|(t, _)| **t != self.tenure)
            .map(|(_, n)| n)
            .sum()
    }

    // ----- the lease -----

    fn on_lease(&mut self, now: Instant, reply: LeaseReply) {
        match reply {
            LeaseReply::Took {
                tenure,
                value,
                how,
                others_pending,
                sent_at,
            } => {
                if self.stopping_since.is_some() {
                    // Asked just before the stop: give it back at once.
                    self.out
                        .push_back(Command::Lease(LeaseOp::Release { value }));
                    self.standing = Standing::Standby {
                        next_try: now + LEASE_RETRY,
                        asking: false,
                    };
                    return;
                }
                let fence = match how {
                    Taken::Absent if others_pending => self.s.fence(),
                    // No expiry: the holder may have renewed a moment ago, and goes on
                    // sending until its deadline.
                    Taken::Repaired => self.s.deadline() + self.s.request_timeout,
                    // Our consumer name's previous process died with requests maybe still
                    // running in the plugin; they end within the request timeout.
                    Taken::Restarted { .. } if others_pending => self.s.request_timeout,
                    _ => Duration::ZERO,
                };
                self.start_tenure(now, sent_at.min(now), tenure, value, fence, &how);
            }
            LeaseReply::Held {
                holder,
                value,
                ttl_left,
                same_name_dead,
            } => {
                let retry = LEASE_RETRY.min(self.s.renew_every());
                #[cfg(test)]
                let same_name_dead = if self.s.bugs.same_name_is_self && same_name_dead.is_some() {
                    Some(true)
                } else {
                    same_name_dead
                };
                match same_name_dead {
                    Some(true) => {
                        self.out
                            .push_back(Command::Lease(LeaseOp::TakeFromDead { value }));
                        return;
                    }
                    Some(false) => {
                        log::error!(consumer = holder.consumer.as_str(), ttl_left_ms = ttl_left.as_millis() as u64;
                        "another live process holds the lease under this instance's consumer name: give each instance its own PAHEKO_PUSH_CONSUMER; standing by")
                    }
                    None => {
                        log::debug!(holder = holder.consumer.as_str(), ttl_left_ms = ttl_left.as_millis() as u64;
                        "standing by: another instance holds the lease")
                    }
                }
                self.standing = Standing::Standby {
                    next_try: now + retry.min(ttl_left + Duration::from_millis(20)),
                    asking: false,
                };
            }
            LeaseReply::Renewed { sent_at, ok } => {
                let Standing::Active {
                    renewed,
                    fence_until,
                    ..
                } = self.standing
                else {
                    return;
                };
                if ok {
                    self.standing = Standing::Active {
                        renewed: renewed.max(sent_at),
                        next_renew: sent_at + self.s.renew_every(),
                        renewing: false,
                        fence_until,
                    };
                } else {
                    self.step_down(now, "the lease is held by another instance");
                }
            }
            LeaseReply::Released => {}
            LeaseReply::Failed { error } => match &mut self.standing {
                Standing::Standby { next_try, asking } => {
                    log::warn!(error = error.as_str(); "could not ask Redis for the lease");
                    *asking = false;
                    *next_try = now + LEASE_RETRY.min(self.s.renew_every());
                }
                Standing::Active {
                    renewing,
                    next_renew,
                    ..
                } => {
                    log::warn!(error = error.as_str(); "could not renew the lease; trying again");
                    *renewing = false;
                    *next_renew = now + RENEW_RETRY;
                }
            },
        }
    }

    fn start_tenure(
        &mut self,
        now: Instant,
        sent_at: Instant,
        tenure: u64,
        value: String,
        fence: Duration,
        how: &Taken,
    ) {
        let previous = match how {
            Taken::Released { previous } | Taken::Restarted { previous } => {
                previous.consumer.clone()
            }
            _ => String::new(),
        };
        let fence_ms = fence.as_millis() as u64;
        if previous.is_empty() {
            log::info!(tenure = tenure, fence_ms = fence_ms, how = how.describe();
                "this instance holds the lease: it delivers, taking over every pending entry first");
        } else {
            log::info!(tenure = tenure, fence_ms = fence_ms, how = how.describe(), previous = previous.as_str();
                "this instance holds the lease: it delivers, taking over every pending entry first");
        }
        self.tenure = tenure;
        self.lease_value = value;
        self.standing = Standing::Active {
            renewed: sent_at,
            next_renew: sent_at + self.s.renew_every(),
            renewing: false,
            fence_until: now + fence,
        };
        // A tenure starts everything fresh: lanes, breaker, probe, tries (issue 13, 1).
        self.reset_tenure_state();
        self.phase = Phase::TakeOver;
        self.housekeeping_at = Some(now + self.housekeeping_every());
        self.forget_at = Some(now);
    }

    fn reset_tenure_state(&mut self) {
        self.lanes.clear();
        self.acking.clear();
        self.in_flight.clear();
        self.ready.clear();
        self.tries.clear();
        self.failing.clear();
        self.probe = None;
        self.accepted = 0;
        self.rescan = false;
        self.reading = None;
        self.read_failures = 0;
        self.read_retry_at = None;
        self.touch_at = None;
        // Undecided dead letters stay pending for whoever holds the lease next.
        self.to_settle.clear();
        #[cfg(test)]
        if self.s.bugs.breaker_survives_tenure {
            return;
        }
        self.breaker = Breaker::new(self.s.breaker_threshold, self.s.retry, self.rng.next_u64());
    }

    fn step_down(&mut self, now: Instant, why: &str) {
        if self.tenure == 0 {
            return;
        }
        log::error!(reason = why, tenure = self.tenure, in_flight = self.in_flight_current();
            "stepping down: {why}; no new request starts, what is held stays pending for the holder");
        self.tenure = 0;
        self.reset_tenure_state();
        self.standing = Standing::Standby {
            next_try: now + LEASE_RETRY.min(self.s.renew_every()),
            asking: false,
        };
    }

    fn housekeeping_every(&self) -> Duration {
        self.s.claim_idle.min(HOUSEKEEPING_EVERY)
    }

    fn may_send(&self, now: Instant) -> bool {
        let Standing::Active {
            renewed,
            fence_until,
            ..
        } = self.standing
        else {
            return false;
        };
        #[cfg(test)]
        let past_clear = self.s.bugs.past_answers_current || self.in_flight_past() == 0;
        #[cfg(not(test))]
        let past_clear = self.in_flight_past() == 0;
        self.tenure != 0
            && self.stopping_since.is_none()
            && !self.acks_failing
            && now >= fence_until
            && now < renewed + self.s.deadline()
            && past_clear
    }

    // ----- reading -----

    /// How many entries the next read may bring: 0 while the bytes are spent, or fewer
    /// than a read's worth of entries are free while something is held (a reader woken
    /// for every settled entry would read them one at a time).
    fn room(&self) -> usize {
        let (held, bytes) = self.held();
        let free = self.s.max_held.saturating_sub(held);
        let count = self.s.read_count.min(self.s.max_held);
        if bytes >= self.s.max_held_bytes || (free < count && held > 0) {
            return 0;
        }
        let by_size = match self.largest {
            0 => count,
            largest => ((self.s.max_held_bytes - bytes) / largest).max(1),
        };
        count.min(free).min(by_size)
    }

    fn plan_read(&mut self, now: Instant) {
        // Nothing is read before the fence either: a previous holder may still read
        // and send until then, and what this one read meanwhile could be overtaken by
        // newer entries of the same session sent by it.
        let fenced =
            matches!(self.standing, Standing::Active { fence_until, .. } if now < fence_until);
        if self.tenure == 0
            || fenced
            || self.stopping_since.is_some()
            || self.reading.is_some()
            || self.read_retry_at.is_some_and(|t| t > now)
        {
            return;
        }
        let tenure = self.tenure;
        let op = match self.phase {
            Phase::TakeOver => ReadOp::TakeOver {
                tenure,
                lease_value: self.lease_value.clone(),
            },
            Phase::Scan(mut after) => {
                let mut count = self.room();
                if count == 0 && self.shed(true) > 0 {
                    // What was shed may lie behind the cursor: the scan starts over, so
                    // it brings every shed entry back in stream order.
                    after = None;
                    count = self.room();
                }
                if count == 0 {
                    return;
                }
                if after.is_none() {
                    self.phase = Phase::Scan(None);
                    self.lanes.scan_started();
                }
                ReadOp::Scan {
                    tenure,
                    after,
                    count,
                }
            }
            Phase::New if self.rescan => {
                self.rescan = false;
                self.phase = Phase::Scan(None);
                return self.plan_read(now);
            }
            Phase::New if self.forget_at.is_some_and(|t| t <= now) => {
                self.forget_at = Some(now + FORGET_EVERY);
                ReadOp::Forget { tenure }
            }
            Phase::New => {
                let mut count = self.room();
                if count == 0 && self.shed(false) > 0 {
                    count = self.room();
                }
                if count == 0 {
                    return;
                }
                if self.housekeeping_at.is_some_and(|t| t <= now) {
                    self.housekeeping_at = Some(now + self.housekeeping_every());
                    ReadOp::ClaimIdle { tenure, count }
                } else {
                    ReadOp::New {
                        tenure,
                        count,
                        lease_value: self.lease_value.clone(),
                        wait: self
                            .housekeeping_at
                            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now)),
                    }
                }
            }
        };
        self.reading = Some(match &op {
            ReadOp::Scan { count, .. }
            | ReadOp::New { count, .. }
            | ReadOp::ClaimIdle { count, .. } => *count,
            _ => 0,
        });
        self.out.push_back(Command::Read(op));
    }

    /// Memory is full: lanes whose head is failing leave their waiting entries in Redis,
    /// so other sessions can be read. Not while Paheko is down (the breaker open on
    /// failures): nothing would go out for them either, and reading on would only turn
    /// the producer's trimming of an unread backlog (one `trimmed` record) into one
    /// record per ticket. A refusal may be one ticket's (issue 13, 5): it sheds.
    fn shed(&mut self, scanning: bool) -> usize {
        // No ticket has failed: no head is failing (and a drain with the budget full
        // would otherwise look through every lane on each turn).
        if self.tries.is_empty() || self.breaker.cause() == Some(Cause::Down) {
            return 0;
        }
        #[cfg(test)]
        if self.s.bugs.no_fair_share {
            return 0;
        }
        let tries = &self.tries;
        let shed = self
            .lanes
            .shed_failing(|head| tries.contains_key(&head), scanning);
        if shed > 0 {
            log::warn!(entries = shed;
                "memory budget full while sessions wait on failing tickets: their later tickets stay in Redis for now, so other sessions can be read");
        }
        shed
    }

    fn on_read(&mut self, now: Instant, reply: ReadReply) {
        let tenure = match &reply {
            ReadReply::TookOver { tenure, .. }
            | ReadReply::Batch { tenure, .. }
            | ReadReply::Done { tenure }
            | ReadReply::Failed { tenure, .. } => *tenure,
        };
        if tenure != self.tenure {
            // Read in a past tenure: what it brought stays pending, and the current
            // tenure (if any) takes every pending entry over anyway.
            return;
        }
        self.reading = None;
        match reply {
            ReadReply::Failed { error, .. } => {
                let delay = redis_retry(self.read_failures);
                self.read_failures += 1;
                self.read_retry_at = Some(now + delay);
                log::error!(error = error.as_str(), retry_in_ms = delay.as_millis() as u64;
                    "redis read failed: trying again");
                // The reply may have been lost after Redis delivered entries to us:
                // they are in our pending list, so read that again first. A take-over
                // that failed is simply asked again (issue 13, 8).
                #[cfg(test)]
                if self.s.bugs.take_over_not_retried && self.phase == Phase::TakeOver {
                    self.phase = Phase::Scan(None);
                    return;
                }
                if self.phase != Phase::TakeOver {
                    self.phase = Phase::Scan(None);
                }
            }
            ReadReply::TookOver { gone, .. } => {
                self.read_failures = 0;
                for id in gone {
                    self.vanished(id, None);
                }
                self.phase = Phase::Scan(None);
            }
            ReadReply::Done { .. } => self.read_failures = 0,
            ReadReply::Batch {
                source,
                items,
                end,
                trimmed,
                ..
            } => {
                self.read_failures = 0;
                self.counters.lost_to_trim += trimmed;
                let last = items.last().map(Incoming::id);
                for item in items {
                    self.admit(item, source == Source::Scan);
                }
                if let Phase::Scan(_) = self.phase
                    && source == Source::Scan
                {
                    match (end, last) {
                        (false, Some(last)) => self.phase = Phase::Scan(Some(last)),
                        _ => {
                            self.lanes.scan_ended();
                            self.phase = Phase::New;
                        }
                    }
                }
            }
        }
    }

    fn admit(&mut self, item: Incoming, from_scan: bool) {
        match item {
            Incoming::Event(event)
                if self.s.max_deliveries > 0 && event.deliveries > self.s.max_deliveries =>
            {
                if !self
                    .lanes
                    .hold(event.id, crate::budget::size(&event.fields))
                {
                    return;
                }
                let detail = format!(
                    "delivered {} times to consumers, more than PAHEKO_PUSH_MAX_DELIVERIES={}",
                    event.deliveries, self.s.max_deliveries
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
                self.dead_letter(dead, None);
            }
            Incoming::Event(event) => {
                self.largest = self.largest.max(crate::budget::size(&event.fields));
                let id = event.id;
                let tries = &self.tries;
                match self
                    .lanes
                    .admit(event, from_scan, |head| tries.contains_key(&head))
                {
                    Admitted::Ready(event) => self.ready.push_back(event),
                    Admitted::Waiting | Admitted::Shed => {}
                    // A copy read again: only a finished one needs acknowledging again.
                    Admitted::Copy => {
                        if self.lanes.finished(id) && !self.to_ack.contains(&id) {
                            self.to_ack.push(id);
                        }
                    }
                }
            }
            Incoming::Rejected(r) => {
                if !self.lanes.hold(r.id, crate::budget::size(&r.fields)) {
                    return;
                }
                self.counters.invalid += 1;
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
                self.dead_letter(dead, None);
            }
            Incoming::Vanished(id) => self.vanished(id, None),
        }
    }

    /// An entry pending for us is gone from the stream (trimmed by the producer's
    /// MAXLEN): recorded as `trimmed` (count 1, its ID), counted, then acknowledged —
    /// at whatever step it is found (issue 13, 10). `key`: its lane, released once the
    /// record is written.
    fn vanished(&mut self, id: StreamId, key: Option<String>) {
        if self.lanes.is_held(id) {
            // Held here with its fields: it is delivered or dead-lettered as usual (its
            // pending entry stays until then).
            return;
        }
        if self.lanes.finished(id) {
            // Delivered a moment ago, its acknowledgement lost: acknowledged again.
            if !self.to_ack.contains(&id) {
                self.to_ack.push(id);
            }
            return;
        }
        #[cfg(test)]
        if self.s.bugs.vanished_untracked {
            // v0.2: the report of an entry gone while pending was discarded.
            return;
        }
        #[cfg(test)]
        if self.s.bugs.vanished_unbudgeted {
            // v0.2: never taken from the budget, but given back when settled.
            self.drift -= 1;
        }
        self.lanes.hold(id, 0);
        self.counters.lost_to_trim += 1;
        log::error!(correlation_id = id.to_string().as_str();
            "entry vanished from the stream before it was delivered (trimmed by the producer's MAXLEN): it is lost, recorded as a 'trimmed' dead letter");
        self.to_settle.push_back(Settling {
            write: Write::Trimmed {
                id,
                lease_value: self.lease_value.clone(),
            },
            id,
            key,
        });
    }

    fn dead_letter(&mut self, dead: DeadLetter, key: Option<String>) {
        let id = dead.id;
        self.to_settle.push_back(Settling {
            write: Write::DeadLetter {
                dead,
                lease_value: self.lease_value.clone(),
            },
            id,
            key,
        });
    }

    // ----- sending -----

    fn dispatch(&mut self, now: Instant) {
        if !self.may_send(now) {
            return;
        }
        let due = self.lanes.due(now);
        self.ready.extend(due);
        while self.in_flight_current() < self.s.window && !self.ready.is_empty() {
            let Some(permit) = self.breaker.permit(now) else {
                return;
            };
            let Some(mut event) = self.ready.pop_front() else {
                return;
            };
            event.attempts += 1;
            let probe = permit == Permit::Probe;
            if probe {
                log::info!(correlation_id = event.id.to_string().as_str(), attempt = event.attempts;
                    "probing the plugin with one ticket");
                self.probe = Some(event.id);
            }
            *self.out_by_tenure.entry(self.tenure).or_default() += 1;
            self.in_flight.insert(event.id);
            self.counters.requests += 1;
            self.out.push_back(Command::Send {
                event,
                probe,
                tenure: self.tenure,
            });
        }
    }

    fn on_answer(&mut self, now: Instant, answer: Answer) {
        let Answer {
            tenure,
            event,
            reply,
            took,
        } = answer;
        let duration_ms = took.as_millis() as u64;
        if let Some(n) = self.out_by_tenure.get_mut(&tenure) {
            *n -= 1;
            if *n == 0 {
                self.out_by_tenure.remove(&tenure);
            }
        }
        if tenure == self.tenure {
            self.in_flight.remove(&event.id);
        }
        let delivered = matches!(&reply, Reply::Status { status, .. } if status / 100 == 2);
        #[cfg(test)]
        let past = tenure != self.tenure && !self.s.bugs.past_answers_current;
        #[cfg(not(test))]
        let past = tenure != self.tenure;
        if past || self.tenure == 0 {
            // An answer of a past tenure: a 2xx is still acknowledged if the lease
            // allows it, which spares a repeat; nothing else of it counts (issue 13, 7).
            if delivered {
                self.counters.delivered += 1;
                self.to_ack.push(event.id);
            }
            return;
        }
        let permit = if self.probe == Some(event.id) {
            self.probe = None;
            Permit::Probe
        } else {
            Permit::Send
        };
        let (status, retry_after, answer) = match reply {
            Reply::Unsent => {
                // Handed over before the breaker opened or the worker stopped: still
                // its lane's head.
                self.breaker.release(permit);
                let mut event = event;
                event.attempts -= 1;
                self.ready.push_front(event);
                return;
            }
            Reply::Status {
                status,
                retry_after,
                body,
            } => (status, retry_after, body),
            Reply::NoAnswer(error) => (0, None, error),
        };
        let verdict = match status {
            0 => Verdict::Transient { retry_after: None },
            _ => crate::retry::classify(status, None, 0, &self.s.dead_letter_statuses),
        };
        let verdict = match verdict {
            Verdict::Transient { .. } => Verdict::Transient { retry_after },
            v => v,
        };
        let id = event.id.to_string();
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
                self.accepted += 1;
                self.counters.delivered += 1;
                self.tries.remove(&event.id);
                self.failing.clear();
                let change = self.breaker.on_answer(now);
                self.breaker_changed(change);
                attempt_log!(log::Level::Info, "delivered");
                self.to_ack.push(event.id);
                self.acking.insert(event.id);
                self.release_lane(event.key.as_deref());
            }
            Verdict::Rejected => {
                self.failing.clear();
                let change = self.breaker.on_answer(now);
                self.breaker_changed(change);
                self.tries.remove(&event.id);
                log::error!(
                    correlation_id = id.as_str(), request_id = event.request_id.as_str(),
                    event = event.kind.as_str(), attempt = event.attempts, status = status,
                    duration_ms = duration_ms, detail = answer.as_str();
                    "refused by the plugin: moving it to the dead letters"
                );
                let dead = self.dead_of(event.clone(), "rejected", Some(status), answer);
                self.dead_letter(dead, event.key);
            }
            Verdict::Refusing => self.refused(now, event, status, permit, answer),
            Verdict::Transient { retry_after } => {
                self.counters.failures += 1;
                self.counters.retried += 1;
                // The breaker counts tickets, not attempts: one ticket failing again and
                // again on its own backoff is not Paheko down.
                if permit == Permit::Probe || self.failing.insert(event.id) {
                    let change = self.breaker.on_failure(permit, now);
                    self.breaker_changed(change);
                }
                let error = match status {
                    0 => answer.clone(),
                    _ => format!("http status {status}"),
                };
                let accepted = self.accepted;
                let unit = self.rng.unit();
                let tries = self
                    .tries
                    .entry(event.id)
                    .or_insert_with(|| Tries::new(accepted));
                #[cfg(test)]
                let retry_after = if self.s.bugs.no_delay_floor {
                    retry_after.or(Some(Duration::ZERO))
                } else {
                    retry_after
                };
                let next = tries.failed(
                    &self.s.retry,
                    self.s.give_up_after_parks,
                    accepted,
                    retry_after,
                    unit,
                );
                #[cfg(test)]
                let next = match next {
                    Next::Retry { parked, .. } if self.s.bugs.no_delay_floor => Next::Retry {
                        after: Duration::ZERO,
                        parked,
                    },
                    n => n,
                };
                match next {
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
                            let attempts_left = self.s.retry.max_attempts
                                - tries.failed % self.s.retry.max_attempts;
                            log::warn!(
                                correlation_id = id.as_str(), request_id = event.request_id.as_str(),
                                event = event.kind.as_str(), attempt = event.attempts, status = status,
                                duration_ms = duration_ms, error = error.as_str(), retry_in_ms = retry_in_ms,
                                attempts_left = attempts_left;
                                "delivery failed, will retry"
                            );
                        }
                        self.lanes.park(event, now + after);
                    }
                    Next::GiveUp => {
                        self.tries.remove(&event.id);
                        let detail = if status == 0 || answer.is_empty() {
                            error
                        } else {
                            format!("{error}: {answer}")
                        };
                        log::error!(
                            correlation_id = id.as_str(), request_id = event.request_id.as_str(),
                            event = event.kind.as_str(), attempt = event.attempts, status = status,
                            detail = detail.as_str(), rounds = self.s.give_up_after_parks;
                            "failing alone: the plugin accepts other tickets but keeps failing on this one; moving it to the dead letters so its session goes on"
                        );
                        let status = (status != 0).then_some(status);
                        let dead = self.dead_of(event.clone(), "failing_alone", status, detail);
                        self.dead_letter(dead, event.key);
                    }
                }
            }
        }
    }

    /// A 3xx or an unlisted 4xx. The first time, it may be the plugin refusing every
    /// ticket (a rotated secret, a wrong URL): the breaker opens and the ticket waits
    /// its backoff, so the probe is another ticket when there is one. If the plugin
    /// accepted another ticket since, and still refuses this one, the status is this
    /// ticket's: it is dead-lettered, and its session goes on (issue 13, 5).
    fn refused(&mut self, now: Instant, event: Event, status: u16, permit: Permit, answer: String) {
        self.counters.failures += 1;
        let accepted = self.accepted;
        #[cfg(test)]
        let per_ticket_check = !self.s.bugs.refusal_blocks_everyone;
        #[cfg(not(test))]
        let per_ticket_check = true;
        let tries = self
            .tries
            .entry(event.id)
            .or_insert_with(|| Tries::new(accepted));
        if per_ticket_check
            && let Some(at) = tries.refused_at
            && accepted > at
        {
            self.tries.remove(&event.id);
            log::error!(correlation_id = event.id.to_string().as_str(), status = status;
                "the plugin answers {status} to this ticket only, while it accepts others: moving it to the dead letters");
            self.failing.clear();
            let change = self.breaker.on_answer(now);
            self.breaker_changed(change);
            let detail =
                format!("answered {status} to this ticket only, while accepting others: {answer}");
            let dead = self.dead_of(event.clone(), "rejected", Some(status), detail);
            self.dead_letter(dead, event.key);
            return;
        }
        tries.refused_at = Some(accepted);
        let change = self.breaker.on_refusal(status, permit, now);
        self.breaker_changed(change);
        log::debug!(correlation_id = event.id.to_string().as_str(), status = status;
            "refused by the plugin: stays pending");
        #[cfg(test)]
        if !per_ticket_check {
            self.ready.push_front(event);
            return;
        }
        let wait = self.s.retry.delay_for(1, None, self.rng.unit());
        self.lanes.park(event, now + wait);
    }

    fn dead_of(
        &self,
        event: Event,
        reason: &str,
        status: Option<u16>,
        detail: String,
    ) -> DeadLetter {
        DeadLetter {
            id: event.id,
            reason: reason.into(),
            status,
            attempts: event.attempts,
            detail,
            fields: event.fields,
        }
    }

    fn release_lane(&mut self, key: Option<&str>) {
        match self.lanes.release(key) {
            Some(next) => self.ready.push_back(next),
            None => {
                if key.is_some_and(|k| self.lanes.is_shed(k)) {
                    self.rescan = true;
                }
            }
        }
    }

    /// Logs a change of the breaker's state; when the plugin takes tickets again, the
    /// events parked meanwhile go at once.
    fn breaker_changed(&mut self, change: Option<Change>) {
        let Some(change) = change else {
            return;
        };
        match change {
            Change::Opened {
                cause: Cause::Down,
                failures,
                next_probe_in,
            } => {
                log::error!(consecutive_failures = failures, next_probe_in_ms = next_probe_in.as_millis() as u64;
                "paheko looks down: circuit open, sending one probe per backoff interval until it answers")
            }
            Change::Opened {
                cause: Cause::Refusing(status),
                next_probe_in,
                ..
            } => log::error!(status = status, next_probe_in_ms = next_probe_in.as_millis() as u64;
                "the plugin refuses tickets with HTTP {status}: {}. Nothing is dead-lettered while it refuses every ticket: one probe per backoff interval, with another ticket when there is one",
                crate::retry::refusal_meaning(status)),
            Change::StillOpen {
                cause,
                probes,
                down_for,
                next_probe_in,
            } => {
                let message = match cause {
                    Cause::Down => "paheko still down: probe failed",
                    Cause::Refusing(_) => "the plugin still refuses every ticket: probe refused",
                };
                log::warn!(probes = probes, next_probe_in_ms = next_probe_in.as_millis() as u64,
                    down_for_s = down_for.as_secs(); "{message}");
            }
            Change::Closed {
                down_for, probes, ..
            } => {
                log::info!(down_for_s = down_for.as_secs(), probes = probes;
                    "paheko answers again: circuit closed, delivering at full speed");
                let parked = self.lanes.unpark_all();
                self.ready.extend(parked);
            }
        }
    }

    // ----- writing -----

    fn plan_write(&mut self, now: Instant) {
        if self.writing.is_some() || self.write_retry_at.is_some_and(|t| t > now) {
            return;
        }
        let touch_due = self.tenure != 0 && self.touch_at.is_some_and(|t| t <= now);
        let write = if !self.to_ack.is_empty() {
            Write::Ack {
                ids: self.to_ack.clone(),
                lease_value: self.lease_value.clone(),
            }
        } else if let Some(settling) = self.to_settle.front() {
            settling.write.clone()
        } else if touch_due {
            self.touch_at = None;
            let ids: Vec<StreamId> = self.lanes.held_ids().collect();
            if ids.is_empty() {
                return;
            }
            Write::Touch { ids }
        } else {
            return;
        };
        self.writing = Some(write.clone());
        self.out.push_back(Command::Write(write));
    }

    fn on_wrote(&mut self, now: Instant, reply: WriteReply) {
        let Some(write) = self.writing.take() else {
            return;
        };
        match reply {
            WriteReply::Failed { error } => {
                if matches!(write, Write::Ack { .. }) {
                    self.acks_failing = true;
                }
                let delay = redis_retry(self.write_failures);
                self.write_failures += 1;
                self.write_retry_at = Some(now + delay);
                log::error!(error = error.as_str(), waiting_acks = self.to_ack.len(),
                    waiting_dead_letters = self.to_settle.len(), retry_in_ms = delay.as_millis() as u64;
                    "redis did not take acknowledgements: keeping them to write again");
            }
            WriteReply::Touched => {}
            WriteReply::Acked { ids, held } => {
                if self.write_failures > 0 {
                    log::info!("redis takes acknowledgements again");
                }
                self.write_failures = 0;
                self.write_retry_at = None;
                self.acks_failing = false;
                if !held {
                    log::warn!(entries = ids.len();
                        "delivered, but the lease is another instance's now: left pending for it (it sends them again, under the same Idempotency-Key)");
                }
                // The write took `to_ack` as it stood, and entries are only ever
                // appended to it: what was written is its beginning.
                debug_assert!(self.to_ack.starts_with(&ids));
                self.to_ack.drain(..ids.len().min(self.to_ack.len()));
                for id in ids {
                    if self.acking.remove(&id) {
                        self.lanes.forget(id);
                    }
                }
            }
            WriteReply::DeadLettered { id, outcome } => {
                self.write_failures = 0;
                self.write_retry_at = None;
                let Some(at) = self.to_settle.iter().position(|s| s.id == id) else {
                    return;
                };
                let settling = self.to_settle.remove(at).expect("found above");
                match outcome {
                    Moved::Moved => {
                        if let Write::DeadLetter { dead, .. } = &settling.write {
                            self.counters.dead_lettered += 1;
                            log::warn!(correlation_id = id.to_string().as_str(), reason = dead.reason.as_str();
                                "moved to the dead letters");
                        }
                    }
                    Moved::WasNotPending => {
                        log::info!(correlation_id = id.to_string().as_str();
                            "no longer pending: settled already, nothing to move");
                    }
                    Moved::NotHolder => {
                        // The lease is another's: the entry is its holder's now.
                        self.step_down(now, "the lease is held by another instance");
                        return;
                    }
                }
                self.lanes.forget(id);
                self.release_lane(settling.key.as_deref());
            }
        }
    }

    // ----- the step after every input -----

    fn step(&mut self, now: Instant) {
        if self.exited {
            return;
        }
        let stopping = self.stopping_since.is_some();
        // The lease's timers.
        match self.standing.clone() {
            Standing::Standby { next_try, asking } => {
                if !stopping && !asking && now >= next_try {
                    self.standing = Standing::Standby {
                        next_try,
                        asking: true,
                    };
                    self.out.push_back(Command::Lease(LeaseOp::Take));
                }
            }
            Standing::Active {
                renewed,
                next_renew,
                renewing,
                fence_until,
            } => {
                if now >= renewed + self.s.deadline() {
                    let why = format!(
                        "no renewal of the lease for {} ms",
                        now.duration_since(renewed).as_millis()
                    );
                    self.step_down(now, &why);
                } else if !renewing && now >= next_renew {
                    self.standing = Standing::Active {
                        renewed,
                        next_renew,
                        renewing: true,
                        fence_until,
                    };
                    self.out.push_back(Command::Lease(LeaseOp::Renew {
                        value: self.lease_value.clone(),
                    }));
                }
            }
        }
        self.dispatch(now);
        self.plan_read(now);
        // The touch timer runs only while something is held, so an idle worker does
        // not wake for it.
        if self.tenure != 0 && self.touch_at.is_none() && self.lanes.held() > 0 {
            self.touch_at = Some(now + self.s.claim_idle / 3);
        }
        self.publish_gate();
        if stopping {
            // What is left to write goes out before the grace period is judged.
            self.plan_write(now);
        }
        if stopping && self.in_flight_all() == 0 && self.writing.is_none() {
            let settled = self.to_ack.is_empty() && self.to_settle.is_empty();
            let grace_over = self.stopping_since.is_some_and(|t| now >= t + STOP_GRACE);
            if settled || grace_over {
                if !settled {
                    log::error!(acks = self.to_ack.len(), dead_letters = self.to_settle.len();
                        "stopping with writes Redis did not take: those entries stay pending and will be delivered again");
                }
                if self.tenure != 0 {
                    self.out.push_back(Command::Lease(LeaseOp::Release {
                        value: self.lease_value.clone(),
                    }));
                    self.tenure = 0;
                    self.publish_gate();
                }
                self.out.push_back(Command::Exit);
                self.exited = true;
            }
        }
    }

    /// Tells the pushers what they may start, when that changed.
    fn publish_gate(&mut self) {
        let send_until = match self.standing {
            Standing::Active { renewed, .. } if self.tenure != 0 => {
                Some(renewed + self.s.deadline())
            }
            _ => None,
        };
        let tenure = if self.stopping_since.is_some() {
            0
        } else {
            self.tenure
        };
        let gate = (tenure, send_until, self.breaker.cause().is_some());
        if self.last_gate != Some(gate) {
            self.last_gate = Some(gate);
            self.out.push_back(Command::Gate {
                tenure: gate.0,
                send_until: gate.1,
                breaker_open: gate.2,
            });
        }
    }
}

/// The wait after `n` Redis errors in a row.
fn redis_retry(n: u32) -> Duration {
    REDIS_RETRY_MIN
        .saturating_mul(1 << n.min(16))
        .min(REDIS_RETRY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(lease_secs: u64, timeout_secs: u64) -> Settings {
        Settings {
            retry: RetryConfig {
                max_attempts: 5,
                backoff: Duration::from_secs(1),
                factor: 2.0,
                max_backoff: Duration::from_secs(16),
            },
            dead_letter_statuses: crate::retry::DEAD_LETTER_STATUSES.to_vec(),
            give_up_after_parks: 3,
            breaker_threshold: 5,
            max_deliveries: 0,
            window: 32,
            lease_ttl: Duration::from_secs(lease_secs),
            request_timeout: Duration::from_secs(timeout_secs),
            max_held: crate::budget::MAX_HELD,
            max_held_bytes: crate::budget::MAX_HELD_BYTES,
            read_count: 128,
            claim_idle: Duration::from_secs(60),
            seed: 1,
            bugs: sim::Bugs::default(),
        }
    }

    #[test]
    fn the_lease_times_are_the_documented_fractions() {
        // The defaults, as README's guarantees quote them: a 15 s lease, requests
        // that time out after 30 s, a fence of 10 + 30 − 15 = 25 s.
        let s = settings(15, 30);
        assert_eq!(s.renew_every(), Duration::from_secs(5));
        assert_eq!(s.deadline(), Duration::from_secs(10));
        assert_eq!(s.fence(), Duration::from_secs(25));
        // A request timeout shorter than a third of the lease needs no fence.
        assert_eq!(settings(30, 5).fence(), Duration::ZERO);
        assert_eq!(
            settings(30, 15).fence(),
            Duration::from_secs(5),
            "20 + 15 − 30"
        );
    }

    #[test]
    fn redis_errors_are_retried_from_100_ms_doubling_to_5_s() {
        let waits: Vec<u64> = [0, 1, 2, 5, 6, 16, 40]
            .iter()
            .map(|n| redis_retry(*n).as_millis() as u64)
            .collect();
        assert_eq!(waits, [100, 200, 400, 3200, 5000, 5000, 5000]);
    }
}
