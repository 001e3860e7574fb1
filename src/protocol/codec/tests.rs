//! Unit tests: spec byte vectors, round trips, every validation rule,
//! incremental decoding.

use bytes::{Bytes, BytesMut};

use super::*;
use crate::protocol::packet::*;

use DecodeError::*;
use Version::{V311, V5};

pub(super) fn enc(p: &Packet, v: Version) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(p, v, &mut out).unwrap_or_else(|e| panic!("encode {p:?}: {e}"));
    assert_eq!(out.len(), encoded_len(p, v), "encoded_len disagrees for {p:?}");
    out.to_vec()
}

/// Decodes exactly one packet that must use all of `bytes`.
pub(super) fn dec(bytes: &[u8], v: Version) -> Result<Packet, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    match decode(&mut buf, v, MAX_PACKET_SIZE)? {
        Some(p) => {
            assert!(buf.is_empty(), "{} bytes left after {p:?}", buf.len());
            Ok(p)
        }
        None => panic!("incomplete: {bytes:02X?}"),
    }
}

fn err(bytes: &[u8], v: Version) -> DecodeError {
    match dec(bytes, v) {
        Ok(p) => panic!("decoded {p:?} from {bytes:02X?}"),
        Err(e) => e,
    }
}

/// What a packet looks like after an encode/decode round trip: 3.1.1 loses
/// properties and 5.0-only reason codes; both versions drop DUP and the
/// packet id of QoS 0 and the session-present flag of a failed CONNACK.
pub(super) fn normalize(p: &Packet, v: Version) -> Packet {
    let mut p = p.clone();
    match &mut p {
        Packet::Publish(p) if p.qos == QoS::AtMostOnce => {
            p.dup = false;
            p.packet_id = None;
        }
        Packet::ConnAck(c) => c.session_present &= c.code == ConnectReason::Success,
        _ => {}
    }
    if v == V5 {
        return p;
    }
    match &mut p {
        Packet::Connect(c) => {
            c.version = V311;
            c.properties = Default::default();
            if let Some(w) = &mut c.will {
                w.properties = Default::default();
            }
        }
        Packet::ConnAck(c) => {
            c.properties = Default::default();
            c.code = connect_reason_from_v311(connect_reason_v311(c.code)).unwrap();
            c.session_present &= c.code == ConnectReason::Success;
        }
        Packet::Publish(p) => p.properties = Default::default(),
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => *a = PubAck::new(a.packet_id),
        Packet::Subscribe(s) => {
            s.subscription_identifier = None;
            s.user_properties.clear();
            for f in &mut s.filters {
                f.options = SubscriptionOptions::qos(f.options.qos);
            }
        }
        Packet::SubAck(a) => {
            a.properties = Default::default();
            for r in &mut a.reasons {
                if *r > 2 {
                    *r = 0x80;
                }
            }
        }
        Packet::Unsubscribe(u) => u.user_properties.clear(),
        Packet::UnsubAck(a) => {
            a.reasons.clear();
            a.properties = Default::default();
        }
        Packet::Disconnect(d) => *d = Disconnect::new(DisconnectReason::NormalDisconnection),
        Packet::PingReq | Packet::PingResp | Packet::Auth(_) => {}
    }
    p
}

fn up() -> Vec<UserProperty> {
    vec![("k".into(), "v".into()), ("k".into(), "v2".into()), ("ü".into(), String::new())]
}

fn full_message_props() -> MessageProperties {
    MessageProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        content_type: Some("text/plain".into()),
        response_topic: Some("reply/to".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        user_properties: up(),
    }
}

fn reason_props() -> ReasonProperties {
    ReasonProperties { reason_string: Some("because".into()), user_properties: up() }
}

