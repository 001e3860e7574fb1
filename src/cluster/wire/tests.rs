//! The envelope's round trips and its refusals of malformed frames.

use super::*;

fn decode(bytes: &[u8]) -> Result<Wire, WireError> {
    super::decode(&Bytes::copy_from_slice(bytes))
}

fn retained_item(topic: &str, message: Option<Message>) -> crate::cluster::retained_item::FleetRetained {
    crate::cluster::retained_item::FleetRetained {
        topic: topic.into(),
        hlc: 9 << 16,
        origin: 3,
        message,
        cleared_at_ms: 0,
    }
}

fn forward() -> Forward {
    Forward {
        id: 7,
        sequence: Some(Sequence { epoch: 3, seq: 9, base: 4 }),
        message: Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::ExactlyOnce,
            retain: false,
            properties: Default::default(),
            expires_at_ms: Some(99),
            origin: Some("c1".into()),
            fleet_id: None,
        },
        route: ForwardRoute {
            plain: true,
            shared: vec![SharedPick { group: "g".into(), filter: "a/+".into() }],
            sent_on: None,
        },
    }
}

#[test]
fn forwards_with_properties_and_without_options_round_trip() {
    let mut f = forward();
    f.message.properties.content_type = Some("text/plain".into());
    f.message.properties.user_properties = vec![("k".into(), "v".into())];
    let bytes = encode_forward(f.id, f.sequence, &f.message, &f.route);
    assert_eq!(decode(&bytes).unwrap(), Wire::Forward(Box::new(f.clone())));
    f.sequence = None;
    f.message.origin = None;
    f.message.expires_at_ms = None;
    f.message.retain = true;
    f.message.qos = QoS::AtMostOnce;
    f.route = ForwardRoute::plain();
    let bytes = encode_forward(f.id, f.sequence, &f.message, &f.route);
    assert_eq!(decode(&bytes).unwrap(), Wire::Forward(Box::new(f)));
}

#[test]
fn forwards_and_acks_round_trip() {
    let f = forward();
    let wire = Wire::Forward(Box::new(f.clone()));
    assert_eq!(decode(&encode_forward(f.id, f.sequence, &f.message, &f.route)).unwrap(), wire);
    assert_eq!(decode(&encode_ack(2, u64::MAX)).unwrap(), Wire::Ack { epoch: 2, upto: u64::MAX });
    let put =
        RetainFrame::Put { items: vec![retained_item("a/b", Some(f.message.clone()))], relay: true, ack: Some(3) };
    assert_eq!(decode(&encode_retained(&put)).unwrap(), Wire::Retained(Box::new(put)));
    let digests = RetainFrame::Digests { items: vec![(kadmq_dht::shard::ShardKey::of_prefix("a/b"), 7)], reply: false };
    assert_eq!(decode(&encode_retained(&digests)).unwrap(), Wire::Retained(Box::new(digests)));
    let stored = RetainFrame::Stored { req: 3 };
    assert_eq!(decode(&encode_retained(&stored)).unwrap(), Wire::Retained(Box::new(stored)));
    let query = RetainFrame::Query { req: 4, filter: "a/+".into() };
    assert_eq!(decode(&encode_retained(&query)).unwrap(), Wire::Retained(Box::new(query)));
    let answer = RetainFrame::Answer { req: 4, items: vec![retained_item("a/c", None)], last: true };
    assert_eq!(decode(&encode_retained(&answer)).unwrap(), Wire::Retained(Box::new(answer)));
    assert_eq!(decode(&encode_rejoined()).unwrap(), Wire::Rejoined);
}

#[test]
fn a_batch_carries_its_frames_in_order() {
    let f = forward();
    let frames = vec![encode_forward(1, None, &f.message, &f.route), encode_ack(1, 2), encode_rejoined()];
    let batch = encode_batch(&frames);
    assert_eq!(unbatch(batch).unwrap(), frames);
    // A single frame is its own batch.
    assert_eq!(unbatch(frames[1].clone()).unwrap(), vec![frames[1].clone()]);
    // A truncated batch is an error; a batch inside a batch does not decode.
    let batch = encode_batch(&frames);
    assert!(matches!(unbatch(batch.slice(..batch.len() - 1)), Err(WireError::Batch)));
    let nested = encode_batch(&[encode_batch(&frames)]);
    let inner = unbatch(nested).unwrap();
    assert!(matches!(decode(&inner[0]), Err(WireError::Kind(BATCH))));
}

