//! Durability with the real `kadmq` binary: SIGKILL and restart on the same
//! data directory, damaged directories, graceful stop on SIGTERM.

use crate::common::BrokerProcess;
use crate::support::ports::free_port;
use crate::support::process::kadmq;
use crate::support::raw::{encode311, publish_packet, Raw, QUIET};
use kadmq::protocol::{Packet as P, PubAck, QoS as Q};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Sends every PUBLISH at once, then waits for every PUBACK / PUBREC (the
/// broker promises durability with them). Returns when all came.
async fn publish_all_and_wait_for_acks(c: &mut Raw, topic: &str, qos: Q, n: u16, first_id: u16) {
    let mut bytes = Vec::new();
    for i in 0..n {
        let id = first_id + i;
        bytes.extend(encode311(&publish_packet(topic, &i.to_be_bytes(), qos, false, Some(id))));
    }
    c.send_bytes(&bytes).await;
    let mut acked = BTreeSet::new();
    while acked.len() < n as usize {
        match (qos, c.recv().await) {
            (Q::AtLeastOnce, P::PubAck(a)) | (Q::ExactlyOnce, P::PubRec(a)) => {
                assert!(acked.insert(a.packet_id), "ack for {} twice", a.packet_id);
            }
            (_, other) => panic!("expected an ack, got {other:?}"),
        }
    }
}

fn payloads(got: &[kadmq::protocol::Publish], topic: &str) -> BTreeSet<u16> {
    got.iter().filter(|p| p.topic == topic).map(|p| u16::from_be_bytes([p.payload[0], p.payload[1]])).collect()
}

#[tokio::test]
async fn retained_messages_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::spawn(dir.path());
    let (mut c, _) = Raw::v311(broker.addr(), "ret-writer", true).await;
    c.publish_with_id("keep/1", b"one", Q::AtLeastOnce, true, 1).await;
    c.publish_with_id("keep/2", b"two", Q::ExactlyOnce, true, 2).await;
    c.publish_with_id("keep/3", b"old", Q::AtLeastOnce, true, 3).await;
    c.publish_with_id("keep/3", b"three", Q::AtLeastOnce, true, 4).await;
    c.publish_with_id("keep/gone", b"x", Q::AtLeastOnce, true, 5).await;
    c.publish_with_id("keep/gone", b"", Q::AtLeastOnce, true, 6).await;
    broker.kill();

    let broker = BrokerProcess::spawn(dir.path());
    let (mut s, _) = Raw::v311(broker.addr(), "ret-reader", true).await;
    s.subscribe_id(1, &[("keep/#", Q::ExactlyOnce)]).await;
    let got = s.drain(QUIET).await;
    let mut found: Vec<(String, Vec<u8>, Q, bool)> =
        got.into_iter().map(|p| (p.topic, p.payload.to_vec(), p.qos, p.retain)).collect();
    found.sort();
    assert_eq!(
        found,
        vec![
            ("keep/1".into(), b"one".to_vec(), Q::AtLeastOnce, true),
            ("keep/2".into(), b"two".to_vec(), Q::ExactlyOnce, true),
            ("keep/3".into(), b"three".to_vec(), Q::AtLeastOnce, true),
        ]
    );
}

#[tokio::test]
async fn acknowledged_messages_for_an_offline_session_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::spawn(dir.path());
    let (mut sub, _) = Raw::v311(broker.addr(), "durable-sub", false).await;
    assert_eq!(sub.subscribe_id(1, &[("d/1", Q::AtLeastOnce), ("d/2", Q::ExactlyOnce)]).await, vec![1, 2]);
    sub.disconnect().await;

    let (mut publisher, _) = Raw::v311(broker.addr(), "durable-pub", true).await;
    publish_all_and_wait_for_acks(&mut publisher, "d/1", Q::AtLeastOnce, 200, 1).await;
    publish_all_and_wait_for_acks(&mut publisher, "d/2", Q::ExactlyOnce, 50, 1000).await;
    broker.kill();

    let broker = BrokerProcess::spawn(dir.path());
    let (mut sub, present) = Raw::v311(broker.addr(), "durable-sub", false).await;
    assert!(present, "the persistent session survives SIGKILL");
    let got = sub.drain(Duration::from_millis(1000)).await;
    assert_eq!(payloads(&got, "d/1"), (0..200).collect(), "every PUBACKed QoS 1 message");
    assert_eq!(payloads(&got, "d/2"), (0..50).collect(), "every PUBRECed QoS 2 message");
    assert_eq!(got.len(), 250, "no duplicates");
    assert!(got.iter().all(|p| p.qos == if p.topic == "d/1" { Q::AtLeastOnce } else { Q::ExactlyOnce }));
}

