//! What brokers send each other over the driver's frame streams.
//!
//! Job: one envelope around the traffic between nodes (the routing core's
//! route frames, forwarded messages, acknowledgements of QoS 1/2 forwards,
//! retained messages for their owners, sessions), with a version byte so a fleet can be upgraded node by
//! node. Boundary: pure encoding, no state.
//!
//! Layout: byte 0 is [`VERSION`], byte 1 the kind; a route frame follows as
//! the core encoded it (it carries its own version), a batch is a sequence
//! of whole frames, each behind its 4-byte big-endian length, a forward is
//! a fixed binary layout (see [`write_forward`]: the bulk of the traffic,
//! and its payload is read without a copy), the others are rmp-serde.

use super::outbox::Sequence;
use super::retained::RetainFrame;
use super::sessions::{Part, SessionFrame, Update};
use crate::broker::message::Message;
use crate::protocol::QoS;
use crate::storage::StoredDelivery;
use bytes::Bytes;
use kadmq_dht::core::{self, ForwardRoute, NodeId, SharedPick};
use kadmq_dht::topic;
use std::sync::Arc;

pub const VERSION: u8 = 6;

const ROUTE: u8 = 1;
const FORWARD: u8 = 2;
const ACK: u8 = 3;
const RETAINED: u8 = 4;
const REJOINED: u8 = 5;
const BATCH: u8 = 6;
const SESSION: u8 = 7;

/// A forward's route flag: sent on for a dead node ([`ForwardRoute::sent_on`]).
const SENT_ON_FLAG: u8 = 2;

/// A message forwarded to one destination node.
#[derive(Debug, Clone, PartialEq)]
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
    /// Retained messages for (or from) their shards' owners (`super::retained`).
    Retained(Box<RetainFrame>),
    /// The sender had taken the receiver for dead and sees it again: the
    /// receiver's routes must be asserted to it afresh.
    Rejoined,
    /// Sessions following their clients (`super::sessions`).
    Session(Box<SessionFrame>),
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
    #[error("malformed forward: {0}")]
    Forward(&'static str),
    /// Decoded, but what it carries is not acceptable input.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

impl WireError {
    /// The `reason` label of `kadmq_cluster_frames_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            WireError::Empty | WireError::Body(_) | WireError::Batch | WireError::Forward(_) => "malformed",
            WireError::Route(core::FrameError::Version(_)) | WireError::Version(_) => "version",
            WireError::Route(_) => "malformed",
            WireError::Kind(_) => "unknown_kind",
            WireError::Invalid("topic") => "invalid_topic",
            WireError::Invalid(_) => "invalid_field",
        }
    }
}

/// Most properties bytes a message from another node may carry: what one
/// frame holds (a node cannot send more; a claim of more is a lie). Not
/// lower: a broker allows properties up to its `max_packet_size`, and what
/// a node accepts from its clients its peers must take from it.
pub const MAX_PROPERTIES: usize = kadmq_dht::driver::frames::MAX_FRAME;
/// Most retained items one frame may carry (a node sends at most this many
/// and at most 1 MiB of them).
pub const MAX_RETAINED_ITEMS: usize = 4096;

/// A topic a message may be published to, within the node's level limit.
fn check_topic(topic: &str, max_levels: usize) -> Result<(), WireError> {
    if !topic::valid_topic_name(topic) || topic::level_count(topic) > max_levels {
        return Err(WireError::Invalid("topic"));
    }
    Ok(())
}

/// What a message from another node carries besides its topic.
fn check_message(message: &Message, max_levels: usize) -> Result<(), WireError> {
    check_topic(&message.topic, max_levels)?;
    if message.origin.as_deref().is_some_and(str::is_empty) {
        return Err(WireError::Invalid("origin"));
    }
    let p = &message.properties;
    let strings = p.content_type.iter().chain(&p.response_topic);
    let user: usize = p.user_properties.iter().map(|u| u.0.len() + u.1.len()).sum();
    let size = strings.map(String::len).sum::<usize>() + p.correlation_data.as_ref().map_or(0, |d| d.len()) + user;
    if size > MAX_PROPERTIES {
        return Err(WireError::Invalid("properties"));
    }
    Ok(())
}

