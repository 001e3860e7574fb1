//! One versioned retained topic of the fleet, open and packed.
//!
//! Job: the two forms of an item the shard owners keep. [`FleetRetained`] is
//! the open form that frames carry and code reads; [`Packed`] is the form an
//! owner keeps, in memory and on disk: one allocation holding the version,
//! the topic and the message, about the size of the message itself. (An
//! `Arc<Message>` with its topic and payload is three allocations and ~280
//! bytes more per topic; at a million retained topics that was most of an
//! owner's memory, docs/BENCHMARKS.md, "Retained messages at their owners".)
//!
//! Layout, little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | 0xC1 (`MAGIC`) |
//! | 8 | hybrid logical clock of the write |
//! | 8 | the node that wrote it |
//! | 1 | kind: tombstone, plain or full |
//! | 2 | topic length |
//! | n | topic |
//! | rest | tombstone: when it was cleared (u64 ms); plain: QoS byte and payload; full: the message (MessagePack, named fields, topic empty) |
//!
//! "Plain" is a message without properties or expiry, the common case;
//! "full" keeps everything else. Records written before this form
//! (MessagePack of a [`FleetRetained`]) are read and packed on load.

use crate::broker::message::Message;
use crate::protocol::QoS;
use serde::{Deserialize, Serialize};

/// A retained message of the fleet as its shard's owners exchange it: the
/// newest version of the topic, set (`message`) or cleared (a tombstone,
/// kept until `cleared_at_ms` plus the tombstone time so that a node that
/// was away cannot bring the old value back).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetRetained {
    pub topic: String,
    /// Hybrid logical clock of the write (ms << 16 | counter) and the
    /// node that made it: the newer (hlc, origin) wins.
    pub hlc: u64,
    pub origin: u64,
    pub message: Option<Message>,
    pub cleared_at_ms: u64,
}

impl FleetRetained {
    pub fn version(&self) -> (u64, u64) {
        (self.hlc, self.origin)
    }
}

/// The first byte of a packed record: never the first byte of MessagePack,
/// so a record of the older form is told apart.
const MAGIC: u8 = 0xC1;
const TOMBSTONE: u8 = 0;
const PLAIN: u8 = 1;
const FULL: u8 = 2;
/// Magic, clock, origin, kind, topic length.
const HEADER: usize = 1 + 8 + 8 + 1 + 2;

/// A [`FleetRetained`] in one allocation (see the module docs).
#[derive(Clone, PartialEq, Eq)]
pub struct Packed(Box<[u8]>);

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packed").field("topic", &self.topic()).field("version", &self.version()).finish()
    }
}

impl Packed {
    /// Packs `item`. The message keeps its payload, QoS, properties and
    /// expiry; its topic is the item's, and what names a publish (origin
    /// client, fleet id) is not kept.
    pub fn pack(item: &FleetRetained) -> Packed {
        let topic = item.topic.as_bytes();
        let topic_len = u16::try_from(topic.len()).expect("an MQTT topic has at most 65,535 bytes");
        let (kind, body) = match &item.message {
            None => (TOMBSTONE, item.cleared_at_ms.to_le_bytes().to_vec()),
            Some(message) if message.properties == Default::default() && message.expires_at_ms.is_none() => {
                let mut body = Vec::with_capacity(1 + message.payload.len());
                body.push(message.qos as u8);
                body.extend_from_slice(&message.payload);
                (PLAIN, body)
            }
            Some(message) => {
                let bare =
                    Message { topic: String::new(), origin: None, fleet_id: None, retain: true, ..message.clone() };
                (FULL, rmp_serde::to_vec_named(&bare).expect("in-memory messages always encode"))
            }
        };
        let mut out = Vec::with_capacity(HEADER + topic.len() + body.len());
        out.push(MAGIC);
        out.extend_from_slice(&item.hlc.to_le_bytes());
        out.extend_from_slice(&item.origin.to_le_bytes());
        out.push(kind);
        out.extend_from_slice(&topic_len.to_le_bytes());
        out.extend_from_slice(topic);
        out.extend_from_slice(&body);
        Packed(out.into_boxed_slice())
    }

