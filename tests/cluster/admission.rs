//! Admission (issue 11): a node started with a bootstrap address takes no
//! MQTT client before it has joined its fleet: every CONNECT is refused
//! with CONNACK 0x88 Server unavailable (3.1.1: return code 3) and closed,
//! and `/health/ready` answers 503, until another member is up and the
//! membership settled. Once admitted it stays admitted. Restarted (its
//! peers file remembering the fleet) it waits again. The join timeout
//! admits a node that joins nobody, with one WARN line. A node without a
//! bootstrap address is ready at once.

use crate::support::lab::{wait_for_members, Lab, Node, SETTLE};
use crate::support::ports::free_port;
use crate::support::raw::{connect_v311, connect_v5, encoded, Raw, WAIT};
use crate::support::runtime;
use crate::support::wait::wait_until;
use kadmq::protocol::{ConnectReason, Packet, Version};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// What a node logs (once per start) when it refuses a client before it joined.
const REFUSED_LINE: &str = "has not joined its fleet yet";

fn mqtt(node: &Node) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], node.mqtt_port))
}

/// Asserts that `node` refuses an MQTT 5 and an MQTT 3.1.1 CONNECT as a
/// node that has not joined: CONNACK 0x88 (3.1.1: the bytes 20 02 00 03),
/// then the close.
fn refuses_clients(rt: &Runtime, node: &Node, tag: &str) {
    rt.block_on(async {
        let (mut v5, ack) = Raw::connect(mqtt(node), connect_v5(&format!("{tag}-v5"))).await;
        assert_eq!(ack.code, ConnectReason::ServerUnavailable, "{}: MQTT 5 CONNACK {ack:?}", node.name);
        assert_eq!(ack.code as u8, 0x88);
        assert!(!ack.session_present);
        let after = v5.expect_closed(WAIT).await;
        assert!(after.is_empty(), "{}: nothing after the refusal: {after:?}", node.name);
    });
    // 3.1.1 on a plain socket: the exact bytes of the CONNACK, then EOF.
    let mut stream = std::net::TcpStream::connect(mqtt(node)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let connect = Packet::Connect(connect_v311(&format!("{tag}-v311"), true, 30));
    stream.write_all(&encoded(&connect, Version::V311)).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap_or_else(|err| panic!("{}: no close after the CONNACK: {err}", node.name));
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x03], "{}: 3.1.1 CONNACK return code 3, then the close", node.name);
}

/// Asserts that `node` takes an MQTT 5 and an MQTT 3.1.1 client.
fn takes_clients(rt: &Runtime, node: &Node, tag: &str) {
    rt.block_on(async {
        let v5 = Raw::v5(mqtt(node), &format!("{tag}-v5"), |_| {}).await;
        let (v311, _) = Raw::v311(mqtt(node), &format!("{tag}-v311"), true).await;
        v5.disconnect().await;
        v311.disconnect().await;
    });
}

fn ready(node: &Node) -> (u16, String) {
    node.get("/health/ready")
}

fn lines_with(node: &Node, text: &str) -> usize {
    node.log().lines().filter(|l| l.contains(text)).count()
}

