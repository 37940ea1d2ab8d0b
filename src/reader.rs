//! The reader thread: the only one that reads the stream. At start, and after any
//! reconnection, it asks Redis its version, then re-reads this consumer's own pending
//! entries in order — with XPENDING and XRANGE, so that this never counts as another
//! delivery — then reads new ones. It parses what it reads and hands it to the acker in
//! batches; it refreshes the queue figures for /health as it goes. A Redis error never
//! stops it: it reconnects with backoff, recreating the group if Redis lost it. Only a
//! Redis too old to run with (before 6.2) ends it, and with it the worker.
//!
//! On Redis 7 each read of new entries first counts the entries the producer's MAXLEN
//! trimmed before the group read them, and records each such gap as one `trimmed` dead
//! letter, in the same script as the read ([`store::read_new`]); the reader decides
//! this alone, since only the read can tell, and logs it. When nothing is left to read
//! it waits for the stream to grow with a plain XREAD (which leaves the group alone),
//! then reads with the script: never with a blocking XREADGROUP, which would deliver
//! what arrived meanwhile without that count.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, select};
use redis::RedisError;

use crate::Error;
use crate::budget::{self, Budget};
use crate::event::{Entry, Event, Incoming, StreamId};
use crate::lease::{self, Role};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::store::{self, Cursor, Names, Redis, Support};

/// The longest a read blocks, so a stop is noticed within it.
pub const BLOCK: Duration = Duration::from_secs(2);
/// The Redis read timeout: longer than BLOCK, see [`store::Redis`].
pub const READ_TIMEOUT: Duration = Duration::from_secs(7);
/// Entries per read.
pub const COUNT: usize = 128;
/// How often entries left idle by other consumers are looked for and the queue
/// figures of /health refreshed, in one round trip: while idle the worker wakes only for
/// that and its blocked reads.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(10);
/// How soon after reading entries the queue figures are refreshed.
const BUSY_REFRESH: Duration = Duration::from_secs(1);
/// XAUTOCLAIM calls of COUNT entries per look, at most.
const RECLAIM_ROUNDS: usize = 8;
/// How often a reader held back by a full acker wakes to ping systemd's watchdog.
const WATCHDOG_TICK: Duration = Duration::from_secs(1);

pub struct Reader {
    pub redis: Redis,
    pub names: Names,
    pub order_keys: Vec<String>,
    /// Entries of other consumers idle longer than this are taken over.
    pub claim_idle: Duration,
    pub stats: Arc<Stats>,
    pub shutdown: Shutdown,
    /// What may still be read: the acker gives back what it settled.
    pub budget: Arc<Budget>,
    /// From the acker: whether this instance holds the lease (issue 9). A standby reads
    /// nothing; a new holder first takes every pending entry of the group over.
    pub roles: Receiver<Role>,
    /// Consumers of the group holding nothing, idle this long, are deleted.
    pub forget_consumers_after: Duration,
}

/// How often the active instance looks for consumers to forget.
const FORGET_EVERY: Duration = Duration::from_secs(600);

/// What the reader learnt of the server since it last connected.
#[derive(Default)]
struct Server {
    /// `None` until connected (again): asked after every reconnection, since the Redis
    /// behind the URL may have been replaced.
    support: Option<Support>,
    /// The version last warned about, so a warning is said once, not at every
    /// reconnection.
    warned: Option<store::Version>,
    /// Whether the "cannot count trimmed entries" warning was given.
    warned_uncounted: bool,
    /// Set when the last read found the group caught up: the group's last-delivered
    /// ID, to wait from for the stream to grow before reading again.
    caught_up_at: Option<StreamId>,
}

