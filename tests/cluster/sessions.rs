//! Sessions and wills follow the client across the fleet (issue 10): what
//! a client sees must not tell a fleet of three nodes from one broker.
//! Real nodes, real clients, one test per case:
//!
//! - a. a persistent session taken over on another node while QoS 1 and 2
//!   messages stream to it: none lost, QoS 2 not repeated;
//! - b. messages queued for an offline session on one node are delivered
//!   when it comes back on another, and its subscription moves with it;
//! - c. two connections racing with one client id on two nodes: one stays;
//! - d. the session's node SIGKILLed: the client resumes on another node
//!   with every message that node had acknowledged;
//! - e. the will of a client whose node is SIGKILLed: once, fleet-wide;
//! - f. wills when a node is stopped with SIGTERM: published, delayed as
//!   asked, and cancelled by a reconnection elsewhere;
//! - g. a rolling restart under QoS 1 load with persistent sessions loses
//!   no acknowledged message;
//! - h. a `$share` member's node SIGKILLed: its messages reach the other
//!   member; h2. a member ending with unacknowledged messages: they go to
//!   a member on another node;
//! - i. paho-mqtt interop and the session conformance checks of
//!   `tests/broker` through a round-robin proxy over the three nodes.
//! - j. what a SIGKILLed node had not acknowledged reaches the sessions
//!   adopted from it, though the first sending-on is lost.
//!
//! Each test gathers what went wrong into one report and fails once at the
//! end (so one run tells everything), except where a later step cannot run
//! without an earlier one. Every wait is bounded; the clients run on a
//! runtime of their own while the test thread asks the nodes over HTTP.

use crate::support::checks;
use crate::support::lab::{strings, wait_for_members, Lab, Node, MEMBERSHIP, SETTLE};
use crate::support::mqtt::{Client, Client5, PATIENCE};
use crate::support::paho;
use crate::support::proxy::Proxy;
use crate::support::raw::{connect_v311, connect_v5, delayed_will, publish, will, Ending, Raw};
use crate::support::runtime;
use crate::support::stream::{loopback, number, Numbered, Progress, Roaming};
use crate::support::wait::{try_wait_until, wait_until};
use kadmq::protocol::{ConnectReason, DisconnectReason, QoS as Q};
use rumqttc::v5::mqttbytes::v5 as v5p;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::QoS;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// The nodes' failure detector where a test kills one: dead after 4 s of
/// silence (the least `--dead-timeout` that a loaded machine tolerates).
const FAST: [&str; 2] = ["--dead-timeout", "4"];
const DEAD_TIMEOUT: Duration = Duration::from_secs(4);
/// Where no node dies: a starved debug build must not be declared dead.
const CALM: [&str; 2] = ["--dead-timeout", "30"];
/// How long a test listens after the last expected copy, for a second one.
const AFTERWARDS: Duration = Duration::from_secs(3);
const NAMES: [&str; 3] = ["n1", "n2", "n3"];

// ----- helpers -------------------------------------------------------------------------

fn addr(node: &Node) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], node.mqtt_port))
}

/// Whether `node` routes `topic` to every node of `to` (and where it does).
fn routes_to(node: &Node, topic: &str, to: &[&str]) -> Result<(), String> {
    let destinations = strings(&node.routes(topic)["destinations"]);
    if to.iter().all(|name| destinations.iter().any(|d| d == name)) {
        Ok(())
    } else {
        Err(format!("{} routes {topic} to {destinations:?}", node.name))
    }
}

/// Waits until each of `nodes` routes `topic` to every node of `to`, so a
/// publish anywhere reaches the subscribers there.
fn wait_routed(nodes: &[&Node], topic: &str, to: &[&str]) {
    for node in nodes {
        wait_until(SETTLE, &format!("{} to route {topic} to {to:?}", node.name), || routes_to(node, topic, to));
    }
}

/// Fails the test with every problem found, if any.
fn verdict(what: &str, problems: &[String]) {
    assert!(problems.is_empty(), "{what}:\n  - {}", problems.join("\n  - "));
}

/// The numbers a 3.1.1 client received on `topic`, in arrival order.
fn numbers_311(client: &Client, topic: &str) -> Vec<u64> {
    client.received().iter().filter(|r| r.publish.topic == topic).filter_map(|r| number(&r.publish.payload)).collect()
}

/// The numbers a 5.0 client received on `topic`, in arrival order.
fn numbers_5(client: &Client5, topic: &str) -> Vec<u64> {
    client
        .received()
        .iter()
        .filter(|r| &r.publish.topic[..] == topic.as_bytes())
        .filter_map(|r| number(&r.publish.payload))
        .collect()
}

/// `0..n` less `have`: what is missing, shortened for a report.
fn missing(want: impl IntoIterator<Item = u64>, have: &BTreeSet<u64>) -> Option<String> {
    let gone: Vec<u64> = want.into_iter().filter(|n| !have.contains(n)).collect();
    (!gone.is_empty()).then(|| {
        let shown: Vec<String> = gone.iter().take(20).map(u64::to_string).collect();
        format!("{} missing: {}{}", gone.len(), shown.join(" "), if gone.len() > 20 { " ..." } else { "" })
    })
}

/// A clean 5.0 DISCONNECT (no will), and waits until `node` has no
/// connection left, so the session is offline before the test goes on.
fn disconnect5(rt: &Runtime, client: Client5, node: &Node) {
    let mut client = client;
    rt.block_on(async {
        client.client.disconnect().await.unwrap();
        client
            .wait_for("DISCONNECT sent", |e| {
                matches!(e, rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Disconnect)).then_some(())
            })
            .await;
    });
    drop(client);
    wait_until(SETTLE, &format!("{} to have no connection", node.name), || node.metric("kadmq_connections") == 0);
}

/// The same for a 3.1.1 client.
fn disconnect311(rt: &Runtime, client: Client, node: &Node) {
    let mut client = client;
    rt.block_on(async {
        client.client.disconnect().await.unwrap();
        client
            .wait_for("DISCONNECT sent", |e| {
                matches!(e, rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)).then_some(())
            })
            .await;
    });
    drop(client);
    wait_until(SETTLE, &format!("{} to have no connection", node.name), || node.metric("kadmq_connections") == 0);
}

/// A 3.1.1 client on `node`, its CONNACK a success; clean session or not.
fn connect311(rt: &Runtime, node: &Node, id: &str, clean: bool) -> (Client, bool) {
    let mut options = Client::options(id, node.mqtt_port);
    options.set_clean_session(clean);
    rt.block_on(Client::connect_ok(options))
}

