//! Decoding: fixed header, per-packet bodies, properties.

use bytes::{Buf, Bytes, BytesMut};

use super::{
    connect_reason_from, connect_reason_from_v311, disconnect_reason_from, kind, prop, valid_auth_reason,
    valid_puback_reason, valid_pubrel_reason, valid_suback_reason, valid_unsuback_reason, DecodeError, MAX_VARINT,
};
use crate::protocol::packet::*;
use kadmq_dht::topic;

type Result<T> = std::result::Result<T, DecodeError>;

const SHORT: DecodeError = DecodeError::MalformedPacket("packet content shorter than its fields");
const TRAILING: DecodeError = DecodeError::MalformedPacket("bytes after the end of the packet content");
const DUPLICATE: DecodeError = DecodeError::ProtocolError("property appears more than once");
const PACKET_ID_ZERO: DecodeError = DecodeError::ProtocolError("packet identifier 0");
const BAD_REASON: DecodeError = DecodeError::ProtocolError("invalid reason code");

/// Decodes one packet from the front of `buf` and advances past it.
///
/// `Ok(None)`: `buf` does not hold a whole packet yet (nothing consumed). A
/// packet whose fixed header announces more than `max_packet_size` bytes
/// (fixed header included) is refused as soon as the fixed header is
/// readable. CONNECT is read by its own protocol level; every other packet in
/// the wire form of `version`. After an error the connection must be closed:
/// how much of `buf` was consumed is unspecified.
pub fn decode(buf: &mut BytesMut, version: Version, max_packet_size: usize) -> Result<Option<Packet>> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    check_first_byte(byte1, version)?;

    // Remaining length: at most four bytes, the fourth without continuation.
    let mut remaining = 0usize;
    let mut header_len = 1;
    loop {
        let Some(&b) = buf.get(header_len) else {
            return Ok(None);
        };
        remaining |= ((b & 0x7F) as usize) << (7 * (header_len - 1));
        header_len += 1;
        if b & 0x80 == 0 {
            break;
        }
        if header_len == 5 {
            return Err(DecodeError::MalformedPacket("remaining length longer than four bytes"));
        }
    }

    let size = header_len + remaining;
    if size > max_packet_size {
        return Err(DecodeError::PacketTooLarge { size, max: max_packet_size });
    }
    if buf.len() < size {
        return Ok(None);
    }
    buf.advance(header_len);
    let body = buf.split_to(remaining).freeze();
    decode_body(byte1, body, version).map(Some)
}

/// The packet type and its fixed-header flags, checked from the first byte
/// alone.
fn check_first_byte(byte1: u8, version: Version) -> Result<()> {
    let flags = byte1 & 0x0F;
    match byte1 >> 4 {
        0 => Err(DecodeError::MalformedPacket("reserved packet type 0")),
        kind::PUBLISH => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                Err(DecodeError::MalformedPacket("PUBLISH with QoS 3"))
            } else if qos == 0 && flags & 0b1000 != 0 {
                Err(DecodeError::MalformedPacket("PUBLISH with QoS 0 and DUP set"))
            } else {
                Ok(())
            }
        }
        kind::PUBREL | kind::SUBSCRIBE | kind::UNSUBSCRIBE => {
            if flags == 0b0010 {
                Ok(())
            } else {
                Err(DecodeError::MalformedPacket("reserved fixed header flags must be 0010"))
            }
        }
        kind::AUTH if version == Version::V311 => Err(DecodeError::MalformedPacket("reserved packet type 15")),
        _ => {
            if flags == 0 {
                Ok(())
            } else {
                Err(DecodeError::MalformedPacket("reserved fixed header flags must be 0000"))
            }
        }
    }
}