/// Every packet type, with full property sets (`full`) or none.
pub(super) fn samples(full: bool) -> Vec<Packet> {
    let rp = if full { reason_props() } else { ReasonProperties::default() };
    let connect = Connect {
        version: V5,
        client_id: "client-1".into(),
        clean_start: true,
        keep_alive: 30,
        username: Some("user".into()),
        password: Some(Bytes::from_static(b"pw\x00\xff")),
        will: Some(LastWill {
            topic: "will/topic".into(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: if full {
                WillProperties { will_delay_interval: Some(5), message: full_message_props() }
            } else {
                WillProperties::default()
            },
        }),
        properties: if full {
            ConnectProperties {
                session_expiry_interval: Some(0xFFFF_FFFF),
                receive_maximum: Some(100),
                maximum_packet_size: Some(1 << 20),
                topic_alias_maximum: Some(10),
                request_response_information: Some(1),
                request_problem_information: Some(0),
                user_properties: up(),
                authentication_method: Some("SCRAM".into()),
                authentication_data: Some(Bytes::from_static(b"data")),
            }
        } else {
            ConnectProperties::default()
        },
    };
    let mut bare_connect = connect.clone();
    bare_connect.will = None;
    bare_connect.username = None;
    bare_connect.password = None;
    bare_connect.client_id = String::new();
    bare_connect.clean_start = false;

    let connack = ConnAck {
        session_present: true,
        code: ConnectReason::Success,
        properties: if full {
            ConnAckProperties {
                session_expiry_interval: Some(60),
                receive_maximum: Some(20),
                maximum_qos: Some(1),
                retain_available: Some(0),
                maximum_packet_size: Some(65536),
                assigned_client_identifier: Some("auto-1".into()),
                topic_alias_maximum: Some(5),
                reason_string: Some("ok".into()),
                user_properties: up(),
                wildcard_subscription_available: Some(1),
                subscription_identifiers_available: Some(1),
                shared_subscription_available: Some(0),
                server_keep_alive: Some(120),
                response_information: Some("resp".into()),
                server_reference: Some("other:1883".into()),
                authentication_method: Some("SCRAM".into()),
                authentication_data: Some(Bytes::from_static(b"srv")),
            }
        } else {
            ConnAckProperties::default()
        },
    };
    let publish = |qos, packet_id| Publish {
        dup: qos != QoS::AtMostOnce,
        qos,
        retain: true,
        topic: "a/b/c".into(),
        packet_id,
        payload: Bytes::from(vec![7u8; 300]),
        properties: if full {
            PublishProperties {
                message: full_message_props(),
                topic_alias: Some(3),
                subscription_identifiers: vec![1, 268_435_455, 128],
            }
        } else {
            PublishProperties::default()
        },
    };
    let subscribe = Subscribe {
        packet_id: 10,
        filters: vec![
            SubscribeFilter { filter: "a/+/b".into(), options: SubscriptionOptions::qos(QoS::AtLeastOnce) },
            SubscribeFilter {
                filter: "#".into(),
                options: SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: full,
                    retain_as_published: full,
                    retain_handling: if full { 2 } else { 0 },
                },
            },
            SubscribeFilter { filter: "$share/g/x/#".into(), options: SubscriptionOptions::qos(QoS::AtMostOnce) },
        ],
        subscription_identifier: if full { Some(77) } else { None },
        user_properties: if full { up() } else { vec![] },
    };
    let disconnect = if full {
        Disconnect {
            reason: DisconnectReason::ServerMoved,
            session_expiry_interval: Some(0),
            reason_string: Some("moved".into()),
            user_properties: up(),
            server_reference: Some("b:1883".into()),
        }
    } else {
        Disconnect::new(DisconnectReason::NormalDisconnection)
    };
    let auth = if full {
        Auth {
            reason: 0x18,
            authentication_method: Some("SCRAM".into()),
            authentication_data: Some(Bytes::from_static(b"c1")),
            reason_string: Some("more".into()),
            user_properties: up(),
        }
    } else {
        Auth {
            reason: 0,
            authentication_method: None,
            authentication_data: None,
            reason_string: None,
            user_properties: vec![],
        }
    };
    let ack = |id, reason| PubAck { packet_id: id, reason, properties: rp.clone() };
    vec![
        Packet::Connect(connect),
        Packet::Connect(bare_connect),
        Packet::ConnAck(connack),
        Packet::ConnAck(ConnAck {
            session_present: false,
            code: ConnectReason::NotAuthorized,
            properties: ConnAckProperties::default(),
        }),
        Packet::Publish(publish(QoS::AtMostOnce, None)),
        Packet::Publish(publish(QoS::AtLeastOnce, Some(1))),
        Packet::Publish(publish(QoS::ExactlyOnce, Some(65535))),
        Packet::PubAck(ack(1, if full { 0x10 } else { 0 })),
        Packet::PubRec(ack(2, if full { 0x80 } else { 0 })),
        Packet::PubRel(ack(3, if full { 0x92 } else { 0 })),
        Packet::PubComp(ack(4, 0)),
        Packet::Subscribe(subscribe),
        Packet::SubAck(SubAck { packet_id: 10, reasons: vec![1, 2, 0, 0x80, 0x87], properties: rp.clone() }),
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 11,
            filters: vec!["a/+/b".into(), "#".into()],
            user_properties: if full { up() } else { vec![] },
        }),
        Packet::UnsubAck(UnsubAck { packet_id: 11, reasons: vec![0, 0x11], properties: rp }),
        Packet::PingReq,
        Packet::PingResp,
        Packet::Disconnect(disconnect),
        Packet::Auth(auth),
    ]
}

#[test]
fn round_trip_every_packet_both_versions() {
    for full in [false, true] {
        for p in samples(full) {
            let got = dec(&enc(&p, V5), V5).unwrap();
            assert_eq!(got, normalize(&p, V5), "v5 round trip (full={full})");
            if matches!(p, Packet::Auth(_)) {
                continue;
            }
            let mut p311 = p.clone();
            if let Packet::Connect(c) = &mut p311 {
                c.version = V311;
            }
            let got = dec(&enc(&p311, V311), V311).unwrap();
            assert_eq!(got, normalize(&p311, V311), "3.1.1 round trip (full={full})");
        }
    }
}

#[test]
fn spec_bytes_connect_v311() {
    let c = Connect {
        version: V311,
        client_id: "abc".into(),
        clean_start: true,
        keep_alive: 60,
        username: None,
        password: None,
        will: None,
        properties: Default::default(),
    };
    let bytes = [0x10, 0x0F, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 3, b'a', b'b', b'c'];
    assert_eq!(enc(&Packet::Connect(c.clone()), V311), bytes);
    // CONNECT is read by its own protocol level whatever the connection says.
    assert_eq!(dec(&bytes, V5).unwrap(), Packet::Connect(c.clone()));
    assert_eq!(dec(&bytes, V311).unwrap(), Packet::Connect(c));
}

