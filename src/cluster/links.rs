//! Frames to other nodes, batched per destination.
//!
//! Job: take frames for a node from any thread without waiting (a publishing
//! connection, the cluster task), keep them in order per destination, and
//! hand them to the driver as few, large frames. Frames are written straight
//! into the destination's current batch ([`wire::append_to_batch`]; a batch
//! is closed at [`MAX_BATCH_BYTES`]); one sender task per node takes every
//! batch filled since its last round and hands them to the driver. Under
//! load the batches grow by themselves while the driver is busy with the
//! previous ones; when idle a frame leaves at once, in a batch of one.
//!
//! Boundary: every byte queued here, and then in the driver until it is
//! written, holds its share of the one node-wide send budget
//! ([`driver::SendBudget`], `cluster.send_buffer_mib`): however many peers
//! are slow or gone, what is held for them stays within it. Past
//! [`DROPPABLE_SHARE`] of the budget a frame that can be lost or sent later
//! is refused ([`Class`]): QoS 0 forwards are dropped, QoS 1/2 forwards wait
//! in the outbox (resent), while route frames, acknowledgements and notices
//! may use the whole budget. Refusals are counted here ([`SendRefusals`]).
//! A slow node holds up only its own queue, and at most the budget.
//!
//! The one way to send: get a node's [`Sender`] ([`Links::sender`]; routes
//! remember theirs) and call [`Sender::send`]. The sender tasks belong to
//! [`Links`]: they end when their queue is closed ([`Links::forget`],
//! [`Links::close_all`]) and are aborted if `Links` is dropped first.

use super::wire;
use ahash::AHashMap;
use bytes::Bytes;
use kadmq_dht::driver::{self, PeerId};
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// The share of the send budget (7/8) past which only control frames are
/// queued.
pub const DROPPABLE_SHARE: (usize, usize) = (7, 8);

/// What a frame is, for the send budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Route frames, acknowledgements, notices, retained messages: may use
    /// the whole budget.
    Control,
    /// A QoS 0 forward: dropped past [`DROPPABLE_SHARE`].
    Droppable,
    /// A QoS 1/2 forward: refused past [`DROPPABLE_SHARE`], resent from the
    /// outbox later.
    Resendable,
}

impl Class {
    fn ceiling(self, budget: &driver::SendBudget) -> usize {
        match self {
            Class::Control => budget.limit(),
            Class::Droppable | Class::Resendable => budget.limit() / DROPPABLE_SHARE.1 * DROPPABLE_SHARE.0,
        }
    }
}
/// A batch is closed once it holds this many bytes (the driver takes
/// frames of up to 16 MiB).
pub const MAX_BATCH_BYTES: usize = 1 << 20;
/// Room a new batch starts with.
const BATCH_START: usize = 16 << 10;

/// The send queues of every node this node talks to.
pub struct Links {
    client: driver::Client,
    queues: RwLock<AHashMap<PeerId, Arc<Queue>>>,
    /// One sender task per queue.
    tasks: Mutex<JoinSet<()>>,
    refusals: Arc<SendRefusals>,
    rounds: Arc<SendRounds>,
}

/// What the sender tasks handed to the driver: rounds (each every batch
/// filled since the previous one) and the frames in them; frames per round
/// is how much batching the load gives.
#[derive(Default)]
pub struct SendRounds {
    pub rounds: AtomicU64,
    pub frames: AtomicU64,
}

/// Frames the send budget had no room for, by [`Class`].
#[derive(Default)]
pub struct SendRefusals {
    /// Route frames, acknowledgements and notices dropped.
    pub control: AtomicU64,
    /// QoS 0 forwards dropped.
    pub droppable: AtomicU64,
    /// QoS 1/2 forwards not queued (they stay in the outbox and are resent).
    pub resendable: AtomicU64,
}

impl SendRefusals {
    fn of(&self, class: Class) -> &AtomicU64 {
        match class {
            Class::Control => &self.control,
            Class::Droppable => &self.droppable,
            Class::Resendable => &self.resendable,
        }
    }

    fn count(&self, class: Class) {
        self.of(class).fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, class: Class) -> u64 {
        self.of(class).load(Ordering::Relaxed)
    }
}

struct Queue {
    pending: Mutex<Pending>,
    wake: Notify,
    budget: driver::SendBudget,
    refusals: Arc<SendRefusals>,
    rounds: Arc<SendRounds>,
}

/// The send queue of one node: a handle to keep (routes remember theirs)
/// rather than look up per frame.
#[derive(Clone)]
pub struct Sender(Arc<Queue>);

