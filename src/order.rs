//! Per-key ordering, as plain data: which held events may go out now and which must
//! wait. Events sharing an ordering key form a lane; only the lane's head is ever out
//! (in flight or parked), the rest wait behind it in stream order until the head is
//! delivered or dead-lettered. Events without a key go out at once. It also remembers
//! every entry it holds, and the last ones it finished, so an entry read twice (a
//! pending list re-read after a reconnect) is not delivered twice.
//!
//! A lane whose head keeps failing may *shed* its waiting entries when memory is short
//! (issue 13, 6): they stay pending in Redis, not in memory, and the lane is marked
//! shed. While it is, newly read entries of that key are shed too (never sent ahead of
//! the shed ones); only a re-read of the pending list, which goes in stream order,
//! brings them back, and a scan that brought every one of them back clears the mark.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use crate::event::{Event, IdMap, IdSet, StreamId};

/// How many finished entries are remembered for de-duplication.
const RECENT: usize = 16_384;

/// What became of an admitted event.
#[derive(Debug)]
pub enum Admitted {
    /// It may go out now.
    Ready(Event),
    /// It waits behind its lane's head.
    Waiting,
    /// Held already, or finished a moment ago: a copy, dropped.
    Copy,
    /// Its lane is shed: it stays pending in Redis, to be read again by a scan.
    Shed,
}

#[derive(Debug, Default)]
pub struct Lanes {
    /// Every entry from admission until [`Lanes::forget`], with its size in bytes.
    held: IdMap<usize>,
    /// The sum of `held`'s sizes.
    bytes: usize,
    /// Per key: the head that is out, and the events waiting behind it.
    lanes: HashMap<String, (StreamId, VecDeque<Event>)>,
    /// Lanes whose later entries were left in Redis; see the module doc.
    shed: HashSet<String>,
    /// Lanes shed again during the current scan: still shed after it.
    reshed: HashSet<String>,
    /// Heads waiting for their next attempt, with its time.
    parked: Vec<(Instant, Event)>,
    recent: VecDeque<StreamId>,
    recent_set: IdSet,
}

impl Lanes {
    /// Takes a read event. `from_scan`: it comes from a re-read of the pending list in
    /// stream order, the only read that may bring back a shed lane's entries.
    /// While its head is `failing`, a shed lane takes nothing back even from a scan: a
    /// scan started over to make room would otherwise read the same entries back into
    /// it again and again.
    pub fn admit(
        &mut self,
        event: Event,
        from_scan: bool,
        failing: impl Fn(StreamId) -> bool,
    ) -> Admitted {
        if self.recent_set.contains(&event.id) || self.held.contains_key(&event.id) {
            return Admitted::Copy;
        }
        if let Some(key) = &event.key
            && self.shed.contains(key)
        {
            if !from_scan {
                return Admitted::Shed;
            }
            // Once one entry of the lane was left out of this scan, so are the later
            // ones, whatever becomes of the head meanwhile.
            if self.reshed.contains(key)
                || self.lanes.get(key).is_some_and(|(head, _)| failing(*head))
            {
                self.reshed.insert(key.clone());
                return Admitted::Shed;
            }
        }
        self.hold(event.id, crate::budget::size(&event.fields));
        let Some(key) = &event.key else {
            return Admitted::Ready(event);
        };
        match self.lanes.get_mut(key) {
            None => {
                self.lanes.insert(key.clone(), (event.id, VecDeque::new()));
                Admitted::Ready(event)
            }
            Some((_, waiting)) => {
                // Stream order, also for an older entry that comes back late.
                let at = waiting.partition_point(|e| e.id < event.id);
                waiting.insert(at, event);
                Admitted::Waiting
            }
        }
    }

    /// Leaves in Redis the waiting entries of every lane whose head `failing` says is
    /// failing, so other sessions can be read (issue 13, 6). Returns how many were shed.
    pub fn shed_failing(&mut self, failing: impl Fn(StreamId) -> bool, scanning: bool) -> usize {
        let mut shed = 0;
        for (key, (head, waiting)) in &mut self.lanes {
            if waiting.is_empty() || !failing(*head) {
                continue;
            }
            for event in waiting.drain(..) {
                if let Some(bytes) = self.held.remove(&event.id) {
                    self.bytes -= bytes;
                }
                shed += 1;
            }
            self.shed.insert(key.clone());
            if scanning {
                self.reshed.insert(key.clone());
            }
        }
        shed
    }

    /// Whether the lane of `key` left entries in Redis.
    pub fn is_shed(&self, key: &str) -> bool {
        self.shed.contains(key)
    }

    /// A scan of the pending list starts.
    pub fn scan_started(&mut self) {
        self.reshed.clear();
    }

    /// A scan of the pending list reached its end: every lane it did not have to shed
    /// again has all its entries back (or settled).
    pub fn scan_ended(&mut self) {
        let reshed = std::mem::take(&mut self.reshed);
        self.shed.retain(|key| reshed.contains(key));
    }