impl Reader {
    /// Reads until the stop, sending batches on `out`. Fails only on a Redis too old
    /// to run with; the stop is then triggered for the whole worker.
    pub fn run(mut self, out: Sender<Vec<Incoming>>) -> Result<(), Error> {
        let mut cursor = Cursor::Pending(StreamId::default());
        let mut server = Server::default();
        let mut group_ready = false;
        let mut failures = 0u32;
        let mut housekeeping_at = Instant::now();
        let mut active = false;
        // Set on taking the lease: every pending entry of the group is made ours
        // before anything else is read.
        let mut take_over = false;
        let mut forget_at = Instant::now();
        while !self.shutdown.is_stopping() {
            crate::notify::watchdog();
            let mut role = self.roles.try_iter().last();
            if role.is_none() && group_ready && !active {
                // A standby reads nothing: it waits for the lease, keeping /health's
                // view of the queue current.
                if Instant::now() >= housekeeping_at {
                    housekeeping_at = Instant::now() + HOUSEKEEPING_EVERY;
                    self.refresh_stats();
                }
                role = self.wait_for_role();
                if role.is_none() {
                    continue;
                }
            }
            if let Some(role) = role {
                active = role == Role::Active;
                take_over = active;
                server.caught_up_at = None;
                cursor = Cursor::Pending(StreamId::default());
                continue;
            }
            let result = if !group_ready {
                self.prepare(&mut server).map(|()| {
                    group_ready = true;
                    if server.support != Some(Support::TooOld) {
                        crate::notify::ready();
                    }
                    Vec::new()
                })
            } else if take_over {
                take_over = false;
                forget_at = Instant::now() + FORGET_EVERY;
                self.take_over()
            } else if Instant::now() >= forget_at {
                forget_at = Instant::now() + FORGET_EVERY;
                self.forget_idle_consumers().map(|()| Vec::new())
            } else if self.budget.room(COUNT) == 0 {
                // Everything the worker may hold is held (Paheko down, or slow): the
                // rest waits in Redis. /health must go on showing the queue grow.
                if Instant::now() >= housekeeping_at {
                    housekeeping_at = Instant::now() + HOUSEKEEPING_EVERY;
                    self.refresh_stats();
                }
                self.budget.wait(&self.shutdown);
                Ok(Vec::new())
            } else if cursor == Cursor::New && Instant::now() >= housekeeping_at {
                housekeeping_at = Instant::now() + HOUSEKEEPING_EVERY;
                self.housekeeping()
            } else {
                self.read(&mut cursor, &mut server)
            };
            if server.support == Some(Support::TooOld) {
                self.shutdown.trigger();
                return Err(Error::Startup(
                    server
                        .warned
                        .and_then(|v| Support::TooOld.warning(v))
                        .unwrap_or_else(|| "redis: too old".into()),
                ));
            }
            match result {
                Ok(batch) => {
                    if failures > 0 {
                        log::info!("redis reachable again");
                    }
                    failures = 0;
                    self.stats.set_redis_ok(true);
                    if !batch.is_empty() {
                        // Busy: refresh the figures /health shows soon after, not in 10 s.
                        housekeeping_at = housekeeping_at.min(Instant::now() + BUSY_REFRESH);
                        if !self.send(&out, batch) {
                            return Ok(());
                        }
                    }
                }
                Err(e) if store::is_no_group(&e) => {
                    log::warn!(stream = self.names.stream.as_str(), group = self.names.group.as_str();
                        "the stream or its consumer group is gone (Redis restarted empty?): recreating it");
                    group_ready = false;
                    server.caught_up_at = None;
                    cursor = Cursor::Pending(StreamId::default());
                }
                Err(e) => {
                    self.stats.set_redis_ok(false);
                    let delay = store::reconnect_delay(failures);
                    log::error!(error = e.to_string().as_str(), retry_in_ms = delay.as_millis() as u64;
                        "redis read failed: reconnecting");
                    failures += 1;
                    group_ready = false;
                    server.support = None;
                    server.caught_up_at = None;
                    // The reply may have been lost after Redis delivered entries to us:
                    // they are in our pending list, so read that again first.
                    cursor = Cursor::Pending(StreamId::default());
                    self.shutdown.sleep(delay);
                }
            }
        }
        Ok(())
    }

    /// The acker's next word on the lease, if it comes before the stop or the
    /// watchdog's tick.
    fn wait_for_role(&self) -> Option<Role> {
        select! {
            recv(self.roles) -> role => role.ok(),
            recv(self.shutdown.signal()) -> _ => None,
            default(WATCHDOG_TICK) => None,
        }
    }

    /// This instance just took the lease: every entry pending in the group, whoever
    /// read it, becomes ours in one step (nobody else is working on any of them now),
    /// then the pending list is re-read from the start, in stream order, before any new
    /// entry. Entries gone from the stream meanwhile are reported.
    fn take_over(&mut self) -> Result<Vec<Incoming>, RedisError> {
        let (moved, gone) = lease::take_over(&mut self.redis, &self.names)?;
        if moved > 0 || !gone.is_empty() {
            log::warn!(entries = moved, vanished = gone.len();
                "taking over every entry other consumers left pending, before reading anything new");
        }
        self.forget_idle_consumers()?;
        Ok(gone.into_iter().map(Incoming::Vanished).collect())
    }

    /// Deletes consumers of the group that hold nothing and were idle for long (renamed
    /// containers), so they do not pile up.
    fn forget_idle_consumers(&mut self) -> Result<(), RedisError> {
        let deleted = lease::forget_idle_consumers(
            &mut self.redis,
            &self.names,
            self.forget_consumers_after,
        )?;
        if !deleted.is_empty() {
            log::info!(consumers = deleted.join(",").as_str(),
                idle_s = self.forget_consumers_after.as_secs();
                "deleted consumers of the group idle with nothing pending");
        }
        Ok(())
    }