#[test]
fn spec_bytes_connect_v5_with_properties() {
    let bytes = [
        0x10, 0x17, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 10, // header, flags, keep alive
        8, 0x11, 0, 0, 0, 120, 0x21, 0, 20, // properties: session expiry 120, receive max 20
        0, 2, b'c', b'1', // client id
    ];
    let c = Connect {
        version: V5,
        client_id: "c1".into(),
        clean_start: true,
        keep_alive: 10,
        username: None,
        password: None,
        will: None,
        properties: ConnectProperties {
            session_expiry_interval: Some(120),
            receive_maximum: Some(20),
            ..Default::default()
        },
    };
    assert_eq!(dec(&bytes, V311).unwrap(), Packet::Connect(c.clone()));
    assert_eq!(enc(&Packet::Connect(c), V311), bytes);
}

#[test]
fn spec_bytes_publish_qos1() {
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "a/b".into(),
        packet_id: Some(10),
        payload: Bytes::from_static(b"hi"),
        properties: Default::default(),
    });
    let v311 = [0x32, 0x09, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i'];
    let v5 = [0x32, 0x0A, 0, 3, b'a', b'/', b'b', 0, 10, 0, b'h', b'i'];
    assert_eq!(enc(&p, V311), v311);
    assert_eq!(enc(&p, V5), v5);
    assert_eq!(dec(&v311, V311).unwrap(), p);
    assert_eq!(dec(&v5, V5).unwrap(), p);
    // With DUP and retain: 0x3B.
    let Packet::Publish(mut q) = p else { unreachable!() };
    q.dup = true;
    q.retain = true;
    assert_eq!(enc(&Packet::Publish(q), V311)[0], 0x3B);
}

#[test]
fn spec_bytes_suback() {
    let p = Packet::SubAck(SubAck { packet_id: 1, reasons: vec![0, 1, 0x87], properties: Default::default() });
    assert_eq!(enc(&p, V311), [0x90, 0x05, 0, 1, 0, 1, 0x80]);
    assert_eq!(enc(&p, V5), [0x90, 0x06, 0, 1, 0, 0, 1, 0x87]);
    assert_eq!(dec(&[0x90, 0x06, 0, 1, 0, 0, 1, 0x87], V5).unwrap(), p);
}

#[test]
fn spec_bytes_short_forms() {
    let normal = Packet::Disconnect(Disconnect::new(DisconnectReason::NormalDisconnection));
    assert_eq!(enc(&normal, V5), [0xE0, 0x00]);
    assert_eq!(enc(&normal, V311), [0xE0, 0x00]);
    assert_eq!(dec(&[0xE0, 0x00], V5).unwrap(), normal);
    assert_eq!(dec(&[0xE0, 0x00], V311).unwrap(), normal);
    let taken = Packet::Disconnect(Disconnect::new(DisconnectReason::SessionTakenOver));
    assert_eq!(enc(&taken, V5), [0xE0, 0x01, 0x8E]);
    assert_eq!(enc(&taken, V311), [0xE0, 0x00]);
    assert_eq!(dec(&[0xE0, 0x01, 0x8E], V5).unwrap(), taken);
    // Reason code plus an empty property section is valid too.
    assert_eq!(dec(&[0xE0, 0x02, 0x8E, 0x00], V5).unwrap(), taken);

    let ack = Packet::PubAck(PubAck::new(5));
    assert_eq!(enc(&ack, V5), [0x40, 0x02, 0, 5]);
    assert_eq!(enc(&ack, V311), [0x40, 0x02, 0, 5]);
    let no_subs = Packet::PubAck(PubAck::with_reason(5, 0x10));
    assert_eq!(enc(&no_subs, V5), [0x40, 0x03, 0, 5, 0x10]);
    assert_eq!(enc(&no_subs, V311), [0x40, 0x02, 0, 5]);
    assert_eq!(dec(&[0x40, 0x03, 0, 5, 0x10], V5).unwrap(), no_subs);
    assert_eq!(dec(&[0x40, 0x04, 0, 5, 0x10, 0], V5).unwrap(), no_subs);
    assert_eq!(dec(&[0x40, 0x04, 0, 5, 0x00, 0], V5).unwrap(), ack);
    for (ty, byte1) in [(5u8, 0x50u8), (6, 0x62), (7, 0x70)] {
        let got = dec(&[byte1, 0x02, 0, 9], V5).unwrap();
        let want = PubAck::new(9);
        let want = match ty {
            5 => Packet::PubRec(want),
            6 => Packet::PubRel(want),
            _ => Packet::PubComp(want),
        };
        assert_eq!(got, want);
        assert_eq!(enc(&want, V5), [byte1, 0x02, 0, 9]);
    }
    let rel = Packet::PubRel(PubAck::with_reason(9, 0x92));
    assert_eq!(enc(&rel, V5), [0x62, 0x03, 0, 9, 0x92]);

    let auth = dec(&[0xF0, 0x00], V5).unwrap();
    assert_eq!(
        auth,
        Packet::Auth(Auth {
            reason: 0,
            authentication_method: None,
            authentication_data: None,
            reason_string: None,
            user_properties: vec![]
        })
    );
    assert_eq!(enc(&auth, V5), [0xF0, 0x00]);
    assert_eq!(enc(&Packet::PingReq, V5), [0xC0, 0x00]);
    assert_eq!(enc(&Packet::PingResp, V311), [0xD0, 0x00]);
}