#[test]
fn a_starting_node_admits_no_client_before_it_joined() {
    let rt = runtime();
    let lab = Lab::new();
    // a1 will listen here; for now nothing does.
    let port = free_port();
    let boot = format!("/ip4/127.0.0.1/tcp/{port}");
    let mut joiner = lab.unstarted("a2", Some(&boot), &lab.key, &["--join-timeout-ms", "600000"]);
    joiner.launch();

    // 1. Its bootstrap address does not answer: it waits, and says so,
    // also well past the settle a joined node waits (1.5 s).
    let (status, body) = ready(&joiner);
    assert_eq!(status, 503, "/health/ready before the join: {body}");
    assert!(body.contains("joining"), "{body}");
    assert_eq!(joiner.get("/health/live").0, 200, "live while it waits");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ready(&joiner).0, 503, "alone, it does not take its own view for a fleet");
    refuses_clients(&rt, &joiner, "early");
    assert_eq!(joiner.metric("kadmq_connections_refused_not_ready_total"), 2);
    assert_eq!(joiner.metric("kadmq_connections_total"), 0, "no client was served");
    assert_eq!(joiner.metric("kadmq_ready"), 0);
    assert_eq!(joiner.cluster()["admitted"], false);
    assert_eq!(lines_with(&joiner, REFUSED_LINE), 1, "one log line for all refusals:\n{}", joiner.log());

    // 2. The first node comes up at that address (no bootstrap: ready at
    // once); a2 joins it and takes clients.
    let mut first = lab.unstarted("a1", None, &lab.key, &[]);
    first.p2p_port = port;
    first.start();
    assert_eq!(ready(&first).0, 200, "a node without a bootstrap address is ready at once");
    takes_clients(&rt, &first, "first");
    joiner.wait_ready();
    wait_for_members(&[&first, &joiner], &["a1", "a2"]);
    takes_clients(&rt, &joiner, "joined");
    assert_eq!(joiner.metric("kadmq_ready"), 1);
    assert_eq!(joiner.cluster()["admitted"], true);
    assert_eq!(lines_with(&joiner, "joined the fleet: taking MQTT clients"), 1, "{}", joiner.log());
    assert_eq!(lines_with(&joiner, "join timeout"), 0, "admitted by the join, not the timeout");

    // 3. Admitted, it stays admitted: a1 leaves, a2 is alone and still
    // takes clients. (First a2 remembers a1 in its peers file.)
    let peers = joiner.data_dir.join("cluster").join("peers");
    let a1 = first.peer_id();
    wait_until(SETTLE, "a2 to remember a1 in its peers file", || {
        std::fs::read_to_string(&peers).is_ok_and(|text| text.contains(&a1))
    });
    first.stop();
    wait_until(SETTLE, "a2 to see a1 gone", || joiner.metric("kadmq_cluster_members") == 1);
    assert_eq!(ready(&joiner).0, 200, "still ready alone");
    takes_clients(&rt, &joiner, "alone");

    // 4. Restarted with its peers file and its bootstrap address, both of
    // a node that is down: it waits to join again.
    joiner.stop();
    joiner.launch();
    assert_eq!(ready(&joiner).0, 503, "a restarted node waits to join");
    refuses_clients(&rt, &joiner, "restarted");
    assert_eq!(joiner.metric("kadmq_connections_refused_not_ready_total"), 2, "counted per run");
    assert_eq!(lines_with(&joiner, REFUSED_LINE), 2, "one line per start");
    first.start();
    joiner.wait_ready();
    takes_clients(&rt, &joiner, "rejoined");
}

#[test]
fn the_join_timeout_admits_a_node_that_joins_nobody() {
    const TIMEOUT: Duration = Duration::from_secs(5);
    let rt = runtime();
    let lab = Lab::new();
    let boot = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let mut lone = lab.unstarted("t1", Some(&boot), &lab.key, &[]);
    // The setting as its environment variable.
    lone.env.push(("KADMQ_JOIN_TIMEOUT_MS".into(), TIMEOUT.as_millis().to_string()));
    let launched = Instant::now();
    lone.launch();
    assert_eq!(ready(&lone).0, 503, "waiting for the join timeout");
    lone.wait_ready();
    let waited = launched.elapsed();
    assert!(waited >= TIMEOUT, "ready after {waited:?}, before the join timeout of {TIMEOUT:?}");
    takes_clients(&rt, &lone, "alone");
    let warned: Vec<String> = lone
        .log()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("joined no other member within the join timeout"))
        .map(String::from)
        .collect();
    assert_eq!(warned.len(), 1, "one WARN line:\n{}", lone.log());
    eprintln!("ready after {waited:?}: {}", warned[0]);
    assert_eq!(lone.metric("kadmq_cluster_members"), 1);
    assert_eq!(lone.cluster()["admitted"], true);
}
