//! What brokers send each other over the driver's frame streams.
//!
//! Job: one envelope around the traffic between nodes (the routing core's
//! route frames, forwarded messages, acknowledgements of QoS 1/2 forwards,
//! and retained messages), with a version byte so a fleet can be upgraded node by
//! node. Boundary: pure encoding, no state.
//!
//! Layout: byte 0 is [`VERSION`], byte 1 the kind; a route frame follows as
//! the core encoded it (it carries its own version), a batch is a sequence
//! of whole frames, each behind its 4-byte big-endian length, the others
//! are rmp-serde.

use super::outbox::Sequence;
use crate::broker::message::Message;
use bytes::Bytes;
use kadmq_dht::core::{self, ForwardRoute};
use serde::{Deserialize, Serialize};

pub const VERSION: u8 = 1;

const ROUTE: u8 = 1;
const FORWARD: u8 = 2;
const ACK: u8 = 3;
const RETAIN: u8 = 4;
const REJOINED: u8 = 5;
const BATCH: u8 = 6;

/// A message forwarded to one destination node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forward {
    /// The publishing node's id for this message.
    pub id: u64,
    /// For QoS 1/2: its place in the sender's sequence to this node (the
    /// receiver delivers in order, once, and acknowledges).
    pub sequence: Option<Sequence>,
    pub message: Message,
    pub route: ForwardRoute,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Wire {
    Route(core::Frame),
    Forward(Box<Forward>),
    /// The destination holds every forward of the sender's `epoch` up to
    /// `upto` (queued for, or delivered to, its sessions).
    Ack {
        epoch: u64,
        upto: u64,
    },
    /// Retained messages set (or cleared: empty payload) on the sender.
    Retain(Vec<Message>),
    /// The sender had taken the receiver for dead and sees it again: the
    /// receiver's routes must be asserted to it afresh.
    Rejoined,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("empty frame")]
    Empty,
    #[error("frame version {0} is not {VERSION}: is every node running the same kadmq?")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("route frame: {0}")]
    Route(#[from] core::FrameError),
    #[error("undecodable frame: {0}")]
    Body(#[from] rmp_serde::decode::Error),
    #[error("truncated batch")]
    Batch,
}

pub fn encode_route(frame: &core::Frame) -> Bytes {
    with_header(ROUTE, &core::encode(frame))
}

/// Encodes a forward without copying the message (same layout as [`Forward`]).
pub fn encode_forward(id: u64, sequence: Option<Sequence>, message: &Message, route: &ForwardRoute) -> Bytes {
    #[derive(Serialize)]
    struct ForwardRef<'a> {
        id: u64,
        sequence: Option<Sequence>,
        message: &'a Message,
        route: &'a ForwardRoute,
    }
    let forward = ForwardRef { id, sequence, message, route };
    let body = rmp_serde::to_vec(&forward).expect("in-memory forwards always encode");
    with_header(FORWARD, &body)
}

pub fn encode_ack(epoch: u64, upto: u64) -> Bytes {
    with_header(ACK, &rmp_serde::to_vec(&(epoch, upto)).expect("numbers always encode"))
}

pub fn encode_retain(messages: &[&Message]) -> Bytes {
    with_header(RETAIN, &rmp_serde::to_vec(messages).expect("in-memory messages always encode"))
}

pub fn encode_rejoined() -> Bytes {
    with_header(REJOINED, &[])
}

/// Several frames for one node in one: they arrive together and in order.
pub fn encode_batch(frames: &[Bytes]) -> Bytes {
    let size = frames.iter().map(|f| f.len() + 4).sum::<usize>() + 2;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&[VERSION, BATCH]);
    for frame in frames {
        out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        out.extend_from_slice(frame);
    }
    Bytes::from(out)
}

/// The frames inside a batch (slices of `bytes`, not copies), or `bytes`
/// itself when it is a single frame. A batch inside a batch is refused when
/// its frames are decoded.
pub fn unbatch(bytes: Bytes) -> Result<Vec<Bytes>, WireError> {
    if bytes.get(1) != Some(&BATCH) || bytes.first() != Some(&VERSION) {
        return Ok(vec![bytes]);
    }
    let mut frames = Vec::new();
    let mut at = 2;
    while at < bytes.len() {
        let len = bytes.get(at..at + 4).ok_or(WireError::Batch)?;
        let len = u32::from_be_bytes(len.try_into().expect("four bytes")) as usize;
        let end = at + 4 + len;
        if end > bytes.len() {
            return Err(WireError::Batch);
        }
        frames.push(bytes.slice(at + 4..end));
        at = end;
    }
    Ok(frames)
}