#[test]
fn v311_mappings() {
    let codes = [
        (ConnectReason::Success, 0),
        (ConnectReason::UnsupportedProtocolVersion, 1),
        (ConnectReason::ClientIdentifierNotValid, 2),
        (ConnectReason::ServerUnavailable, 3),
        (ConnectReason::ServerBusy, 3),
        (ConnectReason::BadUserNameOrPassword, 4),
        (ConnectReason::NotAuthorized, 5),
        (ConnectReason::Banned, 3),
        (ConnectReason::QuotaExceeded, 3),
    ];
    for (code, rc) in codes {
        let p = Packet::ConnAck(ConnAck { session_present: true, code, properties: Default::default() });
        let sp = (code == ConnectReason::Success) as u8;
        assert_eq!(enc(&p, V311), [0x20, 0x02, sp, rc], "{code:?}");
    }
    let p = Packet::ConnAck(ConnAck {
        session_present: false,
        code: ConnectReason::Banned,
        properties: ConnAckProperties { reason_string: Some("x".into()), ..Default::default() },
    });
    assert_eq!(enc(&p, V5), [0x20, 0x07, 0x00, 0x8A, 4, 0x1F, 0, 1, b'x']);
    let unsuback = Packet::UnsubAck(UnsubAck { packet_id: 3, reasons: vec![0, 0x11], properties: reason_props() });
    assert_eq!(enc(&unsuback, V311), [0xB0, 0x02, 0, 3]);
    let ack = Packet::PubRec(PubAck { packet_id: 3, reason: 0x80, properties: reason_props() });
    assert_eq!(enc(&ack, V311), [0x50, 0x02, 0, 3]);
}

#[test]
fn encode_errors_leave_buffer_untouched() {
    let mut out = BytesMut::from(&b"xy"[..]);
    let long = "x".repeat(65_536);
    let p = Packet::Unsubscribe(Unsubscribe { packet_id: 1, filters: vec![long], user_properties: vec![] });
    assert_eq!(encode(&p, V5, &mut out), Err(EncodeError::FieldTooLong(65_536)));
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "t".into(),
        packet_id: None,
        payload: Bytes::new(),
        properties: Default::default(),
    });
    assert_eq!(encode(&p, V311, &mut out), Err(EncodeError::MissingPacketId));
    let auth = samples(true).pop().unwrap();
    assert!(matches!(auth, Packet::Auth(_)));
    assert_eq!(encode(&auth, V311, &mut out), Err(EncodeError::UnsupportedInVersion("AUTH")));
    let mut c = match samples(false).remove(0) {
        Packet::Connect(c) => c,
        _ => unreachable!(),
    };
    c.version = V311;
    c.username = None;
    assert!(matches!(encode(&Packet::Connect(c), V311, &mut out), Err(EncodeError::UnsupportedInVersion(_))));
    let mut p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "t".into(),
        packet_id: None,
        payload: Bytes::new(),
        properties: PublishProperties { subscription_identifiers: vec![0], ..Default::default() },
    });
    assert!(matches!(encode(&p, V5, &mut out), Err(EncodeError::InvalidValue(_))));
    // Over the protocol maximum (calloc'd, never touched).
    if let Packet::Publish(p) = &mut p {
        p.properties = Default::default();
        p.payload = Bytes::from(vec![0u8; 268_435_455]);
    }
    assert_eq!(encoded_len(&p, V311), 268_435_455 + 5 + 3);
    assert_eq!(encode(&p, V311, &mut out), Err(EncodeError::PacketTooLarge(268_435_455 + 3)));
    assert_eq!(&out[..], b"xy");
}

#[test]
fn encoded_len_at_varint_boundaries() {
    for n in [0usize, 1, 120, 121, 122, 123, 16_380, 16_381, 16_382, 16_383, 2_097_148, 2_097_149, 2_097_150] {
        let p = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "t".into(),
            packet_id: None,
            payload: Bytes::from(vec![1u8; n]),
            properties: Default::default(),
        });
        for v in [V311, V5] {
            let bytes = enc(&p, v);
            assert_eq!(dec(&bytes, v).unwrap(), p);
        }
    }
}

// ---- validation: one failing input per rule ----

fn connect_bytes(level: u8, flags: u8, props: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 10];
    if level == 5 {
        body.push(props.len() as u8);
        body.extend_from_slice(props);
    }
    body.extend_from_slice(&[0, 1, b'c']);
    body.extend_from_slice(rest);
    with_header(0x10, &body)
}

fn with_header(byte1: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut v = vec![byte1, body.len() as u8];
    v.extend_from_slice(body);
    v
}

/// A V5 PUBLISH QoS 0 to topic `t` with the given properties.
fn publish_v5(topic: &[u8], props: &[u8]) -> Vec<u8> {
    let mut body = vec![0, topic.len() as u8];
    body.extend_from_slice(topic);
    body.push(props.len() as u8);
    body.extend_from_slice(props);
    body.extend_from_slice(b"payload");
    with_header(0x30, &body)
}

#[test]
fn reject_reserved_fixed_header_flags() {
    for v in [V311, V5] {
        // The first byte alone is enough.
        for byte1 in [0x80u8, 0x83, 0xA0, 0xA3, 0x60, 0x63, 0x11, 0x21, 0x41, 0x51, 0x72, 0x91, 0xB1, 0xC1, 0xD8, 0xE1]
        {
            let mut buf = BytesMut::from(&[byte1][..]);
            assert!(matches!(decode(&mut buf, v, MAX_PACKET_SIZE), Err(MalformedPacket(_))), "{byte1:02X}");
        }
        assert!(matches!(err(&[0x00, 0x00], v), MalformedPacket(_)));
        assert!(matches!(err(&[0xC0, 0x01, 0x00], v), MalformedPacket(_)), "PINGREQ with a body");
    }
    assert!(matches!(err(&[0xF0, 0x00], V311), MalformedPacket(_)), "AUTH in 3.1.1");
    assert!(matches!(err(&[0xF1, 0x00], V5), MalformedPacket(_)));
}

