//! Differential tests against `mqttbytes` 0.6: our bytes read by mqttbytes,
//! mqttbytes' bytes read by us, for CONNECT, CONNACK, PUBLISH, PUBACK,
//! SUBSCRIBE and SUBACK in both versions; then one test per mqttbytes bug we
//! fix (`mqttbytes_bug_*`), each showing mqttbytes failing on the input.

use bytes::{Bytes, BytesMut};
use mqttbytes::{v4, v5};

use super::tests::{dec, enc, normalize, samples};
use super::*;
use crate::protocol::packet::*;

use Version::{V311, V5};

const BIG: usize = 1 << 20;

fn qos(q: mqttbytes::QoS) -> QoS {
    QoS::from_u8(q as u8).unwrap()
}

fn up(v: &[(String, String)]) -> Vec<UserProperty> {
    v.to_vec()
}

/// mqttbytes 3.1.1 packet → ours (only the types we compare).
fn from_v4(p: v4::Packet) -> Packet {
    match p {
        v4::Packet::Connect(c) => Packet::Connect(Connect {
            version: V311,
            client_id: c.client_id,
            clean_start: c.clean_session,
            keep_alive: c.keep_alive,
            username: c.login.as_ref().map(|l| l.username.clone()),
            password: c.login.map(|l| Bytes::from(l.password)),
            will: c.last_will.map(|w| LastWill {
                topic: w.topic,
                payload: w.message,
                qos: qos(w.qos),
                retain: w.retain,
                properties: Default::default(),
            }),
            properties: Default::default(),
        }),
        v4::Packet::ConnAck(c) => Packet::ConnAck(ConnAck {
            session_present: c.session_present,
            code: connect_reason_from_v311(c.code as u8).unwrap(),
            properties: Default::default(),
        }),
        v4::Packet::Publish(p) => Packet::Publish(Publish {
            dup: p.dup,
            qos: qos(p.qos),
            retain: p.retain,
            topic: p.topic,
            packet_id: (p.qos as u8 > 0).then_some(p.pkid),
            payload: p.payload,
            properties: Default::default(),
        }),
        v4::Packet::PubAck(a) => Packet::PubAck(PubAck::new(a.pkid)),
        v4::Packet::Subscribe(s) => Packet::Subscribe(Subscribe {
            packet_id: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubscribeFilter { filter: f.path, options: SubscriptionOptions::qos(qos(f.qos)) })
                .collect(),
            subscription_identifier: None,
            user_properties: vec![],
        }),
        v4::Packet::SubAck(a) => Packet::SubAck(SubAck {
            packet_id: a.pkid,
            reasons: a
                .return_codes
                .iter()
                .map(|c| match c {
                    v4::SubscribeReasonCode::Success(q) => *q as u8,
                    v4::SubscribeReasonCode::Failure => 0x80,
                })
                .collect(),
            properties: Default::default(),
        }),
        other => panic!("not compared: {other:?}"),
    }
}

fn message_v5(
    pfi: Option<u8>,
    mei: Option<u32>,
    ct: Option<String>,
    rt: Option<String>,
    cd: Option<Bytes>,
    u: &[(String, String)],
) -> MessageProperties {
    MessageProperties {
        payload_format_indicator: pfi,
        message_expiry_interval: mei,
        content_type: ct,
        response_topic: rt,
        correlation_data: cd,
        user_properties: up(u),
    }
}