pub fn encode_route(frame: &core::Frame) -> Bytes {
    with_header(ROUTE, &core::encode(frame))
}

/// Encodes a forward to one node (the cluster writes forwards straight
/// into a batch with [`write_forward`]).
#[cfg(test)]
pub fn encode_forward(id: u64, sequence: Option<Sequence>, message: &Message, route: &ForwardRoute) -> Bytes {
    let mut out = Vec::with_capacity(forward_size(message, route));
    write_forward(&mut out, id, sequence, message, route);
    Bytes::from(out)
}

/// An upper bound of a forward's encoded size, properties aside: 59
/// bytes of fields (a sequence and an expiry included), 24 more when sent
/// on, then the strings and the payload.
#[cfg(test)]
fn forward_size(message: &Message, route: &ForwardRoute) -> usize {
    let shared: usize = route.shared.iter().map(|p| p.group.len() + p.filter.len() + 4).sum();
    let sent_on = if route.sent_on.is_some() { 24 } else { 0 };
    59 + sent_on + message.topic.len() + message.payload.len() + message.origin.as_ref().map_or(0, |o| o.len()) + shared
}

/// Appends a whole forward frame (header included) to `out`. Layout after
/// the header, integers big-endian: id u64; sequence flag u8 (then epoch,
/// seq, base u64); qos u8; retain u8; topic (u16 length, bytes); origin flag
/// u8 (then u16 length, bytes); expiry flag u8 (then u64); properties flag
/// u8 (then u32 length, rmp-serde; only when any is set); route flags u8
/// (bit 0 plain, bit 1 sent on: then the dead node's id u64 and the
/// message's fleet id, origin u64 and number u64); shared picks
/// u16, each a group and a filter (u16 length, bytes); payload (u32 length,
/// bytes), last.
pub fn write_forward(out: &mut Vec<u8>, id: u64, sequence: Option<Sequence>, message: &Message, route: &ForwardRoute) {
    out.extend_from_slice(&[VERSION, FORWARD]);
    out.extend_from_slice(&id.to_be_bytes());
    match sequence {
        Some(s) => {
            out.push(1);
            for n in [s.epoch, s.seq, s.base] {
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
        None => out.push(0),
    }
    out.push(message.qos as u8);
    out.push(message.retain as u8);
    put_str(out, &message.topic);
    match &message.origin {
        Some(origin) => {
            out.push(1);
            put_str(out, origin);
        }
        None => out.push(0),
    }
    match message.expires_at_ms {
        Some(at) => {
            out.push(1);
            out.extend_from_slice(&at.to_be_bytes());
        }
        None => out.push(0),
    }
    if message.properties == Default::default() {
        out.push(0);
    } else {
        out.push(1);
        let props = rmp_serde::to_vec(&message.properties).expect("in-memory properties always encode");
        out.extend_from_slice(&(props.len() as u32).to_be_bytes());
        out.extend_from_slice(&props);
    }
    match route.sent_on {
        Some(dead) => {
            // A copy sent on keeps the fleet id it was first delivered
            // under: the sessions adopted from `dead` and `dead` itself
            // recognise it by that id. A held QoS 1/2 message always has
            // one; the fallback (origin 0, this forward's id) names a new
            // message, recognised by nobody.
            debug_assert!(message.fleet_id.is_some(), "a message sent on has a fleet id");
            let (origin, number) = message.fleet_id.unwrap_or((0, id));
            out.push(route.plain as u8 | SENT_ON_FLAG);
            for n in [dead.0, origin, number] {
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
        None => out.push(route.plain as u8),
    }
    out.extend_from_slice(&(route.shared.len() as u16).to_be_bytes());
    for pick in &route.shared {
        put_str(out, &pick.group);
        put_str(out, &pick.filter);
    }
    out.extend_from_slice(&(message.payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&message.payload);
}

/// Topics, client ids, group names and filters are MQTT strings: at most
/// 65,535 bytes.
fn put_str(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Reads a forward's body (after the header) from `frame`; the payload is
/// a slice of `frame`, not a copy.
fn read_forward(frame: &Bytes, max_levels: usize) -> Result<Forward, WireError> {
    let mut r = Reader { bytes: frame, at: 2 };
    let id = r.u64()?;
    let sequence = match r.u8()? {
        0 => None,
        _ => Some(Sequence { epoch: r.u64()?, seq: r.u64()?, base: r.u64()? }),
    };
    let qos = match r.u8()? {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => return Err(WireError::Forward("qos")),
    };
    // QoS 1/2 forwards are numbered (and only they): the receiver's
    // duplicate filter counts on it. `base` never passes `seq`, and the
    // last number is never used (the receiver counts one past it).
    match sequence {
        None if qos != QoS::AtMostOnce => return Err(WireError::Invalid("sequence (missing)")),
        Some(_) if qos == QoS::AtMostOnce => return Err(WireError::Invalid("sequence (QoS 0)")),
        Some(s) if s.base > s.seq || s.seq == u64::MAX => return Err(WireError::Invalid("sequence")),
        _ => {}
    }
    if qos != QoS::AtMostOnce && id == 0 {
        return Err(WireError::Invalid("message id"));
    }
    let retain = r.u8()? != 0;
    let topic = r.string()?;
    check_topic(&topic, max_levels)?;
    let origin = match r.u8()? {
        0 => None,
        _ => Some(Arc::from(r.string()?)),
    };
    let expires_at_ms = match r.u8()? {
        0 => None,
        _ => Some(r.u64()?),
    };
    let properties = match r.u8()? {
        0 => Default::default(),
        _ => {
            let len = r.u32()? as usize;
            if len > MAX_PROPERTIES {
                return Err(WireError::Invalid("properties"));
            }
            rmp_serde::from_slice(r.take(len)?)?
        }
    };
    let flags = r.u8()?;
    if flags & !(1 | SENT_ON_FLAG) != 0 {
        return Err(WireError::Invalid("route flags"));
    }
    let plain = flags & 1 != 0;
    let (sent_on, fleet_id) = match flags & SENT_ON_FLAG {
        0 => (None, None),
        _ => (Some(NodeId(r.u64()?)), Some((r.u64()?, r.u64()?))),
    };
    if fleet_id.is_some_and(|(_, number)| number == 0) {
        return Err(WireError::Invalid("fleet id"));
    }
    // Only a held (numbered) forward is sent on, and only for what the
    // dead node delivered itself.
    if sent_on.is_some() && (sequence.is_none() || !plain) {
        return Err(WireError::Invalid("route (sent on)"));
    }
    let picks = r.u16()?;
    let mut shared = Vec::with_capacity(picks.min(64) as usize);
    for _ in 0..picks {
        let pick = SharedPick { group: r.string()?, filter: r.string()? };
        if !topic::valid_share_group(&pick.group) || !topic::valid_topic_filter(&pick.filter) {
            return Err(WireError::Invalid("shared subscription pick"));
        }
        shared.push(pick);
    }
    if !plain && shared.is_empty() {
        return Err(WireError::Invalid("route (nothing to deliver)"));
    }
    let len = r.u32()? as usize;
    let start = r.at;
    r.take(len)?;
    if r.at != frame.len() {
        return Err(WireError::Forward("trailing bytes"));
    }
    let payload = frame.slice(start..start + len);
    let message = Message { topic, payload, qos, retain, properties, expires_at_ms, origin, fleet_id };
    check_message(&message, max_levels)?;
    Ok(Forward { id, sequence, message, route: ForwardRoute { plain, shared, sent_on } })
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], WireError> {
        let end =
            self.at.checked_add(n).filter(|end| *end <= self.bytes.len()).ok_or(WireError::Forward("truncated"))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("two bytes")))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("four bytes")))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("eight bytes")))
    }

    fn string(&mut self) -> Result<String, WireError> {
        let len = self.u16()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::Forward("string is not UTF-8"))
    }
}

