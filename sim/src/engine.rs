//! The discrete-event engine: a virtual clock and a queue of timed events.
//!
//! Events at the same instant run in the order they were scheduled (a
//! sequence number breaks ties), so a run is a pure function of its inputs
//! and seed. Time is in milliseconds, the unit the routing core takes.
//!
//! Boundary: ordering only. What an event means is the fleet's business
//! ([`crate::fleet`]).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Virtual time in milliseconds.
pub type Millis = u64;

struct Scheduled<E> {
    at: Millis,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Scheduled<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl<E> Eq for Scheduled<E> {}

impl<E> PartialOrd for Scheduled<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Scheduled<E> {
    // Reversed: BinaryHeap is a max-heap and we want the earliest first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// A virtual clock and the events scheduled on it.
pub struct EventQueue<E> {
    now: Millis,
    seq: u64,
    heap: BinaryHeap<Scheduled<E>>,
    processed: u64,
}

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        EventQueue::new()
    }
}

impl<E> EventQueue<E> {
    pub fn new() -> EventQueue<E> {
        EventQueue { now: 0, seq: 0, heap: BinaryHeap::new(), processed: 0 }
    }

    /// The current virtual time: the time of the event last popped.
    pub fn now(&self) -> Millis {
        self.now
    }

    /// Schedules `event` at `at` (clamped to now: the past is gone).
    pub fn schedule(&mut self, at: Millis, event: E) {
        let at = at.max(self.now);
        self.seq += 1;
        self.heap.push(Scheduled { at, seq: self.seq, event });
    }

    /// Schedules `event` `delay` ms from now.
    pub fn after(&mut self, delay: Millis, event: E) {
        self.schedule(self.now + delay, event);
    }

    /// The time of the next event, if any.
    pub fn peek_time(&self) -> Option<Millis> {
        self.heap.peek().map(|s| s.at)
    }

    /// Advances the clock to the next event and returns it.
    pub fn pop(&mut self) -> Option<(Millis, E)> {
        let next = self.heap.pop()?;
        self.now = next.at;
        self.processed += 1;
        Some((next.at, next.event))
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Events popped so far.
    pub fn processed(&self) -> u64 {
        self.processed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_first_and_fifo_on_ties() {
        let mut q = EventQueue::new();
        q.schedule(10, "c");
        q.schedule(5, "a");
        q.schedule(10, "d");
        q.schedule(5, "b");
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, vec![(5, "a"), (5, "b"), (10, "c"), (10, "d")]);
        assert_eq!(q.now(), 10);
    }

    #[test]
    fn the_past_is_clamped_to_now() {
        let mut q = EventQueue::new();
        q.schedule(100, 1);
        assert_eq!(q.pop(), Some((100, 1)));
        q.schedule(50, 2);
        q.after(0, 3);
        assert_eq!(q.pop(), Some((100, 2)));
        assert_eq!(q.pop(), Some((100, 3)));
        assert_eq!(q.processed(), 3);
    }
}
