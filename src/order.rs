//! Per-key ordering, as plain data: which held events may go out now and which must
//! wait. Events sharing an ordering key form a lane; only the lane's head is ever out
//! (in flight or parked), the rest wait behind it in stream order until the head is
//! delivered or dead-lettered. Events without a key go out at once. It also remembers
//! every entry it holds, and the last ones it finished, so an entry read twice (a
//! pending list re-read after a reconnect) is not delivered twice.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use crate::event::{Event, StreamId};

/// How many finished entries are remembered for de-duplication.
const RECENT: usize = 16_384;

#[derive(Debug, Default)]
pub struct Lanes {
    /// Every entry from admission until [`Lanes::forget`], with its size in bytes.
    held: HashMap<StreamId, usize>,
    lanes: HashMap<String, VecDeque<Event>>,
    /// Heads waiting for their next attempt, with its time.
    parked: Vec<(Instant, Event)>,
    recent: VecDeque<StreamId>,
    recent_set: HashSet<StreamId>,
}

impl Lanes {
    /// Takes a newly read event. Returns it when it may go out now; `None` when it waits
    /// behind its lane's head or is one this worker already has.
    pub fn admit(&mut self, event: Event) -> Option<Event> {
        if !self.hold(event.id, crate::budget::size(&event.fields)) {
            return None;
        }
        let Some(key) = &event.key else {
            return Some(event);
        };
        match self.lanes.get_mut(key) {
            None => {
                self.lanes.insert(key.clone(), VecDeque::new());
                Some(event)
            }
            Some(waiting) => {
                // Stream order, also for an older entry that comes back late.
                let at = waiting.partition_point(|e| e.id < event.id);
                waiting.insert(at, event);
                None
            }
        }
    }

    /// Records an entry of `bytes` bytes as held; false when it already is, or was just
    /// finished.
    pub fn hold(&mut self, id: StreamId, bytes: usize) -> bool {
        if self.recent_set.contains(&id) || self.held.contains_key(&id) {
            return false;
        }
        self.held.insert(id, bytes);
        true
    }

    /// Whether the entry is held here now.
    pub fn is_held(&self, id: StreamId) -> bool {
        self.held.contains_key(&id)
    }

    /// Whether the entry was settled a moment ago: a copy read again (the group was
    /// recreated, the pending list re-read) only needs acknowledging again.
    pub fn finished(&self, id: StreamId) -> bool {
        self.recent_set.contains(&id)
    }

    /// The head of `key`'s lane is done (delivered or dead-lettered): returns the next
    /// event of the lane, which may go out now.
    pub fn release(&mut self, key: Option<&str>) -> Option<Event> {
        let key = key?;
        let waiting = self.lanes.get_mut(key)?;
        let next = waiting.pop_front();
        if next.is_none() {
            self.lanes.remove(key);
        }
        next
    }

    /// The entry's acknowledgement or dead letter is written: stop holding it. Returns
    /// its size when it was held.
    pub fn forget(&mut self, id: StreamId) -> Option<usize> {
        let bytes = self.held.remove(&id)?;
        if self.recent.len() == RECENT
            && let Some(old) = self.recent.pop_front()
        {
            self.recent_set.remove(&old);
        }
        self.recent.push_back(id);
        self.recent_set.insert(id);
        Some(bytes)
    }

    /// Keeps a lane's head that failed until its next attempt at `until`; its lane
    /// stays blocked behind it.
    pub fn park(&mut self, event: Event, until: Instant) {
        self.parked.push((until, event));
    }

    /// The parked events due by `now`, oldest entry first.
    pub fn due(&mut self, now: Instant) -> Vec<Event> {
        let (due, later): (Vec<_>, Vec<_>) = self.parked.drain(..).partition(|(t, _)| *t <= now);
        self.parked = later;
        let mut due: Vec<Event> = due.into_iter().map(|(_, e)| e).collect();
        due.sort_by_key(|e| e.id);
        due
    }

