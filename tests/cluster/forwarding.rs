//! Forwarding in a fleet of real `kadmq` processes, with real MQTT clients
//! (rumqttc, MQTT 3.1.1):
//!
//! - 3- and 5-node clusters form from one bootstrap address, and every node
//!   sees every member alive;
//! - a publish on one node reaches the matching subscribers on the others at
//!   QoS 0, 1 and 2, for exact filters, `+` and `#` at every position and
//!   root wildcards: each expected message once, nothing else, in order;
//! - `$share` groups with members on two nodes get each message once;
//! - 10,000 filters on 5 nodes with R = 3 are owned 3 times each, spread over
//!   the nodes;
//! - once a publisher has the routes of a shard, publishing to it makes no
//!   lookups (cache hits only);
//! - a node with another cluster key never joins, and says why;
//! - `/api/v1/routes` agrees with the subscriptions (its subscriber counts
//!   do not: `routes_report_subscriber_counts_per_node` fails against the
//!   current src/, see its comment).
//!
//! The clients run on a tokio runtime of their own; the test thread polls
//! the nodes' HTTP endpoints (blocking) while they run. Every wait is
//! bounded.

use crate::support::lab::{strings, wait_for_members, Lab, Node, SETTLE};
use crate::support::mqtt::Client;
use crate::support::runtime;
use crate::support::wait::{wait_until, wait_until_every};
use rumqttc::{Event, Packet, QoS};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// How long a client may take for what must come (CONNACK, SUBACK, acks).
const WAIT: Duration = Duration::from_secs(30);
/// How long we keep listening after the last expected message, to catch
/// extras and duplicates.
const QUIET: Duration = Duration::from_secs(1);
/// Literal prefix levels naming a shard (the nodes run the default).
const SHARD_DEPTH: usize = 2;
/// A failure detector that tolerates a starved CPU: these tests are about
/// routing, not failure detection, and a member wrongly declared dead (the
/// default is 8 s of silence) would move shards and invalidate caches under
/// them. Debug builds on a busy 2-core machine do miss heartbeats for
/// seconds.
const CALM: [&str; 2] = ["--dead-timeout", "30"];

// ----- MQTT: the oracle -----------------------------------------------------------------

/// MQTT 3.1.1 §4.7 matching, written here independently of the broker.
fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let topic: Vec<&str> = topic.split('/').collect();
    let filter: Vec<&str> = filter.split('/').collect();
    for (i, level) in filter.iter().enumerate() {
        match *level {
            // `#` also matches the parent level: `a/#` matches `a`.
            "#" => return true,
            "+" if i < topic.len() => {}
            literal if topic.get(i) == Some(&literal) => {}
            _ => return false,
        }
    }
    filter.len() == topic.len()
}

/// The literal prefix naming a filter's shard: its first [`SHARD_DEPTH`]
/// levels, stopping at the first wildcard ("" is the root shard).
fn filter_prefix(filter: &str) -> String {
    let literal: Vec<&str> =
        filter.split('/').take(SHARD_DEPTH).take_while(|level| *level != "+" && *level != "#").collect();
    literal.join("/")
}

/// The shards a publish to `topic` consults: its prefixes of 0 to
/// [`SHARD_DEPTH`] levels (no root shard for `$` topics: root filters start
/// with a wildcard).
fn topic_prefixes(topic: &str) -> BTreeSet<String> {
    let levels: Vec<&str> = topic.split('/').collect();
    let first = if topic.starts_with('$') { 1 } else { 0 };
    (first..=SHARD_DEPTH.min(levels.len())).map(|n| levels[..n].join("/")).collect()
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

// ----- MQTT clients ---------------------------------------------------------------------

/// One PUBLISH a client received.
#[derive(Clone, Debug)]
struct Got {
    topic: String,
    qos: u8,
    payload: String,
}

/// Connects client `id` (clean session) to `node` and waits for a
/// successful CONNACK.
fn connect(rt: &Runtime, node: &Node, id: &str) -> Client {
    let mut options = Client::options(id, node.mqtt_port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, ack) = rt.block_on(Client::connect(options));
    assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success, "{id} on {}", node.name);
    client
}

/// Subscribes to `filters` at QoS 2 (one SUBSCRIBE) and checks each was granted.
fn subscribe(rt: &Runtime, client: &mut Client, filters: &[String]) {
    rt.block_on(client.subscribe_all(filters, QoS::ExactlyOnce, filters.len(), WAIT));
}

fn publish(rt: &Runtime, client: &Client, topic: &str, qos: QoS, payload: String) {
    rt.block_on(client.publish(topic, qos, false, payload));
}

/// Every PUBLISH `client` received so far.
fn got(client: &Client) -> Vec<Got> {
    let publishes = client.received().into_iter().map(|r| r.publish);
    publishes
        .map(|p| Got { topic: p.topic, qos: p.qos as u8, payload: String::from_utf8_lossy(&p.payload).into_owned() })
        .collect()
}