impl Sender {
    /// Queues the one frame `write` appends to the buffer it is given (no
    /// copy of its own); false if the send budget has no room for it (of its
    /// [`Class`]: counted in [`SendRefusals`]) or the peer was forgotten,
    /// and it is not queued.
    pub fn send(&self, class: Class, write: impl FnOnce(&mut Vec<u8>)) -> bool {
        let queue = &self.0;
        let mut pending = queue.pending.lock();
        let pushed = pending.push(&queue.budget, class, write);
        if pushed && pending.frames == 1 {
            queue.wake.notify_one();
        }
        drop(pending);
        if !pushed {
            queue.refusals.count(class);
        }
        pushed
    }
}

/// The writer for a frame encoded beforehand (one copy into the batch).
pub fn copy_of(frame: &Bytes) -> impl FnOnce(&mut Vec<u8>) + '_ {
    move |out| out.extend_from_slice(frame)
}

#[derive(Default)]
struct Pending {
    /// Filled batches, the last one open, each with the bytes of the send
    /// budget its frames reserved.
    batches: Vec<(Vec<u8>, usize)>,
    frames: usize,
    /// The peer was forgotten: nothing is queued any more.
    closed: bool,
}

impl Pending {
    fn push(&mut self, budget: &driver::SendBudget, class: Class, write: impl FnOnce(&mut Vec<u8>)) -> bool {
        if self.closed {
            return false;
        }
        if self.batches.last().is_none_or(|b| b.0.len() >= MAX_BATCH_BYTES) {
            self.batches.push((wire::new_batch(BATCH_START), 0));
        }
        let (batch, charged) = self.batches.last_mut().expect("an open batch");
        let before = batch.len();
        wire::append_to_batch(batch, write);
        let bytes = batch.len() - before;
        if !budget.try_reserve(bytes, class.ceiling(budget)) {
            batch.truncate(before);
            if *charged == 0 {
                // A batch opened for this frame alone: nothing to send.
                self.batches.pop();
            }
            return false;
        }
        *charged += bytes;
        self.frames += 1;
        true
    }

    /// Everything queued so far, as batches to send in order, each with the
    /// budget it holds.
    fn take(&mut self, budget: &driver::SendBudget) -> Vec<(Vec<u8>, driver::Charged)> {
        self.frames = 0;
        std::mem::take(&mut self.batches).into_iter().map(|(batch, bytes)| (batch, budget.adopt(bytes))).collect()
    }
}

impl Links {
    pub fn new(client: driver::Client) -> Links {
        Links {
            client,
            queues: RwLock::new(AHashMap::new()),
            tasks: Mutex::new(JoinSet::new()),
            refusals: Arc::default(),
            rounds: Arc::default(),
        }
    }

    /// What the send budget refused so far.
    pub fn refusals(&self) -> &SendRefusals {
        &self.refusals
    }

    /// What the sender tasks sent so far.
    pub fn rounds(&self) -> &SendRounds {
        &self.rounds
    }

    /// The send queue of `peer` (started on first use).
    pub fn sender(&self, peer: PeerId) -> Sender {
        if let Some(queue) = self.queues.read().get(&peer) {
            return Sender(queue.clone());
        }
        let queue = self
            .queues
            .write()
            .entry(peer)
            .or_insert_with(|| {
                let queue = Arc::new(Queue {
                    pending: Mutex::new(Pending::default()),
                    wake: Notify::new(),
                    budget: self.client.send_budget().clone(),
                    refusals: self.refusals.clone(),
                    rounds: self.rounds.clone(),
                });
                let mut tasks = self.tasks.lock();
                // Reap the tasks of forgotten peers so the set does not grow.
                while tasks.try_join_next().is_some() {}
                tasks.spawn(send_rounds(self.client.clone(), peer, queue.clone()));
                queue
            })
            .clone();
        Sender(queue)
    }

    /// Drops the queue of `peer` (dead for good): what it held goes back
    /// to the send budget, its sender task ends, and senders still held
    /// (remembered routes) queue nothing more.
    pub fn forget(&self, peer: &PeerId) {
        let Some(queue) = self.queues.write().remove(peer) else { return };
        queue.close();
        self.client.forget(peer);
    }

    /// Closes every queue (the node leaves): the sender tasks end.
    pub fn close_all(&self) {
        for (_, queue) in self.queues.write().drain() {
            queue.close();
        }
    }

    /// Peers with a queue, for tests of the pruning.
    pub fn len(&self) -> usize {
        self.queues.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.queues.read().is_empty()
    }
}

