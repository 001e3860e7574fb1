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
//! Boundary: a node with [`MAX_QUEUED_BYTES`] of frames waiting loses the
//! excess (counted by the caller; QoS 1/2 forwards are resent from the
//! outbox, routes repaired by anti-entropy). The bound is in bytes and
//! generous: a burst of a few hundred thousand messages while a link is
//! still being set up (right after a node joins) must not be cut. A slow
//! node holds up only its own queue.

use super::wire;
use ahash::AHashMap;
use bytes::Bytes;
use kadmq_dht::driver::{self, PeerId};
use parking_lot::{Mutex, RwLock};
use std::sync::Arc;
use tokio::sync::Notify;

/// Bytes of frames waiting for one node before new ones are dropped.
pub const MAX_QUEUED_BYTES: usize = 32 << 20;
/// A batch is closed once it holds this many bytes (the driver takes
/// frames of up to 16 MiB).
pub const MAX_BATCH_BYTES: usize = 1 << 20;
/// Room a new batch starts with.
const BATCH_START: usize = 16 << 10;

/// The send queues of every node this node talks to.
pub struct Links {
    client: driver::Client,
    queues: RwLock<AHashMap<PeerId, Arc<Queue>>>,
}

#[derive(Default)]
struct Queue {
    pending: Mutex<Pending>,
    wake: Notify,
}

/// The send queue of one node: a handle to keep (routes remember theirs)
/// rather than look up per frame.
#[derive(Clone)]
pub struct Sender(Arc<Queue>);

impl Sender {
    /// Queues the one frame `write` appends to the buffer it is given (no
    /// copy of its own); false if the queue was full and it is dropped.
    pub fn push_with(&self, write: impl FnOnce(&mut Vec<u8>)) -> bool {
        let queue = &self.0;
        let mut pending = queue.pending.lock();
        let pushed = pending.push(write);
        if pushed && pending.frames == 1 {
            queue.wake.notify_one();
        }
        pushed
    }
}

#[derive(Default)]
struct Pending {
    /// Filled batches, the last one open.
    batches: Vec<Vec<u8>>,
    frames: usize,
    /// Bytes in `batches`, the last one's as of the previous push.
    bytes: usize,
}

impl Pending {
    fn push(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> bool {
        if self.bytes >= MAX_QUEUED_BYTES {
            return false;
        }
        if self.batches.last().is_none_or(|b| b.len() >= MAX_BATCH_BYTES) {
            self.batches.push(wire::new_batch(BATCH_START));
        }
        let batch = self.batches.last_mut().expect("an open batch");
        let before = batch.len();
        wire::append_to_batch(batch, write);
        self.bytes += batch.len() - before;
        self.frames += 1;
        true
    }

    /// Everything queued so far, as batches to send in order.
    fn take(&mut self) -> Vec<Vec<u8>> {
        self.frames = 0;
        self.bytes = 0;
        std::mem::take(&mut self.batches)
    }
}

impl Links {
    pub fn new(client: driver::Client) -> Links {
        Links { client, queues: RwLock::new(AHashMap::new()) }
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
                let queue = Arc::new(Queue::default());
                tokio::spawn(send_rounds(self.client.clone(), peer, queue.clone()));
                queue
            })
            .clone();
        Sender(queue)
    }
}

/// One node's sender: each round sends the batches filled since the last.
async fn send_rounds(client: driver::Client, peer: PeerId, queue: Arc<Queue>) {
    loop {
        queue.wake.notified().await;
        loop {
            let batches = queue.pending.lock().take();
            if batches.is_empty() {
                break;
            }
            for batch in batches {
                match client.send(peer, Bytes::from(batch)).await {
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

    fn frames_of(batches: Vec<Vec<u8>>) -> Vec<Bytes> {
        batches.into_iter().flat_map(|b| wire::unbatch(Bytes::from(b)).unwrap()).collect()
    }

    #[test]
    fn frames_leave_in_order_in_batches_of_bounded_size() {
        let mut pending = Pending::default();
        let frames: Vec<Vec<u8>> = (0..3000u32).map(|i| vec![(i % 251) as u8; 1000 + (i % 7) as usize]).collect();
        for frame in &frames {
            assert!(pending.push(|out| out.extend_from_slice(frame)));
        }
        let batches = pending.take();
        assert!(batches.len() >= 3, "3 MB of frames in batches of 1 MiB: {} batches", batches.len());
        assert!(batches.iter().all(|b| b.len() < MAX_BATCH_BYTES + 2_000));
        let got = frames_of(batches);
        assert_eq!(got.len(), frames.len());
        assert!(got.iter().zip(&frames).all(|(a, b)| a[..] == b[..]));
        // Taken means empty: the next round starts afresh.
        assert!(pending.take().is_empty());
        assert!(pending.push(|out| out.push(7)));
        assert_eq!(frames_of(pending.take()), vec![Bytes::from_static(&[7])]);
    }

    #[test]
    fn a_full_queue_drops_new_frames_until_taken() {
        let mut pending = Pending::default();
        let frame = vec![1u8; 4096 - 4];
        let fit = MAX_QUEUED_BYTES / 4096;
        for _ in 0..fit {
            assert!(pending.push(|out| out.extend_from_slice(&frame)));
        }
        assert!(!pending.push(|out| out.push(2)), "the frame past the limit is dropped");
        assert_eq!(frames_of(pending.take()).len(), fit);
        assert!(pending.push(|out| out.push(3)), "room again once taken");
    }
}