/// mqttbytes 5.0 packet → ours.
fn from_v5(p: v5::Packet) -> Packet {
    match p {
        v5::Packet::Connect(c) => Packet::Connect(Connect {
            version: V5,
            client_id: c.client_id,
            clean_start: c.clean_session,
            keep_alive: c.keep_alive,
            username: c.login.as_ref().map(|l| l.username.clone()),
            password: c.login.map(|l| Bytes::from(l.password)),
            will: c.last_will.map(|w| LastWill {
                topic: w.topic,
                payload: w.message,
                qos: qos(w.qos),
                retain: w.retain,
                properties: w
                    .properties
                    .map(|p| WillProperties {
                        will_delay_interval: p.delay_interval,
                        message: message_v5(
                            p.payload_format_indicator,
                            p.message_expiry_interval,
                            p.content_type,
                            p.response_topic,
                            p.correlation_data,
                            &p.user_properties,
                        ),
                    })
                    .unwrap_or_default(),
            }),
            properties: c
                .properties
                .map(|p| ConnectProperties {
                    session_expiry_interval: p.session_expiry_interval,
                    receive_maximum: p.receive_maximum,
                    maximum_packet_size: p.max_packet_size,
                    topic_alias_maximum: p.topic_alias_max,
                    request_response_information: p.request_response_info,
                    request_problem_information: p.request_problem_info,
                    user_properties: up(&p.user_properties),
                    authentication_method: p.authentication_method,
                    authentication_data: p.authentication_data,
                })
                .unwrap_or_default(),
        }),
        v5::Packet::ConnAck(c) => Packet::ConnAck(ConnAck {
            session_present: c.session_present,
            code: connect_reason_from(c.code as u8).unwrap(),
            properties: c
                .properties
                .map(|p| ConnAckProperties {
                    session_expiry_interval: p.session_expiry_interval,
                    receive_maximum: p.receive_max,
                    maximum_qos: p.max_qos,
                    retain_available: p.retain_available,
                    maximum_packet_size: p.max_packet_size,
                    assigned_client_identifier: p.assigned_client_identifier,
                    topic_alias_maximum: p.topic_alias_max,
                    reason_string: p.reason_string,
                    user_properties: up(&p.user_properties),
                    wildcard_subscription_available: p.wildcard_subscription_available,
                    subscription_identifiers_available: p.subscription_identifiers_available,
                    shared_subscription_available: p.shared_subscription_available,
                    server_keep_alive: p.server_keep_alive,
                    response_information: p.response_information,
                    server_reference: p.server_reference,
                    authentication_method: p.authentication_method,
                    authentication_data: p.authentication_data,
                })
                .unwrap_or_default(),
        }),
        v5::Packet::Publish(p) => Packet::Publish(Publish {
            dup: p.dup,
            qos: qos(p.qos),
            retain: p.retain,
            topic: p.topic,
            packet_id: (p.qos as u8 > 0).then_some(p.pkid),
            payload: p.payload,
            properties: p
                .properties
                .map(|p| PublishProperties {
                    message: message_v5(
                        p.payload_format_indicator,
                        p.message_expiry_interval,
                        p.content_type,
                        p.response_topic,
                        p.correlation_data,
                        &p.user_properties,
                    ),
                    topic_alias: p.topic_alias,
                    subscription_identifiers: p.subscription_identifiers.iter().map(|&i| i as u32).collect(),
                })
                .unwrap_or_default(),
        }),
        v5::Packet::PubAck(a) => Packet::PubAck(PubAck {
            packet_id: a.pkid,
            reason: a.reason as u8,
            properties: a
                .properties
                .map(|p| ReasonProperties { reason_string: p.reason_string, user_properties: up(&p.user_properties) })
                .unwrap_or_default(),
        }),
        v5::Packet::Subscribe(s) => Packet::Subscribe(Subscribe {
            packet_id: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubscribeFilter {
                    filter: f.path,
                    options: SubscriptionOptions {
                        qos: qos(f.qos),
                        no_local: f.nolocal,
                        retain_as_published: f.preserve_retain,
                        retain_handling: f.retain_forward_rule as u8,
                    },
                })
                .collect(),
            subscription_identifier: s.properties.as_ref().and_then(|p| p.id).map(|i| i as u32),
            user_properties: s.properties.map(|p| up(&p.user_properties)).unwrap_or_default(),
        }),
        v5::Packet::SubAck(a) => Packet::SubAck(SubAck {
            packet_id: a.pkid,
            reasons: a.return_codes.iter().map(|&c| c as u8).collect(),
            properties: a
                .properties
                .map(|p| ReasonProperties { reason_string: p.reason_string, user_properties: up(&p.user_properties) })
                .unwrap_or_default(),
        }),
        other => panic!("not compared: {other:?}"),
    }
}

fn write_v4(p: &v4::Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    match p {
        v4::Packet::Connect(x) => x.write(&mut out),
        v4::Packet::ConnAck(x) => x.write(&mut out),
        v4::Packet::Publish(x) => x.write(&mut out),
        v4::Packet::PubAck(x) => x.write(&mut out),
        v4::Packet::Subscribe(x) => x.write(&mut out),
        v4::Packet::SubAck(x) => x.write(&mut out),
        other => panic!("not compared: {other:?}"),
    }
    .unwrap();
    out.to_vec()
}