#[test]
fn reject_publish_qos3_and_dup_on_qos0() {
    for v in [V311, V5] {
        assert!(matches!(err(&[0x36, 0x05, 0, 1, b't', 0, 1], v), MalformedPacket(_)));
        assert!(matches!(err(&[0x38, 0x03, 0, 1, b't'], v), MalformedPacket(_)));
        assert!(matches!(err(&[0x39, 0x03, 0, 1, b't'], v), MalformedPacket(_)));
    }
}

#[test]
fn reject_long_remaining_length() {
    for v in [V311, V5] {
        let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0xFF][..]);
        assert!(matches!(decode(&mut buf, v, MAX_PACKET_SIZE), Err(MalformedPacket(_))));
        // The largest legal remaining length is just incomplete.
        let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0x7F][..]);
        assert_eq!(decode(&mut buf, v, MAX_PACKET_SIZE), Ok(None));
    }
}

#[test]
fn reject_bad_strings() {
    for v in [V311, V5] {
        let (pre, post): (&[u8], &[u8]) = if v == V5 { (&[], &[0]) } else { (&[], &[]) };
        for topic in [&[0xC3u8, 0x28][..], &[b'a', 0], &[0xED, 0xA0, 0x80], &[0xFF]] {
            let mut body = pre.to_vec();
            body.extend_from_slice(&[0, topic.len() as u8]);
            body.extend_from_slice(topic);
            body.extend_from_slice(post);
            assert_eq!(err(&with_header(0x30, &body), v), InvalidUtf8, "{topic:02X?}");
        }
        // Client id with U+0000.
        let mut c = connect_bytes(if v == V5 { 5 } else { 4 }, 0x02, &[], &[]);
        let n = c.len();
        c[n - 1] = 0;
        assert_eq!(err(&c, v), InvalidUtf8);
    }
    // A user property value with invalid UTF-8.
    assert_eq!(err(&publish_v5(b"t", &[0x26, 0, 1, b'k', 0, 1, 0x80]), V5), InvalidUtf8);
}

#[test]
fn reject_bad_connect_flags() {
    for level in [4u8, 5] {
        let v = if level == 5 { V5 } else { V311 };
        assert!(matches!(err(&connect_bytes(level, 0x03, &[], &[]), v), MalformedPacket(_)), "reserved");
        assert!(matches!(err(&connect_bytes(level, 0x0A, &[], &[]), v), MalformedPacket(_)), "will qos");
        assert!(matches!(err(&connect_bytes(level, 0x22, &[], &[]), v), MalformedPacket(_)), "will retain");
        let will: &[u8] = if level == 5 { &[0, 0, 1, b't', 0, 0] } else { &[0, 1, b't', 0, 0] };
        assert!(matches!(err(&connect_bytes(level, 0x1E, &[], will), v), MalformedPacket(_)), "will qos 3");
        // A valid will for comparison.
        assert!(dec(&connect_bytes(level, 0x16, &[], will), v).is_ok());
        let mut bad_topic = will.to_vec();
        let i = bad_topic.len() - 3;
        bad_topic[i] = b'#';
        assert_eq!(err(&connect_bytes(level, 0x16, &[], &bad_topic), v), TopicNameInvalid, "will topic");
    }
    // Password without user name: malformed in 3.1.1, fine in 5.0.
    assert!(matches!(err(&connect_bytes(4, 0x42, &[], &[0, 2, 1, 2]), V311), MalformedPacket(_)));
    let Packet::Connect(c) = dec(&connect_bytes(5, 0x42, &[], &[0, 2, 1, 2]), V311).unwrap() else { panic!() };
    assert_eq!((c.username, c.password), (None, Some(Bytes::from_static(&[1, 2]))));
}

#[test]
fn reject_unsupported_protocol() {
    let mqisdp = [0x10, 0x11, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 10, 0, 3, b'a', b'b', b'c'];
    assert_eq!(err(&mqisdp, V311), UnsupportedProtocolVersion(3));
    assert_eq!(err(&mqisdp, V5), UnsupportedProtocolVersion(3));
    assert_eq!(err(&connect_bytes(6, 0x02, &[], &[]), V5), UnsupportedProtocolVersion(6));
    assert_eq!(err(&connect_bytes(3, 0x02, &[], &[]), V5), UnsupportedProtocolVersion(3));
    let mut bad_name = connect_bytes(4, 0x02, &[], &[]);
    bad_name[7] = b'X';
    assert!(matches!(err(&bad_name, V311), ProtocolError(_)));
    assert_eq!(UnsupportedProtocolVersion(3).connect_reason(), ConnectReason::UnsupportedProtocolVersion);
}

