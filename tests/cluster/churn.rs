//! Failure and churn in a fleet of real `kadmq` processes with real MQTT
//! clients (rumqttc):
//!
//! - a node SIGKILLed under traffic is routed around (publishes between the
//!   survivors flow again within 10 s), its route entries disappear and the
//!   survivors' entries are replicated R = 3 times again, its persistent
//!   session is adopted by a survivor (routed there meanwhile); restarted
//!   with its data dir it rejoins with the same peer id, and its client,
//!   connecting to it again, takes the session back there;
//! - a sixth node joining under QoS 1 traffic takes shards, and no
//!   subscription misses a message while they move;
//! - a node the others declare dead while it is alive (paused past their
//!   dead timeout, not its own) has its subscriptions routed again.
//!
//! Runs with `KADMQ_KEEP_LOGS=DIR` keep the nodes' whole logs of a failed
//! test in DIR (the lab's temporary directory goes with the test).
//!
//! The clients run on a tokio runtime of their own, so the test thread can
//! poll the nodes' HTTP endpoints (blocking) while the traffic flows. Every
//! payload is `tag seq sent_ms` (the test's clock), so a subscriber can tell
//! what it missed, what came twice, and when.

use crate::support::lab::{strings, wait_for_members, Lab, Node, SETTLE};
use crate::support::mqtt::{Client, Received, PATIENCE};
use crate::support::runtime;
use crate::support::wait::{try_wait_until_every, wait_until_every};
use rumqttc::QoS;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio::time::{timeout, MissedTickBehavior};

/// Owners per route shard (the default `--replication`).
const R: u64 = 3;
/// How soon after a kill publishes between the survivors must flow again.
const RECOVERY_BOUND_MS: u64 = 10_000;

// ----- the test's clock, logs, waiting -----------------------------------------

/// Milliseconds since the test started: publishers stamp payloads with it,
/// subscribers stamp arrivals, the test stamps kills and joins.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }

    /// `at` on the test clock.
    fn ms_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.0).as_millis() as u64
    }
}

/// The wall clock as the nodes' logs show it (UTC, `HH:MM:SS.mmm`).
fn utc_now() -> String {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let s = ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}.{:03}", s / 3600, s / 60 % 60, s % 60, ms % 1000)
}

/// How often a wait polls: each check asks several nodes over HTTP.
const POLL: Duration = Duration::from_millis(300);

/// Prints a line stamped with the test clock.
macro_rules! say {
    ($clock:expr, $($arg:tt)*) => {
        println!("[{:6.1} s] {}", $clock.ms() as f64 / 1000.0, format!($($arg)*))
    };
}

// ----- what the nodes say ----------------------------------------------------------

/// The names in a JSON list, sorted.
fn names(list: &Value) -> Vec<String> {
    let mut names = strings(list);
    names.sort();
    names
}

/// The shard named `prefix` in a routes report.
fn shard<'a>(report: &'a Value, prefix: &str) -> &'a Value {
    report["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["prefix"] == prefix)
        .unwrap_or_else(|| panic!("no shard {prefix:?} in {report}"))
}

fn sum(nodes: &[&Node], metric: &str) -> u64 {
    nodes.iter().map(|n| n.metric(metric)).sum()
}

/// Each node's (shards owned, entries owned, local filters): one `/metrics` each.
fn table(nodes: &[&Node]) -> Vec<(String, [u64; 3])> {
    let names = ["kadmq_cluster_shards_owned", "kadmq_cluster_shard_entries_owned", "kadmq_cluster_local_filters"];
    nodes
        .iter()
        .map(|n| {
            let all = n.metrics();
            (
                n.name.clone(),
                names.map(|name| all.get(name).copied().unwrap_or_else(|| panic!("no {name} on {}", n.name))),
            )
        })
        .collect()
}

