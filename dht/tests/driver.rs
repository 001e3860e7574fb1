//! The libp2p driver over real sockets on 127.0.0.1: membership forming
//! from one bootstrap address, frames in order and without loss, the
//! cluster key keeping strangers out, failure detection, restarts, and the
//! partition fault hook. Every wait is bounded; set `RUST_LOG=debug` to see
//! what the nodes do.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use kadmq_dht::driver::{self, Client, DriverConfig, Event, Member, MemberState, Multiaddr, PeerId, PreSharedKey};
use tokio::{sync::mpsc, task::JoinHandle, time::timeout};

const HEARTBEAT: Duration = Duration::from_millis(250);
const SUSPECT: Duration = Duration::from_millis(2000);
const DEAD: Duration = Duration::from_millis(4000);
const HANDSHAKE: Duration = Duration::from_secs(5);

/// Tests run one at a time: each starts several nodes whose debug-build
/// crypto is CPU-heavy, and on a small machine (2 cores, perhaps compiling
/// at the same time) parallel tests starve each other's heartbeats past the
/// suspect timeout.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

fn config(name: &str, key: &PreSharedKey, bootstrap: Vec<Multiaddr>) -> DriverConfig {
    let mut config = DriverConfig::new(name, driver::generate_keypair(), *key);
    config.listen_addrs = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    config.bootstrap = bootstrap;
    config.mqtt_listeners = vec![format!("mqtt://{name}.invalid:1883")];
    config.heartbeat_interval = HEARTBEAT;
    config.suspect_timeout = SUSPECT;
    config.dead_timeout = DEAD;
    config.handshake_timeout = HANDSHAKE;
    config
}

struct Node {
    client: Client,
    events: mpsc::Receiver<Event>,
    task: JoinHandle<()>,
    peer: PeerId,
    addr: Multiaddr,
}

async fn spawn(config: DriverConfig) -> Node {
    let (client, events, event_loop) = driver::start(config).await.expect("node starts");
    let task = tokio::spawn(event_loop.run());
    let peer = client.local_peer_id();
    let addr = client.listen_addrs().await.unwrap().remove(0);
    Node { client, events, task, peer, addr }
}

fn alive(members: &[Member]) -> Vec<PeerId> {
    let mut peers: Vec<PeerId> = members.iter().filter(|m| m.state == MemberState::Alive).map(|m| m.peer_id).collect();
    peers.sort();
    peers
}