    /// After (re)connecting: what the server supports, said once when it is less than
    /// everything; then the group, created if missing.
    fn prepare(&mut self, server: &mut Server) -> Result<(), RedisError> {
        let version = store::server_version(&mut self.redis)?;
        let support = Support::of(version);
        server.support = Some(support);
        if let Some(warning) = support.warning(version)
            && server.warned != Some(version)
        {
            server.warned = Some(version);
            match support {
                Support::TooOld => log::error!(redis_version = version.to_string().as_str();
                    "{warning}: stopping"),
                _ => log::warn!(redis_version = version.to_string().as_str(); "{warning}"),
            }
        }
        if support == Support::TooOld {
            return Ok(());
        }
        if store::ensure_group(&mut self.redis, &self.names)? {
            log::info!(stream = self.names.stream.as_str(), group = self.names.group.as_str();
                "consumer group created");
        }
        store::ensure_consumer(&mut self.redis, &self.names)
    }

    /// One read: this consumer's pending entries after the cursor, or new ones.
    fn read(
        &mut self,
        cursor: &mut Cursor,
        server: &mut Server,
    ) -> Result<Vec<Incoming>, RedisError> {
        let count = self.budget.room(COUNT);
        match *cursor {
            Cursor::Pending(after) => {
                let after = (after != StreamId::default()).then_some(after);
                let pending = store::read_pending(&mut self.redis, &self.names, after, count)?;
                *cursor = match pending.last() {
                    Some(last) => Cursor::Pending(last.entry.id),
                    None => Cursor::New,
                };
                if !pending.is_empty() {
                    log::info!(entries = pending.len(); "taking back this consumer's pending entries");
                }
                let counts = pending.iter().map(|p| (p.entry.id, p.deliveries)).collect();
                let entries = pending.into_iter().map(|p| p.entry).collect();
                Ok(self.incoming(entries, &counts))
            }
            Cursor::New if server.support == Some(Support::Full) => {
                if let Some(after) = server.caught_up_at {
                    if !store::wait_for_new(&mut self.redis, &self.names, after, BLOCK)? {
                        return Ok(Vec::new());
                    }
                    server.caught_up_at = None;
                }
                // Stepped down while waiting: read nothing more.
                if !self.roles.is_empty() {
                    return Ok(Vec::new());
                }
                let new = store::read_new(&mut self.redis, &self.names, count)?;
                if let Some(t) = new.trimmed {
                    self.stats.lost_to_trim.fetch_add(t.count, Relaxed);
                    self.stats.trimmed_records.fetch_add(1, Relaxed);
                    log::error!(count = t.count, after_id = t.after.to_string().as_str(),
                        before_id = t.before.to_string().as_str(), dead_letter = t.record.to_string().as_str(),
                        dead_letter_stream = self.names.dead_letters.as_str();
                        "{} entries were trimmed from the stream (the producer's MAXLEN) before they were read: lost, recorded as one 'trimmed' dead letter", t.count);
                }
                if !new.counted && !server.warned_uncounted {
                    server.warned_uncounted = true;
                    log::warn!(group = self.names.group.as_str();
                        "how many entries the stream had received at the group's last read is unknown (the group was moved by another program, or entries deleted with XDEL): entries trimmed before they were read cannot be counted until the group reaches the stream's end");
                }
                if new.entries.is_empty() {
                    server.caught_up_at = Some(new.last_delivered);
                }
                Ok(self.incoming(new.entries, &HashMap::new()))
            }
            Cursor::New => {
                let entries = store::read_blocking(&mut self.redis, &self.names, count, BLOCK)?;
                Ok(self.incoming(entries, &HashMap::new()))
            }
        }
    }

