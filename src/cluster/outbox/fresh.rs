//! The held messages not written yet, in id order, for the storage's flush.
//!
//! Job: [`FreshRecords`] keeps them by id, ascending, in a ring buffer
//! rather than a tree: a record is held right after its id is taken, so
//! ids arrive in order but for a few places (several publishing threads
//! take ids and hold records concurrently), and leave mostly from the
//! front (acknowledged or written in order). Inserting scans from the
//! back, finding is a binary search, and a removed record leaves a hole
//! that goes once it reaches either end (or the holes outnumber the
//! records), so a record costs no allocation of its own.

use std::collections::VecDeque;

/// Records by id, ascending; `None` is a removed one's hole.
pub(super) struct FreshRecords<T> {
    slots: VecDeque<(u64, Option<T>)>,
    live: usize,
}

impl<T> Default for FreshRecords<T> {
    fn default() -> Self {
        FreshRecords { slots: VecDeque::new(), live: 0 }
    }
}

impl<T> FreshRecords<T> {
    /// Holds `record` under `id` (replacing one held under it before).
    pub(super) fn insert(&mut self, id: u64, record: T) {
        let at = self.slots.iter().rposition(|(other, _)| *other <= id).map_or(0, |p| p + 1);
        match self.slots.get_mut(at.wrapping_sub(1)) {
            Some((other, slot)) if *other == id => {
                if slot.replace(record).is_none() {
                    self.live += 1;
                }
            }
            _ => {
                self.slots.insert(at, (id, Some(record)));
                self.live += 1;
            }
        }
    }

    fn index(&self, id: u64) -> Option<usize> {
        self.slots.binary_search_by_key(&id, |(other, _)| *other).ok()
    }

    pub(super) fn get_mut(&mut self, id: u64) -> Option<&mut T> {
        let at = self.index(id)?;
        self.slots[at].1.as_mut()
    }

    pub(super) fn remove(&mut self, id: u64) -> Option<T> {
        let at = self.index(id)?;
        let record = self.slots[at].1.take()?;
        self.live -= 1;
        self.trim();
        Some(record)
    }

    /// Drops the holes at both ends, and all of them once they outnumber
    /// the records (a record that stays long at the front, its
    /// destination slow, leaves the ones behind it acknowledged).
    fn trim(&mut self) {
        while self.slots.front().is_some_and(|(_, slot)| slot.is_none()) {
            self.slots.pop_front();
        }
        while self.slots.back().is_some_and(|(_, slot)| slot.is_none()) {
            self.slots.pop_back();
        }
        if self.slots.len() > 2 * self.live + 64 {
            self.slots.retain(|(_, slot)| slot.is_some());
        }
    }

    /// The lowest id held.
    pub(super) fn first(&self) -> Option<u64> {
        self.slots.front().map(|(id, _)| *id)
    }

    /// The highest id held.
    pub(super) fn last(&self) -> Option<u64> {
        self.slots.back().map(|(id, _)| *id)
    }

    /// The records, lowest id first.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.slots.iter().filter_map(|(id, slot)| Some((*id, slot.as_ref()?)))
    }

    pub(super) fn len(&self) -> usize {
        self.live
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn out_of_order_ids_are_kept_in_order_and_holes_go() {
        let mut records = FreshRecords::default();
        for id in [1, 3, 2, 5, 4] {
            records.insert(id, id * 10);
        }
        assert_eq!(records.iter().collect::<Vec<_>>(), [(1, &10), (2, &20), (3, &30), (4, &40), (5, &50)]);
        assert_eq!(records.remove(3), Some(30));
        assert_eq!(records.remove(3), None, "once");
        assert_eq!(records.slots.len(), 5, "a hole in the middle stays");
        assert_eq!(records.remove(1), Some(10));
        assert_eq!(records.remove(2), Some(20));
        assert_eq!((records.first(), records.slots.len()), (Some(4), 2), "holes at the front went");
        records.insert(4, 41);
        assert_eq!((records.get_mut(4).copied(), records.len()), (Some(41), 2), "replaced, not added");
    }

    #[test]
    fn holes_behind_a_record_that_stays_are_dropped_once_they_outnumber_the_records() {
        let mut records = FreshRecords::default();
        for id in 0..10_000 {
            records.insert(id, ());
            if id > 1 {
                records.remove(id - 1);
            }
        }
        // 0 never leaves; everything after it but the last did.
        assert!(records.slots.len() <= 2 * records.len() + 64 + 1, "{} slots", records.slots.len());
        assert_eq!(records.iter().map(|(id, _)| id).collect::<Vec<_>>(), [0, 9_999]);
    }

    proptest! {
        /// The same answers as a BTreeMap for any mix of inserts (ids a
        /// few places out of order) and removals.
        #[test]
        fn behaves_as_an_ordered_map(ops in proptest::collection::vec((0u8..3, 0u64..8), 1..400)) {
            let mut records = FreshRecords::default();
            let mut model = BTreeMap::new();
            let mut next = 0u64;
            for (op, jitter) in ops {
                match op {
                    0 | 1 => {
                        let id = next.saturating_sub(jitter);
                        next += 1;
                        records.insert(id, next);
                        model.insert(id, next);
                    }
                    _ => {
                        let id = next.saturating_sub(jitter * 3);
                        prop_assert_eq!(records.remove(id), model.remove(&id));
                    }
                }
                prop_assert_eq!(records.len(), model.len());
                prop_assert_eq!(records.first(), model.keys().next().copied());
                prop_assert_eq!(records.last(), model.keys().next_back().copied());
                prop_assert!(records.iter().map(|(id, v)| (id, *v)).eq(model.iter().map(|(id, v)| (*id, *v))));
            }
        }
    }
}
