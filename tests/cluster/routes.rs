//! The route table never misses: a SUBACK means the routes are at their
//! owners, and route frames lost on a link (the fault hook) are repaired.
//!
//! - subscribe on one node, publish at once on another, 100 fresh topics at
//!   QoS 1: nothing missed;
//! - the route frames between two nodes lost (the fault hook) during
//!   subscribe/unsubscribe churn, then the link healed: every node's view
//!   of where each topic goes (`/api/v1/routes`) converges to the truth
//!   within seconds, with no anti-entropy round to help (the resync);
//! - a SUBACK whose owners cannot be reached goes out after the timeout
//!   (counted), and the route reaches them once the link heals.

use crate::support::lab::{strings, Lab, Node};
use crate::support::mqtt::Client;
use crate::support::wait::{try_wait_until_every, wait_until};
use rumqttc::{Event, Packet, QoS};
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;

/// How long a client may take for what must come (CONNACK, SUBACK, acks).
const WAIT: Duration = Duration::from_secs(30);
/// Heartbeats of debug builds on a busy 2-core machine are late at times;
/// a member wrongly declared dead would move shards under these tests.
const CALM: [&str; 2] = ["--dead-timeout", "30"];

async fn connect(node: &Node, id: &str) -> Client {
    let (client, ack) = Client::connect(Client::options(id, node.mqtt_port)).await;
    assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success, "{id} on {}", node.name);
    client
}