// ----- what the nodes say -----------------------------------------------------------------

/// `[["name", count], ...]` as (name, count) pairs, sorted.
fn node_counts(list: &Value) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = list
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|pair| (pair[0].as_str().unwrap_or_default().to_string(), pair[1].as_u64().unwrap_or(0)))
        .collect();
    out.sort();
    out
}

/// Checks each node's peer id in every node's `/api/v1/cluster` against
/// `kadmq id`, and that exactly one member is the answering node.
fn check_member_ids(nodes: &[&Node]) {
    let ids: BTreeMap<String, String> = nodes.iter().map(|n| (n.name.clone(), n.peer_id())).collect();
    for node in nodes {
        let status = node.cluster();
        assert_eq!(status["node"], node.name.as_str());
        let members = status["members"].as_array().unwrap();
        for member in members {
            let name = member["name"].as_str().unwrap();
            assert_eq!(member["peer_id"].as_str(), ids.get(name).map(|s| s.as_str()), "{} on {}", name, node.name);
            assert_eq!(member["local"].as_bool(), Some(name == node.name), "{} on {}", name, node.name);
        }
        assert_eq!(members.len(), nodes.len(), "{} lists {members:?}", node.name);
    }
}

/// The figure `metric` of each node, and their sum.
fn per_node(nodes: &[&Node], name: &str) -> (Vec<u64>, u64) {
    let each: Vec<u64> = nodes.iter().map(|n| n.metric(name)).collect();
    let sum = each.iter().sum();
    (each, sum)
}

/// Subscriptions: (node name, filter) for each subscribing client.
type Subs = Vec<(String, String)>;

/// (shard prefix, owners) for each shard of a topic.
type ShardOwners = Vec<(String, Vec<String>)>;

/// Checks one node's `/api/v1/routes` report for `topic` against the
/// subscriptions: the shards are the topic's prefixes, owned by
/// `replication` of `members`; an owned or cached shard lists exactly the
/// matching filters whose prefix names it, each with the nodes (and their
/// subscriber counts, if `counts`) that subscribe to it.
fn check_routes(
    node: &Node,
    topic: &str,
    subs: &Subs,
    members: &[&str],
    replication: usize,
    counts: bool,
) -> Result<ShardOwners, String> {
    let report = node.routes(topic);
    let at = format!("{} for {topic:?}", node.name);
    if report["topic"] != topic {
        return Err(format!("{at}: report names topic {}", report["topic"]));
    }
    let shards = report["shards"].as_array().cloned().unwrap_or_default();
    let prefixes: BTreeSet<String> = shards.iter().map(|s| s["prefix"].as_str().unwrap_or("?").to_string()).collect();
    if prefixes != topic_prefixes(topic) {
        return Err(format!("{at}: shards {prefixes:?}, want {:?}", topic_prefixes(topic)));
    }
    let mut owners_seen = Vec::new();
    for shard in &shards {
        let prefix = shard["prefix"].as_str().unwrap_or("?");
        let owners = strings(&shard["owners"]);
        let distinct: BTreeSet<&String> = owners.iter().collect();
        if owners.len() != replication || distinct.len() != replication {
            return Err(format!("{at}: shard {prefix:?} has owners {owners:?}, want {replication} distinct"));
        }
        if let Some(stranger) = owners.iter().find(|o| !members.contains(&o.as_str())) {
            return Err(format!("{at}: shard {prefix:?} owned by {stranger}, not a member"));
        }
        let source = shard["source"].as_str().unwrap_or("?");
        let owner = owners.contains(&node.name);
        if (source == "owned") != owner || !["owned", "cached", "unknown"].contains(&source) {
            return Err(format!("{at}: shard {prefix:?} is {source:?} with owners {owners:?}"));
        }
        let mut listed: Vec<(String, Vec<(String, u64)>)> = shard["filters"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|f| {
                if f["groups"].as_array().is_some_and(|g| !g.is_empty()) {
                    return ("groups?".into(), Vec::new());
                }
                let mut nodes = node_counts(&f["nodes"]);
                if !counts {
                    nodes.iter_mut().for_each(|(_, c)| *c = 0);
                }
                (f["filter"].as_str().unwrap_or("?").to_string(), nodes)
            })
            .collect();
        listed.sort();
        let want: Vec<(String, Vec<(String, u64)>)> = if source == "unknown" {
            Vec::new()
        } else {
            let mut by_filter: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
            for (sub_node, filter) in subs {
                if matches(filter, topic) && filter_prefix(filter) == prefix {
                    *by_filter.entry(filter.clone()).or_default().entry(sub_node.clone()).or_default() +=
                        u64::from(counts);
                }
            }
            by_filter.into_iter().map(|(f, nodes)| (f, nodes.into_iter().collect())).collect()
        };
        if listed != want {
            return Err(format!("{at}: shard {prefix:?} ({source}) lists {listed:?}, want {want:?}"));
        }
        owners_seen.push((prefix.to_string(), owners));
    }
    owners_seen.sort();
    Ok(owners_seen)
}

