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
pub const FRAME_VERSION: u16 = 3;

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
    /// Never set by the core: the message was held for this node, which
    /// was declared dead before it acknowledged, and is sent on for the
    /// sessions adopted from it (`plain` then says what it delivered
    /// there). Read by the glue only; a field of its own so that the
    /// sender's outbox holds, resends and persists it like any forward.
    #[serde(default)]
    pub sent_on: Option<NodeId>,
}

impl ForwardRoute {
    /// Deliver to every local non-shared subscription matching the topic, only.
    pub fn plain() -> ForwardRoute {
        ForwardRoute { plain: true, ..ForwardRoute::default() }
    }

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
    /// in that shard goes (the first assertion to an owner, re-assertion
    /// after a move, a retry or a repair request). `seq` numbers the
    /// assertions of one (shard, subscriber, owner): the owner applies an
    /// incremental one only right after the one before it, and asks for a
    /// replacement when one is missing. `split`: the sender knows the shard
    /// is split (hot-prefix split, see the `node` module docs); the owner
    /// takes it on, so a split outlives every owner that saw it happen.
    /// `more`: a replacement too large for one frame goes on in the next
    /// assertions (the first has `replace`, the last not `more`); the
    /// owner removes what no part named only with the last.
    Assert { shard: ShardKey, seq: u64, replace: bool, ops: Vec<RouteOp>, split: bool, more: bool },
    /// Owner → subscriber: assertions up to `seq` are applied and their
    /// changes pushed to the shard's watchers (`seq` 0: none, the frame only
    /// tells the split). `split`: the shard is split; the subscriber moves
    /// its deeper filters to the child shards.
    Acked { shard: ShardKey, seq: u64, split: bool },
    /// Publisher → one owner: send me the shard and watch it for me.
    Lookup { shard: ShardKey, req: u64 },
    /// Owner → publisher. `version` numbers the owner's copy: each
    /// [`Frame::Delta`] after it carries the next one. `split`: the shard is
    /// split; a publish also consults the child shard on its topic's path.
    /// `part`, `more`: a shard too large for one frame is answered in parts
    /// numbered from 0, all at `version`; `more` on every one but the last.
    /// An asker missing a part drops the answer and asks the next owner.
    LookupReply { shard: ShardKey, req: u64, version: u64, answer: LookupAnswer, split: bool, part: u32, more: bool },
    /// Publisher → owner: stop pushing the watch that lookup `req` made.
    /// (The request id keeps an unwatch meant for an older lookup from
    /// cancelling a newer one.)
    Unwatch { shard: ShardKey, req: u64 },
    /// Owner → a watcher: entries changed (`req`: the watcher's lookup),
    /// making the owner's copy `version`. A watcher whose copy is not at
    /// `version - 1` missed a delta and looks the shard up again. `split`:
    /// as in [`Frame::LookupReply`], as of this version.
    Delta { shard: ShardKey, req: u64, version: u64, changes: Vec<RouteChange>, split: bool },
    /// Owner → watchers: I no longer serve this shard; look it up again.
    Released { shard: ShardKey },
    /// Replica → replica: my hash of each shard we both own.
    Digest { items: Vec<(ShardKey, u64)> },
    /// Replica → replica, on a digest mismatch: my hash per subscriber node.
    NodeDigests { shard: ShardKey, items: Vec<(NodeId, u64)> },
    /// Owner → subscriber node: replicas disagree about you; re-assert.
    Reassert { shards: Vec<ShardKey> },
    /// Subscriber → owner: my hash of my own entries in each of these
    /// shards (the truth); the owner asks for a re-assertion where its copy
    /// differs.
    OwnDigests { items: Vec<(ShardKey, u64)> },
    /// Publisher → the owner it watches: the (lookup, version) of each
    /// shard I cached from you.
    WatchCheck { items: Vec<(ShardKey, u64, u64)> },
    /// Owner → publisher, answering [`Frame::WatchCheck`] (the shards whose
    /// version differs from mine, `Some(mine)`, or that I do not watch for
    /// you under that lookup, `None`), or a while after a shard's last
    /// delta (its version now: a lost last delta shows no gap otherwise).
    /// The publisher drops a copy at another version.
    WatchState { items: Vec<(ShardKey, u64, Option<u64>)> },
}

/// Frame kinds, for counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    Assert,
    Acked,
    Lookup,
    LookupReply,
    Unwatch,
    Delta,
    Released,
    Digest,
    NodeDigests,
    Reassert,
    OwnDigests,
    WatchCheck,
    WatchState,
}

