//! Peers that hold the cluster key but misbehave: one that never announces
//! a node record, one that announces other fleet settings, one that is a
//! member but sends invalid frames. Each is a hand-driven libp2p swarm in
//! this process (the driver's own transport stack, no kadmq on top), talking
//! to real kadmq nodes over a real link: nothing it sends is applied, every
//! drop is counted by reason, and the node goes on routing for good peers.

use crate::support::lab::{wait_for_members, Lab, Node, SETTLE};
use crate::support::mqtt::Client;
use crate::support::runtime;
use crate::support::wait::wait_until;
use bytes::Bytes;
use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use kadmq::broker::message::Message;
use kadmq::cluster::wire;
use kadmq_dht::core::{Frame, RouteOp};
use kadmq_dht::driver::{
    self,
    behaviour::{build_swarm, MEMBERSHIP_TOPIC},
    frames::{encode_frame, ACCEPTED, PROTOCOL},
    membership::RECORD_VERSION,
    DriverConfig, FleetSettings, Load, NodeRecord,
};
use kadmq_dht::shard::{filter_shard, DEFAULT_SHARD_DEPTH};
use libp2p::{gossipsub, Multiaddr, PeerId};
use rumqttc::{Event, Packet, QoS};
use std::time::Duration;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

/// The settings every kadmq node of these tests runs with.
fn fleet() -> FleetSettings {
    FleetSettings {
        replication: 3,
        shard_depth: DEFAULT_SHARD_DEPTH as u32,
        frame_version: kadmq::cluster::frame_version(),
    }
}

/// A test peer holding `lab`'s cluster key, connected to `node`; it
/// announces a node record with `announce` (none: it never does) and writes
/// whatever is sent on the returned channel as frames to `node`.
fn test_peer(
    rt: &Runtime,
    lab: &Lab,
    node: &Node,
    name: &str,
    announce: Option<FleetSettings>,
) -> (PeerId, mpsc::UnboundedSender<Bytes>) {
    test_peer_after(rt, lab, node, name, announce, Duration::ZERO)
}

