//! Frames to other nodes, batched per destination.
//!
//! Job: take frames for a node from any thread without waiting (a publishing
//! connection, the cluster task), keep them in order per destination, and
//! hand them to the driver as few, large frames: one sender task per node
//! takes everything queued for it since its last round and sends it as one
//! [`wire::encode_batch`] (split at [`MAX_BATCH_BYTES`]). Under load the
//! batches grow by themselves, while the driver is busy with the previous
//! one; when idle a frame leaves alone at once.
//!
//! Boundary: a node whose queue holds [`MAX_QUEUED`] frames loses the excess
//! (counted by the caller; QoS 1/2 forwards are resent from the outbox,
//! routes repaired by anti-entropy). A slow node holds up only its own queue.

use super::wire;
use bytes::Bytes;
use kadmq_dht::driver::{self, PeerId};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Notify;

/// Frames waiting for one node before new ones are dropped.
pub const MAX_QUEUED: usize = 65_536;
/// Largest batch handed to the driver (its frames may be up to 16 MiB).
pub const MAX_BATCH_BYTES: usize = 1 << 20;

/// The send queues of every node this node talks to.
pub struct Links {
    client: driver::Client,
    queues: RwLock<HashMap<PeerId, Arc<Queue>>>,
}

#[derive(Default)]
struct Queue {
    frames: Mutex<Vec<Bytes>>,
    wake: Notify,
}

impl Links {
    pub fn new(client: driver::Client) -> Links {
        Links { client, queues: RwLock::new(HashMap::new()) }
    }

    /// Queues `frame` for `peer`; false if the queue was full and the frame
    /// is dropped.
    pub fn push(&self, peer: PeerId, frame: Bytes) -> bool {
        let queue = self.queue(peer);
        let mut frames = queue.frames.lock();
        if frames.len() >= MAX_QUEUED {
            return false;
        }
        frames.push(frame);
        if frames.len() == 1 {
            queue.wake.notify_one();
        }
        true
    }

    fn queue(&self, peer: PeerId) -> Arc<Queue> {
        if let Some(queue) = self.queues.read().get(&peer) {
            return queue.clone();
        }
        self.queues
            .write()
            .entry(peer)
            .or_insert_with(|| {
                let queue = Arc::new(Queue::default());
                tokio::spawn(send_rounds(self.client.clone(), peer, queue.clone()));
                queue
            })
            .clone()
    }
}

/// One node's sender: each round sends what was queued since the last.
async fn send_rounds(client: driver::Client, peer: PeerId, queue: Arc<Queue>) {
    loop {
        queue.wake.notified().await;
        loop {
            let frames = std::mem::take(&mut *queue.frames.lock());
            if frames.is_empty() {
                break;
            }
            for batch in batches(frames) {
                match client.send(peer, batch).await {
                    Ok(()) => {}
                    Err(driver::Error::Stopped) => return,
                    Err(err) => tracing::debug!(%peer, cause = %err, "frames not sent"),
                }
            }
        }
    }
}

/// Groups `frames` into driver frames of at most [`MAX_BATCH_BYTES`] (a
/// larger frame goes alone), in order.
fn batches(frames: Vec<Bytes>) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut group: Vec<Bytes> = Vec::new();
    let mut size = 0;
    let flush = |group: &mut Vec<Bytes>, out: &mut Vec<Bytes>| match group.len() {
        0 => {}
        1 => out.push(group.pop().expect("one")),
        _ => out.push(wire::encode_batch(&std::mem::take(group))),
    };
    for frame in frames {
        if size + frame.len() + 4 > MAX_BATCH_BYTES {
            flush(&mut group, &mut out);
            size = 0;
        }
        size += frame.len() + 4;
        group.push(frame);
    }
    flush(&mut group, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_keep_order_and_respect_the_size_limit() {
        let small: Vec<Bytes> = (0..10u8).map(|i| Bytes::from(vec![i; 100])).collect();
        let out = batches(small.clone());
        assert_eq!(out.len(), 1);
        assert_eq!(wire::unbatch(out[0].clone()).unwrap(), small);

        // A single frame is sent as it is.
        assert_eq!(batches(vec![small[3].clone()]), vec![small[3].clone()]);

        let big = Bytes::from(vec![9u8; MAX_BATCH_BYTES / 2]);
        let frames = vec![small[0].clone(), big.clone(), big.clone(), small[1].clone()];
        let out = batches(frames.clone());
        assert!(out.len() >= 2, "{} batches", out.len());
        assert!(out.iter().all(|b| b.len() <= MAX_BATCH_BYTES + 2));
        let again: Vec<Bytes> = out.into_iter().flat_map(|b| wire::unbatch(b).unwrap()).collect();
        assert_eq!(again, frames);
    }
}