/// A persistent 5.0 session (expiry 300 s) on `node`, its CONNACK a success.
fn connect5(rt: &Runtime, node: &Node, id: &str) -> (Client5, bool) {
    let (client, ack) = rt.block_on(Client5::connect(Client5::persistent(id, node.mqtt_port, 300)));
    assert_eq!(ack.code, v5p::ConnectReturnCode::Success, "CONNACK for {id} on {}", node.name);
    (client, ack.session_present)
}

fn subscribe5(rt: &Runtime, client: &mut Client5, filters: &[(&str, Q5)]) {
    let filters = filters.iter().map(|(f, q)| v5p::Filter::new(*f, *q)).collect();
    let ack = rt.block_on(client.subscribe(filters, None));
    assert!(ack.return_codes.iter().all(|c| matches!(c, v5p::SubscribeReasonCode::Success(_))), "{ack:?}");
}

/// Publishes `numbers` at QoS 1 to `topic` and waits for every PUBACK.
fn publish_acked(rt: &Runtime, publisher: &Client, topic: &str, numbers: std::ops::Range<u64>) {
    let before = publisher.pubacks();
    let count = numbers.end - numbers.start;
    for n in numbers {
        rt.block_on(publisher.publish(topic, QoS::AtLeastOnce, false, n.to_string()));
    }
    wait_until(SETTLE, &format!("{count} PUBACKs for {topic}"), || publisher.pubacks() - before >= count);
}

/// Has each of `clients` publish its name at QoS 1 to `will/ready`, then
/// waits until every watcher has them all: a barrier after the clients'
/// CONNECTs, so what their node told the others about them (their wills)
/// has arrived if it went the way forwards go. Watchers subscribe to
/// `will/#` and the tests count only their own will topics.
fn announce(rt: &Runtime, clients: &mut [(&str, &mut Raw)], watchers: &[&Client]) {
    rt.block_on(async {
        for (name, client) in clients.iter_mut() {
            client.publish(publish("will/ready", name.as_bytes(), Q::AtLeastOnce)).await;
        }
    });
    let names: Vec<&str> = clients.iter().map(|(name, _)| *name).collect();
    for watcher in watchers {
        wait_until(SETTLE, &format!("{} to have {names:?} on will/ready", watcher.id), || {
            let got: Vec<String> = watcher
                .received()
                .iter()
                .filter(|r| r.publish.topic == "will/ready")
                .map(|r| String::from_utf8_lossy(&r.publish.payload).into_owned())
                .collect();
            names.iter().all(|n| got.iter().any(|g| g == n))
        });
    }
}

// ----- a. takeover across nodes with messages in flight ------------------------------------

/// a. A persistent MQTT 5 subscriber on n1 (`to/q1` QoS 1, `to/q2` QoS 2)
/// gets a numbered stream from n3; halfway through, the same client id
/// connects on n2. The new connection finds the session (session present
/// 1), the old one gets DISCONNECT 0x8E or is closed, and between them they
/// get every QoS 1 number at least once and every QoS 2 number once: the
/// only second copy allowed is a redelivery to the new connection, DUP set
/// and with the packet id the old connection had, of a QoS 2 PUBLISH whose
/// PUBREC may not have reached the broker (a client keeping its session
/// state would know it; a new connection object does not). The publisher
/// gets every PUBACK and PUBCOMP.
///
/// The new connection is a raw client that answers every PUBREL: rumqttc
/// ends its connection on a PUBREL for a flow it did not start, which a
/// resumed session legitimately sends.
#[test]
fn a_takeover_on_another_node_mid_stream_loses_no_qos1_and_repeats_no_qos2() {
    const N: u64 = 200;
    let rt = runtime();
    let lab = Lab::new();
    let [n1, n2, n3] = lab.fleet(NAMES, &CALM);
    let (mut old, _) = connect5(&rt, &n1, "taker");
    subscribe5(&rt, &mut old, &[("to/q1", Q5::AtLeastOnce), ("to/q2", Q5::ExactlyOnce)]);
    wait_routed(&[&n3], "to/q1", &["n1"]);
    wait_routed(&[&n3], "to/q2", &["n1"]);

    let progress = Arc::new(Progress::default());
    let stream = rt.spawn(
        Numbered {
            id: "to-pub".into(),
            topics: vec![("to/q1".into(), Q::AtLeastOnce), ("to/q2".into(), Q::ExactlyOnce)],
            count: N,
            every: Duration::from_millis(20),
            limit: Duration::from_secs(40),
            addrs: vec![addr(&n3)],
        }
        .run(progress.clone()),
    );
    wait_until(SETTLE, "half the stream to be acknowledged", || progress.done.load(Ordering::Relaxed) >= N / 2);

    let mut problems = Vec::new();
    let mut connect = connect_v5("taker");
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(300);
    let (new, ack) = rt.block_on(Raw::connect_within(addr(&n2), connect, PATIENCE));
    let taken_at = progress.done.load(Ordering::Relaxed);
    assert_eq!(ack.code, ConnectReason::Success, "CONNACK on n2");
    if !ack.session_present {
        problems.push("the takeover on n2 answered session present 0".into());
    }
    let new = rt.block_on(async { new.acking() });

    match try_wait_until(Duration::from_secs(10), "the old connection to end", || old.ended().is_some()) {
        Err(_) => problems.push("the old connection on n1 is still open 10 s after the takeover".into()),
        Ok(()) => match old.server_disconnect() {
            None | Some(0x8E) => {}
            Some(other) => problems.push(format!("the old connection got DISCONNECT {other:#04x}, not 0x8E")),
        },
    }
    let published = rt.block_on(async { tokio::time::timeout(Duration::from_secs(45), stream).await });
    let published = published.expect("the stream ends within its limit").expect("the stream task");
    println!("takeover at number {taken_at}; publisher: {:?}", published.connections);
    for (t, topic) in ["to/q1", "to/q2"].iter().enumerate() {
        if let Some(gap) = missing(0..N, &published.acked[t]) {
            problems.push(format!("publisher not acknowledged on {topic}: {gap}"));
        }
    }

    // What the two connections got, (number, dup, packet id, on the new one).
    let copies = |topic: &str| -> Vec<(u64, bool, u16, bool)> {
        let mut out: Vec<(u64, bool, u16, bool)> = old
            .received()
            .iter()
            .filter(|r| &r.publish.topic[..] == topic.as_bytes())
            .filter_map(|r| Some((number(&r.publish.payload)?, r.publish.dup, r.publish.pkid, false)))
            .collect();
        out.extend(
            new.publishes()
                .iter()
                .filter(|p| p.topic == topic)
                .filter_map(|p| Some((number(&p.payload)?, p.dup, p.packet_id.unwrap_or(0), true))),
        );
        out
    };
    let distinct = |topic: &str| copies(topic).iter().map(|c| c.0).collect::<BTreeSet<u64>>();
    let complete = try_wait_until(SETTLE, "every number on both topics", || {
        let (q1, q2) = (distinct("to/q1"), distinct("to/q2"));
        if q1.len() as u64 >= N && q2.len() as u64 >= N {
            Ok(())
        } else {
            Err(format!("{} of {N} on to/q1, {} on to/q2", q1.len(), q2.len()))
        }
    });
    if complete.is_ok() {
        std::thread::sleep(AFTERWARDS);
    }
    if let Some(gap) = missing(0..N, &distinct("to/q1")) {
        problems.push(format!("QoS 1 lost: {gap}"));
    }
    if let Some(gap) = missing(0..N, &distinct("to/q2")) {
        problems.push(format!("QoS 2 lost: {gap}"));
    }
    let mut by_number: BTreeMap<u64, Vec<(bool, u16, bool)>> = BTreeMap::new();
    for (n, dup, id, on_new) in copies("to/q2") {
        by_number.entry(n).or_default().push((dup, id, on_new));
    }
    let (mut redelivered, mut repeated) = (Vec::new(), Vec::new());
    for (n, copies) in &by_number {
        match copies.as_slice() {
            [_] => {}
            [(_, old_id, false), (true, new_id, true)] if old_id == new_id => redelivered.push(*n),
            _ => repeated.push(format!("{n}: {copies:?}")),
        }
    }
    if !repeated.is_empty() {
        problems
            .push(format!("QoS 2 delivered more than once ((dup, packet id, on the new connection)): {repeated:?}"));
    }
    println!(
        "old connection: {} copies, ended: {:?}; new connection: {} copies, {:?}; QoS 2 redelivered to the new one: {redelivered:?}",
        old.count(),
        old.ended(),
        new.publishes().len(),
        new.ending()
    );
    verdict("takeover across nodes", &problems);
}