impl Queue {
    /// Queues nothing more; what it held goes back to the send budget and
    /// its sender task ends.
    fn close(&self) {
        let mut pending = self.pending.lock();
        pending.closed = true;
        drop(pending.take(&self.budget));
        drop(pending);
        self.wake.notify_one();
    }
}

/// One node's sender: each round sends the batches filled since the last.
async fn send_rounds(client: driver::Client, peer: PeerId, queue: Arc<Queue>) {
    loop {
        queue.wake.notified().await;
        loop {
            let (batches, frames, closed) = {
                let mut pending = queue.pending.lock();
                let frames = pending.frames;
                (pending.take(&queue.budget), frames, pending.closed)
            };
            if closed {
                return;
            }
            if batches.is_empty() {
                break;
            }
            queue.rounds.rounds.fetch_add(1, Ordering::Relaxed);
            queue.rounds.frames.fetch_add(frames as u64, Ordering::Relaxed);
            for (batch, charged) in batches {
                match client.send_charged(peer, Bytes::from(batch), charged).await {
                    Ok(()) => {}
                    Err(driver::Error::Stopped) => return,
                    Err(err) => tracing::debug!(%peer, cause = %err, "frames not sent"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames_of(batches: Vec<(Vec<u8>, driver::Charged)>) -> Vec<Bytes> {
        batches.into_iter().flat_map(|(b, _)| wire::unbatch(Bytes::from(b)).unwrap()).collect()
    }

    #[test]
    fn frames_leave_in_order_in_batches_of_bounded_size() {
        let budget = driver::SendBudget::new(64 << 20);
        let mut pending = Pending::default();
        let frames: Vec<Vec<u8>> = (0..3000u32).map(|i| vec![(i % 251) as u8; 1000 + (i % 7) as usize]).collect();
        for frame in &frames {
            assert!(pending.push(&budget, Class::Control, |out| out.extend_from_slice(frame)));
        }
        let batches = pending.take(&budget);
        assert!(batches.len() >= 3, "3 MB of frames in batches of 1 MiB: {} batches", batches.len());
        assert!(batches.iter().all(|b| b.0.len() < MAX_BATCH_BYTES + 2_000));
        let got = frames_of(batches);
        assert_eq!(got.len(), frames.len());
        assert!(got.iter().zip(&frames).all(|(a, b)| a[..] == b[..]));
        assert_eq!(budget.used(), 0, "sent (here: dropped) batches give their budget back");
        // Taken means empty: the next round starts afresh.
        assert!(pending.take(&budget).is_empty());
        assert!(pending.push(&budget, Class::Control, |out| out.push(7)));
        assert_eq!(frames_of(pending.take(&budget)), vec![Bytes::from_static(&[7])]);
    }

    #[test]
    fn the_shared_budget_refuses_forwards_first_and_control_frames_last() {
        // One budget, two peers' queues.
        let budget = driver::SendBudget::new(1 << 20);
        let (mut a, mut b) = (Pending::default(), Pending::default());
        let frame = vec![1u8; 4096 - 4];
        let mut queued = 0;
        while a.push(&budget, Class::Droppable, |out| out.extend_from_slice(&frame)) {
            queued += 1;
        }
        assert_eq!(queued, (1 << 20) / 8 * 7 / 4096, "QoS 0 forwards stop at 7/8 of the budget");
        assert!(!b.push(&budget, Class::Resendable, |out| out.extend_from_slice(&frame)), "another peer too");
        let mut control = 0;
        while b.push(&budget, Class::Control, |out| out.extend_from_slice(&frame)) {
            control += 1;
        }
        assert_eq!(control, (1 << 20) / 8 / 4096, "control frames use the rest");
        assert!(budget.used() <= budget.limit());
        // A refused frame leaves nothing behind in the batch.
        assert_eq!(frames_of(b.take(&budget)).len(), control);
        assert_eq!(frames_of(a.take(&budget)).len(), queued);
        assert_eq!(budget.used(), 0);
        assert!(a.push(&budget, Class::Droppable, |out| out.push(3)), "room again once sent");
    }

    #[test]
    fn a_forgotten_queue_takes_nothing_more() {
        let budget = driver::SendBudget::new(1 << 20);
        let mut pending = Pending::default();
        assert!(pending.push(&budget, Class::Control, |out| out.push(1)));
        pending.closed = true;
        drop(pending.take(&budget));
        assert!(!pending.push(&budget, Class::Control, |out| out.push(2)));
        assert_eq!(budget.used(), 0, "what it held went back to the budget");
    }
}
