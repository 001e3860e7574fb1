//! Hot-prefix splits on real nodes (issue 12):
//!
//! - 10,000 device filters under one prefix (`devices/eu/dev{i}/telemetry`),
//!   subscribed on one node of five (R = 3): the prefix's shard splits by the
//!   device level, no node owns more than 1.25 x R·E/N entries, and a node
//!   that publishes to one device caches at most 1% of the table;
//! - a shard that splits while QoS 1 publishes flow through it loses none
//!   of them.

use crate::support::lab::{Lab, Node};
use crate::support::mqtt::Client;
use crate::support::wait::wait_until;
use rumqttc::{Event, Packet, QoS};
use std::collections::BTreeSet;
use std::time::Duration;

/// Heartbeats of debug builds on a busy 2-core machine are late at times;
/// a member wrongly declared dead would move shards under these tests.
const CALM: [&str; 2] = ["--dead-timeout", "30"];
/// Replication (the default).
const R: u64 = 3;

async fn connect(node: &Node, id: &str) -> Client {
    let mut options = Client::options(id, node.mqtt_port);
    options.set_max_packet_size(1024 * 1024, 1024 * 1024);
    let (client, ack) = Client::connect(options).await;
    assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success, "{id} on {}", node.name);
    client
}

fn sum(nodes: &[&Node], metric: &str) -> u64 {
    nodes.iter().map(|n| n.metric(metric)).sum()
}

fn owned(nodes: &[&Node]) -> Vec<u64> {
    nodes.iter().map(|n| n.metric("kadmq_cluster_shard_entries_owned")).collect()
}

/// Publishes `count` QoS 1 messages round-robin over `topics` (payload: the
/// message's number), at most 50 unacknowledged, and waits for every PUBACK.
async fn publish_acked(publisher: &mut Client, topics: &[String], count: usize) {
    const WINDOW: usize = 50;
    let mut sent = 0;
    while sent < count {
        let batch = WINDOW.min(count - sent);
        for i in sent..sent + batch {
            publisher.publish(&topics[i % topics.len()], QoS::AtLeastOnce, false, i.to_string()).await;
        }
        publisher
            .collect("PUBACK", batch, Duration::from_secs(60), |e| {
                matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())
            })
            .await;
        sent += batch;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_prefix_spreads_over_the_fleet_and_a_publisher_caches_only_its_path() {
    let lab = Lab::new();
    let [a, b, c, d, e] = lab.fleet(["a", "b", "c", "d", "e"], &CALM);
    let nodes = [&a, &b, &c, &d, &e];
    const DEVICES: u64 = 10_000;
    let filters: Vec<String> = (0..DEVICES).map(|i| format!("devices/eu/dev{i}/telemetry")).collect();
    let mut subscriber = connect(&a, "sub-a").await;
    subscriber.subscribe_all(&filters, QoS::AtLeastOnce, 100, Duration::from_secs(600)).await;
    // Once the moves are done every entry is in one child shard, R times.
    let ceiling = R * DEVICES * 5 / (4 * nodes.len() as u64);
    tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(120), "the filters to move to the child shards", || {
            let owned = owned(&nodes);
            owned.iter().sum::<u64>() == R * DEVICES && owned.iter().all(|&o| o <= ceiling)
        })
    });
    let owned = owned(&nodes);
    assert!(sum(&nodes, "kadmq_cluster_route_splits_total") >= 1, "the shard split");
    // The filters subscribed before the split moved; later ones went to
    // their child shard at once.
    let moved = a.metric("kadmq_cluster_route_filters_moved_total");
    assert!((4_096..=DEVICES).contains(&moved), "{moved} filters moved");
    let max = *owned.iter().max().expect("five nodes");
    assert!(max <= ceiling, "entries owned {owned:?}: over 1.25 x R·E/N = {ceiling}");

    // A publisher on another node caches one device's path, not the prefix.
    let mut publisher = connect(&e, "pub-e").await;
    let topic = "devices/eu/dev4711/telemetry".to_string();
    publish_acked(&mut publisher, std::slice::from_ref(&topic), 1).await;
    let got = || subscriber.received().iter().filter(|r| r.publish.topic == topic).count();
    tokio::task::block_in_place(|| wait_until(Duration::from_secs(30), "the device's message", || got() == 1));
    let cached = e.metric("kadmq_cluster_route_cache_entries");
    eprintln!("entries owned per node {owned:?} (ceiling {ceiling}), {moved} moved, the publisher caches {cached}");
    assert!(cached <= DEVICES / 100, "the publisher caches {cached} entries, over 1% of {DEVICES}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_splits_under_publish_load_loses_no_message() {
    let lab = Lab::new();
    let flags = [CALM[0], CALM[1], "--split-entries", "200"];
    let [a, b, c] = lab.fleet(["a", "b", "c"], &flags);
    let nodes = [&a, &b, &c];
    // 150 devices subscribed on c: below the threshold, no split yet.
    let devices: Vec<String> = (0..150).map(|i| format!("hot/eu/d{i}/t")).collect();
    let mut subscriber = connect(&c, "sub-c").await;
    subscriber.subscribe_all(&devices, QoS::AtLeastOnce, 50, Duration::from_secs(120)).await;
    assert_eq!(sum(&nodes, "kadmq_cluster_route_splits_total"), 0, "not split yet");

    // QoS 1 publishes to those devices from a, while 100 more filters of
    // the same shard, subscribed on b, take it past 200 entries.
    const MESSAGES: usize = 10_000;
    let mut publisher = connect(&a, "pub-a").await;
    let load = {
        let devices = devices.clone();
        tokio::spawn(async move {
            publish_acked(&mut publisher, &devices, MESSAGES).await;
            publisher
        })
    };
    let more: Vec<String> = (0..100).map(|i| format!("hot/eu/x{i}/t")).collect();
    let mut second = connect(&b, "sub-b").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    second.subscribe_all(&more, QoS::AtLeastOnce, 10, Duration::from_secs(120)).await;
    // The SUBACKs wait for the owners, which split the shard on the way.
    assert!(!load.is_finished(), "the split came after the load: make it longer");
    let _publisher = load.await.expect("the load task");

    let numbers = || -> BTreeSet<usize> {
        subscriber
            .received()
            .iter()
            .filter_map(|r| std::str::from_utf8(&r.publish.payload).ok()?.parse().ok())
            .collect()
    };
    tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(60), "every acknowledged message", || numbers().len() == MESSAGES)
    });
    assert!(sum(&nodes, "kadmq_cluster_route_splits_total") >= 1, "the shard split during the load");
    assert!(c.metric("kadmq_cluster_route_filters_moved_total") >= 150, "c's filters moved to the children");
    let missing: Vec<usize> = (0..MESSAGES).filter(|n| !numbers().contains(n)).take(10).collect();
    assert!(missing.is_empty(), "acknowledged and never delivered: {missing:?}…");
}