#[tokio::test]
async fn subscriptions_and_unacked_inflight_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::spawn(dir.path());
    let (mut sub, _) = Raw::v311(broker.addr(), "sub-kill", false).await;
    sub.subscribe_id(1, &[("sk/a", Q::AtLeastOnce), ("sk/+/b", Q::ExactlyOnce)]).await;
    let (mut publisher, _) = Raw::v311(broker.addr(), "sub-kill-pub", true).await;
    publisher.publish_with_id("sk/a", b"inflight", Q::AtLeastOnce, false, 1).await;
    let p = sub.recv_publish().await; // received, never acknowledged
    let inflight_id = p.packet_id.unwrap();
    sub.ping().await;
    broker.kill();
    drop(sub);

    let broker = BrokerProcess::spawn(dir.path());
    // Published while the subscriber is still away after the restart.
    let (mut publisher, _) = Raw::v311(broker.addr(), "sub-kill-pub", true).await;
    publisher.publish_with_id("sk/x/b", b"queued", Q::ExactlyOnce, false, 1).await;

    let (mut sub, present) = Raw::v311(broker.addr(), "sub-kill", false).await;
    assert!(present);
    let resent = sub.recv_publish().await;
    assert_eq!((&resent.payload[..], resent.dup, resent.packet_id), (&b"inflight"[..], true, Some(inflight_id)));
    sub.complete(&resent).await;
    let queued = sub.recv_publish().await;
    assert_eq!((&queued.payload[..], queued.qos), (&b"queued"[..], Q::ExactlyOnce));
    sub.complete(&queued).await;

    // And the subscriptions route new messages at their QoS.
    publisher.publish_with_id("sk/a", b"live", Q::ExactlyOnce, false, 2).await;
    let live = sub.recv_publish().await;
    assert_eq!((&live.payload[..], live.qos), (&b"live"[..], Q::AtLeastOnce));
    sub.complete(&live).await;
    sub.expect_silence().await;
}

#[tokio::test]
async fn qos2_from_publisher_is_not_routed_twice_after_kill_9() {
    // PUBREC promises the id is remembered: a retransmitted PUBLISH with the
    // same id after a restart must not be routed again.
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::spawn(dir.path());
    let (mut sub, _) = Raw::v311(broker.addr(), "q2k-sub", false).await;
    sub.subscribe_id(1, &[("q2k/t", Q::ExactlyOnce)]).await;
    sub.disconnect().await;
    let (mut publisher, _) = Raw::v311(broker.addr(), "q2k-pub", false).await;
    publisher.send(&publish_packet("q2k/t", b"once", Q::ExactlyOnce, false, Some(42))).await;
    assert_eq!(publisher.recv().await, P::PubRec(PubAck::new(42)));
    broker.kill();
    drop(publisher);

    let broker = BrokerProcess::spawn(dir.path());
    let (mut publisher, present) = Raw::v311(broker.addr(), "q2k-pub", false).await;
    assert!(present);
    let mut dup = publish_packet("q2k/t", b"once", Q::ExactlyOnce, false, Some(42));
    if let P::Publish(p) = &mut dup {
        p.dup = true;
    }
    publisher.send(&dup).await;
    assert_eq!(publisher.recv().await, P::PubRec(PubAck::new(42)));
    publisher.send(&P::PubRel(PubAck::new(42))).await;
    assert_eq!(publisher.recv().await, P::PubComp(PubAck::new(42)));

    let (mut sub, _) = Raw::v311(broker.addr(), "q2k-sub", false).await;
    let got = sub.drain(QUIET).await;
    assert_eq!(got.len(), 1, "routed exactly once: {got:?}");
}

// --- the binary refusing bad data directories ----------------------------------------

