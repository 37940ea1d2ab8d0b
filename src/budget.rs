//! How much the worker holds in memory, bounded for real: entries read but not settled
//! (in the channel to the acker, waiting in a lane, parked or in flight) and their bytes.
//! The reader takes from the budget before a read and reads no more than it allows; the
//! acker gives back what it settled. So at most [`MAX_HELD`] entries are held, and at
//! most [`MAX_HELD_BYTES`] of their fields plus one read (a read cannot know the size
//! of what it brings: it is cut to what the largest entry seen so far would allow). Two
//! atomics, a counting semaphore, and a one-slot channel that wakes a reader waiting for
//! room; no lock.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, select};

use crate::event::Field;
use crate::shutdown::Shutdown;

/// The most entries held at once. 512 keeps four reads in hand and the peak RSS of a
/// drain near 8 MB (docs/performance.md, change 4).
pub const MAX_HELD: usize = 512;
/// The most field bytes held at once, besides one read.
pub const MAX_HELD_BYTES: usize = 4 * 1024 * 1024;
/// The longest a reader with no room waits before looking again (and pinging the
/// watchdog); room that frees up wakes it at once.
pub const WAIT: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Budget {
    entries: AtomicI64,
    bytes: AtomicI64,
    max_entries: usize,
    max_bytes: usize,
    largest: AtomicUsize,
    freed: (Sender<()>, Receiver<()>),
}

impl Default for Budget {
    fn default() -> Self {
        Budget::new(MAX_HELD, MAX_HELD_BYTES)
    }
}

impl Budget {
    pub fn new(entries: usize, bytes: usize) -> Budget {
        Budget {
            entries: AtomicI64::new(entries as i64),
            bytes: AtomicI64::new(bytes as i64),
            max_entries: entries,
            max_bytes: bytes,
            largest: AtomicUsize::new(0),
            freed: crossbeam_channel::bounded(1),
        }
    }

    /// How many entries the next read may bring, at most `count`; 0 while the bytes are
    /// spent or fewer than `count` entries are free (and something is held): a reader
    /// woken for every settled entry would read them one at a time.
    pub fn room(&self, count: usize) -> usize {
        let entries = self.entries.load(Relaxed).max(0) as usize;
        let bytes = self.bytes.load(Relaxed);
        if bytes <= 0 || (entries < count.min(self.max_entries) && entries < self.max_entries) {
            return 0;
        }
        let by_size = match self.largest.load(Relaxed) {
            0 => count,
            largest => (bytes as usize / largest).max(1),
        };
        count.min(entries).min(by_size)
    }

    /// The reader brought `entries` entries of `bytes` bytes.
    pub fn take(&self, entries: usize, bytes: usize, largest: usize) {
        self.entries.fetch_sub(entries as i64, Relaxed);
        self.bytes.fetch_sub(bytes as i64, Relaxed);
        self.largest.fetch_max(largest, Relaxed);
    }

    /// The acker settled (or dropped a copy of) an entry of `bytes` bytes.
    pub fn give(&self, bytes: usize) {
        let entries = self.entries.fetch_add(1, Relaxed) + 1;
        let before = self.bytes.fetch_add(bytes as i64, Relaxed);
        // Wake a waiting reader only when a read became possible: a whole read's worth
        // of entries free, nothing held any more, or bytes free again.
        let read = crate::reader::COUNT.min(self.max_entries) as i64;
        if entries == read
            || entries == self.max_entries as i64
            || (before <= 0 && before + bytes as i64 > 0)
        {
            // Full means a wake-up is already on its way.
            let _ = self.freed.0.try_send(());
        }
    }

    /// Waits until some room frees up, [`WAIT`] passes or the worker stops.
    pub fn wait(&self, shutdown: &Shutdown) {
        select! {
            recv(self.freed.1) -> _ => {},
            recv(shutdown.signal()) -> _ => {},
            default(WAIT) => {},
        }
    }

    /// Entries and bytes held now (read by the reader, not yet given back).
    pub fn held(&self) -> (u64, u64) {
        let held = |max: usize, left: &AtomicI64| (max as i64 - left.load(Relaxed)).max(0) as u64;
        (
            held(self.max_entries, &self.entries),
            held(self.max_bytes, &self.bytes),
        )
    }
}

/// The bytes an entry's fields take.
pub fn size(fields: &[Field]) -> usize {
    fields.iter().map(|(k, v)| k.len() + v.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stop_when_entries_or_bytes_are_spent() {
        let b = Budget::new(10, 1000);
        assert_eq!(b.room(128), 10, "nothing held: a read of up to 10");
        b.take(10, 100, 10);
        assert_eq!(b.room(4), 0);
        b.give(10);
        assert_eq!(b.room(4), 0, "one free: not a read's worth yet");
        for _ in 0..3 {
            b.give(10);
        }
        // 4 free, 940 bytes left, entries of up to 10 bytes seen: the count limits.
        assert_eq!(b.room(4), 4);
        b.take(1, 900, 300);
        assert_eq!(
            b.room(3),
            1,
            "40 bytes left, entries of 300 seen: one at a time"
        );
        b.take(1, 300, 300);
        assert_eq!(b.room(1), 0, "bytes overdrawn by one read");
        assert_eq!(b.held(), (8, 1260));
    }
}