    /// Forgets everything held (this instance stepped down): returns the sizes of the
    /// entries it held.
    pub fn clear(&mut self) -> Vec<usize> {
        let sizes = self.held.drain().map(|(_, bytes)| bytes).collect();
        self.lanes.clear();
        self.parked.clear();
        sizes
    }

    /// Every parked event, oldest entry first: the plugin takes tickets again, so the
    /// backoff that an outage built up is not waited out.
    pub fn unpark_all(&mut self) -> Vec<Event> {
        let mut all: Vec<Event> = self.parked.drain(..).map(|(_, e)| e).collect();
        all.sort_by_key(|e| e.id);
        all
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.parked.iter().map(|(t, _)| *t).min()
    }

    pub fn held_ids(&self) -> impl Iterator<Item = StreamId> + '_ {
        self.held.keys().copied()
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    pub fn parked(&self) -> usize {
        self.parked.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn event(seq: u64, key: Option<&str>) -> Event {
        let payload = match key {
            Some(k) => format!(r#"{{"cash_session_id":"{k}"}}"#),
            None => "{}".to_string(),
        };
        let fields = vec![(b"payload".to_vec(), payload.into_bytes())];
        Event::parse(
            StreamId { ms: 1, seq },
            fields,
            &["cash_session_id".to_string()],
        )
        .unwrap()
    }

    fn seq(e: Option<Event>) -> Option<u64> {
        e.map(|e| e.id.seq)
    }

    #[test]
    fn a_lane_lets_one_event_out_at_a_time() {
        let mut l = Lanes::default();
        assert_eq!(seq(l.admit(event(1, Some("a")))), Some(1));
        assert_eq!(seq(l.admit(event(2, Some("a")))), None);
        assert_eq!(seq(l.admit(event(3, Some("b")))), Some(3));
        assert_eq!(seq(l.admit(event(4, Some("a")))), None);
        assert_eq!(seq(l.admit(event(5, None))), Some(5));
        assert_eq!(seq(l.release(Some("a"))), Some(2));
        assert_eq!(seq(l.release(Some("a"))), Some(4));
        assert_eq!(seq(l.release(Some("a"))), None);
        // The lane is gone: the next event of "a" goes out at once.
        assert_eq!(seq(l.admit(event(6, Some("a")))), Some(6));
        assert_eq!(l.held(), 6);
    }

    #[test]
    fn a_late_older_entry_goes_before_newer_waiting_ones() {
        let mut l = Lanes::default();
        l.admit(event(1, Some("a")));
        l.admit(event(5, Some("a")));
        l.admit(event(3, Some("a")));
        assert_eq!(seq(l.release(Some("a"))), Some(3));
        assert_eq!(seq(l.release(Some("a"))), Some(5));
    }

    #[test]
    fn duplicates_are_dropped_while_held_and_soon_after() {
        let mut l = Lanes::default();
        assert!(l.admit(event(1, None)).is_some());
        assert!(l.admit(event(1, None)).is_none());
        l.forget(StreamId { ms: 1, seq: 1 });
        assert_eq!(l.held(), 0);
        assert!(
            l.admit(event(1, None)).is_none(),
            "just finished: a re-read copy"
        );
    }

    #[test]
    fn parked_events_come_back_when_due() {
        let mut l = Lanes::default();
        let now = Instant::now();
        let e = l.admit(event(1, Some("a"))).unwrap();
        l.admit(event(2, Some("a")));
        l.park(e, now + Duration::from_secs(60));
        assert_eq!(l.next_due(), Some(now + Duration::from_secs(60)));
        assert!(l.due(now).is_empty());
        assert_eq!(l.parked(), 1);
        let back = l.due(now + Duration::from_secs(61));
        assert_eq!(back.iter().map(|e| e.id.seq).collect::<Vec<_>>(), [1]);
        assert_eq!(l.next_due(), None);
        // Still the head of "a": 2 waits until 1 is released.
        assert_eq!(seq(l.admit(event(3, Some("a")))), None);
        assert_eq!(seq(l.release(Some("a"))), Some(2));
    }
}
