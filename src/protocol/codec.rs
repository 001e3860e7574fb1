//! The MQTT 3.1.1 / 5.0 wire codec: [`decode`] one packet from the front of a
//! buffer, [`encode`] a packet, [`encoded_len`] its exact size on the wire.
//!
//! One packet model serves both versions; the connection's version picks the
//! wire form, except CONNECT, which is always read by its own protocol level.
//! Decoding validates everything the two specifications make checkable on a
//! single packet (reserved bits, flag combinations, UTF-8, property ids,
//! duplicates and values, packet identifiers, topic name and filter syntax,
//! reason codes, trailing bytes). What needs connection state (topic alias
//! ranges, receive maximum, the empty-client-id rules, AUTH method presence)
//! is the broker's job.
//!
//! Hot path: a PUBLISH is decoded without copying its payload (the packet
//! body is split off the read buffer and frozen; the payload and every binary
//! field are slices of it). The only allocations are the topic `String` and
//! the properties that are present.
//!
//! Why not `mqttbytes` 0.6 (still a dependency; `codec/mqttbytes_diff.rs`
//! compares our bytes with its bytes both ways wherever it is right). Bugs
//! demonstrated there, one `mqttbytes_bug_*` test each:
//! 1. v5 DISCONNECT with remaining length 0 (reason 0, no properties) or 1
//!    (reason only) is rejected by `v5::read`, although mqttbytes itself
//!    writes exactly those forms (`E0 00`, `E0 01 8E`).
//! 2. v5 AUTH (packet type 15) does not exist.
//! 3. v5 CONNACK without properties is written without the property length
//!    (`20 02 00 87`), which MQTT 5.0 §3.2.2.3 requires (only the acks,
//!    DISCONNECT and AUTH may omit it).
//! 4. v5 CONNECT with a password and no user name (allowed in 5.0) reads as
//!    user name `""`.
//! 5. The maximum packet size is compared with the remaining length, not
//!    the whole packet, so a packet up to 5 bytes over the limit passes.
//! 6. It writes a QoS 0 PUBLISH with DUP set (malformed).
//! 7. It accepts malformed packets we reject: QoS 0 with DUP, wildcards or
//!    U+0000 in a topic name, an empty topic without alias, payload format
//!    indicator 2, a duplicated property, SUBSCRIBE with flags 0000, no
//!    filters, or reserved option bits, trailing bytes (PUBACK, PINGREQ),
//!    the CONNECT reserved flag, receive maximum 0.
//!
//! Not a bug, though once suspected: mqttbytes 0.6 does read v5
//! PUBACK/PUBREC/PUBREL/PUBCOMP with remaining length 2 or 3.

use super::packet::{ConnectReason, DisconnectReason};

mod decode;
mod encode;
#[cfg(test)]
mod mqttbytes_diff;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use decode::decode;
pub use encode::{encode, encoded_len};

/// The largest packet the protocol can express: a remaining length of
/// 268,435,455 plus the 5-byte fixed header.
pub const MAX_PACKET_SIZE: usize = 268_435_455 + 5;

/// The largest value of a variable byte integer (four bytes).
const MAX_VARINT: usize = 268_435_455;

/// Property identifiers (MQTT 5.0 §2.2.2.2).
mod prop {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

    pub fn known(id: u8) -> bool {
        matches!(
            id,
            0x01 | 0x02 | 0x03 | 0x08 | 0x09 | 0x0B | 0x11 | 0x12 | 0x13 | 0x15..=0x1A | 0x1C | 0x1F | 0x21..=0x2A
        )
    }
}

/// Packet type numbers (the high nibble of the first byte).
mod kind {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
    pub const AUTH: u8 = 15;
}