    /// Records an entry of `bytes` bytes as held; false when it already is, or was just
    /// finished.
    pub fn hold(&mut self, id: StreamId, bytes: usize) -> bool {
        if self.recent_set.contains(&id) || self.held.contains_key(&id) {
            return false;
        }
        self.held.insert(id, bytes);
        self.bytes += bytes;
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
        let (head, waiting) = self.lanes.get_mut(key)?;
        let next = waiting.pop_front();
        match &next {
            Some(next) => *head = next.id,
            None => {
                self.lanes.remove(key);
            }
        }
        next
    }

    /// The entry's acknowledgement or dead letter is written: stop holding it. Returns
    /// its size when it was held.
    pub fn forget(&mut self, id: StreamId) -> Option<usize> {
        let bytes = self.held.remove(&id)?;
        self.bytes -= bytes;
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
        self.bytes = 0;
        self.lanes.clear();
        self.parked.clear();
        self.shed.clear();
        self.reshed.clear();
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

    #[cfg(test)]
    pub fn debug(&self, key: &str) -> String {
        format!(
            "lane {key}: {:?}, shed {}, reshed {}",
            self.lanes.get(key).map(|(h, w)| (
                h.to_string(),
                w.iter().map(|e| e.id.to_string()).collect::<Vec<_>>()
            )),
            self.shed.contains(key),
            self.reshed.contains(key)
        )
    }

    /// The entries waiting behind their lane's head.
    pub fn waiting_ids(&self) -> impl Iterator<Item = StreamId> + '_ {
        self.lanes
            .values()
            .flat_map(|(_, w)| w.iter().map(|e| e.id))
    }

    /// The parked heads.
    pub fn parked_ids(&self) -> impl Iterator<Item = StreamId> + '_ {
        self.parked.iter().map(|(_, e)| e.id)
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The field bytes of the entries held.
    pub fn held_bytes(&self) -> usize {
        self.bytes
    }