// ----- b. offline queue on one node, reconnect on another -------------------------------

/// b. A persistent 3.1.1 session subscribes on n1 (QoS 1) and disconnects
/// cleanly; 50 QoS 1 messages are published (and acknowledged) on n2; the
/// client comes back on n3: session present, all 50 delivered. Then its
/// subscription has moved: a publish on n1 reaches it on n3.
#[test]
fn b_messages_queued_offline_on_one_node_are_delivered_on_another() {
    const N: u64 = 50;
    let rt = runtime();
    let lab = Lab::new();
    let [n1, n2, n3] = lab.fleet(NAMES, &CALM);
    let (mut sub, _) = connect311(&rt, &n1, "wanderer", false);
    rt.block_on(sub.subscribe("off/#", QoS::AtLeastOnce));
    wait_routed(&[&n2], "off/x", &["n1"]);
    disconnect311(&rt, sub, &n1);

    let (publisher, _) = connect311(&rt, &n2, "off-pub", true);
    publish_acked(&rt, &publisher, "off/x", 0..N);

    let mut problems = Vec::new();
    let (sub, present) = connect311(&rt, &n3, "wanderer", false);
    if !present {
        problems.push("reconnected on n3: session present 0".into());
    }
    let got = |sub: &Client| numbers_311(sub, "off/x").into_iter().collect::<BTreeSet<u64>>();
    let _ = try_wait_until(SETTLE, "the 50 queued messages on n3", || got(&sub).len() as u64 >= N);
    if let Some(gap) = missing(0..N, &got(&sub)) {
        problems.push(format!("queued on n1, delivered on n3: {gap}"));
    }

    if present {
        // The subscription moved with the session: n1 now routes to n3.
        match try_wait_until(SETTLE, "n1 to route off/x to n3", || routes_to(&n1, "off/x", &["n3"])) {
            Err(why) => problems.push(format!("the subscription did not move to n3: {why}")),
            Ok(()) => {
                let (fresh, _) = connect311(&rt, &n1, "off-pub-1", true);
                publish_acked(&rt, &fresh, "off/x", N..N + 1);
                if try_wait_until(SETTLE, "the fresh message on n3", || got(&sub).contains(&N)).is_err() {
                    problems.push("a publish on n1 after the move did not reach the client on n3".into());
                }
            }
        }
    } else {
        problems.push("not checked whether the subscription moved: no session on n3".into());
    }
    let copies = numbers_311(&sub, "off/x");
    println!("n3 got {} copies: {copies:?}", copies.len());
    verdict("offline queue on n1, reconnect on n3", &problems);
}

// ----- c. racing connects -----------------------------------------------------------------

/// c. The same client id connects to n1 and n2 at the same moment. Within
/// 10 s exactly one of the two connections is left (the other got
/// DISCONNECT 0x8E or was closed), and it works: what it subscribes to,
/// published on n3, arrives once.
#[test]
fn c_two_connections_racing_with_one_client_id_on_two_nodes_leave_one() {
    let rt = runtime();
    let lab = Lab::new();
    let [n1, n2, n3] = lab.fleet(NAMES, &CALM);
    let (at_n1, at_n2) = rt.block_on(async {
        tokio::join!(
            Client5::try_connect(Client5::options("racer", n1.mqtt_port), PATIENCE),
            Client5::try_connect(Client5::options("racer", n2.mqtt_port), PATIENCE)
        )
    });
    let mut racers: Vec<(&str, Client5)> = Vec::new();
    for (name, result) in [("n1", at_n1), ("n2", at_n2)] {
        match result {
            Ok((client, ack)) if ack.code == v5p::ConnectReturnCode::Success => racers.push((name, client)),
            Ok((_, ack)) => println!("the connection on {name} was refused: {ack:?}"),
            Err(why) => println!("the connection on {name} ended before its CONNACK: {why}"),
        }
    }
    let alive = |racers: &[(&str, Client5)]| racers.iter().filter(|(_, c)| c.ended().is_none()).count();
    let settled = try_wait_until(Duration::from_secs(10), "one racer to be left", || match alive(&racers) {
        1 => Ok(()),
        n => Err(format!("{n} connections open")),
    });
    let report: Vec<String> = racers
        .iter()
        .map(|(name, c)| format!("{name}: ended {:?}, DISCONNECT {:?}", c.ended(), c.server_disconnect()))
        .collect();
    assert!(settled.is_ok(), "racing connects: not exactly one connection left after 10 s: {report:?}");
    let mut problems = Vec::new();
    for (name, c) in &racers {
        if let Some(reason) = c.server_disconnect().filter(|r| *r != 0x8E) {
            problems.push(format!("the connection on {name} got DISCONNECT {reason:#04x}, not 0x8E"));
        }
    }
    let (node, survivor) = racers.iter_mut().find(|(_, c)| c.ended().is_none()).unwrap();
    let node = *node;
    subscribe5(&rt, survivor, &[("race/t", Q5::AtLeastOnce)]);
    wait_routed(&[&n3], "race/t", &[node]);
    let (publisher, _) = connect311(&rt, &n3, "race-pub", true);
    publish_acked(&rt, &publisher, "race/t", 0..1);
    let survivor = &racers.iter().find(|(name, _)| *name == node).unwrap().1;
    let _ = try_wait_until(SETTLE, "the message at the survivor", || !numbers_5(survivor, "race/t").is_empty());
    std::thread::sleep(AFTERWARDS);
    let got = numbers_5(survivor, "race/t");
    if got != [0] {
        problems.push(format!("the survivor on {node} got {got:?}, not the message once"));
    }
    if let Some(why) = survivor.ended() {
        problems.push(format!("the survivor on {node} was disconnected later: {why}"));
    }
    println!("racers: {report:?}");
    verdict("racing connects", &problems);
}

