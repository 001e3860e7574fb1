//! An application message as the broker holds it between publisher and
//! subscribers: shared by `Arc` across the fan-out, persisted with rmp-serde.

use crate::protocol::{MessageProperties, QoS};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Properties forwarded unchanged; `message_expiry_interval` is rewritten
    /// from `expires_at_ms` at delivery.
    pub properties: MessageProperties,
    /// Wall-clock expiry (Unix milliseconds), from the Message Expiry Interval.
    pub expires_at_ms: Option<u64>,
    /// Client id of the publisher, for the No Local option; not for clients.
    pub origin: Option<Arc<str>>,
    /// In a fleet, a QoS 1/2 message's name: the publishing node's id and
    /// its number there. A session moving between nodes may be given the
    /// same message twice (by the node it leaves and the one it reaches);
    /// this is how the copy is known.
    #[serde(default)]
    pub fleet_id: Option<FleetId>,
}

/// A QoS 1/2 message's name in a fleet: (publishing node, its number there).
pub type FleetId = (u64, u64);

impl Message {
    /// Seconds of life left at `now_ms` (rounded up), `Some(0)` once expired.
    pub fn remaining_secs(&self, now_ms: u64) -> Option<u32> {
        self.expires_at_ms.map(|at| at.saturating_sub(now_ms).div_ceil(1000).min(u32::MAX as u64) as u32)
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_rounds_up_and_expires() {
        let msg = Message {
            topic: "t".into(),
            payload: Bytes::new(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: MessageProperties::default(),
            expires_at_ms: Some(10_000),
            origin: None,
            fleet_id: None,
        };
        assert_eq!(msg.remaining_secs(8_500), Some(2));
        assert!(!msg.is_expired(9_999));
        assert!(msg.is_expired(10_000));
        assert_eq!(msg.remaining_secs(12_000), Some(0));
    }
}