fn decode_body(byte1: u8, body: Bytes, version: Version) -> Result<Packet> {
    let mut r = Reader { data: &body, pos: 0, end: body.len() };
    let v5 = version == Version::V5;
    let packet = match byte1 >> 4 {
        kind::CONNECT => Packet::Connect(connect(&mut r)?),
        kind::CONNACK => Packet::ConnAck(connack(&mut r, v5)?),
        kind::PUBLISH => Packet::Publish(publish(&mut r, byte1, v5)?),
        kind::PUBACK => Packet::PubAck(puback(&mut r, v5, valid_puback_reason)?),
        kind::PUBREC => Packet::PubRec(puback(&mut r, v5, valid_puback_reason)?),
        kind::PUBREL => Packet::PubRel(puback(&mut r, v5, valid_pubrel_reason)?),
        kind::PUBCOMP => Packet::PubComp(puback(&mut r, v5, valid_pubrel_reason)?),
        kind::SUBSCRIBE => Packet::Subscribe(subscribe(&mut r, v5)?),
        kind::SUBACK => Packet::SubAck(suback(&mut r, v5)?),
        kind::UNSUBSCRIBE => Packet::Unsubscribe(unsubscribe(&mut r, v5)?),
        kind::UNSUBACK => Packet::UnsubAck(unsuback(&mut r, v5)?),
        kind::PINGREQ => Packet::PingReq,
        kind::PINGRESP => Packet::PingResp,
        kind::DISCONNECT => Packet::Disconnect(disconnect(&mut r, v5)?),
        kind::AUTH => Packet::Auth(auth(&mut r)?),
        _ => unreachable!("packet type checked in check_first_byte"),
    };
    r.finish()?;
    Ok(packet)
}

/// A cursor over a window `pos..end` of a packet body. Binary fields are
/// returned as zero-copy slices of the body.
struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    #[inline]
    fn remaining(&self) -> usize {
        self.end - self.pos
    }

    #[inline]
    fn is_empty(&self) -> bool {
        self.pos == self.end
    }

    fn finish(&self) -> Result<()> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(TRAILING)
        }
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(SHORT);
        }
        let data: &'a [u8] = self.data;
        let s = &data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    #[inline]
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    #[inline]
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    #[inline]
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A variable byte integer (at most four bytes).
    fn varint(&mut self) -> Result<usize> {
        let mut value = 0usize;
        for i in 0..4 {
            let b = self.u8()?;
            value |= ((b & 0x7F) as usize) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::MalformedPacket("variable byte integer longer than four bytes"))
    }

    /// A non-zero packet identifier.
    fn packet_id(&mut self) -> Result<u16> {
        match self.u16()? {
            0 => Err(PACKET_ID_ZERO),
            id => Ok(id),
        }
    }

    /// A UTF-8 string (two-byte length prefix), borrowed.
    fn str(&mut self) -> Result<&'a str> {
        let len = self.u16()? as usize;
        let raw = self.take(len)?;
        let s = std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8)?;
        if raw.contains(&0) {
            return Err(DecodeError::InvalidUtf8);
        }
        Ok(s)
    }

    fn string(&mut self) -> Result<String> {
        self.str().map(str::to_owned)
    }

    /// Binary data (two-byte length prefix), zero-copy.
    fn binary(&mut self) -> Result<Bytes> {
        let len = self.u16()? as usize;
        if self.remaining() < len {
            return Err(SHORT);
        }
        let b = self.data.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(b)
    }

    /// Everything up to the end of the window, zero-copy.
    fn rest(&mut self) -> Bytes {
        let b = self.data.slice(self.pos..self.end);
        self.pos = self.end;
        b
    }

    /// A byte that must be 0 or 1.
    fn flag_byte(&mut self) -> Result<u8> {
        match self.u8()? {
            b @ (0 | 1) => Ok(b),
            _ => Err(DecodeError::ProtocolError("property value must be 0 or 1")),
        }
    }

    fn user_property(&mut self) -> Result<UserProperty> {
        let k = self.string()?;
        let v = self.string()?;
        Ok((k, v))
    }

    /// Reads a property section (length + properties), calling `f` for each
    /// property with its identifier and a reader positioned at its value.
    /// `f` returns `Ok(false)` when the identifier is not allowed in this
    /// packet.
    fn properties(&mut self, mut f: impl FnMut(u8, &mut Reader<'a>) -> Result<bool>) -> Result<()> {
        let len = self.varint()?;
        if self.remaining() < len {
            return Err(DecodeError::MalformedPacket("property length beyond the packet"));
        }
        let mut p = Reader { data: self.data, pos: self.pos, end: self.pos + len };
        self.pos += len;
        while !p.is_empty() {
            let id = p.u8()?;
            if !f(id, &mut p)? {
                return Err(if prop::known(id) {
                    DecodeError::MalformedPacket("property not allowed in this packet")
                } else {
                    DecodeError::MalformedPacket("unknown property identifier")
                });
            }
        }
        Ok(())
    }
}