    /// A record as the data directory holds it under key `topic`: packed,
    /// or of the older form (MessagePack of a [`FleetRetained`]).
    pub fn from_stored(topic: &[u8], record: &[u8]) -> Result<Packed, String> {
        if record.first() != Some(&MAGIC) {
            let item: FleetRetained = rmp_serde::from_slice(record).map_err(|err| err.to_string())?;
            if item.topic.as_bytes() != topic {
                return Err(format!("the record of {:?} names topic {:?}", String::from_utf8_lossy(topic), item.topic));
            }
            return Ok(Packed::pack(&item));
        }
        let packed = Packed(record.into());
        packed.check()?;
        if packed.topic().as_bytes() != topic {
            return Err(format!("the record of {:?} names topic {:?}", String::from_utf8_lossy(topic), packed.topic()));
        }
        Ok(packed)
    }

    /// Whether the bytes are a whole record (a data directory may be
    /// damaged).
    fn check(&self) -> Result<(), String> {
        let b = &self.0;
        if b.len() < HEADER || b.len() < HEADER + self.topic_len() {
            return Err(format!("a retained record of {} bytes is cut short", b.len()));
        }
        std::str::from_utf8(self.topic_bytes()).map_err(|_| "a retained record's topic is not UTF-8".to_string())?;
        let body = self.body();
        match self.kind() {
            TOMBSTONE if body.len() == 8 => Ok(()),
            PLAIN if body.first().and_then(|q| QoS::from_u8(*q)).is_some() => Ok(()),
            FULL => rmp_serde::from_slice::<Message>(body).map(drop).map_err(|err| err.to_string()),
            kind => Err(format!("a retained record of kind {kind} and {} body bytes", body.len())),
        }
    }

