//! The reader thread: the only one that reads the stream, and only what the coordinator
//! asks ([`crate::core::ReadOp`]): take every pending entry of the group over, re-read
//! this consumer's pending list from a cursor, read new entries, take over entries other
//! consumers left idle, forget idle consumers. It parses what it reads and hands it back
//! ([`ReadReply`]); it decides nothing about entries. At start, and after any Redis
//! error, it asks Redis its version and makes sure the group exists (recreating it if
//! Redis lost it); a Redis too old to run with (before 6.2) ends it, and with it the
//! worker. Between reads it keeps the queue figures of /health current, for a standby
//! too.
//!
//! On Redis 7 each read of new entries first counts the entries the producer's MAXLEN
//! trimmed before the group read them, and records each such gap as one `trimmed` dead
//! letter, in the same script as the read ([`store::read_new`]). When nothing is left to
//! read it waits for the stream to grow with a plain XREAD (which leaves the group
//! alone), then reads with the script: never with a blocking XREADGROUP, which would
//! deliver what arrived meanwhile without that count.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use redis::RedisError;

use crate::Error;
use crate::core::{ReadOp, ReadReply, Source};
use crate::event::{Entry, Event, Incoming, StreamId};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::store::{self, Names, Redis, Support};

/// The longest a read blocks, so a stop is noticed within it.
pub const BLOCK: Duration = Duration::from_secs(2);
/// The Redis read timeout: longer than BLOCK, see [`store::Redis`].
pub const READ_TIMEOUT: Duration = Duration::from_secs(7);
/// Entries per read.
pub const COUNT: usize = 128;
/// How often the queue figures of /health are refreshed while no read is asked.
const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// How soon after reading entries the queue figures are refreshed.
const BUSY_REFRESH: Duration = Duration::from_secs(1);
/// How often the reader wakes to ping systemd's watchdog while it waits.
const WATCHDOG_TICK: Duration = Duration::from_secs(1);

pub struct Reader {
    pub redis: Redis,
    pub names: Names,
    pub order_keys: Vec<String>,
    /// Entries of other consumers idle longer than this are taken over.
    pub claim_idle: Duration,
    pub stats: Arc<Stats>,
    pub shutdown: Shutdown,
    /// Consumers of the group holding nothing, idle this long, are deleted.
    pub forget_consumers_after: Duration,
}

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
    /// Whether the group exists, as far as the reader knows.
    group_ready: bool,
}

impl Reader {
    /// Carries out the coordinator's reads until the stop. Fails only on a Redis too
    /// old to run with; the stop is then triggered for the whole worker.
    pub fn run(mut self, ops: Receiver<ReadOp>, out: Sender<ReadReply>) -> Result<(), Error> {
        let mut server = Server::default();
        let mut failures = 0u32;
        let mut retry_at = Instant::now();
        let mut refresh_at = Instant::now();
        while !self.shutdown.is_stopping() {
            crate::notify::watchdog();
            // Ready before anything is asked: a standby is ready too.
            if !server.group_ready && Instant::now() >= retry_at {
                match self.prepare(&mut server) {
                    Ok(()) => {
                        if failures > 0 {
                            log::info!("redis reachable again");
                        }
                        failures = 0;
                        self.stats.set_redis_ok(true);
                    }
                    Err(e) => {
                        let delay = store::reconnect_delay(failures);
                        self.failed(&e, &mut server, delay);
                        failures += 1;
                        retry_at = Instant::now() + delay;
                    }
                }
                if server.support == Some(Support::TooOld) {
                    self.shutdown.trigger();
                    return Err(Error::Startup(
                        server
                            .warned
                            .and_then(|v| Support::TooOld.warning(v))
                            .unwrap_or_else(|| "redis: too old".into()),
                    ));
                }
            }
            if Instant::now() >= refresh_at {
                refresh_at = Instant::now() + REFRESH_EVERY;
                self.refresh_stats();
            }
            let op = select! {
                recv(ops) -> op => match op {
                    Ok(op) => op,
                    Err(_) => return Ok(()),
                },
                recv(self.shutdown.signal()) -> _ => return Ok(()),
                default(WATCHDOG_TICK) => continue,
            };
            let tenure = op.tenure();
            if !server.group_ready {
                // Not connected: the coordinator asks again after its backoff.
                let error = "redis unreachable: reconnecting".to_string();
                if out.send(ReadReply::Failed { tenure, error }).is_err() {
                    return Ok(());
                }
                continue;
            }
            let reply = match self.execute(op, &ops, &mut server) {
                Ok(reply) => {
                    self.stats.set_redis_ok(true);
                    if let ReadReply::Batch { items, .. } = &reply
                        && !items.is_empty()
                    {
                        // Busy: refresh the figures /health shows soon after, not in 10 s.
                        refresh_at = refresh_at.min(Instant::now() + BUSY_REFRESH);
                    }
                    reply
                }
                // The lease moved on while this read waited: nothing is wrong with Redis.
                Err(e) if e.code() == Some("NOTHOLDER") => ReadReply::Failed {
                    tenure,
                    error: e.to_string(),
                },
                Err(e) => {
                    let delay = store::reconnect_delay(failures);
                    self.failed(&e, &mut server, delay);
                    failures += 1;
                    retry_at = Instant::now() + delay;
                    ReadReply::Failed {
                        tenure,
                        error: e.to_string(),
                    }
                }
            };
            if out.send(reply).is_err() {
                return Ok(());
            }
        }
        Ok(())
    }

