//! How much the worker holds in memory, bounded for real: entries read but not settled
//! (waiting in a lane, parked, in flight, or being written) and their bytes. The
//! coordinator ([`crate::core`]) owns the count as plain data: it asks for a read only
//! as large as the budget allows and derives what is held from what it holds, so the
//! count cannot drift from the truth (issue 13, 11). So at most [`MAX_HELD`] entries
//! are held, and at most [`MAX_HELD_BYTES`] of their fields plus one read (a read
//! cannot know the size of what it brings: it is cut to what the largest entry seen so
//! far would allow).

use crate::event::Field;

/// The most entries held at once. 512 keeps four reads in hand and the peak RSS of a
/// drain near 8 MB (docs/performance.md, change 4).
pub const MAX_HELD: usize = 512;
/// The most field bytes held at once, besides one read: a full count of entries of up
/// to 8 KiB each (the bench's tickets weigh 574 bytes), so the count, not the bytes,
/// bounds a backlog of ordinary tickets, and only unusually large entries hit this.
pub const MAX_HELD_BYTES: usize = 4 * 1024 * 1024;
const _: () = assert!(
    MAX_HELD * 8 * 1024 <= MAX_HELD_BYTES,
    "a full count of 8 KiB entries must fit in the byte bound"
);

/// The bytes an entry's fields take.
pub fn size(fields: &[Field]) -> usize {
    fields.iter().map(|(k, v)| k.len() + v.len()).sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_entry_weighs_its_field_names_and_values() {
        let fields = vec![
            (b"event".to_vec(), b"pos.ticket.created".to_vec()),
            (b"payload".to_vec(), b"{}".to_vec()),
        ];
        assert_eq!(super::size(&fields), 5 + 18 + 7 + 2);
        assert_eq!(super::size(&[]), 0);
    }
}