// ----- d. SIGKILL of the session's node, reconnect elsewhere ---------------------------------

/// d. A persistent MQTT 5 session (expiry 300 s) subscribes on n1 (QoS 1)
/// and disconnects cleanly; 20 QoS 1 messages published on n2 are all
/// acknowledged; n1 is SIGKILLed. The client connects on n3 (retrying, as
/// a client does, while the fleet has not yet declared n1 dead): session
/// present, and every one of the 20 arrives (within the dead timeout +
/// 20 s); then 10 more published on n2 reach it on n3.
#[test]
fn d_a_session_whose_node_is_killed_resumes_elsewhere_with_every_acknowledged_message() {
    const N: u64 = 20;
    let rt = runtime();
    let lab = Lab::new();
    let [mut n1, n2, n3] = lab.fleet(NAMES, &FAST);
    let (mut sub, _) = connect5(&rt, &n1, "survivor");
    subscribe5(&rt, &mut sub, &[("kill/#", Q5::AtLeastOnce)]);
    wait_routed(&[&n2], "kill/x", &["n1"]);
    disconnect5(&rt, sub, &n1);
    let (publisher, _) = connect311(&rt, &n2, "kill-pub", true);
    publish_acked(&rt, &publisher, "kill/x", 0..N);

    n1.kill();
    let killed = Instant::now();
    let within = DEAD_TIMEOUT + Duration::from_secs(20);
    let mut problems = Vec::new();
    let mut attempts = Vec::new();
    let resumed = rt.block_on(async {
        while killed.elapsed() < within {
            match Client5::try_connect(Client5::persistent("survivor", n3.mqtt_port, 300), PATIENCE).await {
                Ok((client, ack)) if ack.code == v5p::ConnectReturnCode::Success => return Some((client, ack)),
                Ok((_, ack)) => attempts.push(format!("refused: {ack:?}")),
                Err(why) => attempts.push(why),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        None
    });
    let Some((sub, ack)) = resumed else {
        panic!("no successful CONNACK on n3 within {within:?} of the kill: {attempts:?}");
    };
    println!("connected on n3 {:.1} s after the kill (failed attempts: {attempts:?})", killed.elapsed().as_secs_f64());
    if !ack.session_present {
        problems.push("reconnected on n3: session present 0".into());
    }
    let got = |sub: &Client5| numbers_5(sub, "kill/x").into_iter().collect::<BTreeSet<u64>>();
    let left = within.saturating_sub(killed.elapsed());
    let _ = try_wait_until(left, "the 20 acknowledged messages on n3", || got(&sub).len() as u64 >= N);
    if let Some(gap) = missing(0..N, &got(&sub)) {
        problems.push(format!("acknowledged while n1 held the session, delivered on n3: {gap}"));
    }
    if ack.session_present {
        match try_wait_until(SETTLE, "n2 to route kill/x to n3", || routes_to(&n2, "kill/x", &["n3"])) {
            Err(why) => problems.push(format!("the subscription did not move to n3: {why}")),
            Ok(()) => {
                publish_acked(&rt, &publisher, "kill/x", N..N + 10);
                let _ = try_wait_until(SETTLE, "the 10 later messages on n3", || got(&sub).len() as u64 >= N + 10);
                if let Some(gap) = missing(N..N + 10, &got(&sub)) {
                    problems.push(format!("published on n2 after the move: {gap}"));
                }
            }
        }
    } else {
        problems.push("not checked whether later messages reach n3: no session there".into());
    }
    println!("n3 got {:?}", numbers_5(&sub, "kill/x"));
    verdict("session's node killed, resumed on n3", &problems);
}

// ----- e. wills on SIGKILL, once fleet-wide -----------------------------------------------

/// e. A 3.1.1 client and a 5.0 client on n1, each with a will on
/// `will/kill` (QoS 1, no delay); watchers on n2 and n3 subscribed to
/// `will/#`. n1 is SIGKILLed: each watcher gets each will exactly once
/// (the first within the dead timeout + 20 s, then 3 s more without a
/// second).
#[test]
fn e_wills_of_a_killed_node_are_published_once_fleet_wide() {
    let rt = runtime();
    let lab = Lab::new();
    let [mut n1, n2, n3] = lab.fleet(NAMES, &FAST);
    let watchers: Vec<Client> = [(&n2, "watch-2"), (&n3, "watch-3")]
        .into_iter()
        .map(|(node, id)| {
            let (mut watcher, _) = connect311(&rt, node, id, true);
            rt.block_on(watcher.subscribe("will/#", QoS::AtLeastOnce));
            watcher
        })
        .collect();
    // Every node knows both watchers: whichever publishes the wills reaches them.
    wait_routed(&[&n1, &n2, &n3], "will/kill", &["n2", "n3"]);
    let (mut v311, mut v5) = rt.block_on(async {
        let mut connect = connect_v311("will-311", true, 30);
        connect.will = Some(will("will/kill", b"v311", Q::AtLeastOnce, false));
        let (v311, ack) = Raw::connect(addr(&n1), connect).await;
        assert_eq!(ack.code, ConnectReason::Success);
        let v5 = Raw::v5(addr(&n1), "will-5", |c| c.will = Some(will("will/kill", b"v5", Q::AtLeastOnce, false))).await;
        (v311, v5)
    });
    announce(&rt, &mut [("will-311", &mut v311), ("will-5", &mut v5)], &watchers.iter().collect::<Vec<_>>());

    n1.kill();
    let killed = Instant::now();
    let wills = |watcher: &Client| -> BTreeMap<String, usize> {
        let mut count = BTreeMap::new();
        for r in watcher.received().iter().filter(|r| r.publish.topic == "will/kill") {
            *count.entry(String::from_utf8_lossy(&r.publish.payload).into_owned()).or_insert(0) += 1;
        }
        count
    };
    let both = |watcher: &Client| ["v311", "v5"].iter().all(|w| wills(watcher).contains_key(*w));
    let arrived = try_wait_until(DEAD_TIMEOUT + Duration::from_secs(20), "both wills at both watchers", || {
        watchers.iter().all(both)
    });
    if arrived.is_ok() {
        println!("both wills at both watchers {:.1} s after the kill", killed.elapsed().as_secs_f64());
        std::thread::sleep(AFTERWARDS);
    }
    let mut problems = Vec::new();
    for watcher in &watchers {
        let got = wills(watcher);
        for w in ["v311", "v5"] {
            match got.get(w).copied().unwrap_or(0) {
                1 => {}
                n => problems.push(format!("{} got the {w} will {n} times", watcher.id)),
            }
        }
    }
    drop((v311, v5));
    verdict("wills on SIGKILL", &problems);
}

// ----- f. wills on SIGTERM ------------------------------------------------------------------

/// f. Part 1: a 3.1.1 and a 5.0 client on n1, each with a will (no delay);
/// a watcher on n2; n1 is stopped with SIGTERM: the watcher gets each will
/// exactly once. n1 starts again.
///
/// Part 2: two MQTT 5 clients on n2 with session expiry 300 s: `delayed`
/// (Will Delay Interval 10 s) and `control` (3 s); a watcher on n3. n2 is
/// stopped with SIGTERM; as soon as its connection ends, `delayed`
/// reconnects on n3 (clean start 0, within 2 s): session present, and its
/// will does not come within 12 s (the reconnection cancelled it), while
/// `control`, which does not come back, has its will published once, not
/// before its delay.
#[test]
fn f_wills_survive_a_node_stopped_with_sigterm_and_a_reconnection_cancels_a_delayed_one() {
    let rt = runtime();
    let lab = Lab::new();
    let [mut n1, mut n2, n3] = lab.fleet(NAMES, &FAST);
    let mut problems = Vec::new();

    // Part 1.
    let (mut watcher, _) = connect311(&rt, &n2, "term-watch", true);
    rt.block_on(watcher.subscribe("will/#", QoS::AtLeastOnce));
    wait_routed(&[&n1, &n2, &n3], "will/term", &["n2"]);
    let (mut v311, mut v5) = rt.block_on(async {
        let mut connect = connect_v311("term-311", true, 30);
        connect.will = Some(will("will/term", b"v311", Q::AtLeastOnce, false));
        let (v311, ack) = Raw::connect(addr(&n1), connect).await;
        assert_eq!(ack.code, ConnectReason::Success);
        let v5 = Raw::v5(addr(&n1), "term-5", |c| c.will = Some(will("will/term", b"v5", Q::AtLeastOnce, false))).await;
        (v311, v5)
    });
    announce(&rt, &mut [("term-311", &mut v311), ("term-5", &mut v5)], &[&watcher]);
    let (v311, v5) = rt.block_on(async { (v311.acking(), v5.acking()) });
    n1.stop();
    let count = |watcher: &Client, topic: &str, payload: &str| {
        watcher
            .received()
            .iter()
            .filter(|r| r.publish.topic == topic && &r.publish.payload[..] == payload.as_bytes())
            .count()
    };
    let arrived = try_wait_until(Duration::from_secs(15), "both wills after the SIGTERM", || {
        count(&watcher, "will/term", "v311") >= 1 && count(&watcher, "will/term", "v5") >= 1
    });
    if arrived.is_ok() {
        std::thread::sleep(AFTERWARDS);
    }
    for w in ["v311", "v5"] {
        match count(&watcher, "will/term", w) {
            1 => {}
            n => problems.push(format!("part 1: the {w} will of a client on the stopped n1 came {n} times")),
        }
    }
    println!("part 1: the n1 clients' connections ended: {:?} / {:?}", v311.ending(), v5.ending());
    drop((v311, v5, watcher));
    // n1 started the fleet alone: back, it joins through n2.
    n1.bootstrap = Some(n2.multiaddr());
    n1.start();
    wait_for_members(&[&n1, &n2, &n3], &NAMES);

    // Part 2.
    let (mut watcher, _) = connect311(&rt, &n3, "delay-watch", true);
    rt.block_on(watcher.subscribe("will/#", QoS::AtLeastOnce));
    let with_will = |topic: &'static str, delay: u32| {
        move |c: &mut kadmq::protocol::Connect| {
            c.properties.session_expiry_interval = Some(300);
            c.will = Some(delayed_will(topic, b"gone", delay));
        }
    };
    wait_routed(&[&n1, &n2, &n3], "will/delayed", &["n3"]);
    let (mut delayed, mut control) = rt.block_on(async {
        let delayed = Raw::v5(addr(&n2), "delayed", with_will("will/delayed", 10)).await;
        let control = Raw::v5(addr(&n2), "control", with_will("will/control", 3)).await;
        (delayed, control)
    });
    announce(&rt, &mut [("delayed", &mut delayed), ("control", &mut control)], &[&watcher]);
    let (delayed, control) = rt.block_on(async { (delayed.acking(), control.acking()) });
    let stopping = Instant::now();
    let (ended, back) = std::thread::scope(|scope| {
        let stop = scope.spawn(|| n2.stop());
        let ended =
            try_wait_until(Duration::from_secs(12), "delayed's connection on n2 to end", || delayed.ending().is_some());
        let ended = ended.is_ok().then(Instant::now);
        let back = ended.map(|_| {
            let mut connect = connect_v5("delayed");
            connect.clean_start = false;
            connect.properties.session_expiry_interval = Some(300);
            let sent = Instant::now();
            let (raw, ack) = rt.block_on(Raw::connect_within(addr(&n3), connect, PATIENCE));
            (sent, raw, ack)
        });
        stop.join().unwrap();
        (ended, back)
    });
    println!(
        "part 2: delayed's connection ended {:?} after the SIGTERM: {:?}; control's: {:?}",
        ended.map(|at| at - stopping),
        delayed.ending(),
        control.ending()
    );
    let Some(ended) = ended else {
        problems.push("part 2: delayed's connection on n2 did not end within 12 s of the SIGTERM".into());
        verdict("wills on SIGTERM", &problems);
        return;
    };
    if let Some(Ending::Disconnect(reason)) = delayed.ending() {
        let moving =
            [DisconnectReason::ServerShuttingDown, DisconnectReason::UseAnotherServer, DisconnectReason::ServerMoved];
        if !moving.contains(&reason) {
            problems.push(format!("part 2: n2 said DISCONNECT {reason:?} on its way out"));
        }
    }
    let (sent, reconnected, ack) = back.unwrap();
    if sent - ended > Duration::from_secs(2) {
        problems.push(format!("part 2: the reconnection went out {:?} after the close", sent - ended));
    }
    if ack.code != ConnectReason::Success {
        problems.push(format!("part 2: the reconnection on n3 was refused: {ack:?}"));
    } else if !ack.session_present {
        problems.push("part 2: the reconnection on n3 answered session present 0".into());
    }
    let _reconnected = rt.block_on(async { reconnected.acking() });
    let window = Duration::from_secs(12).saturating_sub(ended.elapsed());
    let _ = try_wait_until(window, "control's will", || count(&watcher, "will/control", "gone") >= 1);
    // Out the whole 12 s: delayed's will must not come in them.
    std::thread::sleep(Duration::from_secs(12).saturating_sub(ended.elapsed()));
    let arrivals = |topic: &str| -> Vec<f64> {
        watcher
            .received()
            .iter()
            .filter(|r| r.publish.topic == topic)
            .map(|r| r.at.saturating_duration_since(ended).as_secs_f64())
            .collect()
    };
    let delayed_at = arrivals("will/delayed");
    if !delayed_at.is_empty() {
        problems.push(format!("part 2: the will of the reconnected client came anyway, at {delayed_at:?} s"));
    }
    let control_at = arrivals("will/control");
    match control_at.as_slice() {
        [at] if *at >= 2.0 => {}
        [at] => problems.push(format!("part 2: control's 3 s delayed will came after {at:.1} s")),
        other => problems.push(format!("part 2: control's will came {} times within 12 s: {other:?}", other.len())),
    }
    verdict("wills on SIGTERM", &problems);
}

// ----- g. rolling restart under load ----------------------------------------------------------

/// g. Three persistent QoS 1 subscribers on `roll/#`, one per node, and a
/// publisher of a numbered QoS 1 stream (20 a second) on n1. Each node in
/// turn is stopped with SIGTERM, started again, and waited for until it
/// is a member again (with 20 more numbers acknowledged before the next).
/// Whoever loses its connection reconnects to another node (subscribers:
/// clean start 0, without subscribing again; the publisher sends again
/// what was not acknowledged). At the end every subscriber has every
/// acknowledged number, and no reconnection found its session gone.
#[test]
fn g_a_rolling_restart_under_qos1_load_loses_no_acknowledged_message() {
    let rt = runtime();
    let lab = Lab::new();
    let mut nodes = Vec::from(lab.fleet(NAMES, &[]));
    let ports: Vec<u16> = nodes.iter().map(|n| n.mqtt_port).collect();
    let ring = |start: usize| loopback(&[ports[start], ports[(start + 1) % 3], ports[(start + 2) % 3]]);
    let limit = Duration::from_secs(150);
    let subscribers: Vec<Roaming> = rt.block_on(async {
        let mut subs = Vec::new();
        for i in 0..3 {
            subs.push(Roaming::start(&format!("roll-{}", i + 1), ring(i), "roll/#", Q5::AtLeastOnce, limit).await);
        }
        subs
    });
    let all: Vec<&Node> = nodes.iter().collect();
    wait_routed(&all, "roll/x", &NAMES);

    let progress = Arc::new(Progress::default());
    let stream = rt.spawn(
        Numbered {
            id: "roll-pub".into(),
            topics: vec![("roll/x".into(), Q::AtLeastOnce)],
            count: 3000,
            every: Duration::from_millis(50),
            limit,
            addrs: ring(0),
        }
        .run(progress.clone()),
    );
    let done = || progress.done.load(Ordering::Relaxed);
    let mut problems = Vec::new();
    let advance = |problems: &mut Vec<String>, by: u64, after: &str| {
        let from = done();
        if try_wait_until(SETTLE, &format!("{by} more acknowledged {after}"), || done() >= from + by).is_err() {
            problems.push(format!("the stream stalled {after} (at {})", done()));
        }
    };
    advance(&mut problems, 20, "before the first restart");
    for i in 0..3 {
        let incarnation = |from: &Node| from.member(NAMES[i]).and_then(|m| m["incarnation"].as_u64()).unwrap_or(0);
        let before: Vec<u64> = (1..3).map(|k| incarnation(&nodes[(i + k) % 3])).collect();
        let started = Instant::now();
        nodes[i].stop();
        let stopped = started.elapsed();
        // n1 started the fleet alone: back, it joins through the next node.
        if nodes[i].bootstrap.is_none() {
            nodes[i].bootstrap = Some(nodes[(i + 1) % 3].multiaddr());
        }
        nodes[i].start();
        let all: Vec<&Node> = nodes.iter().collect();
        wait_for_members(&all, &NAMES);
        // A member again: the others see its new incarnation alive, not the old one.
        for (k, was) in (1..3).zip(&before) {
            let other = &nodes[(i + k) % 3];
            wait_until(MEMBERSHIP, &format!("{} to see {} restarted", other.name, NAMES[i]), || {
                let seen = other.member(NAMES[i]);
                let now = seen.as_ref().and_then(|m| m["incarnation"].as_u64()).unwrap_or(0);
                let alive = seen.as_ref().is_some_and(|m| m["state"] == "alive");
                if alive && now > *was {
                    Ok(())
                } else {
                    Err(format!("incarnation {now} (was {was}), {:?}", seen.map(|m| m["state"].clone())))
                }
            });
        }
        println!(
            "{} restarted: stopped in {:.1} s, a member again {:.1} s after the SIGTERM, stream at {}",
            NAMES[i],
            stopped.as_secs_f64(),
            started.elapsed().as_secs_f64(),
            done()
        );
        advance(&mut problems, 20, &format!("after {} restarted", NAMES[i]));
    }
    progress.stop.store(true, Ordering::Relaxed);
    let published = rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), stream).await });
    let published = published.expect("the stream stops").expect("the stream task");
    let acked = published.acked[0].clone();
    println!("published: {} acknowledged; {:?}", acked.len(), published.connections);
    let _ = try_wait_until(SETTLE, "every acknowledged number at every subscriber", || {
        subscribers.iter().all(|s| acked.is_subset(&s.numbers("roll/x")))
    });
    for (i, s) in subscribers.iter().enumerate() {
        if let Some(gap) = missing(acked.iter().copied(), &s.numbers("roll/x")) {
            problems.push(format!("roll-{}: {gap}", i + 1));
        }
        for lost in s.sessions_lost() {
            problems.push(format!("session lost: {lost}"));
        }
        println!("roll-{}: {} copies; connections {:?}", i + 1, s.got().len(), s.connections());
    }
    verdict("rolling restart", &problems);
}