#[inline]
fn set<T>(slot: &mut Option<T>, value: T) -> Result<bool> {
    if slot.is_some() {
        return Err(DUPLICATE);
    }
    *slot = Some(value);
    Ok(true)
}

fn nonzero_u16(r: &mut Reader<'_>, what: &'static str) -> Result<u16> {
    match r.u16()? {
        0 => Err(DecodeError::ProtocolError(what)),
        v => Ok(v),
    }
}

fn nonzero_u32(r: &mut Reader<'_>, what: &'static str) -> Result<u32> {
    match r.u32()? {
        0 => Err(DecodeError::ProtocolError(what)),
        v => Ok(v),
    }
}

fn read_subscription_id(r: &mut Reader<'_>) -> Result<u32> {
    match r.varint()? {
        0 => Err(DecodeError::ProtocolError("subscription identifier 0")),
        v => {
            debug_assert!(v <= MAX_VARINT);
            Ok(v as u32)
        }
    }
}

/// Properties shared by PUBLISH and the will.
fn message_property(id: u8, r: &mut Reader<'_>, m: &mut MessageProperties) -> Result<bool> {
    match id {
        prop::PAYLOAD_FORMAT_INDICATOR => {
            let v = r.u8()?;
            if v > 1 {
                return Err(DecodeError::ProtocolError("payload format indicator over 1"));
            }
            set(&mut m.payload_format_indicator, v)
        }
        prop::MESSAGE_EXPIRY_INTERVAL => set(&mut m.message_expiry_interval, r.u32()?),
        prop::CONTENT_TYPE => set(&mut m.content_type, r.string()?),
        prop::RESPONSE_TOPIC => {
            let t = r.str()?;
            if !topic::valid_topic_name(t) {
                return Err(DecodeError::ProtocolError("response topic is not a valid topic name"));
            }
            set(&mut m.response_topic, t.to_owned())
        }
        prop::CORRELATION_DATA => set(&mut m.correlation_data, r.binary()?),
        prop::USER_PROPERTY => {
            m.user_properties.push(r.user_property()?);
            Ok(true)
        }
        _ => Ok(false),
    }
}

fn reason_properties(r: &mut Reader<'_>) -> Result<ReasonProperties> {
    let mut p = ReasonProperties::default();
    r.properties(|id, r| match id {
        prop::REASON_STRING => set(&mut p.reason_string, r.string()?),
        prop::USER_PROPERTY => {
            p.user_properties.push(r.user_property()?);
            Ok(true)
        }
        _ => Ok(false),
    })?;
    Ok(p)
}

fn connect(r: &mut Reader<'_>) -> Result<Connect> {
    let name = r.take(2).and_then(|l| r.take(u16::from_be_bytes([l[0], l[1]]) as usize))?;
    let level = r.u8()?;
    let version = match (name, level) {
        (b"MQTT", 4) => Version::V311,
        (b"MQTT", 5) => Version::V5,
        (b"MQTT", level) | (b"MQIsdp", level) => return Err(DecodeError::UnsupportedProtocolVersion(level)),
        _ => return Err(DecodeError::ProtocolError("invalid protocol name")),
    };
    let v5 = version == Version::V5;

    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::MalformedPacket("CONNECT reserved flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if will_qos == 3 {
        return Err(DecodeError::MalformedPacket("will QoS 3"));
    }
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::MalformedPacket("will QoS or retain set without the will flag"));
    }
    if !v5 && password_flag && !username_flag {
        return Err(DecodeError::MalformedPacket("password without user name"));
    }
    let keep_alive = r.u16()?;

    let mut properties = ConnectProperties::default();
    if v5 {
        let p = &mut properties;
        r.properties(|id, r| match id {
            prop::SESSION_EXPIRY_INTERVAL => set(&mut p.session_expiry_interval, r.u32()?),
            prop::RECEIVE_MAXIMUM => set(&mut p.receive_maximum, nonzero_u16(r, "receive maximum 0")?),
            prop::MAXIMUM_PACKET_SIZE => set(&mut p.maximum_packet_size, nonzero_u32(r, "maximum packet size 0")?),
            prop::TOPIC_ALIAS_MAXIMUM => set(&mut p.topic_alias_maximum, r.u16()?),
            prop::REQUEST_RESPONSE_INFORMATION => set(&mut p.request_response_information, r.flag_byte()?),
            prop::REQUEST_PROBLEM_INFORMATION => set(&mut p.request_problem_information, r.flag_byte()?),
            prop::USER_PROPERTY => {
                p.user_properties.push(r.user_property()?);
                Ok(true)
            }
            prop::AUTHENTICATION_METHOD => set(&mut p.authentication_method, r.string()?),
            prop::AUTHENTICATION_DATA => set(&mut p.authentication_data, r.binary()?),
            _ => Ok(false),
        })?;
        if properties.authentication_data.is_some() && properties.authentication_method.is_none() {
            return Err(DecodeError::ProtocolError("authentication data without authentication method"));
        }
    }

    let client_id = r.string()?;

    let will = if will_flag {
        let mut wp = WillProperties::default();
        if v5 {
            r.properties(|id, r| match id {
                prop::WILL_DELAY_INTERVAL => set(&mut wp.will_delay_interval, r.u32()?),
                _ => message_property(id, r, &mut wp.message),
            })?;
        }
        let topic = r.str()?;
        if !topic::valid_topic_name(topic) {
            return Err(DecodeError::TopicNameInvalid);
        }
        let topic = topic.to_owned();
        let payload = r.binary()?;
        Some(LastWill {
            topic,
            payload,
            qos: QoS::from_u8(will_qos).expect("checked above"),
            retain: will_retain,
            properties: wp,
        })
    } else {
        None
    };

    let username = if username_flag { Some(r.string()?) } else { None };
    let password = if password_flag { Some(r.binary()?) } else { None };

    Ok(Connect { version, client_id, clean_start, keep_alive, username, password, will, properties })
}