pub fn encode_ack(epoch: u64, upto: u64) -> Bytes {
    with_header(ACK, &rmp_serde::to_vec(&(epoch, upto)).expect("numbers always encode"))
}

pub fn encode_retained(frame: &RetainFrame) -> Bytes {
    with_header(RETAINED, &rmp_serde::to_vec(frame).expect("in-memory retained frames always encode"))
}

pub fn encode_session(frame: &SessionFrame) -> Bytes {
    with_header(SESSION, &rmp_serde::to_vec(frame).expect("in-memory session frames always encode"))
}

/// What a session frame carries that a node must not take from a peer:
/// client ids that are no MQTT client id, invalid messages or filters.
fn check_session(frame: &SessionFrame, max_levels: usize) -> Result<(), WireError> {
    let client_ok = |c: &str| !c.is_empty() && c.len() <= u16::MAX as usize && !c.contains('\0');
    let client = match frame {
        SessionFrame::Claim { client, .. }
        | SessionFrame::TakeOver { client, .. }
        | SessionFrame::Directory { client, .. }
        | SessionFrame::Take { client }
        | SessionFrame::Moving { client } => Some(client),
        SessionFrame::Claimed { .. } | SessionFrame::ClaimDeferred { .. } | SessionFrame::Handover { .. } => None,
    };
    if client.is_some_and(|c| !client_ok(c)) {
        return Err(WireError::Invalid("client id"));
    }
    // What a session's client could not be sent: identifiers out of range,
    // packet id 0.
    let identifier_ok = |id: u32| (1..=MAX_SUBSCRIPTION_IDENTIFIER).contains(&id);
    let session_ok = |s: &crate::storage::StoredSession| {
        let filters_ok = s.subscriptions.iter().all(|sub| {
            let (filter, _) = topic::split_shared(&sub.filter);
            topic::parse_shared(&sub.filter).is_ok()
                && topic::valid_topic_filter(filter)
                && topic::level_count(filter) <= max_levels
                && sub.identifier.is_none_or(identifier_ok)
        });
        filters_ok && !s.incoming_qos2.contains(&0)
    };
    let delivery_ok =
        |d: &StoredDelivery| d.packet_id != Some(0) && d.subscription_ids.iter().all(|id| identifier_ok(*id));
    let mut messages: Vec<&Message> = Vec::new();
    let mut deliveries: Vec<&StoredDelivery> = Vec::new();
    let mut sessions = Vec::new();
    match frame {
        SessionFrame::Claimed { previous: Some(r), .. } => {
            messages.extend(r.will.iter().map(|(m, _)| m).chain(r.pending_will.iter().map(|(_, m)| m)));
            sessions.extend(r.session.iter());
        }
        SessionFrame::Handover { part: Part::Session(moved), .. } => {
            sessions.push(&moved.session);
            deliveries.extend(&moved.deliveries);
            messages.extend(moved.pending_will.iter().map(|(_, m)| m));
        }
        SessionFrame::Handover { part: Part::More(more), .. } => deliveries.extend(more),
        SessionFrame::Directory { update, .. } => match update {
            Update::Presence { will, pending_will, .. } => {
                messages.extend(will.iter().map(|(m, _)| m).chain(pending_will.iter().map(|(_, m)| m)))
            }
            Update::Session(session) => sessions.push(session),
            Update::Delivery { delivery, .. } => deliveries.push(delivery),
            Update::Copy { deliveries: copy, .. } => deliveries.extend(copy.iter().map(|(_, d)| d)),
            Update::DeliveryDone { .. } | Update::SessionGone | Update::Ended => {}
        },
        _ => {}
    }
    if !sessions.into_iter().all(session_ok) {
        return Err(WireError::Invalid("session subscriptions"));
    }
    if !deliveries.iter().all(|d| delivery_ok(d)) {
        return Err(WireError::Invalid("session delivery"));
    }
    messages.extend(deliveries.iter().map(|d| &d.message));
    messages.into_iter().try_for_each(|m| check_message(m, max_levels))
}

