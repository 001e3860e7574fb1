//! Frames: what one node's routing core says to another's.
//!
//! Serde types put on the wire with rmp-serde (MessagePack): a version
//! number, then the [`Frame`]. [`encode`] and [`decode`] are the only
//! (de)serialization entry points, so the driver, the simulator (to count
//! bytes) and the tests agree on the format.
//!
//! Boundary: route operations only. The message payload of a forwarded
//! publish never passes through the core; the driver carries it next to the
//! [`ForwardRoute`] the core computed (see `Action::Forward`).

use super::id::NodeId;
use crate::shard::ShardKey;
use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change to [`Frame`].
pub const FRAME_VERSION: u16 = 1;

/// One filter of the sending node, asserted to an owner of its shard.
/// Idempotent: `count` is the node's current number of local subscribers
/// (0 = the node no longer has this filter), not an increment, so retries,
/// re-assertions and repairs can be applied any number of times.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteOp {
    pub filter: String,
    /// `Some(group)` for a `$share/group/filter` subscription.
    pub group: Option<String>,
    pub count: u32,
}

/// One route entry as an owner reports it: a lookup answer (count > 0) or
/// a pushed change (count 0 = removed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteChange {
    pub filter: String,
    pub group: Option<String>,
    pub node: NodeId,
    pub count: u32,
}

/// What a destination node must deliver a forwarded publish to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardRoute {
    /// Deliver to every local non-shared subscription matching the topic.
    pub plain: bool,
    /// Deliver to exactly one local member of each of these shared groups.
    pub shared: Vec<SharedPick>,
}

impl ForwardRoute {
    pub fn is_empty(&self) -> bool {
        !self.plain && self.shared.is_empty()
    }
}

/// A shared subscription (`$share/{group}/{filter}`) picked for one message.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SharedPick {
    pub group: String,
    pub filter: String,
}

/// An owner's answer to a lookup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LookupAnswer {
    /// Every entry of the shard; the asker is now a watcher.
    Entries(Vec<RouteChange>),
    /// This node does not own the shard (views differ); ask another owner.
    NotOwner,
    /// This node became an owner of the shard moments ago and the subscriber
    /// nodes' re-assertions may still be on their way: the entries it holds
    /// may be incomplete. Ask an owner of longer standing; use these (the
    /// asker is a watcher, so later re-assertions reach it as deltas) only if
    /// no such owner answers.
    Warming(Vec<RouteChange>),
}

/// A route-operation frame between two nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Subscriber → owner: the sender's entries in `shard`. With `replace`,
    /// `ops` is all of them and anything else the owner holds for the sender
    /// in that shard goes (re-assertion after a move or a repair request).
    Assert { shard: ShardKey, replace: bool, ops: Vec<RouteOp> },
    /// Publisher → one owner: send me the shard and watch it for me.
    Lookup { shard: ShardKey, req: u64 },
    /// Owner → publisher.
    LookupReply { shard: ShardKey, req: u64, answer: LookupAnswer },
    /// Publisher → owner: stop pushing the watch that lookup `req` made.
    /// (The request id keeps an unwatch meant for an older lookup from
    /// cancelling a newer one.)
    Unwatch { shard: ShardKey, req: u64 },
    /// Owner → a watcher: entries changed (`req`: the watcher's lookup).
    Delta { shard: ShardKey, req: u64, changes: Vec<RouteChange> },
    /// Owner → watchers: I no longer serve this shard; look it up again.
    Released { shard: ShardKey },
    /// Replica → replica: my hash of each shard we both own.
    Digest { items: Vec<(ShardKey, u64)> },
    /// Replica → replica, on a digest mismatch: my hash per subscriber node.
    NodeDigests { shard: ShardKey, items: Vec<(NodeId, u64)> },
    /// Owner → subscriber node: replicas disagree about you; re-assert.
    Reassert { shards: Vec<ShardKey> },
}

/// Frame kinds, for counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    Assert,
    Lookup,
    LookupReply,
    Unwatch,
    Delta,
    Released,
    Digest,
    NodeDigests,
    Reassert,
}

impl FrameKind {
    pub const ALL: [FrameKind; 9] = [
        FrameKind::Assert,
        FrameKind::Lookup,
        FrameKind::LookupReply,
        FrameKind::Unwatch,
        FrameKind::Delta,
        FrameKind::Released,
        FrameKind::Digest,
        FrameKind::NodeDigests,
        FrameKind::Reassert,
    ];