/// Waits until every node sees exactly `expected` alive.
async fn wait_full_membership(nodes: &[&Node], within: Duration) {
    let mut expected: Vec<PeerId> = nodes.iter().map(|n| n.peer).collect();
    expected.sort();
    let result = timeout(within, async {
        loop {
            let mut done = true;
            for node in nodes {
                if alive(&node.client.members().await.unwrap()) != expected {
                    done = false;
                }
            }
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if result.is_err() {
        for node in nodes {
            let seen = alive(&node.client.members().await.unwrap());
            eprintln!("{} sees {} of {}: {seen:?}", node.peer, seen.len(), expected.len());
        }
        panic!("membership did not converge within {within:?}");
    }
}

/// Waits for the first event that `pick` accepts, skipping others.
async fn next_event<T>(
    events: &mut mpsc::Receiver<Event>,
    within: Duration,
    mut pick: impl FnMut(Event) -> Option<T>,
) -> Option<T> {
    timeout(within, async {
        while let Some(event) = events.recv().await {
            if let Some(found) = pick(event) {
                return Some(found);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kadmq-driver-{tag}-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_full_membership_from_one_bootstrap_address() {
    init_logging();
    let _serial = SERIAL.lock().await;
    let key = driver::generate_cluster_key();
    let a = spawn(config("a", &key, vec![])).await;
    let b = spawn(config("b", &key, vec![a.addr.clone()])).await;
    let c = spawn(config("c", &key, vec![a.addr.clone()])).await;
    wait_full_membership(&[&a, &b, &c], Duration::from_secs(10)).await;

    // Records carry the caller's data.
    let members = c.client.members().await.unwrap();
    let seen_a = members.iter().find(|m| m.peer_id == a.peer).unwrap();
    assert_eq!(seen_a.name, "a");
    assert_eq!(seen_a.mqtt_listeners, vec!["mqtt://a.invalid:1883"]);
    assert!(!seen_a.listen_addrs.is_empty());

    // The load figure travels with the heartbeats.
    a.client.set_load(driver::Load { connections: 42, shards: 3, entries: 7 }).await.unwrap();
    timeout(Duration::from_secs(5), async {
        loop {
            let members = b.client.members().await.unwrap();
            if members.iter().any(|m| m.peer_id == a.peer && m.load.connections == 42 && m.load.entries == 7) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("load update reaches b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_bootstrap_address_without_a_peer_id_works() {
    init_logging();
    let _serial = SERIAL.lock().await;
    let key = driver::generate_cluster_key();
    let a = spawn(config("a", &key, vec![])).await;
    let port = a
        .addr
        .iter()
        .find_map(|p| match p {
            driver::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .unwrap();
    let by_name: Multiaddr = format!("/dns4/localhost/tcp/{port}").parse().unwrap();
    let b = spawn(config("b", &key, vec![by_name.clone()])).await;
    let c = spawn(config("c", &key, vec![by_name])).await;
    wait_full_membership(&[&a, &b, &c], Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_form_full_membership_and_a_full_mesh() {
    init_logging();
    let _serial = SERIAL.lock().await;
    let key = driver::generate_cluster_key();
    // Each node knows only the previous one: the rest must be discovered.
    let mut nodes = vec![spawn(config("n0", &key, vec![])).await];
    for i in 1..5 {
        let bootstrap = vec![nodes[i - 1].addr.clone()];
        nodes.push(spawn(config(&format!("n{i}"), &key, bootstrap)).await);
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_full_membership(&refs, Duration::from_secs(15)).await;

    // Discovered peers are dialled: every node ends up linked to all others.
    let mesh = timeout(Duration::from_secs(10), async {
        loop {
            let mut full = true;
            for node in &nodes {
                let mut peers = node.client.connected_peers().await.unwrap();
                peers.sort();
                peers.dedup();
                full &= peers.len() == nodes.len() - 1;
            }
            if full {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if mesh.is_err() {
        for node in &nodes {
            let peers = node.client.connected_peers().await.unwrap();
            eprintln!("{} is connected to {peers:?}", node.peer);
        }
        panic!("no full mesh of connections formed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_arrive_in_order_and_without_loss() {
    init_logging();
    let _serial = SERIAL.lock().await;
    const FRAMES: u32 = 10_000;
    let key = driver::generate_cluster_key();
    let a = spawn(config("a", &key, vec![])).await;
    let b = spawn(config("b", &key, vec![a.addr.clone()])).await;
    let mut c = spawn(config("c", &key, vec![a.addr.clone()])).await;
    wait_full_membership(&[&a, &b, &c], Duration::from_secs(10)).await;
    // Straight after formation: both senders open their streams to C at the
    // same moment (libp2p-stream resets all but one of simultaneous inbound
    // streams; the acceptance byte makes the writer retry instead of losing
    // what it wrote).
    // A and B both stream to C at once; each sender's order must hold.
    let sender = |client: Client, to: PeerId, tag: u8| {
        tokio::spawn(async move {
            for seq in 0..FRAMES {
                let mut frame = vec![tag];
                frame.extend_from_slice(&seq.to_be_bytes());
                frame.extend_from_slice(&[0xAB; 100]);
                client.send(to, frame).await.unwrap();
            }
        })
    };
    let send_a = sender(a.client.clone(), c.peer, b'a');
    let send_b = sender(b.client.clone(), c.peer, b'b');

    let mut next = [0u32; 2];
    let received = timeout(Duration::from_secs(15), async {
        while next != [FRAMES, FRAMES] {
            let Event::Frame { from, bytes, .. } = c.events.recv().await.expect("event channel open") else {
                continue;
            };
            let (slot, expected_from) = match bytes[0] {
                b'a' => (0, a.peer),
                b'b' => (1, b.peer),
                other => panic!("unexpected tag {other}"),
            };
            assert_eq!(from, expected_from);
            let seq = u32::from_be_bytes(bytes[1..5].try_into().unwrap());
            assert_eq!(seq, next[slot], "frames out of order from {from}");
            assert_eq!(bytes.len(), 105);
            next[slot] += 1;
        }
    })
    .await;
    assert!(received.is_ok(), "received only {next:?} of {FRAMES} frames per sender");
    send_a.await.unwrap();
    send_b.await.unwrap();

    // Sending to oneself is refused.
    assert!(a.client.send(a.peer, vec![1u8]).await.is_err());
}

#[tokio::test(flavor = "current_thread")]
async fn a_node_with_another_cluster_key_is_refused_and_the_log_says_why() {
    // Capture this test's log (current-thread runtime: every task runs here).
    let log = Arc::new(Mutex::new(Vec::<u8>::new()));
    let writer = {
        let log = log.clone();
        move || CaptureWriter(log.clone())
    };
    let subscriber =
        tracing_subscriber::fmt().with_env_filter("kadmq_dht=warn").with_writer(writer).with_ansi(false).finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let _serial = SERIAL.lock().await;

    let key = driver::generate_cluster_key();
    let other_key = driver::generate_cluster_key();
    let a = spawn(config("a", &key, vec![])).await;
    let b = spawn(config("b", &key, vec![a.addr.clone()])).await;

    // An unreachable address is not blamed on the cluster key.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let closed: Multiaddr = format!("/ip4/127.0.0.1/tcp/{closed_port}").parse().unwrap();
    assert!(a.client.dial(closed).await.is_err());
    assert!(
        !String::from_utf8_lossy(&log.lock().unwrap()).contains("handshake failed"),
        "a refused TCP connection was reported as a handshake failure"
    );
    let stranger = spawn(config("x", &other_key, vec![a.addr.clone()])).await;
    wait_full_membership(&[&a, &b], Duration::from_secs(10)).await;

    // Connection attempts fail, in both directions.
    let dial = timeout(Duration::from_secs(15), stranger.client.dial(a.addr.clone())).await.expect("dial finishes");
    assert!(dial.is_err(), "stranger connected: {dial:?}");
    let dial = timeout(Duration::from_secs(15), a.client.dial(stranger.addr.clone())).await.expect("dial finishes");
    assert!(dial.is_err(), "a connected to the stranger: {dial:?}");

    // No membership either way, after several heartbeats.
    tokio::time::sleep(HEARTBEAT * 4).await;
    assert_eq!(alive(&stranger.client.members().await.unwrap()), vec![stranger.peer]);
    for node in [&a, &b] {
        let members = node.client.members().await.unwrap();
        assert!(members.iter().all(|m| m.peer_id != stranger.peer));
    }

    let log = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    eprintln!("captured log:\n{log}");
    assert!(log.contains("handshake failed, likely a wrong cluster key"), "no clear warning in the log:\n{log}");
}

struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_becomes_suspect_then_dead() {
    init_logging();
    let _serial = SERIAL.lock().await;
    let key = driver::generate_cluster_key();
    let mut a = spawn(config("a", &key, vec![])).await;
    let b = spawn(config("b", &key, vec![a.addr.clone()])).await;
    let c = spawn(config("c", &key, vec![a.addr.clone()])).await;
    wait_full_membership(&[&a, &b, &c], Duration::from_secs(10)).await;

    // Crash: the event loop is dropped without a farewell.
    c.task.abort();
    let killed_at = tokio::time::Instant::now();
    let dead = c.peer;
    let suspect = next_event(&mut a.events, SUSPECT + DEAD, |e| match e {
        Event::MemberSuspect(p) if p == dead => Some(()),
        _ => None,
    })
    .await;
    assert!(suspect.is_some(), "c never became suspect");
    let suspect_after = killed_at.elapsed();
    let gone = next_event(&mut a.events, DEAD * 2, |e| match e {
        Event::MemberDead(p) if p == dead => Some(()),
        _ => None,
    })
    .await;
    assert!(gone.is_some(), "c never became dead");
    let dead_after = killed_at.elapsed();
    // Not before the timeouts (less one heartbeat of slack: the last
    // heartbeat may have been heard up to one interval before the kill).
    assert!(suspect_after + HEARTBEAT >= SUSPECT, "suspect too early: {suspect_after:?}");
    assert!(dead_after + HEARTBEAT >= DEAD, "dead too early: {dead_after:?}");
    assert!(dead_after <= DEAD + Duration::from_secs(2), "dead too late: {dead_after:?}");

    // B agrees, and both still see each other.
    timeout(Duration::from_secs(3), async {
        loop {
            let members = b.client.members().await.unwrap();
            if members.iter().any(|m| m.peer_id == dead && m.state == MemberState::Dead) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("b marks c dead");
    let mut expected = vec![a.peer, b.peer];
    expected.sort();
    assert_eq!(alive(&a.client.members().await.unwrap()), expected);

    // Frames to a dead member are refused.
    assert!(a.client.send(dead, vec![1u8]).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_its_peer_id_and_rejoins_with_a_higher_incarnation() {
    init_logging();
    let _serial = SERIAL.lock().await;
    let key = driver::generate_cluster_key();
    let dir = temp_dir("restart");
    let node_config = |bootstrap: Vec<Multiaddr>| {
        let mut config = config("c", &key, bootstrap);
        config.keypair = driver::load_or_generate_keypair(&dir).unwrap();
        config.incarnation = driver::next_incarnation(&dir).unwrap();
        config
    };

    let mut a = spawn(config("a", &key, vec![])).await;
    let b = spawn(config("b", &key, vec![a.addr.clone()])).await;
    let mut c = spawn(node_config(vec![a.addr.clone()])).await;
    wait_full_membership(&[&a, &b, &c], Duration::from_secs(10)).await;
    let first_peer = c.peer;
    let first_incarnation =
        a.client.members().await.unwrap().into_iter().find(|m| m.peer_id == first_peer).unwrap().incarnation;

    // Frames flow before the crash...
    a.client.send(c.peer, b"before".to_vec()).await.unwrap();
    let got = next_event(&mut c.events, Duration::from_secs(5), |e| match e {
        Event::Frame { bytes, .. } => Some(bytes),
        _ => None,
    })
    .await;
    assert_eq!(got.as_deref(), Some(&b"before"[..]));

    // ...crash, and restart from the same data directory.
    c.task.abort();
    let _ = (&mut c.task).await;
    tokio::time::sleep(HEARTBEAT).await;
    let mut c = spawn(node_config(vec![a.addr.clone()])).await;
    assert_eq!(c.peer, first_peer, "peer id changed across restart");

    let up = next_event(&mut a.events, Duration::from_secs(10), |e| match e {
        Event::MemberUp(m) if m.peer_id == first_peer && m.incarnation > first_incarnation => Some(m),
        _ => None,
    })
    .await;
    assert!(up.is_some(), "a did not see c's new incarnation");
    wait_full_membership(&[&a, &b, &c], Duration::from_secs(10)).await;

    // ...and frames flow again: the writer re-opened its stream.
    let got = timeout(Duration::from_secs(10), async {
        loop {
            a.client.send(c.peer, b"after".to_vec()).await.unwrap();
            if let Some(bytes) = next_event(&mut c.events, Duration::from_millis(500), |e| match e {
                Event::Frame { bytes, .. } => Some(bytes),
                _ => None,
            })
            .await
            {
                return bytes;
            }
        }
    })
    .await
    .expect("frames reach the restarted node");
    assert_eq!(&got[..], b"after");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_peer_is_partitioned_and_heals_after_unblock() {
    init_logging();
    let _serial = SERIAL.lock().await;
    let key = driver::generate_cluster_key();
    let mut a = spawn(config("a", &key, vec![])).await;
    let b = spawn(config("b", &key, vec![a.addr.clone()])).await;
    let mut c = spawn(config("c", &key, vec![a.addr.clone()])).await;
    wait_full_membership(&[&a, &b, &c], Duration::from_secs(10)).await;

    // Cut A <-> C on both sides; B still talks to both (and relays C's
    // heartbeats, which A must ignore).
    a.client.block_peer(c.peer).await.unwrap();
    c.client.block_peer(a.peer).await.unwrap();
    let cut = c.peer;
    let dead = next_event(&mut a.events, DEAD * 3, |e| match e {
        Event::MemberDead(p) if p == cut => Some(()),
        _ => None,
    })
    .await;
    assert!(dead.is_some(), "a never marked c dead during the partition");
    // Frames across the cut are dropped, not delivered.
    a.client.send(c.peer, b"lost".to_vec()).await.ok();

    a.client.unblock_peer(c.peer).await.unwrap();
    c.client.unblock_peer(a.peer).await.unwrap();
    let up = next_event(&mut a.events, Duration::from_secs(10), |e| match e {
        Event::MemberUp(m) if m.peer_id == cut => Some(()),
        _ => None,
    })
    .await;
    assert!(up.is_some(), "c did not come back after the partition healed");
    wait_full_membership(&[&a, &b, &c], Duration::from_secs(10)).await;

    a.client.send(c.peer, b"healed".to_vec()).await.unwrap();
    let got = next_event(&mut c.events, Duration::from_secs(10), |e| match e {
        Event::Frame { bytes, .. } => Some(bytes),
        _ => None,
    })
    .await;
    assert_eq!(got.as_deref(), Some(&b"healed"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_is_seen_as_dead_at_once() {
    init_logging();
    let _serial = SERIAL.lock().await;
    let key = driver::generate_cluster_key();
    let mut a = spawn(config("a", &key, vec![])).await;
    let b = spawn(config("b", &key, vec![a.addr.clone()])).await;
    wait_full_membership(&[&a, &b], Duration::from_secs(10)).await;

    let started = tokio::time::Instant::now();
    b.client.shutdown().await.unwrap();
    let left = b.peer;
    let dead = next_event(&mut a.events, DEAD, |e| match e {
        Event::MemberDead(p) if p == left => Some(()),
        _ => None,
    })
    .await;
    assert!(dead.is_some(), "a did not see b leave");
    assert!(started.elapsed() < SUSPECT, "leaving took a timeout, not a farewell");
    assert!(b.client.members().await.is_err(), "b's event loop still runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_to_an_unknown_peer_is_refused() {
    init_logging();
    let _serial = SERIAL.lock().await;
    let key = driver::generate_cluster_key();
    let a = spawn(config("a", &key, vec![])).await;
    let nobody = PeerId::random();
    let sent = timeout(Duration::from_secs(2), a.client.send(nobody, vec![1u8])).await.expect("send returns at once");
    assert!(matches!(sent, Err(driver::Error::UnknownPeer(p)) if p == nobody), "{sent:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_other_fleet_settings_refuse_each_other_and_exchange_no_frames() {
    init_logging();
    let _serial = SERIAL.lock().await;
    let key = driver::generate_cluster_key();
    let mut a = spawn(config("a", &key, vec![])).await;
    let mut b_config = config("b", &key, vec![a.addr.clone()]);
    b_config.fleet.replication = 2;
    let mut b = spawn(b_config).await;
    // Both sides refuse the other, once, and say what differs.
    let refused_by_a = next_event(&mut a.events, Duration::from_secs(20), |e| match e {
        Event::MemberRefused { peer, reason } if peer == b.peer => Some(reason),
        Event::MemberUp(m) if m.peer_id == b.peer => panic!("a admitted b"),
        _ => None,
    })
    .await
    .expect("a refuses b");
    assert!(refused_by_a.contains("has replication 2") && refused_by_a.contains("this fleet runs replication 3"));
    let refused_by_b = next_event(&mut b.events, Duration::from_secs(20), |e| match e {
        Event::MemberRefused { peer, reason } if peer == a.peer => Some(reason),
        Event::MemberUp(m) if m.peer_id == a.peer => panic!("b admitted a"),
        _ => None,
    })
    .await
    .expect("b refuses a");
    assert!(refused_by_b.contains("has replication 3") && refused_by_b.contains("this fleet runs replication 2"));
    // Frames either way are dropped, and for several heartbeats nothing
    // else comes: no second refusal, no MemberUp, no frame.
    for i in 0..10u8 {
        let _ = b.client.send(a.peer, vec![i]).await;
        let _ = a.client.send(b.peer, vec![i]).await;
    }
    let quiet = Duration::from_secs(2);
    let noise = next_event(&mut a.events, quiet, |e| match e {
        Event::MemberRefused { .. } | Event::MemberUp(_) | Event::Frame { .. } => Some(format!("{e:?}")),
        _ => None,
    })
    .await;
    assert_eq!(noise, None, "a after refusing b");
    let noise = next_event(&mut b.events, quiet, |e| match e {
        Event::MemberRefused { .. } | Event::MemberUp(_) | Event::Frame { .. } => Some(format!("{e:?}")),
        _ => None,
    })
    .await;
    assert_eq!(noise, None, "b after refusing a");
    assert!(alive(&a.client.members().await.unwrap()) == vec![a.peer]);
    assert_eq!(a.client.send_budget().used(), 0, "dropped frames gave their budget back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_frames_not_dealt_with_stop_the_readers_at_the_receive_budget() {
    init_logging();
    let _serial = SERIAL.lock().await;
    let key = driver::generate_cluster_key();
    let mut a_config = config("a", &key, vec![]);
    a_config.receive_buffer = 16 << 20;
    let mut a = spawn(a_config).await;
    let b = spawn(config("b", &key, vec![a.addr.clone()])).await;
    wait_full_membership(&[&a, &b], Duration::from_secs(10)).await;
    let sender = b.client.clone();
    let to = a.peer;
    let send = tokio::spawn(async move {
        for i in 0..40u8 {
            sender.send(to, vec![i; 1 << 20]).await.unwrap();
        }
    });
    // Keep every frame (and its share of the budget): 16 arrive, then none.
    let mut kept = Vec::new();
    while let Some(frame) = next_event(&mut a.events, Duration::from_secs(3), |e| match e {
        Event::Frame { bytes, held, .. } => Some((bytes, held)),
        _ => None,
    })
    .await
    {
        kept.push(frame);
    }
    assert_eq!(kept.len(), 16, "the readers stop at the receive budget");
    // Dealt with: the rest comes, in order.
    let first_rest = kept.len() as u8;
    kept.clear();
    let mut got = Vec::new();
    while got.len() < 40 - first_rest as usize {
        let bytes = next_event(&mut a.events, Duration::from_secs(10), |e| match e {
            Event::Frame { bytes, .. } => Some(bytes),
            _ => None,
        })
        .await
        .expect("the rest arrives once the budget is back");
        got.push(bytes[0]);
    }
    assert_eq!(got, (first_rest..40).collect::<Vec<u8>>());
    send.await.unwrap();
}