/// The largest MQTT 5 Subscription Identifier (a variable byte integer).
const MAX_SUBSCRIPTION_IDENTIFIER: u32 = 268_435_455;

pub fn encode_rejoined() -> Bytes {
    with_header(REJOINED, &[])
}

/// Several frames for one node in one: they arrive together and in order.
#[cfg(test)]
pub fn encode_batch(frames: &[Bytes]) -> Bytes {
    let size = frames.iter().map(|f| f.len() + 4).sum::<usize>();
    let mut batch = new_batch(size);
    for frame in frames {
        append_to_batch(&mut batch, |out| out.extend_from_slice(frame));
    }
    Bytes::from(batch)
}

/// An empty batch with room for `capacity` bytes of frames.
pub fn new_batch(capacity: usize) -> Vec<u8> {
    let mut batch = Vec::with_capacity(capacity + 2);
    batch.extend_from_slice(&[VERSION, BATCH]);
    batch
}

/// Appends to `batch` the one frame `write` appends.
pub fn append_to_batch(batch: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let at = batch.len();
    batch.extend_from_slice(&[0; 4]);
    write(batch);
    let len = (batch.len() - at - 4) as u32;
    batch[at..at + 4].copy_from_slice(&len.to_be_bytes());
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

/// Decodes a frame with the default topic level limit (tests, fuzzing).
pub fn decode(frame: &Bytes) -> Result<Wire, WireError> {
    decode_within(frame, core::node::DEFAULT_MAX_TOPIC_LEVELS)
}

/// Decodes a frame; topics deeper than `max_topic_levels` (the node's
/// `mqtt.max_topic_levels`) are invalid.
pub fn decode_within(frame: &Bytes, max_topic_levels: usize) -> Result<Wire, WireError> {
    let [version, kind, body @ ..] = &frame[..] else { return Err(WireError::Empty) };
    if *version != VERSION {
        return Err(WireError::Version(*version));
    }
    Ok(match *kind {
        ROUTE => Wire::Route(core::decode(body)?),
        FORWARD => Wire::Forward(Box::new(read_forward(frame, max_topic_levels)?)),
        ACK => {
            let (epoch, upto) = rmp_serde::from_slice(body)?;
            Wire::Ack { epoch, upto }
        }
        RETAINED => {
            let frame: RetainFrame = rmp_serde::from_slice(body)?;
            let items = frame.items();
            if items.len() > MAX_RETAINED_ITEMS {
                return Err(WireError::Invalid("retained messages (too many)"));
            }
            for item in items {
                check_topic(&item.topic, max_topic_levels)?;
                if let Some(message) = &item.message {
                    check_message(message, max_topic_levels)?;
                }
            }
            if matches!(&frame, RetainFrame::Digests { items, .. } if items.len() > MAX_RETAINED_ITEMS) {
                return Err(WireError::Invalid("retained digests (too many)"));
            }
            if let RetainFrame::Query { filter, .. } = &frame {
                if !topic::valid_topic_filter(filter) || topic::level_count(filter) > max_topic_levels {
                    return Err(WireError::Invalid("retained query filter"));
                }
            }
            Wire::Retained(Box::new(frame))
        }
        REJOINED => Wire::Rejoined,
        SESSION => {
            let frame: SessionFrame = rmp_serde::from_slice(body)?;
            check_session(&frame, max_topic_levels)?;
            Wire::Session(Box::new(frame))
        }
        other => return Err(WireError::Kind(other)),
    })
}

#[cfg(test)]
mod tests;