#[test]
fn reject_subscribe_problems() {
    // No filters.
    assert!(matches!(err(&[0x82, 0x02, 0, 1], V311), ProtocolError(_)));
    assert!(matches!(err(&[0x82, 0x03, 0, 1, 0], V5), ProtocolError(_)));
    assert!(matches!(err(&[0xA2, 0x02, 0, 1], V311), ProtocolError(_)));
    assert!(matches!(err(&[0xA2, 0x03, 0, 1, 0], V5), ProtocolError(_)));
    // Packet identifier 0.
    assert!(matches!(err(&[0x82, 0x06, 0, 0, 0, 1, b'a', 0], V311), ProtocolError(_)));
    assert!(matches!(err(&[0xA2, 0x05, 0, 0, 0, 1, b'a'], V311), ProtocolError(_)));
    // Options: reserved bits, QoS 3, retain handling 3.
    let sub5 = |o: u8| [0x82, 0x07, 0, 1, 0, 0, 1, b'a', o];
    let sub4 = |o: u8| [0x82, 0x06, 0, 1, 0, 1, b'a', o];
    assert!(dec(&sub5(0x2E), V5).is_ok());
    assert!(matches!(err(&sub5(0x40), V5), MalformedPacket(_)));
    assert!(matches!(err(&sub5(0x80), V5), MalformedPacket(_)));
    assert!(matches!(err(&sub5(0x30), V5), ProtocolError(_)));
    assert!(matches!(err(&sub5(0x03), V5), ProtocolError(_)));
    assert!(dec(&sub4(0x02), V311).is_ok());
    assert!(matches!(err(&sub4(0x03), V311), MalformedPacket(_)));
    assert!(matches!(err(&sub4(0x04), V311), MalformedPacket(_)));
    // Missing options byte.
    assert!(matches!(err(&[0x82, 0x05, 0, 1, 0, 1, b'a'], V311), MalformedPacket(_)));
    // Invalid filters.
    let filt = |f: &[u8], v: Version| {
        let mut body = vec![0, 1];
        if v == V5 {
            body.push(0);
        }
        body.extend_from_slice(&[0, f.len() as u8]);
        body.extend_from_slice(f);
        body.push(0);
        with_header(0x82, &body)
    };
    for v in [V311, V5] {
        for f in [&b"a/#/b"[..], b"a+", b"", b"#a"] {
            assert_eq!(err(&filt(f, v), v), TopicFilterInvalid, "{:?}", std::str::from_utf8(f));
        }
    }
    assert_eq!(err(&filt(b"$share//x", V5), V5), TopicFilterInvalid);
    assert_eq!(err(&filt(b"$share/g", V5), V5), TopicFilterInvalid);
    assert!(dec(&filt(b"$share/g", V311), V311).is_ok(), "no shared subscriptions in 3.1.1");
    // No Local on a shared subscription.
    let mut shared = filt(b"$share/g/x", V5);
    *shared.last_mut().unwrap() = 0x04;
    assert!(matches!(err(&shared, V5), ProtocolError(_)));
    // Unsubscribe with an invalid filter.
    assert_eq!(err(&[0xA2, 0x06, 0, 1, 0, 2, b'#', b'#'], V311), TopicFilterInvalid);
}

#[test]
fn reject_packet_id_zero() {
    for v in [V311, V5] {
        assert!(matches!(err(&[0x32, 0x05, 0, 1, b't', 0, 0], v), ProtocolError(_)));
        assert!(matches!(err(&[0x34, 0x05, 0, 1, b't', 0, 0], v), ProtocolError(_)));
        assert!(matches!(err(&[0x40, 0x02, 0, 0], v), ProtocolError(_)));
        assert!(matches!(err(&[0x62, 0x02, 0, 0], v), ProtocolError(_)));
        assert!(matches!(err(&[0x90, 0x03, 0, 0, 0], V311), ProtocolError(_)));
    }
}

#[test]
fn reject_bad_properties() {
    // Unknown identifier.
    assert!(matches!(err(&publish_v5(b"t", &[0x05, 0]), V5), MalformedPacket(_)));
    assert!(matches!(err(&publish_v5(b"t", &[0x80, 0x01]), V5), MalformedPacket(_)));
    // Not allowed in this packet (Assigned Client Identifier in PUBLISH).
    assert!(matches!(err(&publish_v5(b"t", &[0x12, 0, 1, b'x']), V5), MalformedPacket(_)));
    // Will Delay Interval in CONNECT properties (belongs to the will).
    assert!(matches!(err(&connect_bytes(5, 2, &[0x18, 0, 0, 0, 1], &[]), V5), MalformedPacket(_)));
    // Duplicates.
    assert!(matches!(err(&publish_v5(b"t", &[0x01, 0, 0x01, 0]), V5), ProtocolError(_)));
    assert!(matches!(err(&publish_v5(b"t", &[0x23, 0, 1, 0x23, 0, 2]), V5), ProtocolError(_)));
    let twice = [0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2];
    assert!(matches!(err(&connect_bytes(5, 2, &twice, &[]), V5), ProtocolError(_)));
    assert!(matches!(err(&[0x82, 0x0A, 0, 1, 4, 0x0B, 1, 0x0B, 2, 0, 1, b'a', 0], V5), ProtocolError(_)));
    // Several subscription identifiers are fine in PUBLISH, user properties repeat.
    let Packet::Publish(p) =
        dec(&publish_v5(b"t", &[0x0B, 1, 0x0B, 0x80, 0x01, 0x26, 0, 0, 0, 0, 0x26, 0, 0, 0, 0]), V5).unwrap()
    else {
        panic!()
    };
    assert_eq!(p.properties.subscription_identifiers, [1, 128]);
    assert_eq!(p.properties.message.user_properties.len(), 2);
    // Values.
    assert!(matches!(err(&publish_v5(b"t", &[0x0B, 0]), V5), ProtocolError(_)), "subscription id 0");
    assert!(matches!(err(&[0x82, 0x08, 0, 1, 2, 0x0B, 0, 0, 1, b'a', 0], V5), ProtocolError(_)));
    assert!(matches!(err(&connect_bytes(5, 2, &[0x21, 0, 0], &[]), V5), ProtocolError(_)), "receive max 0");
    assert!(matches!(err(&connect_bytes(5, 2, &[0x27, 0, 0, 0, 0], &[]), V5), ProtocolError(_)), "max packet 0");
    assert!(matches!(err(&connect_bytes(5, 2, &[0x17, 2], &[]), V5), ProtocolError(_)), "request problem 2");
    assert!(matches!(err(&connect_bytes(5, 2, &[0x16, 0, 1, 9], &[]), V5), ProtocolError(_)), "auth data only");
    assert!(matches!(err(&publish_v5(b"t", &[0x01, 2]), V5), ProtocolError(_)), "payload format 2");
    assert!(matches!(err(&publish_v5(b"t", &[0x08, 0, 1, b'+']), V5), ProtocolError(_)), "response topic");
    assert_eq!(err(&publish_v5(b"t", &[0x23, 0, 0]), V5), TopicAliasInvalid);
    // Lengths: property section beyond the packet, value cut short.
    assert!(matches!(err(&[0x30, 0x05, 0, 1, b't', 9, 0x01], V5), MalformedPacket(_)));
    assert!(matches!(err(&publish_v5(b"t", &[0x02, 0, 0]), V5), MalformedPacket(_)));
    // CONNACK maximum QoS 2 is invalid.
    assert!(matches!(err(&[0x20, 0x05, 0, 0, 2, 0x24, 2], V5), ProtocolError(_)));
}