/// [`test_peer`], announcing its record only `after` (its frames go at once).
fn test_peer_after(
    rt: &Runtime,
    lab: &Lab,
    node: &Node,
    name: &str,
    announce: Option<FleetSettings>,
    after: Duration,
) -> (PeerId, mpsc::UnboundedSender<Bytes>) {
    let _guard = rt.enter();
    let key = driver::read_cluster_key(&lab.key).unwrap();
    let config = DriverConfig::new(name, driver::generate_keypair(), key);
    let mut swarm = build_swarm(&config).unwrap();
    let me = *swarm.local_peer_id();
    swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap()).unwrap();
    let topic = gossipsub::IdentTopic::new(MEMBERSHIP_TOPIC);
    swarm.behaviour_mut().gossipsub.subscribe(&topic).unwrap();
    let target: Multiaddr = node.multiaddr().parse().unwrap();
    let node_peer = driver::peer_id_of(&target).unwrap();
    swarm.dial(target).unwrap();
    let mut control = swarm.behaviour().stream.new_control();
    let name = name.to_string();
    rt.spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + after, Duration::from_millis(300));
        let mut seq = 0;
        loop {
            tokio::select! {
                _ = swarm.select_next_some() => {}
                _ = tick.tick() => if let Some(fleet) = announce {
                    seq += 1;
                    let record = NodeRecord {
                        version: RECORD_VERSION,
                        peer_id: me.to_bytes(),
                        name: name.clone(),
                        listen_addrs: Vec::new(),
                        mqtt_listeners: Vec::new(),
                        incarnation: 1,
                        load: Load::default(),
                        seq,
                        leaving: false,
                        fleet,
                    };
                    let _ = swarm.behaviour_mut().gossipsub.publish(topic.clone(), record.encode());
                }
            }
        }
    });
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    rt.spawn(async move {
        // The frame protocol: open, wait for the receiver's acceptance, write.
        let mut stream = loop {
            if let Ok(mut stream) = control.open_stream(node_peer, PROTOCOL).await {
                let mut byte = [0u8];
                if stream.read_exact(&mut byte).await.is_ok() && byte[0] == ACCEPTED {
                    break stream;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        while let Some(frame) = rx.recv().await {
            let mut buf = Vec::new();
            encode_frame(&frame, &mut buf);
            if stream.write_all(&buf).await.is_err() || stream.flush().await.is_err() {
                return;
            }
        }
    });
    (me, tx)
}

/// Nodes n1 and n2 of `lab`, and a test peer `name` that n1 admitted as a
/// member (its frames go to n1).
fn two_nodes_and_a_member_peer(
    rt: &Runtime,
    lab: &Lab,
    name: &str,
) -> (Node, Node, PeerId, mpsc::UnboundedSender<Bytes>) {
    let n1 = lab.node("n1", None);
    let n2 = lab.node("n2", Some(&n1.multiaddr()));
    wait_for_members(&[&n1, &n2], &["n1", "n2"]);
    let (peer, to_n1) = test_peer(rt, lab, &n1, name, Some(fleet()));
    wait_until(SETTLE, "n1 to admit the test peer", || n1.alive_members().contains(&name.to_string()));
    (n1, n2, peer, to_n1)
}

fn assert_op(filter: &str, shard_of: &str) -> Bytes {
    let op = RouteOp { filter: filter.into(), group: None, count: 1 };
    wire::encode_route(&Frame::Assert {
        shard: filter_shard(shard_of, DEFAULT_SHARD_DEPTH),
        seq: 1,
        replace: false,
        ops: vec![op],
        split: false,
        more: false,
    })
}

fn rejected(node: &Node, reason: &str) -> u64 {
    node.metric(&format!("kadmq_cluster_frames_rejected_total{{reason=\"{reason}\"}}"))
}

/// Log lines of `node` naming `peer` and containing `text`.
fn log_lines(node: &Node, peer: &PeerId, text: &str) -> usize {
    let peer = peer.to_string();
    node.log().lines().filter(|l| l.contains(&peer) && l.contains(text)).count()
}

#[test]
fn a_peer_without_a_record_or_with_other_settings_gets_nothing_applied() {
    let rt = runtime();
    let lab = Lab::new();
    let n1 = lab.node_with("n1", None, &lab.key, &["--dead-timeout", "3"]);
    wait_for_members(&[&n1], &["n1"]);

    // No record: its frames are held, then dropped after the dead timeout.
    let (mute, to_n1) = test_peer(&rt, &lab, &n1, "mute", None);
    for i in 0..50 {
        to_n1.send(assert_op(&format!("mute/{i}"), &format!("mute/{i}"))).unwrap();
    }
    wait_until(SETTLE, "n1 to drop the frames of a peer without a record", || rejected(&n1, "not_member") >= 1);
    assert_eq!(n1.metric("kadmq_cluster_shard_entries_owned"), 0, "nothing of the mute peer applied");
    assert_eq!(log_lines(&n1, &mute, "not_member"), 1, "one log line for the peer, not one per frame");

    // Other settings: refused, with one line naming both sides.
    let other = FleetSettings { replication: 2, ..fleet() };
    let (odd, to_n1) = test_peer(&rt, &lab, &n1, "odd", Some(other));
    for i in 0..50 {
        to_n1.send(assert_op(&format!("odd/{i}"), &format!("odd/{i}"))).unwrap();
    }
    wait_until(SETTLE, "n1 to refuse the peer with replication 2", || rejected(&n1, "mismatch") >= 1);
    // Records keep coming (one each 300 ms): still one line.
    std::thread::sleep(Duration::from_secs(3));
    let line = "has replication 2, shard_depth 2, frame version";
    assert_eq!(log_lines(&n1, &odd, line), 1, "{}", n1.log());
    assert!(n1.log().contains("this fleet runs replication 3, shard_depth 2"));
    assert_eq!(n1.metric("kadmq_cluster_shard_entries_owned"), 0, "nothing of the refused peer applied");
    // The node stays healthy, and neither peer became a member.
    assert_eq!(n1.alive_members(), ["n1"]);
    assert_eq!(n1.metric("kadmq_cluster_members"), 1);
}

#[test]
fn invalid_frames_of_a_member_are_counted_and_the_node_keeps_routing() {
    let rt = runtime();
    let lab = Lab::new();
    let (n1, n2, bad, to_n1) = two_nodes_and_a_member_peer(&rt, &lab, "bad");
    let deep = vec!["l"; 129].join("/");
    let garbage = Bytes::from_static(&[wire::VERSION, 1, 0xc1, 0xff]);
    let mut wildcard = Vec::new();
    let message = Message {
        topic: "a/+".into(),
        payload: Bytes::from_static(b"x"),
        qos: kadmq::protocol::QoS::AtMostOnce,
        retain: false,
        properties: Default::default(),
        expires_at_ms: None,
        origin: None,
        fleet_id: None,
    };
    let plain = kadmq_dht::core::ForwardRoute::plain();
    wire::write_forward(&mut wildcard, 0, None, &message, &plain);
    // Each bad frame 20 times: counted 20 times, logged once.
    for _ in 0..20 {
        to_n1.send(assert_op("bad/#/x", "bad")).unwrap();
        to_n1.send(assert_op("bad/a/b", "elsewhere/z")).unwrap();
        to_n1.send(assert_op(&deep, &deep)).unwrap();
        to_n1.send(garbage.clone()).unwrap();
        to_n1.send(Bytes::from(wildcard.clone())).unwrap();
    }
    wait_until(SETTLE, "n1 to count every bad frame", || {
        ["invalid_filter", "wrong_shard", "too_deep", "malformed", "invalid_topic"]
            .iter()
            .all(|r| rejected(&n1, r) >= 20)
    });
    for reason in ["invalid_filter", "wrong_shard", "too_deep", "malformed", "invalid_topic"] {
        assert_eq!(log_lines(&n1, &bad, reason), 1, "{reason} logged once for the peer");
    }
    assert!(n1.metric("kadmq_cluster_shard_entries_owned") < 3, "none of the bad filters was applied");

    // Routing between the good nodes goes on: a publish on n2 reaches a
    // subscriber on n1.
    rt.block_on(async {
        let mut sub = Client::start("sub", Client::options("sub", n1.mqtt_port));
        sub.client.subscribe("good/#", QoS::AtLeastOnce).await.unwrap();
        let publisher = Client::start("pub", Client::options("pub", n2.mqtt_port));
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            publisher.publish("good/1", QoS::AtLeastOnce, false, "hi").await;
            let publish = |e: &Event| match e {
                Event::Incoming(Packet::Publish(p)) => Some(p.topic.clone()),
                _ => None,
            };
            if let Some(topic) = sub.next_within(Duration::from_millis(500), publish).await {
                assert_eq!(topic, "good/1");
                break;
            }
            if let Some(err) = sub.ended() {
                panic!("subscriber: {err}");
            }
            assert!(tokio::time::Instant::now() < deadline, "no publish from n2 reached n1");
        }
    });
    assert_eq!(n1.alive_members(), ["bad", "n1", "n2"], "n1 is healthy and kept its members");
}

#[test]
fn frames_that_come_before_the_record_are_applied_once_it_arrives() {
    let rt = runtime();
    let lab = Lab::new();
    let n1 = lab.node_with("n1", None, &lab.key, &["--dead-timeout", "6"]);
    wait_for_members(&[&n1], &["n1"]);
    let (_, to_n1) = test_peer_after(&rt, &lab, &n1, "late", Some(fleet()), Duration::from_secs(2));
    for i in 0..50 {
        to_n1.send(assert_op(&format!("late/{i}"), &format!("late/{i}"))).unwrap();
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(n1.metric("kadmq_cluster_shard_entries_owned"), 0, "held, not applied, before the record");
    wait_until(SETTLE, "the held frames to be applied at MemberUp", || {
        n1.metric("kadmq_cluster_shard_entries_owned") == 50
    });
    assert_eq!(rejected(&n1, "not_member"), 0);
    assert_eq!(n1.alive_members(), ["late", "n1"]);
}

#[test]
fn what_a_node_keeps_for_a_dead_peer_goes_after_the_dead_timeout() {
    let rt = runtime();
    let lab = Lab::new();
    let n1 = lab.node_with("n1", None, &lab.key, &["--dead-timeout", "3"]);
    let mut n2 = lab.node_with("n2", Some(&n1.multiaddr()), &lab.key, &["--dead-timeout", "3"]);
    wait_for_members(&[&n1, &n2], &["n1", "n2"]);
    // Route frames flow both ways: each node has a subscriber, and each
    // asserts its route to the shard's owners, the other node among them.
    // (With a subscriber on n2 only, n1 might send n2 nothing for a while.)
    rt.block_on(async {
        let mut subscribers = Vec::new();
        for (id, node) in [("s1", &n1), ("s2", &n2)] {
            let sub = Client::start(id, Client::options(id, node.mqtt_port));
            sub.client.subscribe("keep/#", QoS::AtLeastOnce).await.unwrap();
            subscribers.push(sub); // its event loop runs while it lives
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    wait_until(SETTLE, "n1 to keep a send queue for n2", || n1.metric("kadmq_cluster_peer_queues") == 1);
    assert_eq!(n1.metric("kadmq_cluster_peers_known"), 2);
    n2.kill();
    wait_until(SETTLE, "n1 to declare n2 dead", || n1.alive_members() == ["n1"]);
    // Dead for longer than the dead timeout: its queue, sender task and
    // address are gone.
    wait_until(SETTLE, "n1 to forget n2's queue and address", || {
        n1.metric("kadmq_cluster_peer_queues") == 0 && n1.metric("kadmq_cluster_peers_known") == 1
    });
    assert_eq!(n1.metric("kadmq_cluster_send_buffer_bytes"), 0, "nothing held for the dead");
}

/// Forwards flagged "sent on for X" (what a node that took X for dead
/// sends every member) from a member peer to n1, for three X: n2, alive at
/// n1 (n1 forwards it to n2, whose subscriber gets it); n1 itself (taken
/// for dead wrongly: its own subscriber gets it); and a node n1 never knew
/// (it adopted no session of it: nobody gets it). Then a QoS 2 message n1
/// delivered, sent on for n1 again: it keeps its fleet id, and n1 does not
/// deliver it twice.
#[test]
fn a_message_sent_on_for_a_node_alive_here_goes_to_it_and_one_for_this_node_is_delivered_here_once() {
    let rt = runtime();
    let lab = Lab::new();
    let (n1, n2, peer, to_n1) = two_nodes_and_a_member_peer(&rt, &lab, "sender");
    let node_of = |node: &Node| {
        let peer = driver::peer_id_of(&node.multiaddr().parse().unwrap()).unwrap();
        kadmq::cluster::node_id(&peer)
    };
    // A forward numbered `id` by the peer, of the message it first
    // forwarded as `fleet`.
    let forward =
        |seq: u64, id: u64, fleet: u64, sent_on: Option<kadmq_dht::core::NodeId>, qos, payload: &'static str| {
            let message = Message {
                topic: "relay/x".into(),
                payload: Bytes::from_static(payload.as_bytes()),
                qos,
                retain: false,
                properties: Default::default(),
                expires_at_ms: None,
                origin: None,
                fleet_id: sent_on.map(|_| (kadmq::cluster::node_id(&peer).0, fleet)),
            };
            let route = kadmq_dht::core::ForwardRoute { sent_on, ..kadmq_dht::core::ForwardRoute::plain() };
            let sequence = kadmq::cluster::outbox::Sequence { epoch: 1, seq, base: 0 };
            let mut frame = Vec::new();
            wire::write_forward(&mut frame, id, Some(sequence), &message, &route);
            Bytes::from(frame)
        };
    let sent_on =
        |seq: u64, to, payload| forward(seq, seq + 1, seq + 1, Some(to), kadmq::protocol::QoS::AtLeastOnce, payload);
    let payloads = |client: &Client| -> Vec<String> {
        client.received().iter().map(|r| String::from_utf8_lossy(&r.publish.payload).into_owned()).collect()
    };
    let (mut on_n1, _) = rt.block_on(Client::connect_ok(Client::options("on-n1", n1.mqtt_port)));
    let (mut on_n2, _) = rt.block_on(Client::connect_ok(Client::options("on-n2", n2.mqtt_port)));
    rt.block_on(on_n1.subscribe("relay/#", QoS::ExactlyOnce));
    rt.block_on(on_n2.subscribe("relay/#", QoS::AtLeastOnce));
    to_n1.send(sent_on(0, kadmq_dht::core::NodeId(12_345), "for nobody")).unwrap();
    to_n1.send(sent_on(1, node_of(&n2), "for n2")).unwrap();
    to_n1.send(sent_on(2, node_of(&n1), "for n1")).unwrap();
    let qos2 = kadmq::protocol::QoS::ExactlyOnce;
    to_n1.send(forward(3, 100, 100, None, qos2, "qos 2")).unwrap();
    // Sent on under a new number, as the outbox does.
    to_n1.send(forward(4, 101, 100, Some(node_of(&n1)), qos2, "qos 2")).unwrap();
    // n1 takes one member's frames in order: once it counted the second
    // "qos 2" as a duplicate, it has delivered everything before it.
    wait_until(SETTLE, "n1 to see the QoS 2 copy sent on as a duplicate", || {
        n1.metric("kadmq_cluster_qos2_duplicates_total") >= 1
    });
    assert_eq!(n1.metric("kadmq_cluster_qos2_duplicates_total"), 1);
    wait_until(SETTLE, "n1's deliveries", || payloads(&on_n1).len() >= 2);
    wait_until(SETTLE, "the message for n2", || !payloads(&on_n2).is_empty());
    assert_eq!(payloads(&on_n1), ["for n1", "qos 2"], "on n1");
    assert_eq!(payloads(&on_n2), ["for n2"], "on n2");
    assert_eq!(n1.metric("kadmq_cluster_sent_on_relayed_total"), 1);
    assert_eq!(n1.metric("kadmq_cluster_sent_on_unknown_total"), 1, "the one for nobody, not kept");
    assert_eq!(n1.metric("kadmq_cluster_sent_on_dropped_total"), 0);
}