fn describe(table: &[(String, [u64; 3])]) -> String {
    table
        .iter()
        .map(|(name, [shards, entries, filters])| {
            format!("{name}: {shards} shards / {entries} entries owned, {filters} local filters")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `name: shards/entries owned, local filters` for each node.
fn figures(nodes: &[&Node]) -> String {
    describe(&table(nodes))
}

/// The forwarding counters that explain a loss, per node (zeros left out).
fn counters(nodes: &[&Node]) -> String {
    let names = [
        ("kadmq_cluster_remote_lookups_total", "lookups"),
        ("kadmq_cluster_lookups_failed_total", "lookups failed"),
        ("kadmq_cluster_forwarded_total", "forwarded"),
        ("kadmq_cluster_received_total", "received"),
        ("kadmq_cluster_outbox_messages", "in outbox"),
        ("kadmq_cluster_outbox_resent_total", "resent"),
        ("kadmq_cluster_publishes_refused_total", "refused (outbox full)"),
        ("kadmq_cluster_duplicates_total", "duplicates dropped"),
        ("kadmq_messages_dropped_total", "messages dropped"),
    ];
    nodes
        .iter()
        .map(|n| {
            let all = n.metrics();
            let figures: Vec<String> = names
                .iter()
                .filter_map(|(metric, label)| all.get(*metric).filter(|v| **v > 0).map(|v| format!("{label} {v}")))
                .collect();
            format!("{}: {}", n.name, figures.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Passes when each node has its expected number of local filters and the
/// owned entries add up to R times their sum.
fn replicated(nodes: &[&Node], filters: &[u64]) -> Result<(), String> {
    let table = table(nodes);
    for ((name, [_, _, have]), want) in table.iter().zip(filters) {
        if have != want {
            return Err(format!("{name} has {have} local filters, not {want}"));
        }
    }
    let want = R * filters.iter().sum::<u64>();
    let owned: u64 = table.iter().map(|(_, [_, entries, _])| entries).sum();
    if owned != want {
        return Err(format!("entries owned add up to {owned}, not {want} ({})", describe(&table)));
    }
    Ok(())
}

// ----- MQTT clients ---------------------------------------------------------------------

/// One PUBLISH a client received.
#[derive(Clone, Debug)]
struct Arrival {
    topic: String,
    tag: String,
    seq: u64,
    at_ms: u64,
    dup: bool,
}

/// Connects client `id` to `node` (clean session or not) and returns it
/// and the CONNACK's session present flag.
async fn connect(node: &Node, id: &str, clean: bool) -> (Client, bool) {
    let mut options = Client::options(id, node.mqtt_port);
    options.set_clean_session(clean);
    options.set_max_packet_size(256 * 1024, 256 * 1024);
    Client::connect_ok(options).await
}

/// Subscribes to `filters` at QoS 1 (100 per SUBSCRIBE) and waits for the SUBACKs.
async fn subscribe(client: &mut Client, filters: &[String]) {
    let packets = filters.len().div_ceil(100) as u32;
    client.subscribe_all(filters, QoS::AtLeastOnce, 100, PATIENCE * packets).await;
}

/// The `tag seq` a payload (`tag seq sent_ms`) starts with; seq u64::MAX
/// if it is unreadable.
fn tag_seq(payload: &[u8]) -> (String, u64) {
    let text = String::from_utf8_lossy(payload);
    let mut fields = text.split_whitespace();
    let tag = fields.next().unwrap_or_default().to_string();
    (tag, fields.next().and_then(|f| f.parse().ok()).unwrap_or(u64::MAX))
}

/// What these tests read of the PUBLISHes a client got.
trait Arrivals {
    fn arrivals(&self, clock: Clock) -> Vec<Arrival>;
    /// Distinct sequence numbers received from publisher `tag`.
    fn distinct_from(&self, tag: &str) -> usize;
}

impl Arrivals for Client {
    fn arrivals(&self, clock: Clock) -> Vec<Arrival> {
        let arrival = |received: Received<rumqttc::Publish>| {
            let (tag, seq) = tag_seq(&received.publish.payload);
            let at_ms = clock.ms_at(received.at);
            Arrival { topic: received.publish.topic, tag, seq, at_ms, dup: received.publish.dup }
        };
        self.received().into_iter().map(arrival).collect()
    }

    fn distinct_from(&self, tag: &str) -> usize {
        let mut seqs: Vec<u64> = self
            .received()
            .iter()
            .map(|r| tag_seq(&r.publish.payload))
            .filter(|(t, _)| t == tag)
            .map(|(_, seq)| seq)
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        seqs.len()
    }
}

/// How a publisher publishes: one message `every`, until the test clock
/// passes `stop_at` (ms), `max` are sent or `limit` passes.
struct Pace {
    every: Duration,
    max: u64,
    limit: Duration,
    stop_at: Arc<AtomicU64>,
}

/// Publishes QoS 1 `tag seq sent_ms` to `topic(seq)` through `publisher`
/// at `pace`; stops early if its connection ends. Returns the send time
/// (test clock) of each sequence number.
fn spawn_publisher(
    clock: Clock,
    publisher: &Client,
    tag: String,
    topic: impl Fn(u64) -> String + Send + 'static,
    pace: Pace,
) -> JoinHandle<Vec<u64>> {
    let Pace { every, max, limit, stop_at } = pace;
    let client = publisher.client.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut sent = Vec::new();
        while (sent.len() as u64) < max && started.elapsed() < limit {
            tick.tick().await;
            let now = clock.ms();
            if now >= stop_at.load(Ordering::Relaxed) {
                break;
            }
            let seq = sent.len() as u64;
            let publish = client.publish(topic(seq), QoS::AtLeastOnce, false, format!("{tag} {seq} {now}"));
            match timeout(Duration::from_secs(5), publish).await {
                Ok(Ok(())) => sent.push(now),
                // The client's queue is stuck, or closed because its
                // connection ended: stop (the counts tell).
                _ => break,
            }
        }
        sent
    })
}

/// Waits (bounded by `within`) until every client in `subscribers` has
/// every message of each publisher tag it should get.
fn wait_delivered(within: Duration, expected: &[(&Client, &str, usize)]) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if expected.iter().all(|(client, tag, count)| client.distinct_from(tag) >= *count) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

// ----- 1 and 2: a node killed under traffic, then restarted ------------------------------

/// What one publisher → subscriber pair saw around the kill.
struct PairFigures {
    published: usize,
    lost: Vec<u64>,
    /// Lost messages published at or after the kill, with their send time after the kill.
    lost_after_kill: Vec<(u64, u64)>,
    duplicates: usize,
    /// Arrival of the first message published after the kill, after the kill.
    first_after_kill_ms: Option<u64>,
    /// Arrival of the first message published after the kill and after the
    /// last message lost, after the kill: when the flow was whole again.
    recovered_ms: Option<u64>,
    /// The longest time without an arrival, from the kill to the last arrival.
    longest_silence_ms: u64,
}

fn pair_figures(sent: &[u64], got: &[Arrival], kill_ms: u64) -> PairFigures {
    let mut first: BTreeMap<u64, u64> = BTreeMap::new();
    let mut duplicates = 0;
    for arrival in got {
        match first.get_mut(&arrival.seq) {
            Some(at) => {
                duplicates += 1;
                *at = (*at).min(arrival.at_ms);
            }
            None => {
                first.insert(arrival.seq, arrival.at_ms);
            }
        }
    }
    let lost: Vec<u64> = (0..sent.len() as u64).filter(|seq| !first.contains_key(seq)).collect();
    let lost_after_kill: Vec<(u64, u64)> = lost
        .iter()
        .filter(|&&seq| sent[seq as usize] >= kill_ms)
        .map(|&seq| (seq, sent[seq as usize] - kill_ms))
        .collect();
    let first_after_kill = sent.iter().position(|&at| at >= kill_ms).map(|seq| seq as u64);
    let earliest_from = |from: u64| first.range(from..).map(|(_, at)| *at).min().map(|at| at.saturating_sub(kill_ms));
    let first_after_kill_ms = first_after_kill.and_then(earliest_from);
    let recovered_from = lost_after_kill.last().map(|(seq, _)| seq + 1).or(first_after_kill);
    let recovered_ms = recovered_from.and_then(earliest_from);
    let mut times: Vec<u64> = got.iter().map(|a| a.at_ms).filter(|&at| at >= kill_ms).collect();
    times.sort_unstable();
    let mut longest_silence_ms = 0;
    let mut previous = kill_ms;
    for at in times {
        longest_silence_ms = longest_silence_ms.max(at - previous);
        previous = at;
    }
    PairFigures {
        published: sent.len(),
        lost,
        lost_after_kill,
        duplicates,
        first_after_kill_ms,
        recovered_ms,
        longest_silence_ms,
    }
}

/// Five nodes, default timeouts (dead after 8 s). Publishers on the four
/// survivors publish QoS 1 every 100 ms to topics in shards c4 owns, each
/// subscribed on the other three survivors; 24 more filters on every node,
/// a persistent session on c4. c4 is SIGKILLed under that traffic.
/// Checks: the survivors' flows are whole again within 10 s of the kill and
/// lose no QoS 1 message; once c4 is dead the survivors own exactly R × their
/// own entries and route nothing to c4. Then c4 restarts with its data dir:
/// same peer id (higher incarnation), the persistent session is present
/// without subscribing again and gets what another node publishes.
#[test]
fn a_killed_node_is_routed_around_and_rejoins_with_its_persistent_sessions() {
    let test_started = Instant::now();
    let clock = Clock(Instant::now());
    let rt = runtime();
    let lab = Lab::new();
    const NAMES: [&str; 5] = ["c1", "c2", "c3", "c4", "c5"];
    const VICTIM: usize = 3;
    const SURVIVORS: [usize; 4] = [0, 1, 2, 4];
    let mut nodes = Vec::from(lab.fleet(NAMES, &[]));
    say!(clock, "kill: 5 nodes up and seeing each other");
    let victim = NAMES[VICTIM];
    let survivor_names: Vec<String> = SURVIVORS.iter().map(|&i| NAMES[i].to_string()).collect();

    // One flow topic per publisher, each in a shard the victim owns.
    let mut flow_topics = Vec::new();
    for i in 0..100 {
        let topic = format!("churn/k{i}");
        if names(&shard(&nodes[0].routes(&topic), &topic)["owners"]).contains(&victim.to_string()) {
            flow_topics.push(topic);
        }
        if flow_topics.len() == SURVIVORS.len() {
            break;
        }
    }
    assert_eq!(flow_topics.len(), SURVIVORS.len(), "shards owned by {victim}");
    let statics: Vec<String> = (0..24).map(|i| format!("churn/s{i}")).collect();
    let victim_owned = statics
        .iter()
        .chain(&flow_topics)
        .chain(std::iter::once(&"churn/p".to_string()))
        .filter(|t| names(&shard(&nodes[0].routes(t), t)["owners"]).contains(&victim.to_string()))
        .count();
    say!(
        clock,
        "kill: {victim_owned} of {} subscribed shards have {victim} among their owners; flow topics {flow_topics:?}",
        statics.len() + flow_topics.len() + 1
    );

    // Subscriptions: the same 24 filters on every node; on each survivor
    // the flow topics of the other survivors' publishers; on the victim a
    // persistent session (clean session = false) on churn/p.
    let (mut static_subs, mut flow_subs, mut publishers) = (Vec::new(), Vec::new(), Vec::new());
    let keeper = rt.block_on(async {
        for node in &nodes {
            let (mut sub, _) = connect(node, &format!("static-{}", node.name), true).await;
            subscribe(&mut sub, &statics).await;
            static_subs.push(sub);
        }
        for (k, &i) in SURVIVORS.iter().enumerate() {
            let others: Vec<String> =
                (0..SURVIVORS.len()).filter(|&j| j != k).map(|j| flow_topics[j].clone()).collect();
            let (mut sub, _) = connect(&nodes[i], &format!("flow-{}", NAMES[i]), true).await;
            subscribe(&mut sub, &others).await;
            flow_subs.push(sub);
            let (publisher, _) = connect(&nodes[i], &format!("pub-{}", NAMES[i]), true).await;
            publishers.push(publisher);
        }
        let (mut keeper, _) = connect(&nodes[VICTIM], "keeper", false).await;
        subscribe(&mut keeper, &["churn/p".to_string()]).await;
        keeper
    });
    say!(clock, "kill: clients connected and subscribed");
    let mut filters: Vec<u64> = vec![statics.len() as u64 + 3; NAMES.len()];
    filters[VICTIM] = statics.len() as u64 + 1;
    wait_until_every(POLL, SETTLE, "every entry replicated R times", || {
        replicated(&nodes.iter().collect::<Vec<_>>(), &filters)
    });
    let entries_before = sum(&nodes.iter().collect::<Vec<_>>(), "kadmq_cluster_shard_entries_owned");
    say!(clock, "kill: before the kill {}", figures(&nodes.iter().collect::<Vec<_>>()));

    // Traffic: each survivor's publisher, 10 QoS 1 messages a second, to
    // the subscribers on the other survivors; until 16 s after the kill.
    let stop_at = Arc::new(AtomicU64::new(u64::MAX));
    let traffic: Vec<JoinHandle<Vec<u64>>> = publishers
        .iter()
        .enumerate()
        .map(|(k, publisher)| {
            let topic = flow_topics[k].clone();
            let _guard = rt.enter();
            let pace = Pace {
                every: Duration::from_millis(100),
                max: 600,
                limit: Duration::from_secs(60),
                stop_at: stop_at.clone(),
            };
            spawn_publisher(clock, publisher, k.to_string(), move |_| topic.clone(), pace)
        })
        .collect();
    // Pair (k, s): publisher k (on SURVIVORS[k]) → flow subscriber s (on SURVIVORS[s]).
    let pairs: Vec<(usize, usize)> =
        (0..SURVIVORS.len()).flat_map(|k| (0..SURVIVORS.len()).filter(move |&s| s != k).map(move |s| (k, s))).collect();
    wait_until_every(POLL, Duration::from_secs(15), "every pair to flow before the kill", || {
        match pairs.iter().find(|(k, s)| flow_subs[*s].distinct_from(&k.to_string()) < 10) {
            Some((k, s)) => Err(format!("{} got < 10 messages from pub-{}", flow_subs[*s].id, NAMES[SURVIVORS[*k]])),
            None => Ok(()),
        }
    });

    let member = |node: &Node, name: &str| -> Value { node.member(name).unwrap() };
    let before = member(&nodes[0], victim);
    assert_eq!(before["peer_id"], nodes[VICTIM].peer_id(), "c1's view of {victim}'s peer id");

    // SIGKILL under traffic.
    let kill_ms = clock.ms();
    let kill_utc = utc_now();
    nodes[VICTIM].kill();
    stop_at.store(kill_ms + 16_000, Ordering::Relaxed);
    let survivors: Vec<&Node> = SURVIVORS.iter().map(|&i| &nodes[i]).collect();
    wait_until_every(POLL, Duration::from_secs(30), &format!("the survivors to declare {victim} dead"), || {
        for node in &survivors {
            let state = member(node, victim)["state"].clone();
            if state != "dead" {
                return Err(format!("{} sees {victim} {state}", node.name));
            }
        }
        Ok(())
    });
    let dead_ms = clock.ms() - kill_ms;
    wait_until_every(POLL, Duration::from_secs(30), "the survivors' entries replicated R times", || {
        for node in &survivors {
            let members = node.metric("kadmq_cluster_members");
            if members != 4 {
                return Err(format!("{} routes over {members} members", node.name));
            }
        }
        // The keeper's persistent session (churn/p) is adopted by one survivor.
        let each = statics.len() as u64 + 3;
        let have: Vec<u64> = table(&survivors).iter().map(|(_, [_, _, filters])| *filters).collect();
        let adopter =
            have.iter().position(|&h| h == each + 1).ok_or(format!("no survivor adopted churn/p: {have:?}"))?;
        let mut want = vec![each; SURVIVORS.len()];
        want[adopter] += 1;
        replicated(&survivors, &want)
    });
    let replicated_ms = clock.ms() - kill_ms;
    let entries_after = sum(&survivors, "kadmq_cluster_shard_entries_owned");
    say!(clock, "kill: after the kill {}", figures(&survivors));

    // The victim's entries are gone: no survivor routes to it, and each
    // shard's three owners route the (first 8) static filters to every survivor.
    let mut topics: Vec<String> = statics[..8].iter().chain(&flow_topics).cloned().collect();
    topics.push("churn/p".into());
    wait_until_every(POLL, Duration::from_secs(10), &format!("no route to {victim} left"), || {
        for topic in &topics {
            let mut owners = 0;
            for node in &survivors {
                let report = node.routes(topic);
                let destinations = names(&report["destinations"]);
                if destinations.contains(&victim.to_string()) {
                    return Err(format!("{} routes {topic} to {victim}: {report}", node.name));
                }
                if shard(&report, topic)["source"] != "owned" {
                    continue;
                }
                if topic == "churn/p" {
                    // The keeper's persistent session was adopted by one
                    // survivor (its directory owner): routed there now.
                    if destinations.len() != 1 || !survivor_names.contains(&destinations[0]) {
                        return Err(format!(
                            "{} (an owner) routes churn/p to {destinations:?}, not one survivor",
                            node.name
                        ));
                    }
                    owners += 1;
                    continue;
                }
                owners += 1;
                let want: Vec<String> = if let Some(k) = flow_topics.iter().position(|t| t == topic) {
                    survivor_names.iter().enumerate().filter(|(s, _)| *s != k).map(|(_, n)| n.clone()).collect()
                } else {
                    survivor_names.clone()
                };
                if destinations != want {
                    return Err(format!("{} (an owner) routes {topic} to {destinations:?}, not {want:?}", node.name));
                }
            }
            if owners != R {
                return Err(format!("{owners} survivors own the shard of {topic}, not {R}"));
            }
        }
        Ok(())
    });

    // Traffic ends 16 s after the kill; then every message should arrive.
    let sent: Vec<Vec<u64>> = rt.block_on(async {
        let mut sent = Vec::new();
        for handle in traffic {
            sent.push(handle.await.unwrap());
        }
        sent
    });
    let expected: Vec<(&Client, &str, usize)> =
        pairs.iter().map(|&(k, s)| (&flow_subs[s], ["0", "1", "2", "3"][k], sent[k].len())).collect();
    let complete = wait_delivered(Duration::from_secs(15), &expected);
    let mut gap_first = 0;
    let mut recovered = 0;
    let mut report = Vec::new();
    let mut problems = Vec::new();
    for &(k, s) in &pairs {
        let got: Vec<Arrival> = flow_subs[s].arrivals(clock).into_iter().filter(|a| a.tag == k.to_string()).collect();
        let f = pair_figures(&sent[k], &got, kill_ms);
        let pair = format!("{} → {}", NAMES[SURVIVORS[k]], NAMES[SURVIVORS[s]]);
        report.push(format!(
            "{pair}: {} published, {} lost ({} after the kill, at {:?} ms), {} duplicates, first after kill {:?} ms, \
             whole again {:?} ms, longest silence {} ms",
            f.published,
            f.lost.len(),
            f.lost_after_kill.len(),
            f.lost_after_kill.iter().map(|(_, at)| at).collect::<Vec<_>>(),
            f.duplicates,
            f.first_after_kill_ms,
            f.recovered_ms,
            f.longest_silence_ms,
        ));
        match (f.first_after_kill_ms, f.recovered_ms) {
            (Some(first), Some(whole)) => {
                gap_first = gap_first.max(first);
                recovered = recovered.max(whole);
            }
            _ => problems.push(format!("{pair}: nothing published after the kill arrived")),
        }
        if let Some((seq, at)) = f.lost_after_kill.iter().find(|(_, at)| *at > RECOVERY_BOUND_MS) {
            problems.push(format!("{pair}: message {seq}, published {at} ms after the kill, never arrived"));
        }
        if !f.lost.is_empty() {
            // Both ends are alive: a QoS 1 message must not be lost, however
            // soon it came after the kill.
            let acked = publishers[k].pubacks() >= sent[k].len() as u64;
            problems.push(format!(
                "{pair}: {} QoS 1 messages ({}) never arrived, published {:?} ms after the kill",
                f.lost.len(),
                if acked { "all PUBACKed" } else { "not all PUBACKed" },
                f.lost.iter().map(|&seq| sent[k][seq as usize] as i64 - kill_ms as i64).collect::<Vec<_>>()
            ));
        }
    }
    for (k, times) in sent.iter().enumerate() {
        if times.last().is_none_or(|&last| last + 1_000 < kill_ms + 16_000) {
            problems.push(format!("pub-{} stopped early: {} published", NAMES[SURVIVORS[k]], times.len()));
        }
    }
    say!(clock, "kill: {victim} killed at {kill_ms} ms ({kill_utc} UTC in the logs); survivors saw it dead after {dead_ms} ms, entries replicated again after {replicated_ms} ms");
    say!(
        clock,
        "kill: entries owned {entries_before} (5 nodes) → {entries_after} (4 survivors): down {} = R × {victim}'s {} filters but the adopted churn/p; all delivered in the end: {complete}",
        entries_before - entries_after,
        filters[VICTIM] - 1
    );
    for line in &report {
        say!(clock, "kill:   {line}");
    }
    let acks: Vec<String> = publishers
        .iter()
        .zip(&sent)
        .map(|(p, sent)| format!("{}: {} published, {} PUBACKs", p.id, sent.len(), p.pubacks()))
        .collect();
    say!(clock, "kill: publishers {}", acks.join("; "));
    say!(clock, "kill: counters {}", counters(&survivors));
    say!(clock, "kill: recovery gap: first post-kill message after {gap_first} ms; flow whole again after {recovered} ms (bound {RECOVERY_BOUND_MS} ms)");
    if recovered > RECOVERY_BOUND_MS {
        problems.push(format!("publishes between the survivors flowed again only {recovered} ms after the kill"));
    }
    // Failures so far are asserted at the end: the restart is worth running anyway.
    for problem in &problems {
        say!(clock, "kill: FAILED: {problem}");
    }

    // 2. The victim comes back with its data dir: same peer id, and its
    // persistent session's subscription is routed again.
    let restart_ms = clock.ms();
    nodes[VICTIM].start();
    wait_for_members(&nodes.iter().collect::<Vec<_>>(), &NAMES);
    let rejoin_ms = clock.ms() - restart_ms;
    let after = member(&nodes[0], victim);
    let own = member(&nodes[VICTIM], victim);
    assert_eq!(after["peer_id"], before["peer_id"], "{victim} rejoins with its peer id (as c1 sees it)");
    assert_eq!(own["peer_id"], before["peer_id"], "{victim}'s own peer id");
    assert!(own["local"].as_bool().unwrap());
    let (inc_before, inc_after) = (before["incarnation"].as_u64().unwrap(), after["incarnation"].as_u64().unwrap());
    assert!(inc_after > inc_before, "incarnation {inc_before} → {inc_after}");
    say!(clock,
        "kill: {victim} restarted, seen alive by all after {rejoin_ms} ms; peer id {} both times, incarnation {inc_before} → {inc_after}",
        before["peer_id"]
    );

    let (keeper, session_present) = rt.block_on(async {
        drop(keeper);
        connect(&nodes[VICTIM], "keeper", false).await
    });
    assert!(session_present, "the keeper's session survived {victim}'s SIGKILL");
    wait_until_every(POLL, SETTLE, &format!("churn/p's owners to route it to {victim} again"), || {
        let mut owners = 0;
        for node in &nodes {
            let report = node.routes("churn/p");
            if shard(&report, "churn/p")["source"] == "owned" {
                owners += 1;
                if names(&report["destinations"]) != [victim] {
                    return Err(format!("{} (an owner) routes churn/p to {}", node.name, report["destinations"]));
                }
            }
        }
        if owners != R {
            return Err(format!("{owners} owners of churn/p's shard, not {R}"));
        }
        Ok(())
    });
    const BACK: u64 = 20;
    let got = rt.block_on(async {
        let (publisher, _) = connect(&nodes[1], "pub-back", true).await;
        for seq in 0..BACK {
            let payload = format!("back {seq} {}", clock.ms());
            publisher.client.publish("churn/p", QoS::AtLeastOnce, false, payload).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && keeper.distinct_from("back") < BACK as usize {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        publisher.abort();
        keeper.arrivals(clock)
    });
    let back: Vec<u64> = got.iter().filter(|a| a.tag == "back").map(|a| a.seq).collect();
    let mut distinct = back.clone();
    distinct.sort_unstable();
    distinct.dedup();
    say!(clock,
        "kill: the keeper (clean session = false, not subscribing again) got {} of {BACK} messages published on c2 ({} duplicates); other arrivals: {:?}",
        distinct.len(),
        back.len() - distinct.len(),
        got.iter().filter(|a| a.tag != "back").map(|a| &a.topic).collect::<Vec<_>>()
    );
    assert_eq!(distinct, (0..BACK).collect::<Vec<_>>(), "the restarted node's persistent session is routed again");

    // The restarted node holds the keeper's filter only (the clean
    // sessions died with it); the table is whole again.
    let mut filters_back = vec![statics.len() as u64 + 3; NAMES.len()];
    filters_back[VICTIM] = 1;
    wait_until_every(POLL, SETTLE, "every entry replicated R times after the restart", || {
        replicated(&nodes.iter().collect::<Vec<_>>(), &filters_back)
    });
    say!(clock, "kill: after the restart {}", figures(&nodes.iter().collect::<Vec<_>>()));
    for client in static_subs.iter().chain(&flow_subs).chain(&publishers).chain([&keeper]) {
        client.abort();
    }
    say!(clock, "kill: took {:.1} s", test_started.elapsed().as_secs_f64());
    assert!(problems.is_empty(), "while {victim} was killed: {problems:#?}");
}

// ----- 3: a node joins under traffic ----------------------------------------------------

/// Five nodes, 300 filters (one shard each) subscribed on j2..j5; j1
/// publishes QoS 1 round robin over them (every 20 ms) while j6 joins, and
/// for one more round after the table settled.
/// Checks: j6 owns shards and entries, the table settles at R × 1200
/// entries over six nodes, and every subscriber gets every sequence number.
#[test]
fn a_node_joining_under_traffic_takes_shards_and_no_subscription_misses_a_message() {
    let test_started = Instant::now();
    let clock = Clock(Instant::now());
    let rt = runtime();
    let lab = Lab::new();
    const NAMES: [&str; 6] = ["j1", "j2", "j3", "j4", "j5", "j6"];
    const FILTERS: u64 = 300;
    const EVERY: Duration = Duration::from_millis(20);
    // Nobody dies here: a long dead timeout keeps a starved CI machine from
    // declaring deaths that did not happen.
    const PATIENT: [&str; 2] = ["--dead-timeout", "30"];
    let mut nodes = Vec::from(lab.fleet(["j1", "j2", "j3", "j4", "j5"], &PATIENT));
    let boot = nodes[0].multiaddr();
    say!(clock, "join: 5 nodes up and seeing each other");

    // 300 filters, each in its own shard, on a subscriber on each of j2..j5.
    let filters: Vec<String> = (0..FILTERS).map(|i| format!("move/{i}")).collect();
    let mut subscribers = Vec::new();
    let publisher = rt.block_on(async {
        for node in &nodes[1..] {
            let (mut sub, _) = connect(node, &format!("mover-{}", node.name), true).await;
            subscribe(&mut sub, &filters).await;
            subscribers.push(sub);
        }
        connect(&nodes[0], "pub-j1", true).await.0
    });
    say!(clock, "join: clients connected and subscribed");
    let local = [0, FILTERS, FILTERS, FILTERS, FILTERS];
    wait_until_every(POLL, Duration::from_secs(90), "every entry replicated R times", || {
        replicated(&nodes.iter().collect::<Vec<_>>(), &local)
    });
    let before = figures(&nodes.iter().collect::<Vec<_>>());
    say!(clock, "join: before the join {before}");

    // Traffic: 50 QoS 1 messages a second from j1, round robin over the 300 topics.
    let stop_at = Arc::new(AtomicU64::new(u64::MAX));
    let traffic = {
        let _guard = rt.enter();
        let topic = |seq: u64| format!("move/{}", seq % FILTERS);
        let pace = Pace { every: EVERY, max: 4000, limit: Duration::from_secs(90), stop_at: stop_at.clone() };
        spawn_publisher(clock, &publisher, "p".into(), topic, pace)
    };
    wait_until_every(POLL, Duration::from_secs(20), "the subscribers to get traffic", || {
        match subscribers.iter().find(|s| s.distinct_from("p") < 80) {
            Some(s) => Err(format!("{} got {} messages", s.id, s.distinct_from("p"))),
            None => Ok(()),
        }
    });

    // The sixth node joins.
    let join_ms = clock.ms();
    let join_utc = utc_now();
    nodes.push(lab.node_with("j6", Some(&boot), &lab.key, &PATIENT));
    wait_for_members(&nodes.iter().collect::<Vec<_>>(), &NAMES);
    let members_ms = clock.ms() - join_ms;
    wait_until_every(POLL, SETTLE, "j6 to own shards with entries", || {
        let (shards, entries) =
            (nodes[5].metric("kadmq_cluster_shards_owned"), nodes[5].metric("kadmq_cluster_shard_entries_owned"));
        if shards > 0 && entries > 0 {
            Ok(())
        } else {
            Err(format!("j6 owns {shards} shards, {entries} entries"))
        }
    });
    let owned_ms = clock.ms() - join_ms;
    // The table is whole over 6 nodes (shards that moved away count no
    // more on their old owners). If it does not get there, the traffic is
    // still worth checking: the failure is asserted at the end.
    let mut problems = Vec::new();
    let local6 = [0, FILTERS, FILTERS, FILTERS, FILTERS, 0];
    if let Err(last) =
        try_wait_until_every(POLL, Duration::from_secs(30), "every entry replicated R times over 6 nodes", || {
            replicated(&nodes.iter().collect::<Vec<_>>(), &local6)
        })
    {
        problems.push(format!("the route table did not settle over 6 nodes within 30 s: {last}"));
    }
    let settled_ms = clock.ms() - join_ms;
    // One more round over every topic: each is published after the move.
    std::thread::sleep(EVERY * FILTERS as u32);
    stop_at.store(clock.ms(), Ordering::Relaxed);
    let sent = rt.block_on(traffic).unwrap();
    let after = figures(&nodes.iter().collect::<Vec<_>>());
    let (moved_shards, moved_entries) =
        (nodes[5].metric("kadmq_cluster_shards_owned"), nodes[5].metric("kadmq_cluster_shard_entries_owned"));

    // Every message reaches every subscriber: no gap; duplicates reported.
    let expected: Vec<(&Client, &str, usize)> = subscribers.iter().map(|s| (s, "p", sent.len())).collect();
    let complete = wait_delivered(Duration::from_secs(15), &expected);
    let (mut lost_total, mut duplicate_total) = (0, 0);
    let mut lost_topics = std::collections::BTreeSet::new();
    let mut lines = Vec::new();
    for sub in &subscribers {
        let got = sub.arrivals(clock);
        let mut count: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
        for arrival in got.iter().filter(|a| a.tag == "p") {
            let entry = count.entry(arrival.seq).or_default();
            entry.0 += 1;
            entry.1 += arrival.dup as usize;
        }
        let lost: Vec<u64> = (0..sent.len() as u64).filter(|seq| !count.contains_key(seq)).collect();
        let duplicates: usize = count.values().map(|(n, _)| n - 1).sum();
        let flagged: usize = count.values().filter(|(n, _)| *n > 1).map(|(_, d)| *d).sum();
        let wrong_topic = got.iter().filter(|a| a.tag == "p" && a.topic != format!("move/{}", a.seq % FILTERS)).count();
        lost_total += lost.len();
        lost_topics.extend(lost.iter().map(|seq| seq % FILTERS));
        duplicate_total += duplicates;
        let when: Vec<String> = lost
            .iter()
            .take(20)
            .map(|&seq| format!("{seq} (move/{}, {:+} ms)", seq % FILTERS, sent[seq as usize] as i64 - join_ms as i64))
            .collect();
        lines.push(format!(
            "{}: {} distinct of {}, {} lost {when:?}, {duplicates} duplicates ({flagged} with DUP set)",
            sub.id,
            count.len(),
            sent.len(),
            lost.len()
        ));
        // No subscription may be lost while the table moves: a new owner
        // defers to the owners of longer standing until the subscriber
        // nodes' re-assertions have had time to arrive.
        if !lost.is_empty() {
            let before = lost.iter().filter(|&&seq| sent[seq as usize] < join_ms).count();
            problems.push(format!(
                "{} missed {} messages ({before} published before the join), first: {when:?}",
                sub.id,
                lost.len(),
            ));
        }
        if wrong_topic > 0 {
            problems.push(format!("{}: {wrong_topic} messages on the wrong topic", sub.id));
        }
    }
    say!(clock, "join: j6 joined at {join_ms} ms ({join_utc} UTC in the logs; join = 0 below); all saw it alive after {members_ms} ms, it owned shards after {owned_ms} ms, table settled after {settled_ms} ms");
    say!(clock, "join: shards moved to j6: {moved_shards} shards holding {moved_entries} entries");
    say!(clock, "join: after the join {after}");
    say!(clock,
        "join: {} messages published on j1 (QoS 1, {} PUBACKs), {} expected deliveries; all delivered: {complete}; lost {lost_total}, duplicates {duplicate_total}",
        sent.len(),
        publisher.pubacks(),
        sent.len() * subscribers.len()
    );
    for line in &lines {
        say!(clock, "join:   {line}");
    }
    say!(clock, "join: counters {}", counters(&nodes.iter().collect::<Vec<_>>()));
    if !lost_topics.is_empty() {
        // Were the losses on shards that moved to j6?
        let moved = |topic: &str| names(&shard(&nodes[0].routes(topic), topic)["owners"]).contains(&"j6".into());
        let on_moved = lost_topics.iter().take(20).filter(|i| moved(&format!("move/{i}"))).count();
        let all_moved = (0..FILTERS).step_by(5).filter(|i| moved(&format!("move/{i}"))).count();
        say!(
            clock,
            "join: messages were lost on {} topics; of the first 20, {on_moved} are in shards j6 now owns (of every 5th shard, {all_moved} of {} moved to j6)",
            lost_topics.len(),
            FILTERS / 5
        );
    }
    for client in subscribers.iter().chain([&publisher]) {
        client.abort();
    }
    say!(clock, "join: took {:.1} s", test_started.elapsed().as_secs_f64());
    assert!(moved_shards > 0 && moved_entries > 0, "shards moved to j6");
    let (first, last) = (sent.first().copied().unwrap_or(u64::MAX), sent.last().copied().unwrap_or(0));
    assert!(
        first < join_ms && last >= join_ms + settled_ms,
        "the publisher published through the move: from {first} to {last} ms (join at {join_ms} ms, settled {settled_ms} ms later)"
    );
    assert!(problems.is_empty(), "{problems:#?}");
}

// ----- a node the others declare dead while it is alive ---------------------------------

/// Four nodes; f4 runs with `--dead-timeout 60`, the others with 8 s.
/// f4 is paused (SIGSTOP) until f1..f3 declare it dead, then resumed
/// (SIGCONT): only the others saw a death. Its subscriptions, in a shard
/// it owns and in one it does not, must reach it again (within 35 s,
/// longer than an anti-entropy round).
#[test]
fn a_node_declared_dead_while_alive_is_routed_to_again() {
    let clock = Clock(Instant::now());
    let rt = runtime();
    let lab = Lab::new();
    const NAMES: [&str; 4] = ["f1", "f2", "f3", "f4"];
    let mut nodes = vec![lab.node("f1", None)];
    let boot = nodes[0].multiaddr();
    for name in &NAMES[1..3] {
        nodes.push(lab.node(name, Some(&boot)));
    }
    // f4 is slow to declare others dead: when it is paused longer than the
    // others' dead timeout (8 s) but shorter than its own (60 s), only the
    // others see a death.
    nodes.push(lab.node_with("f4", Some(&boot), &lab.key, &["--dead-timeout", "60"]));
    wait_for_members(&nodes.iter().collect::<Vec<_>>(), &NAMES);
    // A topic whose shard f4 does not own, and one it owns.
    let owners = |t: &str| names(&shard(&nodes[0].routes(t), t)["owners"]);
    let foreign = (0..100).map(|i| format!("fd/a{i}")).find(|t| !owners(t).contains(&"f4".to_string())).unwrap();
    let own = (0..100).map(|i| format!("fd/b{i}")).find(|t| owners(t).contains(&"f4".to_string())).unwrap();
    let (sub, publisher) = rt.block_on(async {
        let (mut sub, _) = connect(&nodes[3], "sub-f4", true).await;
        subscribe(&mut sub, &[foreign.clone(), own.clone()]).await;
        let (publisher, _) = connect(&nodes[0], "pub-f1", true).await;
        (sub, publisher)
    });
    wait_until_every(POLL, SETTLE, "f4's entries replicated", || {
        replicated(&nodes.iter().collect::<Vec<_>>(), &[0, 0, 0, 2])
    });
    let probe = |tag: &str, within: Duration| -> Vec<String> {
        // Publishes to both topics every 500 ms until both arrive or `within` passes.
        let start = Instant::now();
        let mut seq = 0;
        loop {
            for topic in [&foreign, &own] {
                let payload = format!("{tag}-{topic} {seq} {}", clock.ms());
                rt.block_on(publisher.client.publish(topic.as_str(), QoS::AtLeastOnce, false, payload)).unwrap();
            }
            seq += 1;
            std::thread::sleep(Duration::from_millis(500));
            let mut got: Vec<String> =
                sub.arrivals(clock).into_iter().filter(|a| a.tag.starts_with(tag)).map(|a| a.topic).collect();
            got.sort();
            got.dedup();
            if got.len() == 2 || start.elapsed() > within {
                return got;
            }
        }
    };
    assert_eq!(probe("before", Duration::from_secs(10)).len(), 2, "both topics reach f4 before the pause");

    // Pause f4 past the others' dead timeout.
    nodes[3].pause();
    let others: Vec<&Node> = nodes[..3].iter().collect();
    let paused = Instant::now();
    wait_until_every(POLL, Duration::from_secs(30), "f1..f3 to declare f4 dead", || {
        for node in &others {
            let state = node.json("/api/v1/cluster")["members"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == "f4")
                .map(|m| m["state"].clone());
            if state != Some("dead".into()) {
                return Err(format!("{} sees f4 {state:?}", node.name));
            }
        }
        Ok(())
    });
    nodes[3].resume();
    say!(clock, "false death: f4 paused {:.1} s", paused.elapsed().as_secs_f64());
    wait_for_members(&nodes.iter().collect::<Vec<_>>(), &NAMES);
    assert_eq!(nodes[3].metric("kadmq_cluster_members"), 4, "f4 itself never saw a member die");
    let after = Instant::now();
    // Longer than an anti-entropy round (30 s).
    let got = probe("after", Duration::from_secs(35));
    say!(
        clock,
        "false death: after f4 came back, probes reached it on {got:?} within {:.1} s ({})",
        after.elapsed().as_secs_f64(),
        figures(&nodes.iter().collect::<Vec<_>>())
    );
    assert_eq!(got.len(), 2, "f4's subscriptions are routed again after it came back: got only {got:?}");
}
