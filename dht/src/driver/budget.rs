//! One node-wide bound on the bytes held for peers.
//!
//! Job: a [`SendBudget`] of bytes shared by every queue that holds frames
//! for other nodes (the caller's batches, the driver's per-peer writer
//! queues). Bytes are reserved when a frame is queued and come back when the
//! [`Charged`] guard that travels with them is dropped: after the writer
//! wrote the batch, or when it is dropped (link torn down, peer dead). So
//! however many peers are slow or gone, the frames held for them never pass
//! the budget. Boundary: accounting only; what to do when there is no room
//! (drop, wait, resend later) is the caller's decision.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use tokio::sync::Notify;

/// The shared byte budget (cheap to clone; clones share it).
#[derive(Clone, Debug)]
pub struct SendBudget(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    limit: usize,
    used: AtomicUsize,
    released: Notify,
}

impl SendBudget {
    pub fn new(limit: usize) -> SendBudget {
        SendBudget(Arc::new(Inner { limit, used: AtomicUsize::new(0), released: Notify::new() }))
    }

    /// The whole budget, in bytes.
    pub fn limit(&self) -> usize {
        self.0.limit
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.0.used.load(Ordering::Relaxed)
    }

    /// Reserves `bytes` if the bytes reserved stay within `ceiling` (at most
    /// the limit): callers give lower ceilings to what may be dropped or
    /// sent later, so that room is left for what may not.
    pub fn try_charge(&self, bytes: usize, ceiling: usize) -> Option<Charged> {
        self.try_reserve(bytes, ceiling).then(|| Charged { bytes, budget: self.clone() })
    }

    /// Reserves `bytes` without a guard (the caller adds to one it holds).
    pub fn try_reserve(&self, bytes: usize, ceiling: usize) -> bool {
        let ceiling = ceiling.min(self.0.limit);
        self.0
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|after| *after <= ceiling)
            })
            .is_ok()
    }

    /// Reserves `bytes`, waiting for room under the whole limit. A frame
    /// larger than the whole budget is charged once nothing else is.
    pub async fn charge(&self, bytes: usize) -> Charged {
        loop {
            let released = self.0.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let charged = if bytes > self.0.limit {
                self.0.used.compare_exchange(0, bytes, Ordering::AcqRel, Ordering::Relaxed).is_ok()
            } else {
                self.try_reserve(bytes, self.0.limit)
            };
            if charged {
                return Charged { bytes, budget: self.clone() };
            }
            released.await;
        }
    }

    /// A guard for `bytes` reserved earlier with [`SendBudget::try_reserve`].
    pub fn adopt(&self, bytes: usize) -> Charged {
        Charged { bytes, budget: self.clone() }
    }

    fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.0.used.fetch_sub(bytes, Ordering::AcqRel);
            self.0.released.notify_waiters();
        }
    }
}

/// Bytes of a [`SendBudget`] held until this is dropped.
#[derive(Debug)]
pub struct Charged {
    bytes: usize,
    budget: SendBudget,
}

impl Charged {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Charged {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_bounded_and_come_back_on_drop() {
        let budget = SendBudget::new(100);
        let a = budget.try_charge(60, 100).unwrap();
        assert!(budget.try_charge(30, 80).is_none(), "over the lower ceiling");
        let b = budget.try_charge(40, 100).unwrap();
        assert!(budget.try_charge(1, 1000).is_none(), "the ceiling never passes the limit");
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 40);
        drop(b);
        assert_eq!(budget.used(), 0);
        assert!(budget.try_reserve(10, 100));
        drop(budget.adopt(10));
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_waiting_charge_goes_on_once_room_is_released() {
        let budget = SendBudget::new(100);
        let held = budget.try_charge(90, 100).unwrap();
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.charge(50).await.bytes() }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        assert_eq!(waiter.await.unwrap(), 50);
        // Larger than the whole budget: charged once nothing else is.
        assert_eq!(budget.charge(500).await.bytes(), 500);
        assert_eq!(budget.used(), 0);
    }
}