// ----- h. $share with a member's node killed ---------------------------------------------------

/// h. `$share/g/sh/#` members on n1 and n2 (MQTT 5, persistent, QoS 1), a
/// numbered QoS 1 stream from n3; once both members have had messages and
/// half the stream is acknowledged, n1 is SIGKILLed. Every acknowledged
/// number reaches at least one member: what was meant for the member on n1
/// and not acknowledged by it goes to the member on n2.
#[test]
fn h_shared_subscription_messages_of_a_killed_members_node_reach_the_other_member() {
    const N: u64 = 200;
    let rt = runtime();
    let lab = Lab::new();
    let [mut n1, n2, n3] = lab.fleet(NAMES, &FAST);
    let (mut m1, _) = connect5(&rt, &n1, "member-1");
    subscribe5(&rt, &mut m1, &[("$share/g/sh/#", Q5::AtLeastOnce)]);
    let (mut m2, _) = connect5(&rt, &n2, "member-2");
    subscribe5(&rt, &mut m2, &[("$share/g/sh/#", Q5::AtLeastOnce)]);
    wait_routed(&[&n3], "sh/x", &["n1", "n2"]);

    let progress = Arc::new(Progress::default());
    let stream = rt.spawn(
        Numbered {
            id: "sh-pub".into(),
            topics: vec![("sh/x".into(), Q::AtLeastOnce)],
            count: N,
            every: Duration::from_millis(20),
            limit: Duration::from_secs(40),
            addrs: vec![addr(&n3)],
        }
        .run(progress.clone()),
    );
    let mut problems = Vec::new();
    let spread = try_wait_until(SETTLE, "both members to have messages, half the stream acknowledged", || {
        let (a, b) = (m1.count(), m2.count());
        let done = progress.done.load(Ordering::Relaxed);
        if a > 0 && b > 0 && done >= N / 2 {
            Ok(())
        } else {
            Err(format!("member-1 {a}, member-2 {b}, {done} acknowledged"))
        }
    });
    if let Err(why) = spread {
        problems.push(format!("before the kill: {why}"));
    }
    n1.kill();
    let killed = Instant::now();
    let killed_at = progress.done.load(Ordering::Relaxed);
    let published = rt.block_on(async { tokio::time::timeout(Duration::from_secs(45), stream).await });
    let published = published.expect("the stream ends within its limit").expect("the stream task");
    let acked = published.acked[0].clone();
    if let Some(gap) = missing(0..N, &acked) {
        problems.push(format!("publisher on n3 not acknowledged: {gap}"));
    }
    let union = || -> BTreeSet<u64> { numbers_5(&m1, "sh/x").into_iter().chain(numbers_5(&m2, "sh/x")).collect() };
    let left = (DEAD_TIMEOUT + Duration::from_secs(20)).saturating_sub(killed.elapsed());
    let _ = try_wait_until(left, "every acknowledged number at a member", || acked.is_subset(&union()));
    if let Some(gap) = missing(acked.iter().copied(), &union()) {
        problems.push(format!("acknowledged, at neither member: {gap}"));
    }
    println!(
        "killed n1 at {killed_at} acknowledged; member-1 {} copies (ended: {:?}), member-2 {} copies; publisher {:?}",
        m1.count(),
        m1.ended(),
        m2.count(),
        published.connections
    );
    verdict("$share with a member's node killed", &problems);
}