fn write_v5(p: &v5::Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    match p {
        v5::Packet::Connect(x) => x.write(&mut out),
        v5::Packet::ConnAck(x) => x.write(&mut out),
        v5::Packet::Publish(x) => x.write(&mut out),
        v5::Packet::PubAck(x) => x.write(&mut out),
        v5::Packet::Subscribe(x) => x.write(&mut out),
        v5::Packet::SubAck(x) => x.write(&mut out),
        other => panic!("not compared: {other:?}"),
    }
    .unwrap();
    out.to_vec()
}

/// The packets compared: CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE,
/// SUBACK from the shared samples, adjusted to what mqttbytes can represent
/// (a password is a `String` and comes only with a user name).
fn compared(v: Version) -> Vec<Packet> {
    samples(true)
        .into_iter()
        .chain(samples(false))
        .filter_map(|p| match p {
            Packet::Connect(mut c) => {
                c.version = v;
                if c.password.is_some() {
                    c.password = Some(Bytes::from_static(b"secret"));
                }
                Some(Packet::Connect(c))
            }
            p @ (Packet::ConnAck(_)
            | Packet::Publish(_)
            | Packet::PubAck(_)
            | Packet::Subscribe(_)
            | Packet::SubAck(_)) => Some(p),
            _ => None,
        })
        .map(|p| normalize(&p, v))
        .collect()
}

#[test]
fn ours_to_mqttbytes_v311() {
    for p in compared(V311) {
        let bytes = enc(&p, V311);
        let theirs = v4::read(&mut BytesMut::from(&bytes[..]), BIG).unwrap_or_else(|e| panic!("{e:?} for {p:?}"));
        // Byte-identical when mqttbytes writes it back.
        assert_eq!(write_v4(&theirs), bytes, "{p:?}");
        assert_eq!(from_v4(theirs), p);
    }
}

#[test]
fn ours_to_mqttbytes_v5() {
    for p in compared(V5) {
        let bytes = enc(&p, V5);
        let theirs = v5::read(&mut BytesMut::from(&bytes[..]), BIG).unwrap_or_else(|e| panic!("{e:?} for {p:?}"));
        let back = write_v5(&theirs);
        assert_eq!(from_v5(theirs), p);
        if matches!(&p, Packet::ConnAck(c) if c.properties == ConnAckProperties::default()) {
            // mqttbytes omits the property length: see
            // mqttbytes_bug_v5_connack_without_property_length.
            continue;
        }
        // mqttbytes' own bytes (property order may differ) decode to the same.
        assert_eq!(dec(&back, V5).unwrap_or_else(|e| panic!("{e} {:02X?}\n{:02X?} for {p:?}", back, bytes)), p);
    }
}

#[test]
fn mqttbytes_to_ours() {
    // Packets built with mqttbytes' own constructors.
    let mut c = v4::Connect::new("dev-1");
    c.set_login("u", "p");
    c.last_will = Some(v4::LastWill::new("w/t", "bye", mqttbytes::QoS::AtLeastOnce, true));
    let mut publish = v4::Publish::new("a/b", mqttbytes::QoS::ExactlyOnce, vec![1, 2, 3]);
    publish.pkid = 42;
    let mut subscribe = v4::Subscribe::new("a/#", mqttbytes::QoS::AtLeastOnce);
    subscribe.pkid = 3;
    let v4s = vec![
        v4::Packet::Connect(c),
        v4::Packet::ConnAck(v4::ConnAck::new(v4::ConnectReturnCode::BadUserNamePassword, false)),
        v4::Packet::Publish(publish),
        v4::Packet::PubAck(v4::PubAck::new(42)),
        v4::Packet::Subscribe(subscribe),
        v4::Packet::SubAck(v4::SubAck::new(
            1,
            vec![v4::SubscribeReasonCode::Success(mqttbytes::QoS::AtLeastOnce), v4::SubscribeReasonCode::Failure],
        )),
    ];
    for theirs in v4s {
        let bytes = write_v4(&theirs);
        let ours = dec(&bytes, V311).unwrap();
        assert_eq!(enc(&ours, V311), bytes);
        assert_eq!(ours, from_v4(theirs));
    }

    let mut c = v5::Connect::new("dev-2");
    c.set_login("u", "p");
    let mut publish = v5::Publish::new("a/b", mqttbytes::QoS::AtLeastOnce, vec![9; 200]);
    publish.pkid = 7;
    let mut subscribe = v5::Subscribe::new("a/+", mqttbytes::QoS::ExactlyOnce);
    subscribe.pkid = 4;
    let v5s = vec![
        v5::Packet::Connect(c),
        v5::Packet::Publish(publish),
        v5::Packet::PubAck(v5::PubAck::new(7)),
        v5::Packet::Subscribe(subscribe),
    ];
    for theirs in v5s {
        let bytes = write_v5(&theirs);
        let ours = dec(&bytes, V5).unwrap_or_else(|e| panic!("{e} for {theirs:?}"));
        assert_eq!(ours, from_v5(theirs));
    }
}