#[test]
fn bad_frames_are_errors_not_panics() {
    assert!(matches!(decode(&[]), Err(WireError::Empty)));
    assert!(matches!(decode(&[9, ACK, 0x90]), Err(WireError::Version(9))));
    assert!(matches!(decode(&[VERSION, 77]), Err(WireError::Kind(77))));
    assert!(matches!(decode(&[VERSION, FORWARD, 0xc1]), Err(WireError::Forward(_))));
    assert!(matches!(decode(&[VERSION, ROUTE, 0xc1]), Err(WireError::Route(_))));
    let f = forward();
    let mut truncated = encode_forward(f.id, None, &f.message, &f.route).to_vec();
    truncated.truncate(truncated.len() - 3);
    assert!(decode(&truncated).is_err());
    let mut longer = encode_forward(f.id, None, &f.message, &f.route).to_vec();
    longer.push(0);
    assert!(decode(&longer).is_err());
    // Any prefix of a forward is an error, never a panic.
    let whole = encode_forward(f.id, f.sequence, &f.message, &f.route);
    for len in 0..whole.len() {
        assert!(decode(&whole[..len]).is_err(), "prefix of {len} bytes");
    }
}

/// Decodes a forward built from `f` (encoded as the sender would).
fn decode_forward(f: &Forward) -> Result<Wire, WireError> {
    decode(&encode_forward(f.id, f.sequence, &f.message, &f.route))
}

