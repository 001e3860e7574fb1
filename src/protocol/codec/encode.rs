//! Encoding. One generic body writer serves both for counting
//! ([`encoded_len`]) and for writing, so the two cannot disagree.

use bytes::BytesMut;

use super::{connect_reason_v311, prop, varint_len, EncodeError, MAX_VARINT};
use crate::protocol::packet::*;

type Result<T> = std::result::Result<T, EncodeError>;

/// Appends `packet` in the wire form of `version` to `out` (a CONNECT in the
/// form of its own `version` field). For 3.1.1, properties and 5.0-only
/// fields are dropped and reason codes mapped to what 3.1.1 can express.
/// For 5.0 the shortest valid form is written. On error `out` is left as it
/// was.
pub fn encode(packet: &Packet, version: Version, out: &mut BytesMut) -> std::result::Result<(), EncodeError> {
    let start = out.len();
    let result = encode_inner(packet, version, out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn encode_inner(packet: &Packet, version: Version, out: &mut BytesMut) -> Result<()> {
    let mut counter = Counter(0);
    body(&mut counter, packet, version)?;
    let remaining = counter.0;
    if remaining > MAX_VARINT {
        return Err(EncodeError::PacketTooLarge(remaining));
    }
    out.reserve(1 + varint_len(remaining) + remaining);
    out.u8(first_byte(packet));
    out.varint(remaining)?;
    body(out, packet, version)
}

/// The exact number of bytes [`encode`] writes for `packet` (meaningless if
/// `encode` would fail).
pub fn encoded_len(packet: &Packet, version: Version) -> usize {
    let mut counter = Counter(0);
    let _ = body(&mut counter, packet, version);
    1 + varint_len(counter.0) + counter.0
}

fn first_byte(packet: &Packet) -> u8 {
    match packet {
        Packet::Connect(_) => 0x10,
        Packet::ConnAck(_) => 0x20,
        Packet::Publish(p) => {
            let qos = p.qos as u8;
            let dup = p.dup && qos > 0;
            0x30 | (dup as u8) << 3 | qos << 1 | p.retain as u8
        }
        Packet::PubAck(_) => 0x40,
        Packet::PubRec(_) => 0x50,
        Packet::PubRel(_) => 0x62,
        Packet::PubComp(_) => 0x70,
        Packet::Subscribe(_) => 0x82,
        Packet::SubAck(_) => 0x90,
        Packet::Unsubscribe(_) => 0xA2,
        Packet::UnsubAck(_) => 0xB0,
        Packet::PingReq => 0xC0,
        Packet::PingResp => 0xD0,
        Packet::Disconnect(_) => 0xE0,
        Packet::Auth(_) => 0xF0,
    }
}

/// Where bytes go: a counter or a buffer.
trait Sink {
    fn put(&mut self, bytes: &[u8]);

    #[inline]
    fn u8(&mut self, v: u8) {
        self.put(&[v]);
    }

    #[inline]
    fn u16(&mut self, v: u16) {
        self.put(&v.to_be_bytes());
    }

    #[inline]
    fn u32(&mut self, v: u32) {
        self.put(&v.to_be_bytes());
    }

    #[inline]
    fn varint(&mut self, mut v: usize) -> Result<()> {
        if v > MAX_VARINT {
            return Err(EncodeError::PacketTooLarge(v));
        }
        let mut buf = [0u8; 4];
        let mut n = 0;
        loop {
            let mut b = (v & 0x7F) as u8;
            v >>= 7;
            if v > 0 {
                b |= 0x80;
            }
            buf[n] = b;
            n += 1;
            if v == 0 {
                break;
            }
        }
        self.put(&buf[..n]);
        Ok(())
    }

    /// Binary data or a string: two-byte length, then the bytes.
    #[inline]
    fn bin(&mut self, b: &[u8]) -> Result<()> {
        if b.len() > u16::MAX as usize {
            return Err(EncodeError::FieldTooLong(b.len()));
        }
        self.u16(b.len() as u16);
        self.put(b);
        Ok(())
    }

    #[inline]
    fn str(&mut self, s: &str) -> Result<()> {
        self.bin(s.as_bytes())
    }
}

struct Counter(usize);

impl Sink for Counter {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
}

impl Sink for BytesMut {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// A property list (without its length prefix).
trait Props {
    fn write<S: Sink>(&self, s: &mut S) -> Result<()>;

    fn len(&self) -> Result<usize> {
        let mut c = Counter(0);
        self.write(&mut c)?;
        Ok(c.0)
    }
}

/// A property section: length, then the properties.
fn section<S: Sink, P: Props>(s: &mut S, p: &P) -> Result<()> {
    s.varint(p.len()?)?;
    p.write(s)
}

fn p_u8<S: Sink>(s: &mut S, id: u8, v: Option<u8>) {
    if let Some(v) = v {
        s.u8(id);
        s.u8(v);
    }
}

fn p_u16<S: Sink>(s: &mut S, id: u8, v: Option<u16>) {
    if let Some(v) = v {
        s.u8(id);
        s.u16(v);
    }
}

fn p_u32<S: Sink>(s: &mut S, id: u8, v: Option<u32>) {
    if let Some(v) = v {
        s.u8(id);
        s.u32(v);
    }
}

fn p_str<S: Sink>(s: &mut S, id: u8, v: &Option<String>) -> Result<()> {
    if let Some(v) = v {
        s.u8(id);
        s.str(v)?;
    }
    Ok(())
}

fn p_bin<S: Sink>(s: &mut S, id: u8, v: &Option<bytes::Bytes>) -> Result<()> {
    if let Some(v) = v {
        s.u8(id);
        s.bin(v)?;
    }
    Ok(())
}

fn p_user<S: Sink>(s: &mut S, props: &[UserProperty]) -> Result<()> {
    for (k, v) in props {
        s.u8(prop::USER_PROPERTY);
        s.str(k)?;
        s.str(v)?;
    }
    Ok(())
}

fn p_subscription_id<S: Sink>(s: &mut S, id: u32) -> Result<()> {
    if id == 0 {
        return Err(EncodeError::InvalidValue("subscription identifier 0"));
    }
    s.u8(prop::SUBSCRIPTION_IDENTIFIER);
    s.varint(id as usize)
}

impl Props for ConnectProperties {
    fn write<S: Sink>(&self, s: &mut S) -> Result<()> {
        p_u32(s, prop::SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        p_u16(s, prop::RECEIVE_MAXIMUM, self.receive_maximum);
        p_u32(s, prop::MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        p_u16(s, prop::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        p_u8(s, prop::REQUEST_RESPONSE_INFORMATION, self.request_response_information);
        p_u8(s, prop::REQUEST_PROBLEM_INFORMATION, self.request_problem_information);
        p_str(s, prop::AUTHENTICATION_METHOD, &self.authentication_method)?;
        p_bin(s, prop::AUTHENTICATION_DATA, &self.authentication_data)?;
        p_user(s, &self.user_properties)
    }
}

impl Props for MessageProperties {
    fn write<S: Sink>(&self, s: &mut S) -> Result<()> {
        p_u8(s, prop::PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        p_u32(s, prop::MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        p_str(s, prop::CONTENT_TYPE, &self.content_type)?;
        p_str(s, prop::RESPONSE_TOPIC, &self.response_topic)?;
        p_bin(s, prop::CORRELATION_DATA, &self.correlation_data)?;
        p_user(s, &self.user_properties)
    }
}

impl Props for WillProperties {
    fn write<S: Sink>(&self, s: &mut S) -> Result<()> {
        p_u32(s, prop::WILL_DELAY_INTERVAL, self.will_delay_interval);
        self.message.write(s)
    }
}

impl Props for ConnAckProperties {
    fn write<S: Sink>(&self, s: &mut S) -> Result<()> {
        p_u32(s, prop::SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        p_u16(s, prop::RECEIVE_MAXIMUM, self.receive_maximum);
        p_u8(s, prop::MAXIMUM_QOS, self.maximum_qos);
        p_u8(s, prop::RETAIN_AVAILABLE, self.retain_available);
        p_u32(s, prop::MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        p_str(s, prop::ASSIGNED_CLIENT_IDENTIFIER, &self.assigned_client_identifier)?;
        p_u16(s, prop::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        p_str(s, prop::REASON_STRING, &self.reason_string)?;
        p_u8(s, prop::WILDCARD_SUBSCRIPTION_AVAILABLE, self.wildcard_subscription_available);
        p_u8(s, prop::SUBSCRIPTION_IDENTIFIER_AVAILABLE, self.subscription_identifiers_available);
        p_u8(s, prop::SHARED_SUBSCRIPTION_AVAILABLE, self.shared_subscription_available);
        p_u16(s, prop::SERVER_KEEP_ALIVE, self.server_keep_alive);
        p_str(s, prop::RESPONSE_INFORMATION, &self.response_information)?;
        p_str(s, prop::SERVER_REFERENCE, &self.server_reference)?;
        p_str(s, prop::AUTHENTICATION_METHOD, &self.authentication_method)?;
        p_bin(s, prop::AUTHENTICATION_DATA, &self.authentication_data)?;
        p_user(s, &self.user_properties)
    }
}

impl Props for PublishProperties {
    fn write<S: Sink>(&self, s: &mut S) -> Result<()> {
        let m = &self.message;
        p_u8(s, prop::PAYLOAD_FORMAT_INDICATOR, m.payload_format_indicator);
        p_u32(s, prop::MESSAGE_EXPIRY_INTERVAL, m.message_expiry_interval);
        p_u16(s, prop::TOPIC_ALIAS, self.topic_alias);
        p_str(s, prop::RESPONSE_TOPIC, &m.response_topic)?;
        p_bin(s, prop::CORRELATION_DATA, &m.correlation_data)?;
        p_user(s, &m.user_properties)?;
        for &id in &self.subscription_identifiers {
            p_subscription_id(s, id)?;
        }
        p_str(s, prop::CONTENT_TYPE, &m.content_type)
    }
}

impl Props for ReasonProperties {
    fn write<S: Sink>(&self, s: &mut S) -> Result<()> {
        p_str(s, prop::REASON_STRING, &self.reason_string)?;
        p_user(s, &self.user_properties)
    }
}

struct SubscribeProps<'a>(&'a Subscribe);

impl Props for SubscribeProps<'_> {
    fn write<S: Sink>(&self, s: &mut S) -> Result<()> {
        if let Some(id) = self.0.subscription_identifier {
            p_subscription_id(s, id)?;
        }
        p_user(s, &self.0.user_properties)
    }
}

struct UserProps<'a>(&'a [UserProperty]);

impl Props for UserProps<'_> {
    fn write<S: Sink>(&self, s: &mut S) -> Result<()> {
        p_user(s, self.0)
    }
}

impl Props for Disconnect {
    fn write<S: Sink>(&self, s: &mut S) -> Result<()> {
        p_u32(s, prop::SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        p_str(s, prop::REASON_STRING, &self.reason_string)?;
        p_str(s, prop::SERVER_REFERENCE, &self.server_reference)?;
        p_user(s, &self.user_properties)
    }
}

impl Props for Auth {
    fn write<S: Sink>(&self, s: &mut S) -> Result<()> {
        p_str(s, prop::AUTHENTICATION_METHOD, &self.authentication_method)?;
        p_bin(s, prop::AUTHENTICATION_DATA, &self.authentication_data)?;
        p_str(s, prop::REASON_STRING, &self.reason_string)?;
        p_user(s, &self.user_properties)
    }
}

/// Everything after the fixed header.
fn body<S: Sink>(s: &mut S, packet: &Packet, version: Version) -> Result<()> {
    let v5 = version == Version::V5;
    match packet {
        Packet::Connect(c) => connect(s, c),
        Packet::ConnAck(c) => {
            s.u8((c.session_present && c.code == ConnectReason::Success) as u8);
            if v5 {
                s.u8(c.code as u8);
                section(s, &c.properties)
            } else {
                s.u8(connect_reason_v311(c.code));
                Ok(())
            }
        }
        Packet::Publish(p) => {
            s.str(&p.topic)?;
            if p.qos != QoS::AtMostOnce {
                s.u16(p.packet_id.ok_or(EncodeError::MissingPacketId)?);
            }
            if v5 {
                section(s, &p.properties)?;
            }
            s.put(&p.payload);
            Ok(())
        }
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            s.u16(a.packet_id);
            if v5 {
                // Shortest form: remaining length 2 (success, no properties),
                // 3 (no properties), or the full form.
                let plen = a.properties.len()?;
                if a.reason != 0 || plen != 0 {
                    s.u8(a.reason);
                    if plen != 0 {
                        s.varint(plen)?;
                        a.properties.write(s)?;
                    }
                }
            }
            Ok(())
        }
        Packet::Subscribe(sub) => {
            s.u16(sub.packet_id);
            if v5 {
                section(s, &SubscribeProps(sub))?;
            }
            for f in &sub.filters {
                s.str(&f.filter)?;
                let o = &f.options;
                if v5 {
                    if o.retain_handling > 2 {
                        return Err(EncodeError::InvalidValue("retain handling over 2"));
                    }
                    s.u8(o.qos as u8
                        | (o.no_local as u8) << 2
                        | (o.retain_as_published as u8) << 3
                        | o.retain_handling << 4);
                } else {
                    s.u8(o.qos as u8);
                }
            }
            Ok(())
        }
        Packet::SubAck(a) => {
            s.u16(a.packet_id);
            if v5 {
                section(s, &a.properties)?;
                s.put(&a.reasons);
            } else {
                for &r in &a.reasons {
                    s.u8(if r <= 2 { r } else { 0x80 });
                }
            }
            Ok(())
        }
        Packet::Unsubscribe(u) => {
            s.u16(u.packet_id);
            if v5 {
                section(s, &UserProps(&u.user_properties))?;
            }
            for f in &u.filters {
                s.str(f)?;
            }
            Ok(())
        }
        Packet::UnsubAck(a) => {
            s.u16(a.packet_id);
            if v5 {
                section(s, &a.properties)?;
                s.put(&a.reasons);
            }
            Ok(())
        }
        Packet::PingReq | Packet::PingResp => Ok(()),
        Packet::Disconnect(d) => {
            if v5 {
                // Remaining length 0 (normal, no properties), 1 (reason
                // only) or the full form.
                let plen = d.len()?;
                if d.reason != DisconnectReason::NormalDisconnection || plen != 0 {
                    s.u8(d.reason as u8);
                    if plen != 0 {
                        s.varint(plen)?;
                        d.write(s)?;
                    }
                }
            }
            Ok(())
        }
        Packet::Auth(a) => {
            if !v5 {
                return Err(EncodeError::UnsupportedInVersion("AUTH"));
            }
            // Remaining length 0 (success, no properties) or the full form.
            let plen = a.len()?;
            if a.reason != 0 || plen != 0 {
                s.u8(a.reason);
                s.varint(plen)?;
                a.write(s)?;
            }
            Ok(())
        }
    }
}

fn connect<S: Sink>(s: &mut S, c: &Connect) -> Result<()> {
    let v5 = c.version == Version::V5;
    if !v5 && c.password.is_some() && c.username.is_none() {
        return Err(EncodeError::UnsupportedInVersion("password without user name in 3.1.1"));
    }
    s.str("MQTT")?;
    s.u8(if v5 { 5 } else { 4 });
    let mut flags = (c.clean_start as u8) << 1;
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos as u8) << 3 | (w.retain as u8) << 5;
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    s.u8(flags);
    s.u16(c.keep_alive);
    if v5 {
        section(s, &c.properties)?;
    }
    s.str(&c.client_id)?;
    if let Some(w) = &c.will {
        if v5 {
            section(s, &w.properties)?;
        }
        s.str(&w.topic)?;
        s.bin(&w.payload)?;
    }
    if let Some(u) = &c.username {
        s.str(u)?;
    }
    if let Some(p) = &c.password {
        s.bin(p)?;
    }
    Ok(())
}