    /// A metric label.
    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Assert => "assert",
            FrameKind::Lookup => "lookup",
            FrameKind::LookupReply => "lookup_reply",
            FrameKind::Unwatch => "unwatch",
            FrameKind::Delta => "delta",
            FrameKind::Released => "released",
            FrameKind::Digest => "digest",
            FrameKind::NodeDigests => "node_digests",
            FrameKind::Reassert => "reassert",
        }
    }
}

impl Frame {
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Assert { .. } => FrameKind::Assert,
            Frame::Lookup { .. } => FrameKind::Lookup,
            Frame::LookupReply { .. } => FrameKind::LookupReply,
            Frame::Unwatch { .. } => FrameKind::Unwatch,
            Frame::Delta { .. } => FrameKind::Delta,
            Frame::Released { .. } => FrameKind::Released,
            Frame::Digest { .. } => FrameKind::Digest,
            Frame::NodeDigests { .. } => FrameKind::NodeDigests,
            Frame::Reassert { .. } => FrameKind::Reassert,
        }
    }
}

/// Why bytes did not decode into a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame version {0}, this node speaks {FRAME_VERSION}")]
    Version(u16),
    #[error("malformed frame: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
    #[error("frame did not encode: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
}

/// The wire form: MessagePack `FRAME_VERSION` followed by the frame.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    encode_into(frame, &mut out).expect("frames always encode");
    out
}

/// [`encode`] appending to a buffer (the driver batches frames).
pub fn encode_into(frame: &Frame, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let mut ser = rmp_serde::Serializer::new(out);
    FRAME_VERSION.serialize(&mut ser)?;
    frame.serialize(&mut ser)?;
    Ok(())
}

/// Decodes one frame; the version is checked before the body is read.
pub fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
    let mut de = rmp_serde::Deserializer::new(bytes);
    let version = u16::deserialize(&mut de)?;
    if version != FRAME_VERSION {
        return Err(FrameError::Version(version));
    }
    Ok(Frame::deserialize(&mut de)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Frame> {
        let shard = ShardKey::of_prefix("devices");
        let change = RouteChange { filter: "devices/+/t".into(), group: Some("g".into()), node: NodeId(7), count: 2 };
        vec![
            Frame::Assert {
                shard,
                replace: true,
                ops: vec![RouteOp { filter: "devices/#".into(), group: None, count: 1 }],
            },
            Frame::Lookup { shard, req: 9 },
            Frame::LookupReply { shard, req: 9, answer: LookupAnswer::Entries(vec![change.clone()]) },
            Frame::LookupReply { shard, req: 10, answer: LookupAnswer::NotOwner },
            Frame::LookupReply { shard, req: 11, answer: LookupAnswer::Warming(vec![change.clone()]) },
            Frame::Unwatch { shard, req: 9 },
            Frame::Delta { shard, req: 9, changes: vec![change] },
            Frame::Released { shard },
            Frame::Digest { items: vec![(shard, u64::MAX)] },
            Frame::NodeDigests { shard, items: vec![(NodeId(1), 5)] },
            Frame::Reassert { shards: vec![shard] },
        ]
    }

    #[test]
    fn frames_round_trip() {
        for frame in samples() {
            let bytes = encode(&frame);
            assert_eq!(decode(&bytes).unwrap(), frame);
        }
        assert_eq!(
            FrameKind::ALL.len(),
            FrameKind::ALL.iter().map(|k| k.name()).collect::<std::collections::HashSet<_>>().len()
        );
    }

    #[test]
    fn other_versions_and_garbage_are_refused() {
        let mut bytes = Vec::new();
        let mut ser = rmp_serde::Serializer::new(&mut bytes);
        2u16.serialize(&mut ser).unwrap();
        Frame::Released { shard: ShardKey::of_prefix("") }.serialize(&mut ser).unwrap();
        assert!(matches!(decode(&bytes), Err(FrameError::Version(2))));
        assert!(matches!(decode(&[0x01, 0xc1]), Err(FrameError::Malformed(_))));
        assert!(matches!(decode(&[]), Err(FrameError::Malformed(_))));
    }
}