fn invalid(result: Result<Wire, WireError>) -> &'static str {
    match result {
        Err(WireError::Invalid(what)) => what,
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

#[test]
fn forwarded_topics_must_be_valid_and_within_the_level_limit() {
    for topic in ["a/+", "#", "", "a\0b"] {
        let mut f = forward();
        f.message.topic = topic.into();
        assert_eq!(invalid(decode_forward(&f)), "topic", "{topic:?}");
    }
    let mut f = forward();
    f.message.topic = vec!["t"; core::node::DEFAULT_MAX_TOPIC_LEVELS + 1].join("/");
    assert_eq!(invalid(decode_forward(&f)), "topic");
    f.message.topic = vec!["t"; core::node::DEFAULT_MAX_TOPIC_LEVELS].join("/");
    assert!(decode_forward(&f).is_ok());
}

#[test]
fn sequences_and_ids_must_fit_the_qos() {
    let mut f = forward();
    f.sequence = None;
    assert_eq!(invalid(decode_forward(&f)), "sequence (missing)");
    let mut f = forward();
    f.message.qos = QoS::AtMostOnce;
    assert_eq!(invalid(decode_forward(&f)), "sequence (QoS 0)");
    let mut f = forward();
    f.sequence = Some(Sequence { epoch: 1, seq: u64::MAX, base: 0 });
    assert_eq!(invalid(decode_forward(&f)), "sequence");
    f.sequence = Some(Sequence { epoch: 1, seq: 3, base: 4 });
    assert_eq!(invalid(decode_forward(&f)), "sequence");
    let mut f = forward();
    f.id = 0;
    assert_eq!(invalid(decode_forward(&f)), "message id");
    // QoS 3 does not even parse.
    let mut bytes = encode_forward(7, None, &forward().message, &forward().route).to_vec();
    bytes[11] = 3;
    assert!(matches!(decode(&bytes), Err(WireError::Forward("qos"))));
}

#[test]
fn a_forward_sent_on_for_a_dead_node_round_trips_with_its_fleet_id_and_must_be_numbered_and_plain() {
    let mut f = forward();
    f.route.sent_on = Some(NodeId(u64::MAX - 1));
    f.message.fleet_id = Some((11, 5));
    assert_eq!(decode_forward(&f).unwrap(), Wire::Forward(Box::new(f.clone())), "the fleet id travels with it");
    let bytes = encode_forward(f.id, f.sequence, &f.message, &f.route);
    assert!(bytes.len() <= forward_size(&f.message, &f.route), "{} bytes", bytes.len());
    let mut numberless = f.clone();
    numberless.message.fleet_id = Some((11, 0));
    assert_eq!(invalid(decode_forward(&numberless)), "fleet id");
    let mut unnumbered = f.clone();
    unnumbered.sequence = None;
    unnumbered.message.qos = QoS::AtMostOnce;
    assert_eq!(invalid(decode_forward(&unnumbered)), "route (sent on)");
    let mut shared_only = f.clone();
    shared_only.route.plain = false;
    assert_eq!(invalid(decode_forward(&shared_only)), "route (sent on)");
    // An unknown route flag is refused, not read as "plain".
    let bytes = encode_forward(f.id, f.sequence, &f.message, &ForwardRoute::plain()).to_vec();
    let flags = bytes.len() - f.message.payload.len() - 4 - 2 - 1;
    assert_eq!(bytes[flags], 1, "the route flags byte");
    let mut bytes = bytes;
    bytes[flags] = 4 | 1;
    assert_eq!(invalid(decode(&bytes)), "route flags");
}

#[test]
fn shared_picks_origin_and_properties_are_checked() {
    for (group, filter) in [("", "a/+"), ("g/h", "a/+"), ("g", "a/#/b"), ("g", "")] {
        let mut f = forward();
        f.route.shared = vec![SharedPick { group: group.into(), filter: filter.into() }];
        assert_eq!(invalid(decode_forward(&f)), "shared subscription pick", "{group:?} {filter:?}");
    }
    let mut f = forward();
    f.route = ForwardRoute::default();
    assert_eq!(invalid(decode_forward(&f)), "route (nothing to deliver)");
    let mut f = forward();
    f.message.origin = Some("".into());
    assert_eq!(invalid(decode_forward(&f)), "origin");
    let mut f = forward();
    f.message.properties.correlation_data = Some(Bytes::from(vec![0u8; MAX_PROPERTIES + 1]));
    assert_eq!(invalid(decode_forward(&f)), "properties");
    // A response topic is opaque here (the broker passes it on as the
    // publisher gave it): only its size counts.
    let mut f = forward();
    f.message.properties.response_topic = Some("r/+".into());
    assert!(decode_forward(&f).is_ok());
}

#[test]
fn retained_messages_are_checked_and_bounded() {
    let put = |items| encode_retained(&RetainFrame::Put { items, relay: false, ack: None });
    assert_eq!(invalid(decode(&put(vec![retained_item("a/#", None)]))), "topic");
    let mut m = forward().message;
    m.topic = "a/#".into();
    assert_eq!(invalid(decode(&put(vec![retained_item("a/b", Some(m))]))), "topic", "the message is checked too");
    let many = vec![retained_item("a/b", None); MAX_RETAINED_ITEMS + 1];
    assert_eq!(invalid(decode(&put(many))), "retained messages (too many)");
    let query = RetainFrame::Query { req: 1, filter: "a/#/b".into() };
    assert_eq!(invalid(decode(&encode_retained(&query))), "retained query filter");
    assert_eq!(WireError::Invalid("topic").reason(), "invalid_topic");
    assert_eq!(WireError::Invalid("origin").reason(), "invalid_field");
    assert_eq!(WireError::Version(9).reason(), "version");
}

#[test]
fn session_frames_round_trip_and_what_a_client_could_not_be_sent_is_refused() {
    use super::super::sessions::{Part, SessionFrame, Update};
    use crate::broker::session::MovedSession;
    use crate::storage::{StoredDelivery, StoredSession, StoredSubscription};
    let delivery = |packet_id| StoredDelivery {
        message: forward().message,
        qos: QoS::ExactlyOnce,
        retain: false,
        subscription_ids: vec![1],
        packet_id,
        released: false,
    };
    let session = StoredSession {
        expiry_interval: 60,
        subscriptions: vec![StoredSubscription {
            filter: "a/+".into(),
            options: crate::protocol::SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
            },
            identifier: Some(1),
        }],
        incoming_qos2: vec![5],
        disconnected_at_ms: Some(1),
    };
    let moved = |packet_id| MovedSession {
        session: session.clone(),
        deliveries: vec![delivery(packet_id)],
        pending_will: None,
        seen: vec![(1, 2)],
    };
    let handover = |packet_id| SessionFrame::Handover { req: 3, part: Part::Session(moved(packet_id)), last: true };
    let ok = handover(Some(7));
    assert_eq!(decode(&encode_session(&ok)).unwrap(), Wire::Session(Box::new(ok)));
    assert!(matches!(decode(&encode_session(&handover(Some(0)))), Err(WireError::Invalid("session delivery"))));
    let copy = Update::Copy { deliveries: vec![(1, delivery(None))], whole: true, more: false };
    let directory = SessionFrame::Directory { client: "c".into(), version: 2, update: copy };
    assert!(decode(&encode_session(&directory)).is_ok());
    for client in ["", "a\0b"] {
        let claim = SessionFrame::Claim { req: 1, client: client.into(), clean_start: false };
        assert!(matches!(decode(&encode_session(&claim)), Err(WireError::Invalid("client id"))), "{client:?}");
    }
    let mut bad = session.clone();
    bad.subscriptions[0].filter = "a/#/b".into();
    let update = SessionFrame::Directory { client: "c".into(), version: 2, update: Update::Session(bad) };
    assert!(matches!(decode(&encode_session(&update)), Err(WireError::Invalid("session subscriptions"))));
}
