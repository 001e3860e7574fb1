//! Property tests: arbitrary packets round trip in both versions; arbitrary
//! and mutated bytes never panic the decoder (and whatever decodes survives
//! a re-encode). The case count follows `PROPTEST_CASES` (default 256); run
//! long with e.g. `PROPTEST_CASES=200000 cargo test --lib protocol::codec::proptests`.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use super::tests::normalize;
use super::*;
use crate::protocol::packet::*;

use Version::{V311, V5};

fn text() -> impl Strategy<Value = String> {
    "[^\\x00]{0,8}"
}

fn topic_name() -> impl Strategy<Value = String> {
    "[a-z$ü]{1,3}(/[a-z0-9 ]{0,3}){0,3}"
}

fn topic_filter() -> impl Strategy<Value = String> {
    let level = prop_oneof![Just("+".to_string()), "[a-z]{0,3}"];
    (vec(level, 1..4), any::<bool>(), option::of("[a-z0-9]{1,3}")).prop_map(|(levels, hash, share)| {
        let mut f = levels.join("/");
        if hash {
            f.push_str("/#");
        }
        if f.is_empty() {
            f.push('x');
        }
        match share {
            Some(group) => format!("$share/{group}/{f}"),
            None => f,
        }
    })
}

fn binary() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..40).prop_map(Bytes::from)
}