#[test]
fn reject_trailing_bytes() {
    for v in [V311, V5] {
        let mut c = connect_bytes(if v == V5 { 5 } else { 4 }, 0x02, &[], &[0xAA]);
        assert!(matches!(err(&c, v), MalformedPacket(_)), "CONNECT");
        c.pop();
        c[1] -= 1;
        assert!(dec(&c, v).is_ok());
        assert!(matches!(err(&[0xD0, 0x01, 0], v), MalformedPacket(_)), "PINGRESP");
        assert!(matches!(err(&[0x20, 0x03, 0, 0, 0], V311), MalformedPacket(_)), "CONNACK");
        assert!(matches!(err(&[0x82, 0x07, 0, 1, 0, 1, b'a', 0, 0], V311), MalformedPacket(_)), "SUBSCRIBE");
    }
    assert!(matches!(err(&[0x40, 0x03, 0, 1, 0], V311), MalformedPacket(_)), "3.1.1 PUBACK");
    assert!(matches!(err(&[0xB0, 0x03, 0, 1, 0], V311), MalformedPacket(_)), "3.1.1 UNSUBACK");
    assert!(matches!(err(&[0xE0, 0x01, 0], V311), MalformedPacket(_)), "3.1.1 DISCONNECT");
    assert!(matches!(err(&[0xE0, 0x03, 0, 0, 0], V5), MalformedPacket(_)), "5.0 DISCONNECT");
    assert!(matches!(err(&[0x40, 0x05, 0, 1, 0, 0, 0], V5), MalformedPacket(_)), "5.0 PUBACK");
    assert!(matches!(err(&[0xF0, 0x03, 0, 0, 0], V5), MalformedPacket(_)), "AUTH");
}

#[test]
fn reject_bad_topics_and_reasons() {
    for v in [V311, V5] {
        let props: &[u8] = if v == V5 { &[0] } else { &[] };
        for t in [&b"a/+"[..], b"#", b"a/#", b"+"] {
            let mut body = vec![0, t.len() as u8];
            body.extend_from_slice(t);
            body.extend_from_slice(props);
            assert_eq!(err(&with_header(0x30, &body), v), TopicNameInvalid);
        }
    }
    // Empty topic: 3.1.1 never, 5.0 only with a topic alias.
    assert_eq!(err(&[0x30, 0x02, 0, 0], V311), TopicNameInvalid);
    assert!(matches!(err(&publish_v5(b"", &[]), V5), ProtocolError(_)));
    let Packet::Publish(p) = dec(&publish_v5(b"", &[0x23, 0, 7]), V5).unwrap() else { panic!() };
    assert_eq!((p.topic.as_str(), p.properties.topic_alias), ("", Some(7)));
    // Reason codes outside each packet's list.
    assert!(matches!(err(&[0x40, 0x03, 0, 1, 0x92], V5), ProtocolError(_)));
    assert!(matches!(err(&[0x62, 0x03, 0, 1, 0x10], V5), ProtocolError(_)));
    assert!(matches!(err(&[0xE0, 0x01, 0x01], V5), ProtocolError(_)));
    assert!(matches!(err(&[0xF0, 0x02, 0x01, 0], V5), ProtocolError(_)));
    assert!(matches!(err(&[0x90, 0x04, 0, 1, 0, 3], V5), ProtocolError(_)));
    assert!(matches!(err(&[0x90, 0x03, 0, 1, 0x87], V311), ProtocolError(_)));
    assert!(matches!(err(&[0x20, 0x02, 0, 6], V311), ProtocolError(_)));
    assert!(matches!(err(&[0x20, 0x03, 0, 0x8B, 0], V5), ProtocolError(_)));
    // CONNACK: reserved flags, session present with a failure.
    assert!(matches!(err(&[0x20, 0x02, 2, 0], V311), MalformedPacket(_)));
    assert!(matches!(err(&[0x20, 0x02, 1, 5], V311), ProtocolError(_)));
    // Empty SUBACK / UNSUBACK.
    assert!(matches!(err(&[0x90, 0x03, 0, 1, 0], V5), ProtocolError(_)));
    assert!(matches!(err(&[0xB0, 0x03, 0, 1, 0], V5), ProtocolError(_)));
    // Truncated packet content.
    assert!(matches!(err(&[0x40, 0x01, 0], V5), MalformedPacket(_)));
    assert!(matches!(err(&[0x30, 0x01, 0], V5), MalformedPacket(_)));
}