    /// The sizes of the entries held, summed anew (the simulation checks `held_bytes`
    /// against it).
    pub fn held_bytes_recounted(&self) -> usize {
        self.held.values().sum()
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

    fn go(l: &mut Lanes, e: Event) -> Option<Event> {
        match l.admit(e, false, |_| false) {
            Admitted::Ready(e) => Some(e),
            _ => None,
        }
    }

    #[test]
    fn a_failing_lane_sheds_its_waiting_entries_until_a_scan_brings_them_back() {
        let mut l = Lanes::default();
        let head = go(&mut l, event(1, Some("a"))).unwrap();
        for n in 2..=5 {
            go(&mut l, event(n, Some("a")));
        }
        go(&mut l, event(6, Some("b")));
        assert_eq!(l.held(), 6);
        assert_eq!(l.shed_failing(|id| id == head.id, false), 4);
        assert_eq!(l.held(), 2, "the failing head and b's");
        assert_eq!(l.held_bytes(), l.held_bytes_recounted());
        // A newer entry of "a" read meanwhile stays in Redis too.
        assert!(matches!(
            l.admit(event(7, Some("a")), false, |_| false),
            Admitted::Shed
        ));
        assert!(l.is_shed("a"));
        assert!(!l.is_shed("b"));
        assert_eq!(seq(l.release(Some("a"))), None);
        // The scan brings them back in stream order; the first is the new head.
        l.scan_started();
        assert!(matches!(
            l.admit(event(2, Some("a")), true, |_| false),
            Admitted::Ready(_)
        ));
        assert!(matches!(
            l.admit(event(3, Some("a")), true, |_| false),
            Admitted::Waiting
        ));
        l.scan_ended();
        assert!(!l.is_shed("a"));
        assert!(matches!(
            l.admit(event(8, Some("a")), false, |_| false),
            Admitted::Waiting
        ));
    }

    fn seq(e: Option<Event>) -> Option<u64> {
        e.map(|e| e.id.seq)
    }

    #[test]
    fn a_lane_lets_one_event_out_at_a_time() {
        let mut l = Lanes::default();
        assert_eq!(seq(go(&mut l, event(1, Some("a")))), Some(1));
        assert_eq!(seq(go(&mut l, event(2, Some("a")))), None);
        assert_eq!(seq(go(&mut l, event(3, Some("b")))), Some(3));
        assert_eq!(seq(go(&mut l, event(4, Some("a")))), None);
        assert_eq!(seq(go(&mut l, event(5, None))), Some(5));
        assert_eq!(seq(l.release(Some("a"))), Some(2));
        assert_eq!(seq(l.release(Some("a"))), Some(4));
        assert_eq!(seq(l.release(Some("a"))), None);
        // The lane is gone: the next event of "a" goes out at once.
        assert_eq!(seq(go(&mut l, event(6, Some("a")))), Some(6));
        assert_eq!(l.held(), 6);
    }

    #[test]
    fn a_late_older_entry_goes_before_newer_waiting_ones() {
        let mut l = Lanes::default();
        go(&mut l, event(1, Some("a")));
        go(&mut l, event(5, Some("a")));
        go(&mut l, event(3, Some("a")));
        assert_eq!(seq(l.release(Some("a"))), Some(3));
        assert_eq!(seq(l.release(Some("a"))), Some(5));
    }

    #[test]
    fn duplicates_are_dropped_while_held_and_soon_after() {
        let mut l = Lanes::default();
        assert!(go(&mut l, event(1, None)).is_some());
        assert!(go(&mut l, event(1, None)).is_none());
        l.forget(StreamId { ms: 1, seq: 1 });
        assert_eq!(l.held(), 0);
        assert!(
            go(&mut l, event(1, None)).is_none(),
            "just finished: a re-read copy"
        );
    }

    #[test]
    fn parked_events_come_back_when_due() {
        let mut l = Lanes::default();
        let now = Instant::now();
        let e = go(&mut l, event(1, Some("a"))).unwrap();
        go(&mut l, event(2, Some("a")));
        l.park(e, now + Duration::from_secs(60));
        assert_eq!(l.next_due(), Some(now + Duration::from_secs(60)));
        assert!(l.due(now).is_empty());
        assert_eq!(l.parked(), 1);
        let back = l.due(now + Duration::from_secs(61));
        assert_eq!(back.iter().map(|e| e.id.seq).collect::<Vec<_>>(), [1]);
        assert_eq!(l.next_due(), None);
        // Still the head of "a": 2 waits until 1 is released.
        assert_eq!(seq(go(&mut l, event(3, Some("a")))), None);
        assert_eq!(seq(l.release(Some("a"))), Some(2));
    }

    #[test]
    fn only_a_failing_head_with_entries_behind_it_sheds() {
        let mut l = Lanes::default();
        // "a": failing, nothing behind it. "b": entries behind a head that is fine.
        let a = go(&mut l, event(1, Some("a"))).unwrap();
        go(&mut l, event(2, Some("b")));
        go(&mut l, event(3, Some("b")));
        assert_eq!(l.shed_failing(|id| id == a.id, false), 0);
        assert!(!l.is_shed("a"), "nothing was left in Redis");
        assert!(!l.is_shed("b"), "its head is not failing");
        assert_eq!(l.held(), 3);
    }

    #[test]
    fn a_scan_started_over_forgets_what_the_abandoned_one_shed_again() {
        let mut l = Lanes::default();
        let head = go(&mut l, event(1, Some("a"))).unwrap();
        go(&mut l, event(2, Some("a")));
        l.scan_started();
        assert_eq!(l.shed_failing(|id| id == head.id, true), 1);
        // The scan is abandoned and a new one starts; the head is no longer failing.
        l.scan_started();
        assert!(matches!(
            l.admit(event(2, Some("a")), true, |_| false),
            Admitted::Waiting
        ));
        l.scan_ended();
        assert!(!l.is_shed("a"));
    }

    #[test]
    fn holding_twice_counts_once() {
        let mut l = Lanes::default();
        let id = StreamId { ms: 1, seq: 1 };
        assert!(l.hold(id, 10));
        assert!(!l.hold(id, 10), "held already");
        assert_eq!((l.held(), l.held_bytes()), (1, 10));
        assert_eq!(l.forget(id), Some(10));
        assert!(!l.hold(id, 10), "finished a moment ago");
        assert_eq!((l.held(), l.held_bytes()), (0, 0));
    }

    #[test]
    fn the_last_finished_entries_are_remembered_up_to_the_window() {
        let mut l = Lanes::default();
        let id = |seq| StreamId { ms: 1, seq };
        for n in 1..=RECENT as u64 + 1 {
            l.hold(id(n), 1);
            l.forget(id(n));
        }
        assert!(!l.finished(id(1)), "the oldest left the window");
        assert!(l.finished(id(2)));
        assert!(l.finished(id(RECENT as u64 + 1)));
    }

    #[test]
    fn the_held_ids_are_every_entry_held_until_forgotten() {
        // What the touch keeps from looking idle to other programs.
        let mut l = Lanes::default();
        go(&mut l, event(1, Some("a")));
        go(&mut l, event(2, Some("a")));
        go(&mut l, event(3, None));
        l.forget(StreamId { ms: 1, seq: 3 });
        let mut ids: Vec<u64> = l.held_ids().map(|id| id.seq).collect();
        ids.sort();
        assert_eq!(ids, [1, 2]);
    }

    #[test]
    fn unparking_all_returns_every_parked_head_oldest_first() {
        let mut l = Lanes::default();
        let later = Instant::now() + Duration::from_secs(600);
        let b = go(&mut l, event(2, Some("b"))).unwrap();
        let a = go(&mut l, event(1, Some("a"))).unwrap();
        l.park(b, later);
        l.park(a, later);
        let all = l.unpark_all();
        assert_eq!(all.iter().map(|e| e.id.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!((l.parked(), l.next_due()), (0, None));
    }
}
