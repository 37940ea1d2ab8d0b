//! The reader thread: the only one that reads the stream. At start, and after any
//! reconnection, it first re-reads this consumer's own pending entries (ID 0, in order),
//! then blocks on new ones. It parses what it reads and hands it to the acker in
//! batches; it refreshes the pending count for /health as it goes. A Redis error never
//! stops it: it reconnects with backoff, recreating the group if Redis lost it.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::event::{Event, Incoming, StreamId};
use crate::health::Stats;
use crate::shutdown::Shutdown;
use crate::store::{self, Cursor, Names, Redis};

/// The longest a read blocks, so a stop is noticed within it.
pub const BLOCK: Duration = Duration::from_secs(2);
/// The Redis read timeout: longer than BLOCK, see [`store::Redis`].
pub const READ_TIMEOUT: Duration = Duration::from_secs(7);
/// Entries per read.
pub const COUNT: usize = 128;
/// How often the pending count shown on /health is refreshed.
const STATS_EVERY: Duration = Duration::from_secs(1);

pub struct Reader {
    pub redis: Redis,
    pub names: Names,
    pub order_keys: Vec<String>,
    pub stats: Arc<Stats>,
    pub shutdown: Shutdown,
}

impl Reader {
    /// Reads until the stop, sending batches on `out`.
    pub fn run(mut self, out: Sender<Vec<Incoming>>) {
        let mut cursor = Cursor::Pending(StreamId { ms: 0, seq: 0 });
        let mut group_ready = false;
        let mut failures = 0u32;
        let mut stats_at: Option<Instant> = None;
        while !self.shutdown.is_stopping() {
            if stats_at.is_none_or(|t| t.elapsed() >= STATS_EVERY) {
                if let Ok(n) = store::pending_count(&mut self.redis, &self.names) {
                    self.stats.pending.store(n, Relaxed);
                }
                stats_at = Some(Instant::now());
            }
            let result = if group_ready {
                store::read(&mut self.redis, &self.names, cursor, COUNT, BLOCK).map(Some)
            } else {
                store::ensure_group(&mut self.redis, &self.names).map(|created| {
                    if created {
                        log::info!(stream = self.names.stream.as_str(), group = self.names.group.as_str();
                            "consumer group created");
                    }
                    group_ready = true;
                    None
                })
            };
            match result {
                Ok(read) => {
                    if failures > 0 {
                        log::info!("redis reachable again");
                    }
                    failures = 0;
                    self.stats.set_redis_ok(true);
                    let Some(entries) = read else {
                        continue;
                    };
                    cursor = match (cursor, entries.last()) {
                        (Cursor::Pending(_), Some(last)) => Cursor::Pending(last.id),
                        (Cursor::Pending(_), None) => Cursor::New,
                        (Cursor::New, _) => Cursor::New,
                    };
                    if entries.is_empty() {
                        continue;
                    }
                    let batch: Vec<Incoming> = entries
                        .into_iter()
                        .map(|entry| match entry.fields {
                            None => Incoming::Vanished(entry.id),
                            Some(fields) => {
                                match Event::parse(entry.id, fields, &self.order_keys) {
                                    Ok(event) => Incoming::Event(event),
                                    Err(rejected) => Incoming::Rejected(rejected),
                                }
                            }
                        })
                        .collect();
                    crossbeam_channel::select! {
                        send(out, batch) -> sent => if sent.is_err() { return },
                        // What was read stays pending for the next start.
                        recv(self.shutdown.signal()) -> _ => return,
                    }
                }
                Err(e) if store::is_no_group(&e) => {
                    log::warn!(stream = self.names.stream.as_str(), group = self.names.group.as_str();
                        "the stream or its consumer group is gone (Redis restarted empty?): recreating it");
                    group_ready = false;
                    cursor = Cursor::Pending(StreamId { ms: 0, seq: 0 });
                }
                Err(e) => {
                    self.stats.set_redis_ok(false);
                    let delay = store::reconnect_delay(failures);
                    log::error!(error = e.to_string().as_str(), retry_in_ms = delay.as_millis() as u64;
                        "redis read failed: reconnecting");
                    failures += 1;
                    group_ready = false;
                    // The reply may have been lost after Redis delivered entries to us:
                    // they are in our pending list, so read that again first.
                    cursor = Cursor::Pending(StreamId { ms: 0, seq: 0 });
                    self.shutdown.sleep(delay);
                }
            }
        }
    }
}

/// While the plugin is not configured: consume nothing, but keep /health's view of
/// Redis and of the pending count current.
pub fn watch(mut redis: Redis, names: &Names, stats: &Stats, shutdown: &Shutdown) {
    loop {
        match store::pending_count(&mut redis, names) {
            Ok(n) => {
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