/// How many [`FrameKind`]s there are.
pub const FRAME_KINDS: usize = 13;

impl FrameKind {
    pub const ALL: [FrameKind; FRAME_KINDS] = [
        FrameKind::Assert,
        FrameKind::Acked,
        FrameKind::Lookup,
        FrameKind::LookupReply,
        FrameKind::Unwatch,
        FrameKind::Delta,
        FrameKind::Released,
        FrameKind::Digest,
        FrameKind::NodeDigests,
        FrameKind::Reassert,
        FrameKind::OwnDigests,
        FrameKind::WatchCheck,
        FrameKind::WatchState,
    ];

    /// A metric label.
    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Assert => "assert",
            FrameKind::Acked => "acked",
            FrameKind::Lookup => "lookup",
            FrameKind::LookupReply => "lookup_reply",
            FrameKind::Unwatch => "unwatch",
            FrameKind::Delta => "delta",
            FrameKind::Released => "released",
            FrameKind::Digest => "digest",
            FrameKind::NodeDigests => "node_digests",
            FrameKind::Reassert => "reassert",
            FrameKind::OwnDigests => "own_digests",
            FrameKind::WatchCheck => "watch_check",
            FrameKind::WatchState => "watch_state",
        }
    }
}

impl Frame {
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Assert { .. } => FrameKind::Assert,
            Frame::Acked { .. } => FrameKind::Acked,
            Frame::Lookup { .. } => FrameKind::Lookup,
            Frame::LookupReply { .. } => FrameKind::LookupReply,
            Frame::Unwatch { .. } => FrameKind::Unwatch,
            Frame::Delta { .. } => FrameKind::Delta,
            Frame::Released { .. } => FrameKind::Released,
            Frame::Digest { .. } => FrameKind::Digest,
            Frame::NodeDigests { .. } => FrameKind::NodeDigests,
            Frame::Reassert { .. } => FrameKind::Reassert,
            Frame::OwnDigests { .. } => FrameKind::OwnDigests,
            Frame::WatchCheck { .. } => FrameKind::WatchCheck,
            Frame::WatchState { .. } => FrameKind::WatchState,
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
                seq: 3,
                replace: true,
                ops: vec![RouteOp { filter: "devices/#".into(), group: None, count: 1 }],
                split: true,
                more: true,
            },
            Frame::Acked { shard, seq: 3, split: true },
            Frame::Lookup { shard, req: 9 },
            Frame::LookupReply {
                shard,
                req: 9,
                version: 4,
                answer: LookupAnswer::Entries(vec![change.clone()]),
                split: true,
                part: 0,
                more: true,
            },
            Frame::LookupReply {
                shard,
                req: 10,
                version: 0,
                answer: LookupAnswer::NotOwner,
                split: false,
                part: 0,
                more: false,
            },
            Frame::LookupReply {
                shard,
                req: 11,
                version: 1,
                answer: LookupAnswer::Warming(vec![change.clone()]),
                split: false,
                part: 3,
                more: false,
            },
            Frame::Unwatch { shard, req: 9 },
            Frame::Delta { shard, req: 9, version: 5, changes: vec![change], split: true },
            Frame::Released { shard },
            Frame::Digest { items: vec![(shard, u64::MAX)] },
            Frame::NodeDigests { shard, items: vec![(NodeId(1), 5)] },
            Frame::Reassert { shards: vec![shard] },
            Frame::OwnDigests { items: vec![(shard, 17)] },
            Frame::WatchCheck { items: vec![(shard, 9, 5)] },
            Frame::WatchState { items: vec![(shard, 9, Some(6)), (shard, 8, None)] },
        ]
    }

    #[test]
    fn frames_round_trip() {
        let frames = samples();
        assert_eq!(
            FrameKind::ALL.len(),
            frames.iter().map(|f| f.kind().name()).collect::<std::collections::HashSet<_>>().len(),
            "every kind has a sample"
        );
        for frame in frames {
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
        (FRAME_VERSION + 1).serialize(&mut ser).unwrap();
        Frame::Released { shard: ShardKey::of_prefix("") }.serialize(&mut ser).unwrap();
        assert!(matches!(decode(&bytes), Err(FrameError::Version(v)) if v == FRAME_VERSION + 1));
        assert!(matches!(decode(&[FRAME_VERSION as u8, 0xc1]), Err(FrameError::Malformed(_))));
        assert!(matches!(decode(&[]), Err(FrameError::Malformed(_))));
    }
}