/// Why a packet could not be decoded. Cheap to build and copy: details are
/// static strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The fixed header announces a packet (fixed header included) larger
    /// than the allowed maximum.
    #[error("packet of {size} bytes exceeds the maximum packet size {max}")]
    PacketTooLarge { size: usize, max: usize },
    #[error("malformed packet: {0}")]
    MalformedPacket(&'static str),
    #[error("protocol error: {0}")]
    ProtocolError(&'static str),
    /// CONNECT with a protocol level other than 4 or 5 (3 = MQTT 3.1 "MQIsdp").
    #[error("unsupported protocol version {0}")]
    UnsupportedProtocolVersion(u8),
    /// A string is not valid UTF-8 or contains U+0000.
    #[error("string is not valid UTF-8 or contains U+0000")]
    InvalidUtf8,
    /// A PUBLISH or will topic is empty (3.1.1) or contains a wildcard.
    #[error("invalid topic name")]
    TopicNameInvalid,
    /// A SUBSCRIBE/UNSUBSCRIBE filter breaks the wildcard rules, or a
    /// `$share/` filter is malformed (5.0).
    #[error("invalid topic filter")]
    TopicFilterInvalid,
    /// A PUBLISH carries Topic Alias 0.
    #[error("topic alias 0")]
    TopicAliasInvalid,
}

impl DecodeError {
    /// The reason code of the DISCONNECT a 5.0 peer should get.
    pub fn disconnect_reason(&self) -> DisconnectReason {
        match self {
            DecodeError::PacketTooLarge { .. } => DisconnectReason::PacketTooLarge,
            DecodeError::MalformedPacket(_) | DecodeError::InvalidUtf8 => DisconnectReason::MalformedPacket,
            DecodeError::ProtocolError(_) | DecodeError::UnsupportedProtocolVersion(_) => {
                DisconnectReason::ProtocolError
            }
            DecodeError::TopicNameInvalid => DisconnectReason::TopicNameInvalid,
            DecodeError::TopicFilterInvalid => DisconnectReason::TopicFilterInvalid,
            DecodeError::TopicAliasInvalid => DisconnectReason::TopicAliasInvalid,
        }
    }

    /// The reason code of the CONNACK to send when the CONNECT itself could
    /// not be decoded.
    pub fn connect_reason(&self) -> ConnectReason {
        match self {
            DecodeError::PacketTooLarge { .. } => ConnectReason::PacketTooLarge,
            DecodeError::MalformedPacket(_) | DecodeError::InvalidUtf8 => ConnectReason::MalformedPacket,
            DecodeError::ProtocolError(_) | DecodeError::TopicFilterInvalid | DecodeError::TopicAliasInvalid => {
                ConnectReason::ProtocolError
            }
            DecodeError::UnsupportedProtocolVersion(_) => ConnectReason::UnsupportedProtocolVersion,
            DecodeError::TopicNameInvalid => ConnectReason::TopicNameInvalid,
        }
    }
}

/// Why a packet could not be encoded. Nothing is left in the output buffer
/// when encoding fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A string or binary field is longer than 65535 bytes.
    #[error("string or binary field of {0} bytes is longer than 65535")]
    FieldTooLong(usize),
    /// The packet would exceed the protocol maximum (remaining length over
    /// 268,435,455) or a property section would.
    #[error("packet of remaining length {0} exceeds the protocol maximum")]
    PacketTooLarge(usize),
    /// A QoS 1/2 PUBLISH without a packet identifier.
    #[error("QoS > 0 PUBLISH without a packet identifier")]
    MissingPacketId,
    /// The packet (e.g. AUTH) or a combination of fields does not exist in
    /// the version being written.
    #[error("cannot be written in this protocol version: {0}")]
    UnsupportedInVersion(&'static str),
    /// A field holds a value the wire format cannot carry.
    #[error("invalid value: {0}")]
    InvalidValue(&'static str),
}

/// Number of bytes of a variable byte integer.
#[inline]
fn varint_len(v: usize) -> usize {
    if v < 128 {
        1
    } else if v < 16_384 {
        2
    } else if v < 2_097_152 {
        3
    } else {
        4
    }
}

fn connect_reason_from(code: u8) -> Option<ConnectReason> {
    use ConnectReason::*;
    Some(match code {
        0x00 => Success,
        0x80 => UnspecifiedError,
        0x81 => MalformedPacket,
        0x82 => ProtocolError,
        0x83 => ImplementationSpecificError,
        0x84 => UnsupportedProtocolVersion,
        0x85 => ClientIdentifierNotValid,
        0x86 => BadUserNameOrPassword,
        0x87 => NotAuthorized,
        0x88 => ServerUnavailable,
        0x89 => ServerBusy,
        0x8A => Banned,
        0x8C => BadAuthenticationMethod,
        0x90 => TopicNameInvalid,
        0x95 => PacketTooLarge,
        0x97 => QuotaExceeded,
        0x99 => PayloadFormatInvalid,
        0x9A => RetainNotSupported,
        0x9B => QoSNotSupported,
        0x9C => UseAnotherServer,
        0x9D => ServerMoved,
        0x9F => ConnectionRateExceeded,
        _ => return None,
    })
}

/// The 3.1.1 CONNACK return code for a reason.
fn connect_reason_v311(code: ConnectReason) -> u8 {
    match code {
        ConnectReason::Success => 0,
        ConnectReason::UnsupportedProtocolVersion => 1,
        ConnectReason::ClientIdentifierNotValid => 2,
        ConnectReason::ServerUnavailable | ConnectReason::ServerBusy => 3,
        ConnectReason::BadUserNameOrPassword => 4,
        ConnectReason::NotAuthorized => 5,
        _ => 3,
    }
}

fn connect_reason_from_v311(code: u8) -> Option<ConnectReason> {
    Some(match code {
        0 => ConnectReason::Success,
        1 => ConnectReason::UnsupportedProtocolVersion,
        2 => ConnectReason::ClientIdentifierNotValid,
        3 => ConnectReason::ServerUnavailable,
        4 => ConnectReason::BadUserNameOrPassword,
        5 => ConnectReason::NotAuthorized,
        _ => return None,
    })
}

fn disconnect_reason_from(code: u8) -> Option<DisconnectReason> {
    use DisconnectReason::*;
    Some(match code {
        0x00 => NormalDisconnection,
        0x04 => DisconnectWithWillMessage,
        0x80 => UnspecifiedError,
        0x81 => MalformedPacket,
        0x82 => ProtocolError,
        0x83 => ImplementationSpecificError,
        0x87 => NotAuthorized,
        0x89 => ServerBusy,
        0x8B => ServerShuttingDown,
        0x8D => KeepAliveTimeout,
        0x8E => SessionTakenOver,
        0x8F => TopicFilterInvalid,
        0x90 => TopicNameInvalid,
        0x93 => ReceiveMaximumExceeded,
        0x94 => TopicAliasInvalid,
        0x95 => PacketTooLarge,
        0x96 => MessageRateTooHigh,
        0x97 => QuotaExceeded,
        0x98 => AdministrativeAction,
        0x99 => PayloadFormatInvalid,
        0x9A => RetainNotSupported,
        0x9B => QoSNotSupported,
        0x9C => UseAnotherServer,
        0x9D => ServerMoved,
        0x9E => SharedSubscriptionsNotSupported,
        0x9F => ConnectionRateExceeded,
        0xA0 => MaximumConnectTime,
        0xA1 => SubscriptionIdentifiersNotSupported,
        0xA2 => WildcardSubscriptionsNotSupported,
        _ => return None,
    })
}

/// Valid reason codes per packet (MQTT 5.0 §3.4.2.1 ff.).
fn valid_puback_reason(code: u8) -> bool {
    matches!(code, 0x00 | 0x10 | 0x80 | 0x83 | 0x87 | 0x90 | 0x91 | 0x97 | 0x99)
}

fn valid_pubrel_reason(code: u8) -> bool {
    matches!(code, 0x00 | 0x92)
}

fn valid_suback_reason(code: u8) -> bool {
    matches!(code, 0x00 | 0x01 | 0x02 | 0x80 | 0x83 | 0x87 | 0x8F | 0x91 | 0x97 | 0x9E | 0xA1 | 0xA2)
}

fn valid_unsuback_reason(code: u8) -> bool {
    matches!(code, 0x00 | 0x11 | 0x80 | 0x83 | 0x87 | 0x8F | 0x91)
}

fn valid_auth_reason(code: u8) -> bool {
    matches!(code, 0x00 | 0x18 | 0x19)
}