    /// Takes over entries idle longer than the claim idle time from any consumer of the
    /// group: those of a dead instance. (This worker's own entries never go idle that
    /// long while it runs: the acker keeps them fresh.)
    fn housekeeping(&mut self) -> Result<Vec<Incoming>, RedisError> {
        let (mut claimed, stats) = store::housekeeping(
            &mut self.redis,
            &self.names,
            self.claim_idle,
            self.budget.room(COUNT).max(1),
        )?;
        self.show(stats);
        let mut batch = Vec::new();
        for round in 0..RECLAIM_ROUNDS {
            if round > 0 {
                let start = claimed.next;
                let room = self.budget.room(COUNT);
                if start == StreamId::default() || room == 0 {
                    break;
                }
                claimed =
                    store::autoclaim(&mut self.redis, &self.names, self.claim_idle, start, room)?;
            }
            for id in std::mem::take(&mut claimed.vanished) {
                batch.push(Incoming::Vanished(id));
            }
            if !claimed.entries.is_empty() {
                let first = claimed.entries[0].id;
                let last = claimed.entries[claimed.entries.len() - 1].id;
                let counts =
                    store::delivery_counts(&mut self.redis, &self.names, first, last, COUNT)?;
                log::warn!(entries = claimed.entries.len(), first = first.to_string().as_str(),
                    claim_idle_s = self.claim_idle.as_secs();
                    "taking over entries another consumer left pending (a stopped or dead instance?)");
                batch.extend(self.incoming(std::mem::take(&mut claimed.entries), &counts));
            }
        }
        Ok(batch)
    }

    /// Parses what was read, and takes it from the budget.
    fn incoming(&self, entries: Vec<Entry>, deliveries: &HashMap<StreamId, u64>) -> Vec<Incoming> {
        let sizes = entries
            .iter()
            .map(|e| e.fields.as_deref().map_or(0, budget::size));
        let largest = sizes.clone().max().unwrap_or(0);
        self.budget.take(entries.len(), sizes.sum(), largest);
        entries
            .into_iter()
            .map(|entry| match entry.fields {
                None => Incoming::Vanished(entry.id),
                Some(fields) => match Event::parse(entry.id, fields, &self.order_keys) {
                    Ok(mut event) => {
                        event.deliveries = deliveries.get(&event.id).copied().unwrap_or(0);
                        Incoming::Event(event)
                    }
                    Err(rejected) => Incoming::Rejected(rejected),
                },
            })
            .collect()
    }

    /// Hands a batch to the acker, waiting while it is full. False when the worker
    /// stops meanwhile (what was read stays pending for the next start).
    fn send(&mut self, out: &Sender<Vec<Incoming>>, mut batch: Vec<Incoming>) -> bool {
        loop {
            match out.send_timeout(batch, WATCHDOG_TICK) {
                Ok(()) => return true,
                Err(SendTimeoutError::Disconnected(_)) => return false,
                Err(SendTimeoutError::Timeout(back)) => {
                    if self.shutdown.is_stopping() {
                        return false;
                    }
                    // Held back while the acker is full (Paheko down): still alive, and
                    // /health must go on showing the queue grow.
                    crate::notify::watchdog();
                    self.refresh_stats();
                    batch = back;
                }
            }
        }
    }

    /// The pending count and lag shown on /health; a warning when the backlog nears
    /// the producer's MAXLEN, where tickets start to be trimmed unseen.
    fn refresh_stats(&mut self) {
        // A failure here is met again, and handled, by the next read.
        if let Ok(q) = store::queue_stats(&mut self.redis, &self.names) {
            self.show(q);
        }
    }

    fn show(&self, q: store::QueueStats) {
        let was_warning = self.stats.backlog_warning();
        {
            self.stats.pending.store(q.pending, Relaxed);
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let age = q
                .oldest_pending
                .map_or(0, |id| now_ms.saturating_sub(id.ms) / 1000);
            self.stats.oldest_pending_age_seconds.store(age, Relaxed);
            self.stats.lag.store(q.lag.unwrap_or(0), Relaxed);
            self.stats.dead_letters.store(q.dead_letters, Relaxed);
            self.stats.trimmed_records.store(q.trimmed_records, Relaxed);
        }
        let warning = self.stats.backlog_warning();
        let (pending, lag) = (
            self.stats.pending.load(Relaxed),
            self.stats.lag.load(Relaxed),
        );
        if warning && !was_warning {
            log::warn!(pending = pending, lag = lag, warn_at = self.stats.backlog_warn.load(Relaxed);
                "backlog is large: the producer trims its stream at 10000 entries, undelivered tickets will be lost past that");
        } else if was_warning && !warning {
            log::info!(pending = pending, lag = lag; "backlog back under the warning level");
        }
    }
}

/// While the plugin is not configured: consume nothing, but keep /health's view of
/// Redis and of the pending count current.
pub fn watch(mut redis: Redis, names: &Names, stats: &Stats, shutdown: &Shutdown) {
    loop {
        crate::notify::watchdog();
        match store::pending_count(&mut redis, names) {
            Ok(n) => {
                crate::notify::ready();
                stats.set_redis_ok(true);
                stats.pending.store(n, Relaxed);
            }
            Err(e) => {
                stats.set_redis_ok(false);
                log::warn!(error = e.to_string().as_str(); "redis unreachable");
            }
        }
        if !shutdown.sleep(BLOCK) {
            return;
        }
    }
}