fn connack(r: &mut Reader<'_>, v5: bool) -> Result<ConnAck> {
    let flags = r.u8()?;
    if flags & 0xFE != 0 {
        return Err(DecodeError::MalformedPacket("CONNACK reserved flags set"));
    }
    let session_present = flags & 1 != 0;
    let code = r.u8()?;
    let code = if v5 { connect_reason_from(code) } else { connect_reason_from_v311(code) }.ok_or(BAD_REASON)?;
    if session_present && code != ConnectReason::Success {
        return Err(DecodeError::ProtocolError("session present with a failure code"));
    }
    let mut properties = ConnAckProperties::default();
    if v5 {
        let p = &mut properties;
        r.properties(|id, r| match id {
            prop::SESSION_EXPIRY_INTERVAL => set(&mut p.session_expiry_interval, r.u32()?),
            prop::RECEIVE_MAXIMUM => set(&mut p.receive_maximum, nonzero_u16(r, "receive maximum 0")?),
            prop::MAXIMUM_QOS => set(&mut p.maximum_qos, r.flag_byte()?),
            prop::RETAIN_AVAILABLE => set(&mut p.retain_available, r.flag_byte()?),
            prop::MAXIMUM_PACKET_SIZE => set(&mut p.maximum_packet_size, nonzero_u32(r, "maximum packet size 0")?),
            prop::ASSIGNED_CLIENT_IDENTIFIER => set(&mut p.assigned_client_identifier, r.string()?),
            prop::TOPIC_ALIAS_MAXIMUM => set(&mut p.topic_alias_maximum, r.u16()?),
            prop::REASON_STRING => set(&mut p.reason_string, r.string()?),
            prop::USER_PROPERTY => {
                p.user_properties.push(r.user_property()?);
                Ok(true)
            }
            prop::WILDCARD_SUBSCRIPTION_AVAILABLE => set(&mut p.wildcard_subscription_available, r.flag_byte()?),
            prop::SUBSCRIPTION_IDENTIFIER_AVAILABLE => set(&mut p.subscription_identifiers_available, r.flag_byte()?),
            prop::SHARED_SUBSCRIPTION_AVAILABLE => set(&mut p.shared_subscription_available, r.flag_byte()?),
            prop::SERVER_KEEP_ALIVE => set(&mut p.server_keep_alive, r.u16()?),
            prop::RESPONSE_INFORMATION => set(&mut p.response_information, r.string()?),
            prop::SERVER_REFERENCE => set(&mut p.server_reference, r.string()?),
            prop::AUTHENTICATION_METHOD => set(&mut p.authentication_method, r.string()?),
            prop::AUTHENTICATION_DATA => set(&mut p.authentication_data, r.binary()?),
            _ => Ok(false),
        })?;
    }
    Ok(ConnAck { session_present, code, properties })
}