#[test]
fn error_reason_codes() {
    let cases = [
        (PacketTooLarge { size: 10, max: 5 }, DisconnectReason::PacketTooLarge, ConnectReason::PacketTooLarge),
        (MalformedPacket("x"), DisconnectReason::MalformedPacket, ConnectReason::MalformedPacket),
        (InvalidUtf8, DisconnectReason::MalformedPacket, ConnectReason::MalformedPacket),
        (ProtocolError("x"), DisconnectReason::ProtocolError, ConnectReason::ProtocolError),
        (UnsupportedProtocolVersion(3), DisconnectReason::ProtocolError, ConnectReason::UnsupportedProtocolVersion),
        (TopicNameInvalid, DisconnectReason::TopicNameInvalid, ConnectReason::TopicNameInvalid),
        (TopicFilterInvalid, DisconnectReason::TopicFilterInvalid, ConnectReason::ProtocolError),
        (TopicAliasInvalid, DisconnectReason::TopicAliasInvalid, ConnectReason::ProtocolError),
    ];
    for (e, d, c) in cases {
        assert_eq!(e.disconnect_reason(), d, "{e}");
        assert_eq!(e.connect_reason(), c, "{e}");
        assert_eq!(d as u8 & 0x80, 0x80);
    }
    assert_eq!(DisconnectReason::MalformedPacket as u8, 0x81);
    assert_eq!(DisconnectReason::ProtocolError as u8, 0x82);
    assert_eq!(DisconnectReason::PacketTooLarge as u8, 0x95);
    assert_eq!(ConnectReason::UnsupportedProtocolVersion as u8, 0x84);
}

// ---- incremental decoding and size limits ----

fn stream(v: Version) -> Vec<Packet> {
    samples(true)
        .into_iter()
        .chain(samples(false))
        .filter(|p| v == V5 || !matches!(p, Packet::Auth(_)))
        .map(|p| match p {
            Packet::Connect(mut c) => {
                c.version = v;
                Packet::Connect(c)
            }
            p => p,
        })
        .collect()
}

#[test]
fn incremental_one_byte_at_a_time() {
    for v in [V311, V5] {
        let packets = stream(v);
        let mut wire = BytesMut::new();
        for p in &packets {
            encode(p, v, &mut wire).unwrap();
        }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &b in wire.iter() {
            buf.extend_from_slice(&[b]);
            while let Some(p) = decode(&mut buf, v, MAX_PACKET_SIZE).unwrap() {
                got.push(p);
            }
        }
        assert!(buf.is_empty());
        let want: Vec<Packet> = packets.iter().map(|p| normalize(p, v)).collect();
        assert_eq!(got, want);
        // And all at once.
        let mut all = wire.clone();
        let mut got = Vec::new();
        while let Some(p) = decode(&mut all, v, MAX_PACKET_SIZE).unwrap() {
            got.push(p);
        }
        assert_eq!(got, want);
    }
}

#[test]
fn packet_too_large_from_fixed_header_alone() {
    for v in [V311, V5] {
        // Remaining length 16384 announced, nothing of the body present.
        let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x01][..]);
        assert_eq!(decode(&mut buf, v, 1000), Err(PacketTooLarge { size: 16_388, max: 1000 }));
        assert_eq!(buf.len(), 4, "nothing consumed");
        // Header incomplete: wait.
        let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80][..]);
        assert_eq!(decode(&mut buf, v, 1000), Ok(None));
        // The limit counts the fixed header: a packet of exactly max passes,
        // one byte more does not.
        let p = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "t".into(),
            packet_id: None,
            payload: Bytes::from(vec![0u8; 200]),
            properties: Default::default(),
        });
        let bytes = enc(&p, v);
        let n = bytes.len();
        assert_eq!(decode(&mut BytesMut::from(&bytes[..]), v, n), Ok(Some(p)));
        assert_eq!(decode(&mut BytesMut::from(&bytes[..3]), v, n - 1), Err(PacketTooLarge { size: n, max: n - 1 }));
    }
}

#[test]
fn publish_payload_is_zero_copy() {
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "t".into(),
        packet_id: Some(1),
        payload: Bytes::from(vec![5u8; 1000]),
        properties: Default::default(),
    });
    let bytes = enc(&p, V5);
    let mut buf = BytesMut::from(&bytes[..]);
    let base = buf.as_ptr() as usize;
    let Some(Packet::Publish(got)) = decode(&mut buf, V5, MAX_PACKET_SIZE).unwrap() else { panic!() };
    let at = got.payload.as_ptr() as usize;
    assert!(at >= base && at < base + bytes.len(), "payload points into the read buffer");
}