// ---- mqttbytes bugs we fix ----

#[test]
fn mqttbytes_bug_v5_disconnect_remaining_length_0() {
    let bytes = [0xE0, 0x00];
    assert!(v5::read(&mut BytesMut::from(&bytes[..]), BIG).is_err());
    assert_eq!(dec(&bytes, V5).unwrap(), Packet::Disconnect(Disconnect::new(DisconnectReason::NormalDisconnection)));
}

#[test]
fn mqttbytes_bug_v5_disconnect_remaining_length_1() {
    let bytes = [0xE0, 0x01, 0x8E];
    assert!(v5::read(&mut BytesMut::from(&bytes[..]), BIG).is_err());
    assert_eq!(dec(&bytes, V5).unwrap(), Packet::Disconnect(Disconnect::new(DisconnectReason::SessionTakenOver)));
}

#[test]
fn mqttbytes_bug_v5_auth_unsupported() {
    let bytes = [0xF0, 0x00];
    assert!(v5::read(&mut BytesMut::from(&bytes[..]), BIG).is_err());
    assert!(matches!(dec(&bytes, V5).unwrap(), Packet::Auth(Auth { reason: 0, .. })));
}

#[test]
fn mqttbytes_bug_max_size_ignores_fixed_header() {
    // A 2 + 100 byte PUBLISH against a 100-byte limit.
    let mut body = vec![0, 1, b't'];
    body.resize(100, 0);
    let mut bytes = vec![0x30, 100];
    bytes.extend_from_slice(&body);
    assert!(v4::read(&mut BytesMut::from(&bytes[..]), 100).is_ok(), "mqttbytes lets it through");
    assert_eq!(
        decode(&mut BytesMut::from(&bytes[..]), V311, 100),
        Err(DecodeError::PacketTooLarge { size: 102, max: 100 })
    );
}

#[test]
fn mqttbytes_bug_v5_disconnect_round_trip_of_its_own_bytes() {
    // mqttbytes writes the short forms itself but cannot read them back.
    for reason in [v5::DisconnectReasonCode::NormalDisconnection, v5::DisconnectReasonCode::SessionTakenOver] {
        let mut d = v5::Disconnect::new();
        d.reason_code = reason;
        let mut out = BytesMut::new();
        d.write(&mut out).unwrap();
        assert!(out.len() <= 3, "{:02X?}", &out[..]);
        assert!(v5::read(&mut out.clone(), BIG).is_err());
        let Packet::Disconnect(ours) = dec(&out, V5).unwrap() else { panic!() };
        assert_eq!(ours.reason as u8, reason as u8);
    }
}

#[test]
fn mqttbytes_bug_v5_connack_without_property_length() {
    // MQTT 5.0 §3.2.2.3.1: CONNACK always carries a property length (only
    // the acks, DISCONNECT and AUTH may omit it). mqttbytes leaves it out.
    let mut out = BytesMut::new();
    v5::ConnAck::new(v5::ConnectReturnCode::NotAuthorized, false).write(&mut out).unwrap();
    assert_eq!(&out[..], [0x20, 0x02, 0x00, 0x87]);
    assert!(matches!(dec(&out, V5), Err(DecodeError::MalformedPacket(_))));
    let ours = Packet::ConnAck(ConnAck {
        session_present: false,
        code: ConnectReason::NotAuthorized,
        properties: Default::default(),
    });
    assert_eq!(enc(&ours, V5), [0x20, 0x03, 0x00, 0x87, 0x00]);
}