fn publish(r: &mut Reader<'_>, byte1: u8, v5: bool) -> Result<Publish> {
    let dup = byte1 & 0b1000 != 0;
    let qos = QoS::from_u8((byte1 >> 1) & 0b11).expect("checked in check_first_byte");
    let retain = byte1 & 1 != 0;

    let topic = r.str()?;
    if topic.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(DecodeError::TopicNameInvalid);
    }
    let packet_id = if qos != QoS::AtMostOnce { Some(r.packet_id()?) } else { None };

    let mut properties = PublishProperties::default();
    if v5 {
        let p = &mut properties;
        r.properties(|id, r| match id {
            prop::TOPIC_ALIAS => match r.u16()? {
                0 => Err(DecodeError::TopicAliasInvalid),
                alias => set(&mut p.topic_alias, alias),
            },
            prop::SUBSCRIPTION_IDENTIFIER => {
                p.subscription_identifiers.push(read_subscription_id(r)?);
                Ok(true)
            }
            _ => message_property(id, r, &mut p.message),
        })?;
    }
    if topic.is_empty() {
        if !v5 {
            return Err(DecodeError::TopicNameInvalid);
        }
        if properties.topic_alias.is_none() {
            return Err(DecodeError::ProtocolError("empty topic name without a topic alias"));
        }
    }

    Ok(Publish { dup, qos, retain, topic: topic.to_owned(), packet_id, payload: r.rest(), properties })
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP.
fn puback(r: &mut Reader<'_>, v5: bool, valid: fn(u8) -> bool) -> Result<PubAck> {
    let packet_id = r.packet_id()?;
    if !v5 || r.is_empty() {
        return Ok(PubAck::new(packet_id));
    }
    let reason = r.u8()?;
    if !valid(reason) {
        return Err(BAD_REASON);
    }
    let properties = if r.is_empty() { ReasonProperties::default() } else { reason_properties(r)? };
    Ok(PubAck { packet_id, reason, properties })
}

/// A topic filter of SUBSCRIBE/UNSUBSCRIBE; in 5.0 `$share/` filters are
/// checked as shared subscriptions. Returns whether the filter is shared.
fn check_filter(filter: &str, v5: bool) -> Result<bool> {
    if v5 {
        match topic::parse_shared(filter) {
            Ok(Some(_)) => return Ok(true),
            Ok(None) => {}
            Err(_) => return Err(DecodeError::TopicFilterInvalid),
        }
    }
    if topic::valid_topic_filter(filter) {
        Ok(false)
    } else {
        Err(DecodeError::TopicFilterInvalid)
    }
}

fn subscribe(r: &mut Reader<'_>, v5: bool) -> Result<Subscribe> {
    let packet_id = r.packet_id()?;
    let mut subscription_identifier = None;
    let mut user_properties = Vec::new();
    if v5 {
        r.properties(|id, r| match id {
            prop::SUBSCRIPTION_IDENTIFIER => set(&mut subscription_identifier, read_subscription_id(r)?),
            prop::USER_PROPERTY => {
                user_properties.push(r.user_property()?);
                Ok(true)
            }
            _ => Ok(false),
        })?;
    }
    if r.is_empty() {
        return Err(DecodeError::ProtocolError("SUBSCRIBE without topic filters"));
    }
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.str()?;
        let shared = check_filter(filter, v5)?;
        let o = r.u8()?;
        let qos = o & 0b11;
        let options = if v5 {
            if o & 0xC0 != 0 {
                return Err(DecodeError::MalformedPacket("subscription options reserved bits set"));
            }
            if qos == 3 {
                return Err(DecodeError::ProtocolError("subscription with QoS 3"));
            }
            let retain_handling = (o >> 4) & 0b11;
            if retain_handling == 3 {
                return Err(DecodeError::ProtocolError("retain handling 3"));
            }
            let no_local = o & 0b100 != 0;
            if no_local && shared {
                return Err(DecodeError::ProtocolError("no local on a shared subscription"));
            }
            SubscriptionOptions {
                qos: QoS::from_u8(qos).expect("checked"),
                no_local,
                retain_as_published: o & 0b1000 != 0,
                retain_handling,
            }
        } else {
            if o & 0xFC != 0 || qos == 3 {
                return Err(DecodeError::MalformedPacket("requested QoS byte other than 0, 1 or 2"));
            }
            SubscriptionOptions::qos(QoS::from_u8(qos).expect("checked"))
        };
        filters.push(SubscribeFilter { filter: filter.to_owned(), options });
    }
    Ok(Subscribe { packet_id, filters, subscription_identifier, user_properties })
}