async fn puback(client: &mut Client) {
    client.wait_for("PUBACK", |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_right_after_the_suback_reaches_a_subscriber_on_another_node() {
    let lab = Lab::new();
    let [a, _b, c] = lab.fleet(["a", "b", "c"], &CALM);
    // A slow link from c to a: c's assertions reach a 150 ms late. Without
    // the wait for a's acknowledgement the SUBACK would come first, and a
    // (an owner of every shard, R = 3) would route the publish to nobody.
    c.delay("a", 150);
    // Past the hand-off warm-up (3 s after the last membership change),
    // when an owner reads its own copy instead of asking another owner.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut subscriber = connect(&c, "sub-c").await;
    let mut publisher = connect(&a, "pub-a").await;
    const TOPICS: usize = 100;
    for i in 0..TOPICS {
        // A fresh shard each time (two literal levels name a shard).
        let topic = format!("fresh/{i}/t");
        let codes = subscriber.subscribe(&topic, QoS::AtLeastOnce).await;
        assert_eq!(codes, vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
        publisher.publish(&topic, QoS::AtLeastOnce, false, i.to_string()).await;
        puback(&mut publisher).await;
    }
    // Every publish was acknowledged: what is forwarded is on its way.
    let got = || subscriber.received().into_iter().map(|r| r.publish.topic).collect::<BTreeSet<String>>();
    tokio::task::block_in_place(|| wait_until(WAIT, "the publishes", || got().len() >= TOPICS));
    let got = got();
    let missed: Vec<String> = (0..TOPICS).map(|i| format!("fresh/{i}/t")).filter(|t| !got.contains(t)).collect();
    assert!(missed.is_empty(), "published right after the SUBACK and missed: {missed:?}");
    assert!(c.metric("kadmq_cluster_subscribe_waits_total") > 0, "the SUBACKs waited for the owners");
    assert_eq!(c.metric("kadmq_cluster_subscribe_ack_timeouts_total"), 0);
}

/// Whether `node`'s view of where `topic` goes is `want`: the nodes named
/// by the shards it owns or caches, and for a shard it holds neither way
/// (the next publish looks it up) by that shard's owners, each of which
/// must agree. No shard passes for want of an answer.
fn view_is(node: &Node, topic: &str, want: &BTreeSet<String>, fleet: &[&Node]) -> Result<(), String> {
    let nodes_in = |shard: &Value| -> BTreeSet<String> {
        let filters = shard["filters"].as_array().unwrap().iter();
        filters
            .flat_map(|f| f["nodes"].as_array().unwrap().iter().map(|n| n[0].as_str().unwrap().to_string()))
            .collect()
    };
    let mut seen = BTreeSet::new();
    for shard in node.routes(topic)["shards"].as_array().unwrap() {
        if shard["source"] != "unknown" {
            seen.extend(nodes_in(shard));
            continue;
        }
        let mut answers = Vec::new();
        for owner in strings(&shard["owners"]) {
            // A member not named yet shows as its id: ask again later.
            let owner = fleet.iter().find(|n| n.name == owner).ok_or(format!("owner {owner} not named yet"))?;
            let routes = owner.routes(topic);
            let shards = routes["shards"].as_array().unwrap().iter();
            let theirs = shards.filter(|s| s["key"] == shard["key"]).map(nodes_in).next();
            answers.push(theirs.ok_or(format!("{} does not route {topic} through that shard", owner.name))?);
        }
        if answers.windows(2).any(|w| w[0] != w[1]) {
            return Err(format!("the owners of {}'s shard for {topic} disagree: {answers:?}", node.name));
        }
        seen.extend(answers.into_iter().next().unwrap_or_default());
    }
    if seen == *want {
        Ok(())
    } else {
        Err(format!("{} routes {topic} to {seen:?}, want {want:?}", node.name))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_views_converge_after_frames_are_lost_during_churn() {
    let lab = Lab::new();
    // R = 2 on 3 nodes: every shard has a node that only caches it. No
    // anti-entropy round within the test: the resync after the lost
    // frames alone must repair them.
    let flags = [CALM[0], CALM[1], "--replication", "2", "--route-check-secs", "0"];
    let [a, b, c] = lab.fleet(["a", "b", "c"], &flags);
    let nodes = [&a, &b, &c];
    const TOPICS: usize = 40;
    let topic = |i: usize| format!("churn/{i}/x");
    let mut publishers = Vec::new();
    for node in nodes {
        publishers.push(connect(node, &format!("pub-{}", node.name)).await);
    }
    // Every node caches (or owns) every shard: publish to each topic once.
    for publisher in publishers.iter_mut() {
        for i in 0..TOPICS {
            publisher.publish(&topic(i), QoS::AtLeastOnce, false, "warm").await;
            puback(publisher).await;
        }
    }

    // Lose every route frame between a and c while c's clients churn.
    a.cut(Some("c"));
    c.cut(Some("a"));
    let mut subscriber = connect(&c, "sub-c").await;
    subscriber
        .client
        .subscribe_many((0..TOPICS).map(|i| rumqttc::SubscribeFilter::new(topic(i), QoS::AtLeastOnce)))
        .await
        .unwrap();
    // Some SUBACKs wait out the timeout: a cannot acknowledge.
    subscriber.wait_for("SUBACK", |e| matches!(e, Event::Incoming(Packet::SubAck(_))).then_some(())).await;
    let mut other = connect(&c, "sub-c2").await;
    other.client.subscribe("churn/+/x", QoS::AtLeastOnce).await.unwrap();
    other.wait_for("SUBACK", |e| matches!(e, Event::Incoming(Packet::SubAck(_))).then_some(())).await;
    for i in (0..TOPICS).step_by(2) {
        subscriber.client.unsubscribe(topic(i)).await.unwrap();
        subscriber.wait_for("UNSUBACK", |e| matches!(e, Event::Incoming(Packet::UnsubAck(_))).then_some(())).await;
    }
    other.client.unsubscribe("churn/+/x").await.unwrap();
    other.wait_for("UNSUBACK", |e| matches!(e, Event::Incoming(Packet::UnsubAck(_))).then_some(())).await;
    let lost =
        a.metric("kadmq_cluster_fault_frames_dropped_total") + c.metric("kadmq_cluster_fault_frames_dropped_total");
    assert!(lost > 0, "the cut lost route frames");
    a.cut(None);
    c.cut(None);

    // The truth: c for the odd topics, nobody for the even ones.
    let want = |i: usize| -> BTreeSet<String> {
        if i % 2 == 1 {
            BTreeSet::from(["c".to_string()])
        } else {
            BTreeSet::new()
        }
    };
    // Blocking HTTP polls: off the runtime's worker (block_in_place), so
    // the clients' tasks (keep-alive included) go on meanwhile.
    // Within a few resync intervals (1 s each).
    let converged = tokio::task::block_in_place(|| {
        try_wait_until_every(Duration::from_secs(1), Duration::from_secs(15), "route views", || {
            for node in nodes {
                for i in 0..TOPICS {
                    view_is(node, &topic(i), &want(i), &nodes)?;
                }
            }
            Ok(())
        })
    });
    converged.unwrap();
    let repaired: u64 = nodes.iter().map(|n| n.metric("kadmq_cluster_assertions_retried_total")).sum();
    assert!(repaired > 0, "assertions were retried");
    // c's assertions to a were lost: c brought a up to date.
    assert!(c.metric("kadmq_cluster_route_resyncs_total") > 0, "c resynced a");

    // And the views are what publishes use: the odd topics reach c.
    for i in 0..TOPICS {
        publishers[0].publish(&topic(i), QoS::AtLeastOnce, false, "after").await;
        puback(&mut publishers[0]).await;
    }
    let after = || -> BTreeSet<String> {
        let received = subscriber.received().into_iter().map(|r| r.publish);
        received.filter(|p| p.payload.as_ref() == b"after").map(|p| p.topic).collect()
    };
    tokio::task::block_in_place(|| wait_until(WAIT, "the publishes after the heal", || after().len() >= TOPICS / 2));
    // Anything extra would have come with them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = after();
    let want: BTreeSet<String> = (0..TOPICS).filter(|i| i % 2 == 1).map(topic).collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suback_whose_owners_are_cut_off_goes_out_after_the_timeout() {
    let lab = Lab::new();
    let flags = [CALM[0], CALM[1], "--subscribe-ack-timeout-ms", "1000"];
    let [a, b, c] = lab.fleet(["a", "b", "c"], &flags);
    // c hears no route frame from a or b, nor they from c.
    for (node, peer) in [(&c, "a"), (&c, "b"), (&a, "c"), (&b, "c")] {
        node.cut(Some(peer));
    }
    let mut subscriber = connect(&c, "sub-c").await;
    let codes = subscriber.subscribe("cut/off/t", QoS::AtLeastOnce).await;
    assert_eq!(codes, vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)], "granted all the same");
    assert_eq!(c.metric("kadmq_cluster_subscribe_ack_timeouts_total"), 1);
    assert!(c.metric("kadmq_cluster_route_unsettled_shards") > 0);
    for node in [&a, &b, &c] {
        node.cut(None);
    }
    // The retries bring the route to a and b: a publish there reaches c.
    tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(60), "the route to settle", || {
            c.metric("kadmq_cluster_route_unsettled_shards") == 0
        })
    });
    let mut publisher = connect(&a, "pub-a").await;
    publisher.publish("cut/off/t", QoS::AtLeastOnce, false, "late").await;
    puback(&mut publisher).await;
    let payload = subscriber
        .next_within(WAIT, |e| match e {
            Event::Incoming(Packet::Publish(p)) => Some(p.payload.to_vec()),
            _ => None,
        })
        .await;
    assert_eq!(payload.as_deref(), Some(&b"late"[..]));
}