    fn failed(&self, e: &RedisError, server: &mut Server, delay: Duration) {
        server.group_ready = false;
        server.caught_up_at = None;
        if store::is_no_group(e) {
            log::warn!(stream = self.names.stream.as_str(), group = self.names.group.as_str();
                "the stream or its consumer group is gone (Redis restarted empty?): recreating it");
            return;
        }
        self.stats.set_redis_ok(false);
        server.support = None;
        log::error!(error = e.to_string().as_str(), retry_in_ms = delay.as_millis() as u64;
            "redis read failed: reconnecting");
    }

    fn execute(
        &mut self,
        op: ReadOp,
        ops: &Receiver<ReadOp>,
        server: &mut Server,
    ) -> Result<ReadReply, RedisError> {
        Ok(match op {
            ReadOp::TakeOver {
                tenure,
                lease_value,
            } => {
                let (moved, gone) =
                    crate::lease::take_over(&mut self.redis, &self.names, &lease_value)?;
                if moved > 0 || !gone.is_empty() {
                    log::warn!(entries = moved, vanished = gone.len();
                        "taking over every entry other consumers left pending, before reading anything new");
                }
                self.forget_idle_consumers()?;
                server.caught_up_at = None;
                ReadReply::TookOver { tenure, gone }
            }
            ReadOp::Forget { tenure } => {
                self.forget_idle_consumers()?;
                ReadReply::Done { tenure }
            }
            ReadOp::Scan {
                tenure,
                after,
                count,
            } => {
                let pending = store::read_pending(&mut self.redis, &self.names, after, count)?;
                if !pending.is_empty() && after.is_none() {
                    log::info!(entries = pending.len(); "taking back this consumer's pending entries");
                }
                let end = pending.len() < count;
                let counts = pending.iter().map(|p| (p.entry.id, p.deliveries)).collect();
                let entries = pending.into_iter().map(|p| p.entry).collect();
                ReadReply::Batch {
                    tenure,
                    source: Source::Scan,
                    items: self.incoming(entries, &counts),
                    end,
                    trimmed: 0,
                }
            }
            ReadOp::ClaimIdle { tenure, count } => {
                let (claimed, gone) =
                    store::claim_idle(&mut self.redis, &self.names, self.claim_idle, count)?;
                if !claimed.is_empty() {
                    log::warn!(entries = claimed.len(), first = claimed[0].entry.id.to_string().as_str(),
                        claim_idle_s = self.claim_idle.as_secs();
                        "taking over entries another consumer left pending (a stopped or dead instance?)");
                }
                let counts = claimed.iter().map(|p| (p.entry.id, p.deliveries)).collect();
                let entries = claimed.into_iter().map(|p| p.entry).collect();
                let mut items: Vec<Incoming> = gone.into_iter().map(Incoming::Vanished).collect();
                items.extend(self.incoming(entries, &counts));
                ReadReply::Batch {
                    tenure,
                    source: Source::Claimed,
                    items,
                    end: false,
                    trimmed: 0,
                }
            }
            ReadOp::New {
                tenure,
                count,
                lease_value,
                wait,
            } => {
                // Caught up, it goes on waiting here (one BLOCK after another) rather than
                // answering "nothing" every BLOCK: an idle worker's coordinator then wakes
                // for its lease and housekeeping only. It answers as soon as something is
                // read, another read is asked, or the queue figures are due.
                let until = Instant::now() + wait;
                let mut refresh_at = Instant::now() + REFRESH_EVERY;
                let (entries, trimmed) = loop {
                    let (entries, trimmed) = self.read_new(count, &lease_value, server)?;
                    if !entries.is_empty()
                        || trimmed > 0
                        || !ops.is_empty()
                        || Instant::now() >= until
                        || self.shutdown.is_stopping()
                    {
                        break (entries, trimmed);
                    }
                    crate::notify::watchdog();
                    if Instant::now() >= refresh_at {
                        refresh_at = Instant::now() + REFRESH_EVERY;
                        self.refresh_stats();
                    }
                };
                ReadReply::Batch {
                    tenure,
                    source: Source::New,
                    items: self.incoming(entries, &HashMap::new()),
                    end: false,
                    trimmed,
                }
            }
        })
    }

    /// Deletes consumers of the group that hold nothing and were idle for long (renamed
    /// containers), so they do not pile up.
    fn forget_idle_consumers(&mut self) -> Result<(), RedisError> {
        let deleted = crate::lease::forget_idle_consumers(
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
        store::ensure_consumer(&mut self.redis, &self.names)?;
        server.group_ready = true;
        crate::notify::ready();
        Ok(())
    }

    /// New entries, waiting up to [`BLOCK`] when the group was caught up; with the
    /// count of entries trimmed before the group read them (Redis 7).
    fn read_new(
        &mut self,
        count: usize,
        lease_value: &str,
        server: &mut Server,
    ) -> Result<(Vec<Entry>, u64), RedisError> {
        if server.support != Some(Support::Full) {
            let entries = store::read_blocking(&mut self.redis, &self.names, count, BLOCK)?;
            return Ok((entries, 0));
        }
        if let Some(after) = server.caught_up_at {
            if !store::wait_for_new(&mut self.redis, &self.names, after, BLOCK)? {
                return Ok((Vec::new(), 0));
            }
            server.caught_up_at = None;
        }
        let new = store::read_new(&mut self.redis, &self.names, lease_value, count)?;
        let mut trimmed = 0;
        if let Some(t) = new.trimmed {
            trimmed = t.count;
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
        Ok((new.entries, trimmed))
    }

    /// Parses what was read.
    fn incoming(&self, entries: Vec<Entry>, deliveries: &HashMap<StreamId, u64>) -> Vec<Incoming> {
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