#[test]
fn mqttbytes_bug_v5_password_without_user_name() {
    // Allowed in 5.0; mqttbytes invents an empty user name.
    let bytes = [0x10, 0x11, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x42, 0, 10, 0, 0, 1, b'c', 0, 1, b'p'];
    let Ok(v5::Packet::Connect(theirs)) = v5::read(&mut BytesMut::from(&bytes[..]), BIG) else { panic!() };
    assert_eq!(theirs.login.map(|l| (l.username, l.password)), Some((String::new(), "p".to_string())));
    let Packet::Connect(ours) = dec(&bytes, V5).unwrap() else { panic!() };
    assert_eq!((ours.username, ours.password), (None, Some(Bytes::from_static(b"p"))));
}

#[test]
fn mqttbytes_bug_writes_dup_on_qos0_publish() {
    let mut p = v5::Publish::new("t", mqttbytes::QoS::AtMostOnce, vec![]);
    p.dup = true;
    let mut out = BytesMut::new();
    p.write(&mut out).unwrap();
    assert_eq!(out[0], 0x38, "QoS 0 with DUP: a malformed packet");
    assert!(matches!(dec(&out, V5), Err(DecodeError::MalformedPacket(_))));
    let ours = Packet::Publish(Publish {
        dup: true,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "t".into(),
        packet_id: None,
        payload: Bytes::new(),
        properties: Default::default(),
    });
    assert_eq!(enc(&ours, V5)[0], 0x30);
}

#[test]
fn mqttbytes_bug_accepts_invalid_packets() {
    use DecodeError::*;
    let connect = |flags: u8, props: &[u8]| {
        let mut v = vec![0x10, 0, 0, 4, b'M', b'Q', b'T', b'T', 5, flags, 0, 10, props.len() as u8];
        v.extend_from_slice(props);
        v.extend_from_slice(&[0, 1, b'c']);
        v[1] = (v.len() - 2) as u8;
        v
    };
    let cases: Vec<(&str, Vec<u8>, DecodeError)> = vec![
        ("QoS 0 with DUP", vec![0x38, 0x04, 0, 1, b't', 0], MalformedPacket("PUBLISH with QoS 0 and DUP set")),
        ("wildcard in topic name", vec![0x30, 0x04, 0, 1, b'#', 0], TopicNameInvalid),
        ("U+0000 in topic name", vec![0x30, 0x05, 0, 2, b'a', 0, 0], InvalidUtf8),
        (
            "empty topic without alias",
            vec![0x30, 0x03, 0, 0, 0],
            ProtocolError("empty topic name without a topic alias"),
        ),
        (
            "payload format indicator 2",
            vec![0x30, 0x06, 0, 1, b't', 2, 1, 2],
            ProtocolError("payload format indicator over 1"),
        ),
        (
            "property twice",
            vec![0x30, 0x08, 0, 1, b't', 4, 1, 0, 1, 0],
            ProtocolError("property appears more than once"),
        ),
        (
            "SUBSCRIBE flags 0000",
            vec![0x80, 0x07, 0, 1, 0, 0, 1, b'a', 0],
            MalformedPacket("reserved fixed header flags must be 0010"),
        ),
        ("SUBSCRIBE without filters", vec![0x82, 0x03, 0, 1, 0], ProtocolError("SUBSCRIBE without topic filters")),
        (
            "subscription options reserved bits",
            vec![0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0xC0],
            MalformedPacket("subscription options reserved bits set"),
        ),
        (
            "PUBACK trailing bytes",
            vec![0x40, 0x05, 0, 5, 0, 0, 0xAA],
            MalformedPacket("bytes after the end of the packet content"),
        ),
        ("PINGREQ with a body", vec![0xC0, 0x01, 0], MalformedPacket("bytes after the end of the packet content")),
        ("CONNECT reserved flag", connect(0x03, &[]), MalformedPacket("CONNECT reserved flag set")),
        ("receive maximum 0", connect(0x02, &[0x21, 0, 0]), ProtocolError("receive maximum 0")),
    ];
    for (name, bytes, want) in cases {
        assert!(v5::read(&mut BytesMut::from(&bytes[..]), BIG).is_ok(), "mqttbytes accepts {name}");
        assert_eq!(dec(&bytes, V5), Err(want), "{name}");
    }
}