fn users() -> impl Strategy<Value = Vec<UserProperty>> {
    vec((text(), text()), 0..3)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn bit() -> impl Strategy<Value = Option<u8>> {
    option::of(0u8..=1)
}

fn reason_props() -> impl Strategy<Value = ReasonProperties> {
    (option::of(text()), users())
        .prop_map(|(reason_string, user_properties)| ReasonProperties { reason_string, user_properties })
}

fn message_props() -> impl Strategy<Value = MessageProperties> {
    (bit(), option::of(any::<u32>()), option::of(text()), option::of(topic_name()), option::of(binary()), users())
        .prop_map(|(pfi, mei, ct, rt, cd, up)| MessageProperties {
            payload_format_indicator: pfi,
            message_expiry_interval: mei,
            content_type: ct,
            response_topic: rt,
            correlation_data: cd,
            user_properties: up,
        })
}

fn connect() -> impl Strategy<Value = Packet> {
    let will = (topic_name(), binary(), qos(), any::<bool>(), option::of(any::<u32>()), message_props()).prop_map(
        |(topic, payload, qos, retain, delay, message)| LastWill {
            topic,
            payload,
            qos,
            retain,
            properties: WillProperties { will_delay_interval: delay, message },
        },
    );
    let props = (
        option::of(any::<u32>()),
        option::of(1u16..),
        option::of(1u32..),
        option::of(any::<u16>()),
        bit(),
        bit(),
        users(),
        option::of(text()),
        option::of(binary()),
    )
        .prop_map(|(sei, rm, mps, tam, rri, rpi, up, am, ad)| ConnectProperties {
            session_expiry_interval: sei,
            receive_maximum: rm,
            maximum_packet_size: mps,
            topic_alias_maximum: tam,
            request_response_information: rri,
            request_problem_information: rpi,
            user_properties: up,
            // Authentication data needs a method.
            authentication_method: if ad.is_some() { Some(am.unwrap_or_default()) } else { am },
            authentication_data: ad,
        });
    (text(), any::<bool>(), any::<u16>(), option::of(text()), option::of(binary()), option::of(will), props).prop_map(
        |(client_id, clean_start, keep_alive, username, password, will, properties)| {
            Packet::Connect(Connect {
                version: V5,
                client_id,
                clean_start,
                keep_alive,
                username,
                password,
                will,
                properties,
            })
        },
    )
}

const CONNECT_REASONS: &[ConnectReason] = &[
    ConnectReason::Success,
    ConnectReason::UnspecifiedError,
    ConnectReason::MalformedPacket,
    ConnectReason::ProtocolError,
    ConnectReason::ImplementationSpecificError,
    ConnectReason::UnsupportedProtocolVersion,
    ConnectReason::ClientIdentifierNotValid,
    ConnectReason::BadUserNameOrPassword,
    ConnectReason::NotAuthorized,
    ConnectReason::ServerUnavailable,
    ConnectReason::ServerBusy,
    ConnectReason::Banned,
    ConnectReason::BadAuthenticationMethod,
    ConnectReason::TopicNameInvalid,
    ConnectReason::PacketTooLarge,
    ConnectReason::QuotaExceeded,
    ConnectReason::PayloadFormatInvalid,
    ConnectReason::RetainNotSupported,
    ConnectReason::QoSNotSupported,
    ConnectReason::UseAnotherServer,
    ConnectReason::ServerMoved,
    ConnectReason::ConnectionRateExceeded,
];

fn connack() -> impl Strategy<Value = Packet> {
    let a = (option::of(any::<u32>()), option::of(1u16..), bit(), bit(), option::of(1u32..), option::of(text()));
    let b = (option::of(any::<u16>()), option::of(text()), users(), bit(), bit(), bit());
    let c =
        (option::of(any::<u16>()), option::of(text()), option::of(text()), option::of(text()), option::of(binary()));
    (any::<bool>(), proptest::sample::select(CONNECT_REASONS), a, b, c).prop_map(
        |(session_present, code, (sei, rm, mq, ra, mps, aci), (tam, rs, up, wsa, sia, ssa), (ska, ri, sr, am, ad))| {
            Packet::ConnAck(ConnAck {
                session_present,
                code,
                properties: ConnAckProperties {
                    session_expiry_interval: sei,
                    receive_maximum: rm,
                    maximum_qos: mq,
                    retain_available: ra,
                    maximum_packet_size: mps,
                    assigned_client_identifier: aci,
                    topic_alias_maximum: tam,
                    reason_string: rs,
                    user_properties: up,
                    wildcard_subscription_available: wsa,
                    subscription_identifiers_available: sia,
                    shared_subscription_available: ssa,
                    server_keep_alive: ska,
                    response_information: ri,
                    server_reference: sr,
                    authentication_method: am,
                    authentication_data: ad,
                },
            })
        },
    )
}

fn publish() -> impl Strategy<Value = Packet> {
    let props = (message_props(), option::of(1u16..), vec(1u32..=268_435_455, 0..3)).prop_map(
        |(message, topic_alias, subscription_identifiers)| PublishProperties {
            message,
            topic_alias,
            subscription_identifiers,
        },
    );
    (any::<bool>(), qos(), any::<bool>(), topic_name(), 1u16.., vec(any::<u8>(), 0..300), props).prop_map(
        |(dup, qos, retain, topic, id, payload, properties)| {
            Packet::Publish(Publish {
                dup,
                qos,
                retain,
                topic,
                packet_id: Some(id),
                payload: Bytes::from(payload),
                properties,
            })
        },
    )
}

fn ack() -> impl Strategy<Value = Packet> {
    const PUBACK_REASONS: &[u8] = &[0x00u8, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
    (0..4u8, 1u16.., proptest::sample::select(PUBACK_REASONS), any::<bool>(), reason_props()).prop_map(
        |(kind, packet_id, reason, pubrel_fail, properties)| {
            let rel_reason = if pubrel_fail { 0x92 } else { 0 };
            match kind {
                0 => Packet::PubAck(PubAck { packet_id, reason, properties }),
                1 => Packet::PubRec(PubAck { packet_id, reason, properties }),
                2 => Packet::PubRel(PubAck { packet_id, reason: rel_reason, properties }),
                _ => Packet::PubComp(PubAck { packet_id, reason: rel_reason, properties }),
            }
        },
    )
}

fn subscribe() -> impl Strategy<Value = Packet> {
    let filter =
        (topic_filter(), qos(), any::<bool>(), any::<bool>(), 0u8..=2).prop_map(|(filter, qos, nl, rap, rh)| {
            let no_local = nl && !filter.starts_with("$share/");
            SubscribeFilter {
                filter,
                options: SubscriptionOptions { qos, no_local, retain_as_published: rap, retain_handling: rh },
            }
        });
    (1u16.., vec(filter, 1..4), option::of(1u32..=268_435_455), users()).prop_map(
        |(packet_id, filters, subscription_identifier, user_properties)| {
            Packet::Subscribe(Subscribe { packet_id, filters, subscription_identifier, user_properties })
        },
    )
}

fn suback() -> impl Strategy<Value = Packet> {
    const CODES: &[u8] = &[0x00u8, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2];
    (1u16.., vec(proptest::sample::select(CODES), 1..5), reason_props())
        .prop_map(|(packet_id, reasons, properties)| Packet::SubAck(SubAck { packet_id, reasons, properties }))
}

fn unsubscribe() -> impl Strategy<Value = Packet> {
    (1u16.., vec(topic_filter(), 1..4), users()).prop_map(|(packet_id, filters, user_properties)| {
        Packet::Unsubscribe(Unsubscribe { packet_id, filters, user_properties })
    })
}

fn unsuback() -> impl Strategy<Value = Packet> {
    const CODES: &[u8] = &[0x00u8, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
    (1u16.., vec(proptest::sample::select(CODES), 1..5), reason_props())
        .prop_map(|(packet_id, reasons, properties)| Packet::UnsubAck(UnsubAck { packet_id, reasons, properties }))
}

const DISCONNECT_REASONS: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];

fn disconnect() -> impl Strategy<Value = Packet> {
    (
        proptest::sample::select(DISCONNECT_REASONS),
        option::of(any::<u32>()),
        option::of(text()),
        users(),
        option::of(text()),
    )
        .prop_map(|(code, sei, rs, up, sr)| {
            Packet::Disconnect(Disconnect {
                reason: disconnect_reason_from(code).unwrap(),
                session_expiry_interval: sei,
                reason_string: rs,
                user_properties: up,
                server_reference: sr,
            })
        })
}

fn auth() -> impl Strategy<Value = Packet> {
    (
        prop_oneof![Just(0u8), Just(0x18), Just(0x19)],
        option::of(text()),
        option::of(binary()),
        option::of(text()),
        users(),
    )
        .prop_map(|(reason, am, ad, rs, up)| {
            Packet::Auth(Auth {
                reason,
                authentication_method: am,
                authentication_data: ad,
                reason_string: rs,
                user_properties: up,
            })
        })
}

fn packet() -> impl Strategy<Value = Packet> {
    prop_oneof![
        connect(),
        connack(),
        publish(),
        ack(),
        subscribe(),
        suback(),
        unsubscribe(),
        unsuback(),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        disconnect(),
        auth(),
    ]
}

/// Makes a V5-valid packet writable as 3.1.1 (or returns None for AUTH).
fn for_v311(p: Packet) -> Option<Packet> {
    match p {
        Packet::Auth(_) => None,
        Packet::Connect(mut c) => {
            c.version = V311;
            if c.password.is_some() && c.username.is_none() {
                c.username = Some(String::new());
            }
            Some(Packet::Connect(c))
        }
        p => Some(p),
    }
}

fn round_trip(p: &Packet, v: Version) -> Result<(), TestCaseError> {
    let mut out = BytesMut::new();
    encode(p, v, &mut out).map_err(|e| TestCaseError::fail(format!("encode: {e}")))?;
    prop_assert_eq!(out.len(), encoded_len(p, v));
    let got = decode(&mut out, v, MAX_PACKET_SIZE);
    prop_assert_eq!(got, Ok(Some(normalize(p, v))));
    prop_assert!(out.is_empty());
    Ok(())
}

/// Decodes packets from `bytes` until it stops; every packet must survive a
/// re-encode and re-decode.
fn decode_all(bytes: &[u8], v: Version, max: usize) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(p)) = decode(&mut buf, v, max) {
        let mut out = BytesMut::new();
        encode(&p, v, &mut out).map_err(|e| TestCaseError::fail(format!("re-encode {p:?}: {e}")))?;
        prop_assert_eq!(out.len(), encoded_len(&p, v));
        prop_assert_eq!(decode(&mut out, v, MAX_PACKET_SIZE), Ok(Some(p)));
    }
    Ok(())
}

proptest! {
    #[test]
    fn arbitrary_packets_round_trip_v5(p in packet()) {
        round_trip(&p, V5)?;
    }

    #[test]
    fn arbitrary_packets_round_trip_v311(p in packet()) {
        if let Some(p) = for_v311(p) {
            round_trip(&p, V311)?;
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        for v in [V311, V5] {
            for max in [16, 300, MAX_PACKET_SIZE] {
                decode_all(&bytes, v, max)?;
            }
        }
    }

    #[test]
    fn mutated_packets_never_panic(
        p in packet(),
        edits in vec((any::<proptest::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<proptest::sample::Index>(),
    ) {
        for v in [V311, V5] {
            let Some(p) = (if v == V5 { Some(p.clone()) } else { for_v311(p.clone()) }) else { continue };
            let mut bytes = BytesMut::new();
            encode(&p, v, &mut bytes).unwrap();
            let mut bytes = bytes.to_vec();
            for (i, x) in &edits {
                let i = i.index(bytes.len());
                bytes[i] ^= x;
            }
            decode_all(&bytes, v, MAX_PACKET_SIZE)?;
            let n = cut.index(bytes.len() + 1);
            decode_all(&bytes[..n], v, MAX_PACKET_SIZE)?;
        }
    }
}
