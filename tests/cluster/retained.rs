//! Retained messages in a fleet, kept at their shards' owners: set on one
//! node, seen by new subscribers on every node, cleared everywhere, handed
//! to a node that joins later; a value cleared or replaced while a node was
//! away does not come back with it; 1,000 topics over 5 nodes come once per
//! wildcard subscribe, wherever the wildcard is; an owner killed under load
//! loses no acknowledged value; a write lost on the way to one owner
//! reaches it from another (the owners' digest exchange).

use crate::support::lab::{wait_for_members, Lab, Node};
use crate::support::mqtt::Client;
use rumqttc::{Event, Packet, QoS};
use std::collections::BTreeSet;
use std::time::Duration;

/// Publishes a retained message (empty payload clears) and waits for its PUBACK.
async fn publish_retained(node: &Node, topic: &str, payload: &[u8]) {
    let (mut client, _) = Client::connect(Client::options(&format!("pub-{}", node.name), node.mqtt_port)).await;
    client.publish(topic, QoS::AtLeastOnce, true, payload.to_vec()).await;
    client.wait_for("PUBACK", |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await;
    client.client.disconnect().await.unwrap();
    let _ = client.next_within(Duration::from_secs(1), |_| None::<()>).await;
}

/// Subscribes to `filter` on `node` and returns the retained payloads that
/// arrive within `quiet` after the SUBSCRIBE.
async fn retained_on(node: &Node, filter: &str, quiet: Duration) -> Vec<(String, Vec<u8>)> {
    let id = format!("sub-{}-{}", node.name, filter.len());
    let mut got = retained_arrivals(node, &id, filter, quiet).await;
    got.sort();
    got
}

/// Waits until a new subscriber on `node` sees exactly `want` for `filter`.
async fn wait_retained(node: &Node, filter: &str, want: &[(&str, &[u8])]) {
    let want: Vec<(String, Vec<u8>)> = want.iter().map(|(t, p)| (t.to_string(), p.to_vec())).collect();
    let mut last = Vec::new();
    for _ in 0..40 {
        last = retained_on(node, filter, Duration::from_millis(500)).await;
        if last == want {
            return;
        }
    }
    panic!("{} never showed retained {want:?} for {filter}; last saw {last:?}", node.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_reach_every_node_and_a_late_joiner() {
    let lab = Lab::new();
    let [n1, n2, n3] = lab.fleet(["r1", "r2", "r3"], &[]);
    let boot = n1.multiaddr();

    publish_retained(&n1, "status/a", b"on").await;
    publish_retained(&n2, "status/b", b"off").await;
    for node in [&n1, &n2, &n3] {
        wait_retained(node, "status/+", &[("status/a", b"on"), ("status/b", b"off")]).await;
    }

    // Cleared on another node than the one that set it: gone everywhere.
    publish_retained(&n3, "status/a", b"").await;
    for node in [&n1, &n2, &n3] {
        wait_retained(node, "status/+", &[("status/b", b"off")]).await;
    }

    // A node that joins later gets the retained messages set before it came.
    let n4 = lab.node("r4", Some(&boot));
    wait_for_members(&[&n1, &n4], &["r1", "r2", "r3", "r4"]);
    wait_retained(&n4, "status/#", &[("status/b", b"off")]).await;
}

/// Every retained message a new subscriber `id` to `filter` on `node` gets
/// (in arrival order, duplicates kept), once nothing more came for `quiet`.
async fn retained_arrivals(node: &Node, id: &str, filter: &str, quiet: Duration) -> Vec<(String, Vec<u8>)> {
    let (mut client, _) = Client::connect(Client::options(id, node.mqtt_port)).await;
    client.client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let got: Vec<(String, Vec<u8>)> = client
        .publishes_until_quiet(quiet)
        .await
        .into_iter()
        .filter(|p| p.retain)
        .map(|p| (p.topic.clone(), p.payload.to_vec()))
        .collect();
    if let Some(err) = client.ended() {
        panic!("subscriber on {}: {err}", node.name);
    }
    client.client.disconnect().await.unwrap();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_cleared_or_replaced_while_a_node_was_away_does_not_come_back() {
    let lab = Lab::new();
    let [n1, n2, mut n3] = lab.fleet(["v1", "v2", "v3"], &["--dead-timeout", "30"]);
    for topic in ["away/a", "away/b", "away/c"] {
        publish_retained(&n1, topic, b"old").await;
    }
    for node in [&n1, &n2, &n3] {
        wait_retained(node, "away/+", &[("away/a", b"old"), ("away/b", b"old"), ("away/c", b"old")]).await;
    }
    // v3 leaves with all three on its disk; meanwhile one is cleared and
    // one replaced.
    n3.stop();
    wait_for_members(&[&n1, &n2], &["v1", "v2"]);
    publish_retained(&n1, "away/a", b"").await;
    publish_retained(&n2, "away/b", b"new").await;
    n3.start();
    wait_for_members(&[&n1, &n2, &n3], &["v1", "v2", "v3"]);
    let want: &[(&str, &[u8])] = &[("away/b", b"new"), ("away/c", b"old")];
    for node in [&n1, &n2, &n3] {
        wait_retained(node, "away/+", want).await;
        wait_retained(node, "away/a", &[]).await;
    }
    // v3 offered its old values to the others, who kept the newer ones.
    let refused = n1.metric("kadmq_cluster_retained_stale_total") + n2.metric("kadmq_cluster_retained_stale_total");
    assert!(refused > 0, "the returning node's stale values were refused");
    // And v3's own copy was brought up to date by the hand-over.
    let stored = n3.metric("kadmq_cluster_retained_messages");
    assert_eq!(stored, 2, "v3 keeps b (new) and c, not a");
    assert_eq!(n3.metric("kadmq_cluster_retained_tombstones"), 1, "and the tombstone of a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_retained_topics_over_five_nodes_come_once_per_wildcard_subscribe() {
    let lab = Lab::new();
    let nodes = lab.fleet(["w1", "w2", "w3", "w4", "w5"], &["--dead-timeout", "30"]);
    // r{a}/{b}/{c}: 100 shards (two literal levels), 10 topics each.
    let topic = topic_of;
    const TOPICS: usize = 1000;
    let mut publishers = Vec::new();
    for node in &nodes {
        let (client, _) = Client::connect(Client::options(&format!("pub-{}", node.name), node.mqtt_port)).await;
        publishers.push(client);
    }
    for i in 0..TOPICS {
        let publisher = &mut publishers[i % nodes.len()];
        publisher.publish(&topic(i), QoS::AtLeastOnce, true, format!("v{i}")).await;
    }
    for publisher in &mut publishers {
        let n = TOPICS / nodes.len();
        publisher
            .collect("PUBACKs", n, Duration::from_secs(60), |e| {
                matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())
            })
            .await;
    }
    // Every topic is kept by exactly R = 3 nodes (the PUBACKs waited for
    // the owners in the publisher's view; a write relayed to an owner its
    // view missed may be a moment behind), none holds them all.
    let held = || -> Vec<u64> { nodes.iter().map(|n| n.metric("kadmq_cluster_retained_messages")).collect() };
    tokio::task::block_in_place(|| {
        crate::support::wait::wait_until(Duration::from_secs(10), "three copies of each topic", || {
            held().iter().sum::<u64>() == 3 * TOPICS as u64
        })
    });
    let held = held();
    assert!(held.iter().all(|h| *h < TOPICS as u64), "no node holds the whole set: {held:?}");
    eprintln!("retained per node: {held:?}");
    // Wildcards at every position, a literal prefix that names one shard,
    // and one that does not.
    let filters: [(&str, Wanted); 8] = [
        ("#", |_| true),
        ("+/+/+", |_| true),
        ("r3/#", |i| i / 100 == 3),
        ("+/4/+", |i| i / 10 % 10 == 4),
        ("+/+/5", |i| i % 10 == 5),
        ("r7/2/+", |i| i / 100 == 7 && i / 10 % 10 == 2),
        ("r7/+/9", |i| i / 100 == 7 && i % 10 == 9),
        ("r1/2/3", |i| i == 123),
    ];
    for (k, (filter, wanted)) in filters.iter().enumerate() {
        let node = &nodes[k % nodes.len()];
        let got = retained_arrivals(node, &format!("sub-{k}"), filter, Duration::from_secs(1)).await;
        let mut seen = std::collections::BTreeMap::new();
        for (topic, payload) in &got {
            *seen.entry(topic.clone()).or_insert(0) += 1;
            let i: usize = String::from_utf8_lossy(&payload[1..]).parse().expect("v<i>");
            assert_eq!(topic, &topic_of(i), "{filter}: payload and topic agree");
        }
        let twice: Vec<&String> = seen.iter().filter(|(_, n)| **n > 1).map(|(t, _)| t).collect();
        assert!(twice.is_empty(), "{filter} on {}: came more than once: {twice:?}", node.name);
        let want: BTreeSet<String> = (0..TOPICS).filter(|i| wanted(*i)).map(topic).collect();
        let got: BTreeSet<String> = seen.into_keys().collect();
        assert_eq!(got, want, "{filter} on {}", node.name);
    }
    assert!(nodes.iter().all(|n| n.metric("kadmq_cluster_retained_partial_total") == 0));
    assert!(nodes.iter().all(|n| n.metric("kadmq_cluster_retained_unacknowledged_total") == 0));
}

/// Which of the numbered topics a filter matches.
type Wanted = fn(usize) -> bool;

fn topic_of(i: usize) -> String {
    format!("r{}/{}/{}", i / 100, i / 10 % 10, i % 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_owner_killed_under_retained_load_loses_no_acknowledged_value() {
    let lab = Lab::new();
    let [k1, k2, k3, mut k4] = lab.fleet(["k1", "k2", "k3", "k4"], &["--dead-timeout", "4"]);
    let (mut publisher, _) = Client::connect(Client::options("pub-k1", k1.mqtt_port)).await;
    const TOPICS: usize = 50;
    let topic = |i: usize| format!("load/{i}/v");
    // Rounds of retained writes to every topic; k4 is killed during the
    // last. Each round's PUBACKs are awaited: what is acknowledged counts.
    let mut last = 0;
    for round in 1..=6 {
        for i in 0..TOPICS {
            publisher.publish(&topic(i), QoS::AtLeastOnce, true, format!("{round}")).await;
            // In the last round: a value acknowledged while k4 was one of
            // its owners is never written again.
            if round == 6 && i == TOPICS / 2 {
                k4.kill();
            }
        }
        publisher
            .collect("PUBACKs", TOPICS, Duration::from_secs(60), |e| {
                matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())
            })
            .await;
        last = round;
    }
    wait_for_members(&[&k1, &k2, &k3], &["k1", "k2", "k3"]);
    let mut want: Vec<(String, Vec<u8>)> = (0..TOPICS).map(|i| (topic(i), last.to_string().into_bytes())).collect();
    want.sort();
    let want: Vec<(&str, &[u8])> = want.iter().map(|(t, p)| (t.as_str(), p.as_slice())).collect();
    for node in [&k1, &k2, &k3] {
        wait_retained(node, "load/+/v", &want).await;
    }
    // The survivors hold every topic R = 3 times again (the dead owner's
    // shards were handed to their new owners).
    let held: u64 = [&k1, &k2, &k3].iter().map(|n| n.metric("kadmq_cluster_retained_messages")).sum();
    assert_eq!(held, 3 * TOPICS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_write_lost_on_the_way_to_an_owner_reaches_it_from_another() {
    let lab = Lab::new();
    let flags = ["--dead-timeout", "30", "--retained-check-secs", "2", "--subscribe-ack-timeout-ms", "500"];
    let [l1, l2, l3] = lab.fleet(["l1", "l2", "l3"], &flags);
    // l3 loses what l1 sends it (route and retained frames): the write
    // reaches l2 (and l1 itself) only.
    l3.cut(Some("l1"));
    publish_retained(&l1, "lost/x", b"v").await;
    assert_eq!(l1.metric("kadmq_cluster_retained_unacknowledged_total"), 1, "l3 never confirmed");
    // The owners' digest exchange brings it to l3 from l2, cut or not.
    tokio::task::block_in_place(|| {
        crate::support::wait::wait_until(Duration::from_secs(30), "l3 to hold lost/x", || {
            l3.metric("kadmq_cluster_retained_messages") == 1
        })
    });
    assert!(
        l3.metric("kadmq_cluster_retained_repaired_total") > 0
            || l2.metric("kadmq_cluster_retained_repaired_total") > 0
    );
    l3.cut(None);
    wait_retained(&l3, "lost/+", &[("lost/x", b"v")]).await;
}