/// h2. A `$share` member on n1 (3.1.1, clean session) takes messages and
/// acknowledges none, then its connection drops and its session ends: what
/// it was given goes to the group's other member, on n2 (there is no other
/// member on n1 to take it).
#[test]
fn h2_an_ending_members_messages_go_to_a_member_on_another_node() {
    const N: u64 = 40;
    let rt = runtime();
    let lab = Lab::new();
    let [n1, n2, n3] = lab.fleet(NAMES, &CALM);
    let (mut m1, _) = rt.block_on(Raw::v311(addr(&n1), "ending-member", true));
    rt.block_on(m1.subscribe("$share/g2/end/#", Q::AtLeastOnce));
    let (mut m2, _) = connect5(&rt, &n2, "staying-member");
    subscribe5(&rt, &mut m2, &[("$share/g2/end/#", Q5::AtLeastOnce)]);
    wait_routed(&[&n3], "end/x", &["n1", "n2"]);
    let (publisher, _) = connect311(&rt, &n3, "end-pub", true);
    publish_acked(&rt, &publisher, "end/x", 0..N);
    // The ending member reads what it is given, acknowledging nothing.
    let unacked: Vec<u64> = rt.block_on(async {
        let mut got = Vec::new();
        while let Some(p) = m1.publish_within(Duration::from_secs(1)).await {
            got.extend(number(&p.payload));
        }
        got
    });
    let mut problems = Vec::new();
    if unacked.is_empty() {
        problems.push("the ending member was given nothing: the test shows nothing".into());
    }
    drop(m1);
    let got = || numbers_5(&m2, "end/x").into_iter().collect::<BTreeSet<u64>>();
    let _ = try_wait_until(SETTLE, "every number at the staying member", || got().len() as u64 >= N);
    if let Some(gap) = missing(0..N, &got()) {
        problems.push(format!("at the staying member on n2 (the ending one had {unacked:?}): {gap}"));
    }
    verdict("$share member ending with unacknowledged messages", &problems);
}