fn with_header(kind: u8, body: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(body.len() + 2);
    out.extend_from_slice(&[VERSION, kind]);
    out.extend_from_slice(body);
    Bytes::from(out)
}

pub fn decode(bytes: &[u8]) -> Result<Wire, WireError> {
    let [version, kind, body @ ..] = bytes else { return Err(WireError::Empty) };
    if *version != VERSION {
        return Err(WireError::Version(*version));
    }
    Ok(match *kind {
        ROUTE => Wire::Route(core::decode(body)?),
        FORWARD => Wire::Forward(Box::new(rmp_serde::from_slice(body)?)),
        ACK => {
            let (epoch, upto) = rmp_serde::from_slice(body)?;
            Wire::Ack { epoch, upto }
        }
        RETAIN => Wire::Retain(rmp_serde::from_slice(body)?),
        REJOINED => Wire::Rejoined,
        other => return Err(WireError::Kind(other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::QoS;
    use kadmq_dht::core::SharedPick;

    fn forward() -> Forward {
        Forward {
            id: 7,
            sequence: Some(Sequence { epoch: 3, seq: 9, base: 4 }),
            message: Message {
                topic: "a/b".into(),
                payload: Bytes::from_static(b"hello"),
                qos: QoS::ExactlyOnce,
                retain: false,
                properties: Default::default(),
                expires_at_ms: Some(99),
                origin: Some("c1".into()),
            },
            route: ForwardRoute { plain: true, shared: vec![SharedPick { group: "g".into(), filter: "a/+".into() }] },
        }
    }

    #[test]
    fn forwards_and_acks_round_trip() {
        let f = forward();
        let wire = Wire::Forward(Box::new(f.clone()));
        assert_eq!(decode(&encode_forward(f.id, f.sequence, &f.message, &f.route)).unwrap(), wire);
        assert_eq!(decode(&encode_ack(2, u64::MAX)).unwrap(), Wire::Ack { epoch: 2, upto: u64::MAX });
        assert_eq!(decode(&encode_retain(&[&f.message])).unwrap(), Wire::Retain(vec![f.message.clone()]));
        assert_eq!(decode(&encode_rejoined()).unwrap(), Wire::Rejoined);
    }

    #[test]
    fn a_batch_carries_its_frames_in_order() {
        let f = forward();
        let frames = vec![encode_forward(1, None, &f.message, &f.route), encode_ack(1, 2), encode_rejoined()];
        let batch = encode_batch(&frames);
        assert_eq!(unbatch(batch).unwrap(), frames);
        // A single frame is its own batch.
        assert_eq!(unbatch(frames[1].clone()).unwrap(), vec![frames[1].clone()]);
        // A truncated batch is an error; a batch inside a batch does not decode.
        let batch = encode_batch(&frames);
        assert!(matches!(unbatch(batch.slice(..batch.len() - 1)), Err(WireError::Batch)));
        let nested = encode_batch(&[encode_batch(&frames)]);
        let inner = unbatch(nested).unwrap();
        assert!(matches!(decode(&inner[0]), Err(WireError::Kind(BATCH))));
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        assert!(matches!(decode(&[]), Err(WireError::Empty)));
        assert!(matches!(decode(&[9, ACK, 0x90]), Err(WireError::Version(9))));
        assert!(matches!(decode(&[VERSION, 77]), Err(WireError::Kind(77))));
        assert!(matches!(decode(&[VERSION, FORWARD, 0xc1]), Err(WireError::Body(_))));
        assert!(matches!(decode(&[VERSION, ROUTE, 0xc1]), Err(WireError::Route(_))));
        let f = forward();
        let mut truncated = encode_forward(f.id, None, &f.message, &f.route).to_vec();
        truncated.truncate(truncated.len() - 3);
        assert!(decode(&truncated).is_err());
    }
}