    /// The bytes to store.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn u64_at(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.0[at..at + 8].try_into().expect("8 bytes"))
    }

    fn kind(&self) -> u8 {
        self.0[17]
    }

    fn topic_len(&self) -> usize {
        u16::from_le_bytes([self.0[18], self.0[19]]) as usize
    }

    fn topic_bytes(&self) -> &[u8] {
        &self.0[HEADER..HEADER + self.topic_len()]
    }

    fn body(&self) -> &[u8] {
        &self.0[HEADER + self.topic_len()..]
    }

    pub fn hlc(&self) -> u64 {
        self.u64_at(1)
    }

    pub fn origin(&self) -> u64 {
        self.u64_at(9)
    }

    pub fn version(&self) -> (u64, u64) {
        (self.hlc(), self.origin())
    }

    pub fn topic(&self) -> &str {
        // Checked when made (`pack` from a `String`, `from_stored`).
        std::str::from_utf8(self.topic_bytes()).unwrap_or_default()
    }

    pub fn is_cleared(&self) -> bool {
        self.kind() == TOMBSTONE
    }

    /// When a tombstone was cleared; 0 for a live message.
    pub fn cleared_at_ms(&self) -> u64 {
        if self.is_cleared() {
            u64::from_le_bytes(self.body().try_into().unwrap_or_default())
        } else {
            0
        }
    }

    /// The message (a retained one, of this topic); `None` for a tombstone.
    pub fn message(&self) -> Option<Message> {
        let body = self.body();
        let mut message = match self.kind() {
            PLAIN => Message {
                topic: String::new(),
                payload: bytes::Bytes::copy_from_slice(&body[1..]),
                qos: QoS::from_u8(body[0]).unwrap_or(QoS::AtMostOnce),
                retain: true,
                properties: Default::default(),
                expires_at_ms: None,
                origin: None,
                fleet_id: None,
            },
            // Checked when made.
            FULL => rmp_serde::from_slice(body).ok()?,
            _ => return None,
        };
        message.topic = self.topic().to_string();
        Some(message)
    }

    /// The open form.
    pub fn item(&self) -> FleetRetained {
        FleetRetained {
            topic: self.topic().to_string(),
            hlc: self.hlc(),
            origin: self.origin(),
            message: self.message(),
            cleared_at_ms: self.cleared_at_ms(),
        }
    }

    /// The live message's payload and topic bytes, and its expiry (0 and
    /// `None` for a tombstone).
    pub fn size_and_expiry(&self) -> (u64, Option<u64>) {
        let topic = self.topic_len() as u64;
        match self.kind() {
            PLAIN => (topic + self.body().len() as u64 - 1, None),
            FULL => self.message().map_or((0, None), |m| (topic + m.payload.len() as u64, m.expires_at_ms)),
            _ => (0, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MessageProperties;

    fn message(topic: &str, payload: &str) -> Message {
        Message {
            topic: topic.into(),
            payload: payload.to_string().into(),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Default::default(),
            expires_at_ms: None,
            origin: Some("publisher".into()),
            fleet_id: Some((4, 5)),
        }
    }

    fn item(topic: &str, message: Option<Message>) -> FleetRetained {
        let cleared_at_ms = if message.is_none() { 77 } else { 0 };
        FleetRetained { topic: topic.into(), hlc: 9 << 16 | 3, origin: 42, message, cleared_at_ms }
    }

    /// What packing keeps: everything but the publish's names.
    fn kept(mut item: FleetRetained) -> FleetRetained {
        if let Some(m) = &mut item.message {
            m.origin = None;
            m.fleet_id = None;
        }
        item
    }

    #[test]
    fn every_kind_comes_back_as_it_went_in() {
        let plain = item("a/b", Some(message("a/b", "hello")));
        let mut with_properties = message("a/c", "");
        with_properties.payload = bytes::Bytes::from_static(b"\x00\xffbinary");
        with_properties.expires_at_ms = Some(123_456);
        with_properties.properties = MessageProperties {
            content_type: Some("text/plain".into()),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        };
        let full = item("a/c", Some(with_properties));
        let tombstone = item("a/d/ü", None);
        for original in [plain, full, tombstone] {
            let packed = Packed::pack(&original);
            assert_eq!(packed.item(), kept(original.clone()));
            assert_eq!(packed.topic(), original.topic);
            assert_eq!(packed.version(), original.version());
            assert_eq!(packed.is_cleared(), original.message.is_none());
            let stored = Packed::from_stored(original.topic.as_bytes(), packed.as_bytes()).unwrap();
            assert_eq!(stored, packed);
        }
    }

    #[test]
    fn a_plain_message_costs_its_topic_and_payload_and_twenty_bytes() {
        let packed = Packed::pack(&item("bench/r1/1", Some(message("bench/r1/1", &"x".repeat(64)))));
        assert_eq!(packed.as_bytes().len(), HEADER + "bench/r1/1".len() + 1 + 64);
        assert_eq!(packed.size_and_expiry(), (("bench/r1/1".len() + 64) as u64, None));
    }

    #[test]
    fn a_record_of_the_older_form_is_read() {
        let old = item("old/t", Some(message("old/t", "v1")));
        let record = rmp_serde::to_vec_named(&old).unwrap();
        assert_eq!(Packed::from_stored(b"old/t", &record).unwrap().item(), kept(old));
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_panic() {
        let packed = Packed::pack(&item("a/b", Some(message("a/b", "hello"))));
        let bytes = packed.as_bytes();
        for cut in 0..HEADER + "a/b".len() + 1 {
            assert!(Packed::from_stored(b"a/b", &bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(Packed::from_stored(b"x/y", bytes).is_err(), "the key names another topic");
        let mut bad_kind = bytes.to_vec();
        bad_kind[17] = 9;
        assert!(Packed::from_stored(b"a/b", &bad_kind).is_err());
        let mut bad_full = bytes.to_vec();
        bad_full[17] = FULL;
        assert!(Packed::from_stored(b"a/b", &bad_full).is_err());
        assert!(Packed::from_stored(b"a/b", b"\x93garbage").is_err());
    }
}