// ----- i. through a round-robin proxy ------------------------------------------------------------

/// i. Through a round-robin TCP proxy over the three nodes' MQTT ports
/// (each new connection lands on the next node): the paho-mqtt interop
/// check (skipped, saying so, without paho-mqtt), then the session
/// conformance checks `tests/broker` runs against one broker. Each check
/// runs to its end; the test fails with every check that failed.
#[test]
fn i_interop_and_session_conformance_through_a_round_robin_proxy() {
    let rt = runtime();
    let lab = Lab::new();
    let nodes = lab.fleet(NAMES, &CALM);
    let proxy = Proxy::over_ports(&nodes.iter().map(|n| n.mqtt_port).collect::<Vec<u16>>());
    let at = proxy.addr();
    let mut problems = Vec::new();
    let run = |problems: &mut Vec<String>, name: &str, check: tokio::task::JoinHandle<()>| {
        let outcome = rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), check).await });
        match outcome {
            Ok(Ok(())) => println!("{name}: ok"),
            Ok(Err(err)) => {
                let why = err.try_into_panic().ok().and_then(|p| {
                    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                });
                problems.push(format!("{name}: {}", why.unwrap_or_else(|| "failed".into())));
            }
            Err(_) => problems.push(format!("{name}: still running after 60 s")),
        }
    };
    if rt.block_on(paho::installed_or_skip()) {
        let port = proxy.port();
        run(&mut problems, "paho interop", rt.spawn(async move { paho::interop(at, &[(port, "tcp", "proxy")]).await }));
    }
    run(
        &mut problems,
        "clean_session_flag_and_subscriptions_across_reconnects",
        rt.spawn(checks::clean_session_flag_and_subscriptions_across_reconnects(at)),
    );
    run(
        &mut problems,
        "offline_persistent_session_gets_qos1_and_qos2_on_reconnect",
        rt.spawn(checks::offline_persistent_session_gets_qos1_and_qos2_on_reconnect(at)),
    );
    run(
        &mut problems,
        "unacked_qos1_is_redelivered_with_dup_and_same_ids_after_reconnect",
        rt.spawn(checks::unacked_qos1_is_redelivered_with_dup_and_same_ids_after_reconnect(at)),
    );
    run(
        &mut problems,
        "unreleased_qos2_is_resumed_with_pubrel_after_reconnect",
        rt.spawn(checks::unreleased_qos2_is_resumed_with_pubrel_after_reconnect(at)),
    );
    run(
        &mut problems,
        "same_client_id_takes_over_and_first_is_disconnected",
        rt.spawn(checks::same_client_id_takes_over_and_first_is_disconnected(at)),
    );
    run(
        &mut problems,
        "takeover_of_a_persistent_session_keeps_it",
        rt.spawn(checks::takeover_of_a_persistent_session_keeps_it(at)),
    );
    run(
        &mut problems,
        "second_connection_with_same_id_takes_over_with_0x8e",
        rt.spawn(checks::second_connection_with_same_id_takes_over_with_0x8e(at)),
    );
    let routed = proxy.routed();
    println!("the proxy sent {} connections to nodes {routed:?}", routed.len());
    assert!((0..3).all(|node| routed.contains(&node)), "the proxy used every node: {routed:?}");
    verdict("through the round-robin proxy", &problems);
}