fn suback(r: &mut Reader<'_>, v5: bool) -> Result<SubAck> {
    let packet_id = r.packet_id()?;
    let properties = if v5 { reason_properties(r)? } else { ReasonProperties::default() };
    if r.is_empty() {
        return Err(DecodeError::ProtocolError("SUBACK without reason codes"));
    }
    let reasons = r.take(r.remaining())?.to_vec();
    let valid: fn(u8) -> bool = if v5 { valid_suback_reason } else { |c| matches!(c, 0 | 1 | 2 | 0x80) };
    if !reasons.iter().all(|&c| valid(c)) {
        return Err(BAD_REASON);
    }
    Ok(SubAck { packet_id, reasons, properties })
}

fn unsubscribe(r: &mut Reader<'_>, v5: bool) -> Result<Unsubscribe> {
    let packet_id = r.packet_id()?;
    let mut user_properties = Vec::new();
    if v5 {
        r.properties(|id, r| match id {
            prop::USER_PROPERTY => {
                user_properties.push(r.user_property()?);
                Ok(true)
            }
            _ => Ok(false),
        })?;
    }
    if r.is_empty() {
        return Err(DecodeError::ProtocolError("UNSUBSCRIBE without topic filters"));
    }
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.str()?;
        check_filter(filter, v5)?;
        filters.push(filter.to_owned());
    }
    Ok(Unsubscribe { packet_id, filters, user_properties })
}

fn unsuback(r: &mut Reader<'_>, v5: bool) -> Result<UnsubAck> {
    let packet_id = r.packet_id()?;
    if !v5 {
        return Ok(UnsubAck { packet_id, reasons: Vec::new(), properties: ReasonProperties::default() });
    }
    let properties = reason_properties(r)?;
    if r.is_empty() {
        return Err(DecodeError::ProtocolError("UNSUBACK without reason codes"));
    }
    let reasons = r.take(r.remaining())?.to_vec();
    if !reasons.iter().all(|&c| valid_unsuback_reason(c)) {
        return Err(BAD_REASON);
    }
    Ok(UnsubAck { packet_id, reasons, properties })
}

fn disconnect(r: &mut Reader<'_>, v5: bool) -> Result<Disconnect> {
    let mut d = Disconnect::new(DisconnectReason::NormalDisconnection);
    if !v5 || r.is_empty() {
        return Ok(d);
    }
    d.reason = disconnect_reason_from(r.u8()?).ok_or(BAD_REASON)?;
    if r.is_empty() {
        return Ok(d);
    }
    r.properties(|id, r| match id {
        prop::SESSION_EXPIRY_INTERVAL => set(&mut d.session_expiry_interval, r.u32()?),
        prop::REASON_STRING => set(&mut d.reason_string, r.string()?),
        prop::USER_PROPERTY => {
            d.user_properties.push(r.user_property()?);
            Ok(true)
        }
        prop::SERVER_REFERENCE => set(&mut d.server_reference, r.string()?),
        _ => Ok(false),
    })?;
    Ok(d)
}

fn auth(r: &mut Reader<'_>) -> Result<Auth> {
    let mut a = Auth {
        reason: 0,
        authentication_method: None,
        authentication_data: None,
        reason_string: None,
        user_properties: Vec::new(),
    };
    if r.is_empty() {
        return Ok(a);
    }
    a.reason = r.u8()?;
    if !valid_auth_reason(a.reason) {
        return Err(BAD_REASON);
    }
    if r.is_empty() {
        return Ok(a);
    }
    r.properties(|id, r| match id {
        prop::AUTHENTICATION_METHOD => set(&mut a.authentication_method, r.string()?),
        prop::AUTHENTICATION_DATA => set(&mut a.authentication_data, r.binary()?),
        prop::REASON_STRING => set(&mut a.reason_string, r.string()?),
        prop::USER_PROPERTY => {
            a.user_properties.push(r.user_property()?);
            Ok(true)
        }
        _ => Ok(false),
    })?;
    Ok(a)
}