/// [`check_routes`] on every node for every topic, plus: the nodes agree on
/// each shard's owners.
fn routes_agree(nodes: &[&Node], topics: &[&str], subs: &Subs, replication: usize, counts: bool) -> Result<(), String> {
    let members: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    for topic in topics {
        let mut first: Option<(String, ShardOwners)> = None;
        for node in nodes {
            let owners = check_routes(node, topic, subs, &members, replication, counts)?;
            match &first {
                None => first = Some((node.name.clone(), owners)),
                Some((name, theirs)) if *theirs != owners => {
                    return Err(format!("{topic:?}: owners on {name} {theirs:?}, on {} {owners:?}", node.name));
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

// ----- 1, 2, 7: three nodes, every QoS and wildcard position -------------------------------

/// What the publishers send to, each round.
const TOPICS: &[&str] = &[
    "a/b/c",
    "a/b",
    "a",
    "a/b/c/d",
    "a/b/c/d/e",
    "x/b/c",
    "a/x/c",
    "a/b/x",
    "a/x/c/d",
    "q/x",
    "a/x",
    "x/y",
    "b",
    "a//c",
    "/x",
    "$app/x",
];

/// One subscriber each, on the third node.
const FILTERS: &[&str] = &[
    "a/b/c", "+/b/c", "a/+/c", "a/b/+", "+/+/+", "#", "a/#", "a/b/#", "a/b/c/#", "+/x", "+/#", "a/+/c/#", "$app/#",
    "x/y",
];

/// Rounds of publishes: the first goes while publishers look routes up,
/// the others from the route cache.
const ROUNDS: usize = 4;

/// A message sent: by publisher `q` (which publishes at QoS `q`), its
/// `seq`-th, to `topic`. Payload `q:seq`.
#[derive(Clone, Debug)]
struct Sent {
    q: u8,
    seq: usize,
    topic: &'static str,
}

/// Compares what a subscriber to `filter` received with what was sent:
/// every match once, nothing else, at the publisher's QoS, each publisher's
/// messages in order per topic, and in order across topics from `ordered_from`.
fn audit(who: &str, filter: &str, got: &[Got], sent: &[Sent], ordered_from: usize) -> Vec<String> {
    let mut problems = Vec::new();
    let want: BTreeMap<(u8, usize), &Sent> =
        sent.iter().filter(|s| matches(filter, s.topic)).map(|s| ((s.q, s.seq), s)).collect();
    let mut seen: BTreeMap<(u8, usize), usize> = BTreeMap::new();
    let mut last_per_topic: BTreeMap<(u8, &str), usize> = BTreeMap::new();
    let mut last_ordered: BTreeMap<u8, usize> = BTreeMap::new();
    for g in got {
        let parsed = g.payload.split_once(':').and_then(|(q, s)| Some((q.parse::<u8>().ok()?, s.parse().ok()?)));
        let Some((q, seq)) = parsed else {
            problems.push(format!("{who} ({filter}): unreadable payload {g:?}"));
            continue;
        };
        *seen.entry((q, seq)).or_default() += 1;
        let Some(s) = want.get(&(q, seq)) else {
            problems.push(format!("{who} ({filter}): unexpected {g:?}"));
            continue;
        };
        if g.topic != s.topic || g.qos != q {
            problems.push(format!("{who} ({filter}): {g:?} was sent to {} at QoS {q}", s.topic));
        }
        if let Some(prev) = last_per_topic.insert((q, s.topic), seq) {
            if prev >= seq {
                problems.push(format!("{who} ({filter}): publisher {q} to {}: {seq} after {prev}", s.topic));
            }
        }
        if seq >= ordered_from {
            if let Some(prev) = last_ordered.insert(q, seq) {
                if prev >= seq {
                    problems.push(format!("{who} ({filter}): publisher {q}: {seq} ({}) after {prev}", s.topic));
                }
            }
        }
    }
    let missing: Vec<String> = want
        .iter()
        .filter(|(k, _)| !seen.contains_key(k))
        .map(|((q, seq), s)| format!("{q}:{seq} {}", s.topic))
        .collect();
    if !missing.is_empty() {
        problems.push(format!("{who} ({filter}): {} missing: {missing:?}", missing.len()));
    }
    let twice: Vec<String> = seen.iter().filter(|(_, n)| **n > 1).map(|((q, s), n)| format!("{q}:{s} x{n}")).collect();
    if !twice.is_empty() {
        problems.push(format!("{who} ({filter}): duplicates: {twice:?}"));
    }
    problems
}

/// Three nodes from one bootstrap address, R = 2 (so that the publishing
/// node owns some shards and looks the others up). Subscribers to every
/// kind of filter on the third node (and a few on the others), three
/// publishers on the first (one per QoS), four rounds over 16 topics.
#[test]
fn three_nodes_forward_every_qos_and_wildcard_position() {
    let started = Instant::now();
    let lab = Lab::new();
    let flags = ["--replication", "2", CALM[0], CALM[1]];
    let [a, b, c] = lab.fleet(["f1", "f2", "f3"], &flags);
    let nodes = [&a, &b, &c];
    eprintln!("3 nodes up and in each other's view after {:?}", started.elapsed());
    check_member_ids(&nodes);

    // Every filter on C; a second subscriber to an exact filter on C; local
    // (A) and other-node (B) subscribers to two of the filters.
    let mut subs: Subs = FILTERS.iter().map(|f| ("f3".to_string(), f.to_string())).collect();
    subs.push(("f3".into(), "a/b/c".into()));
    subs.push(("f1".into(), "a/#".into()));
    subs.push(("f2".into(), "a/#".into()));
    subs.push(("f2".into(), "+/x".into()));
    let rt = runtime();
    let mut subscribers = Vec::new();
    for (i, (on, filter)) in subs.iter().enumerate() {
        let node = nodes.iter().find(|n| n.name == *on).unwrap();
        let mut client = connect(&rt, node, &format!("sub{i}-{on}"));
        subscribe(&rt, &mut client, std::slice::from_ref(filter));
        subscribers.push(client);
    }

    // 7: every node's routes for every topic agree with the subscriptions.
    wait_until(SETTLE, "the routes to agree with the subscriptions on every node", || {
        routes_agree(&nodes, TOPICS, &subs, 2, false)
    });
    eprintln!("routes in place after {:?}", started.elapsed());

    let mut publishers: Vec<Client> = (0..3).map(|q| connect(&rt, &a, &format!("pub{q}"))).collect();
    let mut sent = Vec::new();
    let mut lookups = 0;
    let expected = |sent: &[Sent]| -> Vec<usize> {
        subs.iter().map(|(_, f)| sent.iter().filter(|s| matches(f, s.topic)).count()).collect()
    };
    let all_arrived = |subscribers: &[Client], want: &[usize]| -> Result<(), String> {
        let short: Vec<String> = subscribers
            .iter()
            .zip(want)
            .zip(&subs)
            .filter(|((s, w), _)| s.count() < **w)
            .map(|((s, w), (_, f))| format!("{} ({f}) has {} of {w}", s.id, s.count()))
            .collect();
        if short.is_empty() {
            Ok(())
        } else {
            Err(short.join("; "))
        }
    };
    for round in 0..ROUNDS {
        for (t, topic) in TOPICS.iter().enumerate() {
            for (q, publisher) in publishers.iter().enumerate() {
                let seq = round * TOPICS.len() + t;
                publish(&rt, publisher, topic, qos(q as u8), format!("{q}:{seq}"));
                sent.push(Sent { q: q as u8, seq, topic });
            }
        }
        if round == 0 {
            // The first round waits on lookups; once it is in, every shard
            // the topics need is owned or cached on A.
            let want = expected(&sent);
            wait_until(SETTLE, "the first round to arrive", || all_arrived(&subscribers, &want));
            for topic in TOPICS {
                let report = a.routes(topic);
                for shard in report["shards"].as_array().unwrap() {
                    let source = shard["source"].as_str().unwrap();
                    assert!(source == "owned" || source == "cached", "after publishing, f1 for {topic}: {shard}");
                }
                let want: BTreeSet<String> =
                    subs.iter().filter(|(_, f)| matches(f, topic)).map(|(n, _)| n.clone()).collect();
                let have: BTreeSet<String> = strings(&report["destinations"]).into_iter().collect();
                assert_eq!(have, want, "f1's destinations for {topic}: {report}");
            }
            // With R = 2 of 3, f1 owns about 2/3 of the ~20 shards involved.
            lookups = a.metric("kadmq_cluster_remote_lookups_total");
            assert!(lookups > 0, "f1 looked up the shards it does not own");
        }
    }
    let want = expected(&sent);
    wait_until(SETTLE, "every round to arrive", || all_arrived(&subscribers, &want));
    std::thread::sleep(QUIET);
    let later = a.metric("kadmq_cluster_remote_lookups_total");
    eprintln!("f1 made {lookups} lookups in the first round, {} after", later - lookups);
    assert_eq!(later, lookups, "the later rounds route from f1's cache and owned shards");

    let mut problems = Vec::new();
    for (subscriber, (_, filter)) in subscribers.iter().zip(&subs) {
        subscriber.check_alive();
        problems.extend(audit(&subscriber.id, filter, &got(subscriber), &sent, TOPICS.len()));
    }
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
    let delivered: usize = subscribers.iter().map(|s| s.count()).sum();
    eprintln!("{} publishes, {delivered} deliveries checked after {:?}", sent.len(), started.elapsed());

    // The brokers acknowledged every QoS 1 and 2 publish.
    let per_publisher = ROUNDS * TOPICS.len();
    let pubacks = |e: &Event| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(());
    rt.block_on(publishers[1].collect("PUBACK", per_publisher, WAIT, pubacks));
    let pubcomps = |e: &Event| matches!(e, Event::Incoming(Packet::PubComp(_))).then_some(());
    rt.block_on(publishers[2].collect("PUBCOMP", per_publisher, WAIT, pubcomps));
    for publisher in &publishers {
        publisher.check_alive();
    }
    eprintln!("done after {:?}", started.elapsed());
}

// ----- 3: shared subscriptions over nodes ---------------------------------------------------

/// Members of one `$share` group on B and C, a plain subscriber on C, a
/// publisher on A: each message reaches exactly one member, both members
/// get some, the plain subscriber gets all.
#[test]
fn shared_group_members_on_two_nodes_split_the_messages() {
    const MESSAGES: usize = 200;
    let started = Instant::now();
    let lab = Lab::new();
    let [a, b, c] = lab.fleet(["g1", "g2", "g3"], &CALM);

    let rt = runtime();
    let mut on_b = connect(&rt, &b, "member-b");
    subscribe(&rt, &mut on_b, &["$share/work/jobs/+".into()]);
    let mut on_c = connect(&rt, &c, "member-c");
    subscribe(&rt, &mut on_c, &["$share/work/jobs/+".into()]);
    let mut plain = connect(&rt, &c, "plain-c");
    subscribe(&rt, &mut plain, &["jobs/#".into()]);

    // The publisher's node knows the group has members on g2 and g3.
    wait_until(SETTLE, "g1 to route jobs/0 to the group on g2 and g3", || {
        let report = a.routes("jobs/0");
        let shard = report["shards"].as_array().unwrap().iter().find(|s| s["prefix"] == "jobs").cloned();
        let filters = shard.map(|s| s["filters"].clone()).unwrap_or_default();
        let mut found = BTreeMap::new();
        for f in filters.as_array().unwrap_or(&Vec::new()) {
            for group in f["groups"].as_array().unwrap_or(&Vec::new()) {
                let nodes: Vec<String> = node_counts(&group[1]).into_iter().map(|(n, _)| n).collect();
                found.insert(format!("{} {}", group[0].as_str().unwrap_or("?"), f["filter"]), nodes);
            }
        }
        let want = BTreeMap::from([("work \"jobs/+\"".to_string(), vec!["g2".to_string(), "g3".to_string()])]);
        if found == want {
            Ok(())
        } else {
            Err(format!("groups {found:?}; report {report}"))
        }
    });

    let publisher = connect(&rt, &a, "jobs-publisher");
    for i in 0..MESSAGES {
        publish(&rt, &publisher, &format!("jobs/{}", i % 5), qos((i % 3) as u8), format!("{i}"));
    }
    wait_until(SETTLE, "every message to reach the group and the plain subscriber", || {
        let (group, all) = (on_b.count() + on_c.count(), plain.count());
        if group >= MESSAGES && all >= MESSAGES {
            Ok(())
        } else {
            Err(format!("group has {group}, plain subscriber {all} of {MESSAGES}"))
        }
    });
    std::thread::sleep(QUIET);

    let numbers = |client: &Client| -> Vec<usize> {
        client.check_alive();
        got(client).iter().map(|g| g.payload.parse().unwrap()).collect()
    };
    let (from_b, from_c, from_plain) = (numbers(&on_b), numbers(&on_c), numbers(&plain));
    eprintln!("shared group: {} to g2, {} to g3 of {MESSAGES}", from_b.len(), from_c.len());
    let mut group: Vec<usize> = from_b.iter().chain(&from_c).copied().collect();
    group.sort_unstable();
    assert_eq!(group, (0..MESSAGES).collect::<Vec<_>>(), "each message reaches exactly one member");
    assert!(!from_b.is_empty() && !from_c.is_empty(), "both members get some: {} and {}", from_b.len(), from_c.len());
    for (who, got) in [("member-b", &from_b), ("member-c", &from_c)] {
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{who} receives in publish order: {got:?}");
    }
    assert_eq!(from_plain, (0..MESSAGES).collect::<Vec<_>>(), "the plain subscriber gets all, in order, once");
    eprintln!("done after {:?}", started.elapsed());
}

// ----- 1, 4, 5, 7: five nodes, 10,000 filters ---------------------------------------------

/// Five nodes, R = 3, 10,000 filters on the fifth (each its own shard):
/// every entry is owned three times, spread over the nodes. Then the first
/// node publishes to shards it does not own: after the first publish to
/// each, no more lookups.
#[test]
fn five_nodes_own_each_entry_three_times_and_publish_from_the_cache() {
    const FILTERS: usize = 10_000;
    const R: usize = 3;
    /// Bounds on the share of the distinct entries each node owns: R/N =
    /// 0.6 on average; measured 0.54 to 0.66 (20 nodes over four runs).
    const MAX_SHARE: f64 = 0.75;
    const MIN_SHARE: f64 = 0.45;
    const WARM_SHARDS: usize = 10;
    const PER_SHARD: usize = 30;

    let started = Instant::now();
    let lab = Lab::new();
    let flags = ["--replication", "3", CALM[0], CALM[1]];
    let fleet = lab.fleet(["n1", "n2", "n3", "n4", "n5"], &flags);
    let nodes: Vec<&Node> = fleet.iter().collect();
    let n1 = nodes[0];
    eprintln!("5 nodes up and in each other's view after {:?}", started.elapsed());
    check_member_ids(&nodes);
    let n5 = nodes[4];

    // 4: one client on n5, 20 SUBSCRIBEs of 500 filters.
    let rt = runtime();
    let filter = |i: usize| format!("s{}/x{i}/+", i % 500);
    let filters: Vec<String> = (0..FILTERS).map(filter).collect();
    let mut subscriber = connect(&rt, n5, "many-filters");
    rt.block_on(subscriber.subscribe_all(&filters, QoS::ExactlyOnce, 500, Duration::from_secs(120)));
    eprintln!("{FILTERS} filters granted after {:?}", started.elapsed());
    // Each /metrics walks the ~6,000 shards a node owns: poll gently.
    wait_until_every(Duration::from_secs(1), Duration::from_secs(180), "the entries to be owned R times", || {
        let (each, sum) = per_node(&nodes, "kadmq_cluster_shard_entries_owned");
        if sum == (R * FILTERS) as u64 {
            Ok(())
        } else {
            Err(format!("entries owned {each:?} add up to {sum}"))
        }
    });
    assert_eq!(n5.metric("kadmq_cluster_local_filters"), FILTERS as u64);
    let (entries, _) = per_node(&nodes, "kadmq_cluster_shard_entries_owned");
    let (shards, _) = per_node(&nodes, "kadmq_cluster_shards_owned");
    let shares: Vec<String> = entries.iter().map(|e| format!("{:.3}", *e as f64 / FILTERS as f64)).collect();
    eprintln!(
        "owned after {:?}: entries {entries:?} (share of {FILTERS}: {shares:?}), shards {shards:?}",
        started.elapsed()
    );
    for (node, owned) in nodes.iter().zip(&entries) {
        assert!(
            (*owned as f64) <= MAX_SHARE * FILTERS as f64,
            "{} owns {owned} of {FILTERS} entries (more than {MAX_SHARE}); all: {entries:?}",
            node.name
        );
        assert!(
            (*owned as f64) >= MIN_SHARE * FILTERS as f64,
            "{} owns {owned} of {FILTERS} entries (less than {MIN_SHARE}); all: {entries:?}",
            node.name
        );
    }
    // Each filter is its own shard: shards owned add up the same way.
    assert_eq!(shards.iter().sum::<u64>(), (R * FILTERS) as u64, "shards owned: {shards:?}");

    // 5: shards n1 does not own (their owners, as n1 and an owner report them).
    let mut warm = Vec::new();
    for i in 0..FILTERS {
        if warm.len() == WARM_SHARDS {
            break;
        }
        let topic = format!("s{}/x{i}/w", i % 500);
        let report = n1.routes(&topic);
        let shard = report["shards"].as_array().unwrap().iter().find(|s| s["prefix"] == format!("s{}/x{i}", i % 500));
        let owners = strings(&shard.unwrap()["owners"]);
        if !owners.contains(&"n1".to_string()) {
            warm.push((i, topic, owners));
        }
    }
    assert_eq!(warm.len(), WARM_SHARDS, "n1 owns (nearly) every shard?");
    for (i, topic, owners) in &warm {
        let owner = nodes.iter().find(|n| n.name == owners[0]).unwrap();
        let members: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        let subs = vec![("n5".to_string(), filter(*i))];
        let seen = check_routes(owner, topic, &subs, &members, R, true).unwrap_or_else(|e| panic!("{e}"));
        let theirs = seen.iter().find(|(p, _)| p.contains('/')).map(|(_, o)| o.clone());
        assert_eq!(theirs.as_ref(), Some(owners), "n1 and {} agree on the owners of {topic}", owner.name);
    }

    // The first publish to each looks it up.
    let publisher = connect(&rt, n1, "steady-publisher");
    for (_, topic, _) in &warm {
        publish(&rt, &publisher, topic, QoS::AtLeastOnce, topic.clone());
    }
    wait_until(SETTLE, "the first publishes to arrive", || {
        (subscriber.count() >= WARM_SHARDS).then_some(()).ok_or(format!("{} of {WARM_SHARDS}", subscriber.count()))
    });
    let lookups = n1.metric("kadmq_cluster_remote_lookups_total");
    let misses = n1.metric("kadmq_cluster_route_cache_misses_total");
    let hits = n1.metric("kadmq_cluster_route_cache_hits_total");
    assert!(lookups >= WARM_SHARDS as u64, "n1 looked up the shards it does not own: {lookups} lookups");
    for (i, topic, _) in &warm {
        let report = n1.routes(topic);
        let prefix = format!("s{}/x{i}", i % 500);
        let shard = report["shards"].as_array().unwrap().iter().find(|s| s["prefix"] == prefix).unwrap().clone();
        assert_eq!(shard["source"], "cached", "n1 cached {prefix}: {report}");
        assert_eq!(strings(&report["destinations"]), vec!["n5".to_string()], "n1 for {topic}: {report}");
    }

    // Then a few hundred more to the same shards: cache hits only.
    for round in 0..PER_SHARD {
        for (i, _, _) in &warm {
            let topic = format!("s{}/x{i}/m{round}", i % 500);
            publish(&rt, &publisher, &topic, QoS::AtLeastOnce, topic.clone());
        }
    }
    let total = WARM_SHARDS * (1 + PER_SHARD);
    wait_until(SETTLE, "every publish to arrive", || {
        (subscriber.count() >= total).then_some(()).ok_or(format!("{} of {total}", subscriber.count()))
    });
    std::thread::sleep(QUIET);
    subscriber.check_alive();
    let got = got(&subscriber);
    let distinct: BTreeSet<&str> = got.iter().map(|g| g.payload.as_str()).collect();
    assert_eq!((got.len(), distinct.len()), (total, total), "each publish arrives once");
    assert!(got.iter().all(|g| g.payload == g.topic), "payloads name their topics");
    let after = (
        n1.metric("kadmq_cluster_remote_lookups_total"),
        n1.metric("kadmq_cluster_route_cache_misses_total"),
        n1.metric("kadmq_cluster_route_cache_hits_total"),
    );
    eprintln!("n1: lookups {lookups} -> {}, misses {misses} -> {}, cache hits {hits} -> {}", after.0, after.1, after.2);
    assert_eq!(after.0, lookups, "no remote lookups in steady state");
    assert_eq!(after.1, misses, "no cache misses in steady state");
    assert!(after.2 >= hits + (WARM_SHARDS * PER_SHARD) as u64, "a cache hit per publish at least");
    assert_eq!(n1.metric("kadmq_cluster_lookups_failed_total"), 0);

    // A topic published again takes the route remembered for it: the core
    // is not even asked (no owned read, no cache hit), and it still arrives.
    let (_, topic, _) = &warm[0];
    let memo_before = n1.metric("kadmq_cluster_topic_route_hits_total");
    const AGAIN: usize = 20;
    for _ in 0..AGAIN {
        publish(&rt, &publisher, topic, QoS::AtLeastOnce, topic.clone());
    }
    wait_until(SETTLE, "the repeated publishes to arrive", || {
        let got = subscriber.count();
        (got >= total + AGAIN).then_some(()).ok_or(format!("{got} of {}", total + AGAIN))
    });
    let memo_hits = n1.metric("kadmq_cluster_topic_route_hits_total") - memo_before;
    assert!(memo_hits >= (AGAIN - 1) as u64, "repeated publishes use the remembered route: {memo_hits} hits");
    assert_eq!(n1.metric("kadmq_cluster_publishes_waiting"), 0);
    eprintln!("done after {:?}", started.elapsed());
}

// ----- 6: another cluster key -----------------------------------------------------------------

/// A node holding another cluster key, bootstrapping from a member, never
/// joins: neither side ever lists the other, no message crosses, and the
/// newcomer's log says its handshake failed for a wrong key.
#[test]
fn a_node_with_another_cluster_key_is_refused() {
    /// What the driver logs when an outbound connection fails its upgrade.
    const WHY: &str = "handshake failed, likely a wrong cluster key";
    /// At least this many heartbeats' worth of watching.
    const WATCH: Duration = Duration::from_secs(5);

    let started = Instant::now();
    let lab = Lab::new();
    let [w1, w2] = lab.fleet(["w1", "w2"], &CALM);
    let boot = w1.multiaddr();

    let other_key = lab.dir.path().join("other.key");
    lab.keygen(&other_key);
    assert_ne!(std::fs::read(&other_key).unwrap(), std::fs::read(&lab.key).unwrap());
    // It joins nobody: a short join timeout lets it take clients (alone) soon.
    let w3 = lab.node_with("w3", Some(&boot), &other_key, &[CALM[0], CALM[1], "--join-timeout-ms", "1000"]);

    let rt = runtime();
    let mut outsider = connect(&rt, &w3, "outsider");
    subscribe(&rt, &mut outsider, &["#".into()]);
    let insider = connect(&rt, &w1, "insider");

    // Watch until w3 has logged why (bounded) and for at least WATCH.
    let watch_start = Instant::now();
    let mut sent = 0;
    let mut logged = None;
    while watch_start.elapsed() < SETTLE + WATCH {
        let names = |node: &Node| -> BTreeSet<String> {
            node.cluster()["members"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().into()).collect()
        };
        assert_eq!(names(&w3), BTreeSet::from(["w3".to_string()]), "w3 knows of no other member");
        for node in [&w1, &w2] {
            assert_eq!(names(node), BTreeSet::from(["w1".into(), "w2".into()]), "{} never lists w3", node.name);
        }
        assert_eq!(w3.metric("kadmq_cluster_members"), 1);
        publish(&rt, &insider, &format!("t/{sent}"), QoS::AtLeastOnce, format!("{sent}"));
        sent += 1;
        if logged.is_none() && w3.log().contains(WHY) {
            logged = Some(watch_start.elapsed());
        }
        if logged.is_some() && watch_start.elapsed() >= WATCH {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let log = w3.log();
    let line = log.lines().find(|l| l.contains(WHY));
    assert!(line.is_some(), "w3's log says why it cannot join ({WHY:?}):\n{log}");
    eprintln!("w3 logged after {:?}: {}", logged.unwrap(), line.unwrap());
    if let Some(line) = w1.log().lines().find(|l| l.contains("wrong cluster key")) {
        eprintln!("w1 logged: {line}");
    }
    assert_eq!(outsider.count(), 0, "none of the {sent} messages published on w1 reached w3");
    outsider.check_alive();
    insider.check_alive();
    eprintln!("done after {:?}", started.elapsed());
}

// ----- 7: subscriber counts in the route table ---------------------------------------------

/// The subscriber counts `node` reports for `filter` (in the shard its
/// literal prefix names), as routes to `topic`.
fn reported_counts(node: &Node, topic: &str, filter: &str) -> Vec<(String, u64)> {
    let report = node.routes(topic);
    let prefix = filter_prefix(filter);
    let shards = report["shards"].as_array().cloned().unwrap_or_default();
    let shard = shards.iter().find(|s| s["prefix"] == prefix.as_str()).cloned().unwrap_or_default();
    let filters = shard["filters"].as_array().cloned().unwrap_or_default();
    filters.iter().find(|f| f["filter"] == filter).map(|f| node_counts(&f["nodes"])).unwrap_or_default()
}

/// `/api/v1/routes` documents `nodes` as the nodes with plain subscribers
/// "and their subscriber counts". Two sessions on c2 subscribe to one
/// filter: every owner should say c2 has 2, whether it learnt the entry from
/// the subscriptions themselves (c1, c2) or from the re-assertion a joining
/// owner gets (c3).
///
/// FAILS against the current src/: the routing core asserts a filter to
/// its owners only when a node's first local subscriber comes (count 1)
/// and sends nothing for the next ones (`Node::subscribe`,
/// dht/src/core/node.rs), while a re-assertion sends the real count
/// (`Node::local_ops`). c1 and c2 report 1, c3 reports 2.
#[test]
fn routes_report_subscriber_counts_per_node() {
    let lab = Lab::new();
    let [a, b] = lab.fleet(["c1", "c2"], &CALM);
    let boot = a.multiaddr();

    let rt = runtime();
    let mut first = connect(&rt, &b, "counted-1");
    subscribe(&rt, &mut first, &["cnt/x".into()]);
    let mut second = connect(&rt, &b, "counted-2");
    subscribe(&rt, &mut second, &["cnt/x".into()]);
    for node in [&a, &b] {
        wait_until(SETTLE, &format!("{} to list c2 for cnt/x", node.name), || {
            let counts = reported_counts(node, "cnt/x", "cnt/x");
            (!counts.is_empty()).then_some(()).ok_or(format!("{counts:?}"))
        });
    }

    // A third node joins and becomes an owner: c2 re-asserts its entries to it.
    let c = lab.node_with("c3", Some(&boot), &lab.key, &CALM);
    wait_for_members(&[&a, &b, &c], &["c1", "c2", "c3"]);
    wait_until(SETTLE, "c3 to list c2 for cnt/x", || {
        let counts = reported_counts(&c, "cnt/x", "cnt/x");
        (!counts.is_empty()).then_some(()).ok_or(format!("{counts:?}"))
    });

    let reported: BTreeMap<String, Vec<(String, u64)>> =
        [&a, &b, &c].iter().map(|n| (n.name.clone(), reported_counts(n, "cnt/x", "cnt/x"))).collect();
    eprintln!("subscriber counts reported for cnt/x: {reported:?}");
    let want = vec![("c2".to_string(), 2)];
    let wrong: Vec<&String> = reported.iter().filter(|(_, counts)| **counts != want).map(|(n, _)| n).collect();
    assert!(wrong.is_empty(), "two subscribers on c2; {wrong:?} report otherwise: {reported:?}");
    first.check_alive();
    second.check_alive();
}