/// Runs `kadmq start` on `data_dir`; it must exit by itself within 10 s.
fn start_expecting_exit(data_dir: &Path) -> (ExitStatus, String) {
    let port = free_port();
    let mut child = kadmq()
        .args(["start", "--no-ws", "--mqtt", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(data_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kadmq");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("kadmq did not exit; stderr: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    (status, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn assert_clean_refusal(status: ExitStatus, stderr: &str, mentions: &[&str]) {
    assert!(!status.success(), "must exit non-zero; stderr: {stderr}");
    assert_eq!(status.code(), Some(1), "an error exit, not a signal or abort; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "no panic: {stderr}");
    let lower = stderr.to_lowercase();
    assert!(mentions.iter().any(|m| lower.contains(m)), "stderr should mention one of {mentions:?}: {stderr}");
}

/// Makes a real store (a retained message and a session), then SIGKILLs.
async fn populated_data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::spawn(dir.path());
    let (mut c, _) = Raw::v311(broker.addr(), "populate", false).await;
    c.subscribe_id(1, &[("pop/#", Q::AtLeastOnce)]).await;
    c.publish_with_id("pop/r", b"retained", Q::AtLeastOnce, true, 1).await;
    broker.kill();
    dir
}

fn scramble(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            scramble(&path);
        } else {
            std::fs::write(&path, b"\xff\x00garbage\x13\x37 not a store").unwrap();
        }
    }
}

#[tokio::test]
async fn corrupt_store_files_make_start_fail_cleanly() {
    let dir = populated_data_dir().await;
    scramble(&dir.path().join("store"));
    let (status, stderr) = start_expecting_exit(dir.path());
    assert_clean_refusal(status, &stderr, &["damaged", "corrupt", "unreadable"]);
}

#[tokio::test]
async fn garbage_records_in_the_store_make_start_fail_cleanly() {
    let dir = populated_data_dir().await;
    {
        let db = fjall::Database::builder(dir.path().join("store")).open().unwrap();
        let retained = db.keyspace("retained", fjall::KeyspaceCreateOptions::default).unwrap();
        retained.insert("pop/r", b"\xc1\xc1 not messagepack").unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let (status, stderr) = start_expecting_exit(dir.path());
    assert_clean_refusal(status, &stderr, &["could not be decoded", "damaged", "corrupt"]);
}

#[tokio::test]
async fn unknown_format_version_makes_start_fail_cleanly() {
    let dir = populated_data_dir().await;
    std::fs::write(dir.path().join("FORMAT"), "kadmq-data 999\n").unwrap();
    let (status, stderr) = start_expecting_exit(dir.path());
    assert_clean_refusal(status, &stderr, &["format"]);
    assert!(stderr.contains("999"), "names the version found: {stderr}");
}

#[tokio::test]
async fn foreign_directory_makes_start_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "someone else's files").unwrap();
    let (status, stderr) = start_expecting_exit(dir.path());
    assert_clean_refusal(status, &stderr, &["not a kadmq data directory"]);
    assert_eq!(std::fs::read_to_string(dir.path().join("notes.txt")).unwrap(), "someone else's files");
}

#[tokio::test]
async fn sigterm_stops_gracefully_with_exit_0_and_keeps_state() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::spawn(dir.path());
    let (mut c, _) = Raw::v311(broker.addr(), "term", false).await;
    c.subscribe_id(1, &[("term/t", Q::AtLeastOnce)]).await;
    c.publish_with_id("term/r", b"kept", Q::AtMostOnce, true, 0).await;
    c.ping().await;

    let status = broker.process.stop(Duration::from_secs(10)).expect("kadmq stops within 10 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "graceful stop exits 0: {status:?}");
    // The connection was closed by the broker.
    c.expect_closed(Duration::from_secs(2)).await;

    let broker = BrokerProcess::spawn(dir.path());
    let (mut c, present) = Raw::v311(broker.addr(), "term", false).await;
    assert!(present, "the session is kept across a graceful stop");
    c.subscribe_id(2, &[("term/r", Q::AtMostOnce)]).await;
    let p = c.recv_publish().await;
    assert_eq!((&p.payload[..], p.retain), (&b"kept"[..], true));
}