// ----- j. what a killed node had not acknowledged -----------------------------------------------

/// j. Twelve persistent 5.0 sessions subscribed to `held/#` on n1 go
/// offline; n3 loses n2's QoS 1/2 forwards (fault hook); n1 is SIGKILLed
/// and 20 QoS 1 messages published on n2 at once are acknowledged (n2
/// holds them for n1). Once n2 declares n1 dead it sends them on, to its
/// own adopted sessions and to n3, whose copy is lost; the fault is healed
/// a second after n3 lost them, and n2's outbox resends them. Every session,
/// reconnected on n3, has all 20. n3 must have adopted at least one session
/// and been given the messages for it (else the test shows nothing): with
/// twelve, the chance that n2 adopts every one is 1 in 4,096.
#[test]
fn j_what_a_killed_node_had_not_acknowledged_reaches_its_adopted_sessions_though_the_first_sending_on_is_lost() {
    const N: u64 = 20;
    let rt = runtime();
    let lab = Lab::new();
    let [mut n1, n2, n3] = lab.fleet(NAMES, &FAST);
    let ids: Vec<String> = (0..12).map(|i| format!("held-{i}")).collect();
    for id in &ids {
        let (mut sub, _) = connect5(&rt, &n1, id);
        subscribe5(&rt, &mut sub, &[("held/#", Q5::AtLeastOnce)]);
        disconnect5(&rt, sub, &n1);
    }
    wait_routed(&[&n2, &n3], "held/x", &["n1"]);
    let (publisher, _) = connect311(&rt, &n2, "held-pub", true);
    n3.drop_forwards("n2");
    n1.kill();
    publish_acked(&rt, &publisher, "held/x", 0..N);
    let mut problems = Vec::new();
    wait_for_members(&[&n2, &n3], &["n2", "n3"]);
    let lost = try_wait_until(SETTLE, "n3 to lose what n2 sent on", || {
        n3.metric("kadmq_cluster_fault_frames_dropped_total") > 0
    });
    if let Err(why) = lost {
        problems.push(format!("the test shows nothing: {why}"));
    }
    let all_adopted = try_wait_until(SETTLE, "n2 and n3 to adopt n1's sessions", || {
        let adopted = |node: &Node| node.metric("kadmq_cluster_sessions_adopted_total");
        adopted(&n2) + adopted(&n3) >= ids.len() as u64
    });
    if let Err(why) = all_adopted {
        problems.push(why);
    }
    n3.cut(None);
    let adopted = n3.metric("kadmq_cluster_sessions_adopted_total");
    if adopted == 0 {
        problems.push("the test shows nothing: n3 adopted none of n1's sessions".into());
    } else if let Err(why) = try_wait_until(SETTLE, "n3 to queue what n2 sent on for its adopted sessions", || {
        n3.metric("kadmq_cluster_sent_on_delivered_total") >= adopted * N
    }) {
        problems.push(why);
    }
    for id in &ids {
        let (sub, present) = connect5(&rt, &n3, id);
        if !present {
            problems.push(format!("{id} reconnected on n3: session present 0"));
        }
        let got = || numbers_5(&sub, "held/x").into_iter().collect::<BTreeSet<u64>>();
        let _ = try_wait_until(SETTLE, &format!("the {N} messages for {id} on n3"), || got().len() as u64 >= N);
        if let Some(gap) = missing(0..N, &got()) {
            problems.push(format!("{id}, reconnected on n3: {gap}"));
        }
    }
    println!(
        "n3 adopted {adopted} sessions, was given {} messages sent on for them; n2 resent {} forwards",
        n3.metric("kadmq_cluster_sent_on_delivered_total"),
        n2.metric("kadmq_cluster_outbox_resent_total")
    );
    verdict("messages a killed node had not acknowledged", &problems);
}
