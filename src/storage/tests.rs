//! The typed layer's tests: one body run on both engines, and what only
//! the data directory can show (reopen, foreign or damaged directories).

use super::*;
use crate::protocol::MessageProperties;
use bytes::Bytes;
use std::path::Path;

fn message(topic: &str) -> Message {
    Message {
        topic: topic.into(),
        payload: Bytes::from_static(b"payload"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: MessageProperties { content_type: Some("text/plain".into()), ..Default::default() },
        expires_at_ms: Some(42),
        origin: Some("c".into()),
        fleet_id: None,
    }
}

#[test]
fn records_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let storage = Storage::open(dir.path()).unwrap();
        storage.put_retained(&message("a/b")).unwrap();
        let session = StoredSession {
            expiry_interval: 60,
            subscriptions: vec![StoredSubscription {
                filter: "a/#".into(),
                options: SubscriptionOptions::qos(QoS::ExactlyOnce),
                identifier: Some(7),
            }],
            incoming_qos2: vec![3],
            disconnected_at_ms: None,
        };
        storage.put_session("client", &session).unwrap();
        let delivery = StoredDelivery {
            message: message("a/b"),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![7],
            packet_id: Some(9),
            released: false,
        };
        storage.put_delivery("client", 2, &delivery).unwrap();
        storage.put_delivery("client", 1, &delivery).unwrap();
        storage.put_delivery("client2", 1, &delivery).unwrap();
        storage.sync().unwrap();
    }
    let storage = Storage::open(dir.path()).unwrap();
    assert_eq!(storage.retained().unwrap(), vec![message("a/b")]);
    let sessions = storage.sessions().unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].1.subscriptions[0].identifier, Some(7));
    let seqs: Vec<u64> = storage.deliveries("client").unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(seqs, vec![1, 2]);
    storage.remove_session("client").unwrap();
    assert!(storage.deliveries("client").unwrap().is_empty());
    assert_eq!(storage.deliveries("client2").unwrap().len(), 1);
}

#[test]
fn refuses_foreign_and_unknown_directories() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("something"), b"else").unwrap();
    assert!(matches!(Storage::open(dir.path()), Err(StorageError::Foreign { .. })));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(FORMAT_FILE), b"kadmq-data 999").unwrap();
    let err = Storage::open(dir.path()).err().unwrap();
    assert!(matches!(err, StorageError::UnknownFormat { .. }), "{err}");
}

#[test]
fn corrupt_store_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    drop(Storage::open(dir.path()).unwrap());
    // Overwrite every file of the store with garbage.
    fn scramble(dir: &Path) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                scramble(&path);
            } else {
                std::fs::write(&path, b"\xff\x00garbage\x13\x37").unwrap();
            }
        }
    }
    scramble(&dir.path().join("store"));
    let err = Storage::open(dir.path()).err().expect("a scrambled store must not open");
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
}

fn session(expiry_interval: u32) -> StoredSession {
    StoredSession { expiry_interval, subscriptions: vec![], incoming_qos2: vec![], disconnected_at_ms: Some(5) }
}

fn delivery(topic: &str, packet_id: Option<u16>) -> StoredDelivery {
    StoredDelivery {
        message: message(topic),
        qos: QoS::ExactlyOnce,
        retain: false,
        subscription_ids: vec![],
        packet_id,
        released: packet_id.is_some(),
    }
}

fn seqs(storage: &Storage, client_id: &str) -> Vec<u64> {
    storage.deliveries(client_id).unwrap().into_iter().map(|(seq, _)| seq).collect()
}

/// What the broker and the cluster rely on, whatever the engine.
fn typed_round_trips(storage: &Storage) {
    assert!(!storage.is_dirty());

    // Retained: keyed by topic, replaced, removed.
    storage.put_retained(&message("a/b")).unwrap();
    storage.put_retained(&message("a")).unwrap();
    let mut replaced = message("a/b");
    replaced.payload = Bytes::from_static(b"newer");
    storage.put_retained(&replaced).unwrap();
    assert_eq!(storage.retained().unwrap(), vec![message("a"), replaced]);
    storage.remove_retained("a").unwrap();
    assert_eq!(storage.retained().unwrap().len(), 1);

    // Sessions and deliveries: "a" is a prefix of "ab" as bytes, yet
    // neither sees the other's deliveries, nor loses them with its session.
    storage.put_session("a", &session(60)).unwrap();
    storage.put_session("ab", &session(120)).unwrap();
    // Sequence order is numeric, not the bytes' first digit: 256 after 2.
    for seq in [256, 2, 1] {
        storage.put_delivery("a", seq, &delivery("for/a", None)).unwrap();
    }
    storage.put_delivery("ab", 1, &delivery("for/ab", Some(4))).unwrap();
    storage.put_delivery("b", 1, &delivery("for/b", None)).unwrap();
    assert_eq!(seqs(storage, "a"), vec![1, 2, 256]);
    assert_eq!(storage.deliveries("ab").unwrap(), vec![(1, delivery("for/ab", Some(4)))]);
    assert_eq!(seqs(storage, ""), Vec::<u64>::new());
    storage.remove_delivery("a", 2).unwrap();
    assert_eq!(seqs(storage, "a"), vec![1, 256]);
    let sessions = storage.sessions().unwrap();
    assert_eq!(sessions, vec![("a".to_string(), session(60)), ("ab".to_string(), session(120))]);

    storage.remove_session("a").unwrap();
    assert_eq!(seqs(storage, "a"), Vec::<u64>::new());
    assert_eq!(seqs(storage, "ab"), vec![1]);
    assert_eq!(seqs(storage, "b"), vec![1]);
    assert_eq!(storage.sessions().unwrap(), vec![("ab".to_string(), session(120))]);

    // Outbox: ids in numeric order.
    for id in [300, 7, 1 << 40] {
        storage.put_outbox(id, &id.to_le_bytes()).unwrap();
    }
    storage.remove_outbox(7).unwrap();
    let ids: Vec<u64> = storage.outbox().unwrap().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, vec![300, 1 << 40]);
    assert_eq!(storage.outbox().unwrap()[0].1, 300u64.to_le_bytes().to_vec());

    // Every write marks the store dirty until a flush or a sync.
    assert!(storage.is_dirty());
    storage.flush().unwrap();
    assert!(!storage.is_dirty());
    storage.flush().unwrap();
    storage.remove_outbox(300).unwrap();
    assert!(storage.is_dirty());
    storage.sync().unwrap();
    assert!(!storage.is_dirty());
}

#[test]
fn typed_round_trips_in_memory() {
    typed_round_trips(&Storage::in_memory());
}

#[test]
fn typed_round_trips_on_fjall() {
    let dir = tempfile::tempdir().unwrap();
    typed_round_trips(&Storage::open(dir.path()).unwrap());
}

/// The engine contract the typed layer builds on, whatever the engine.
fn engine_contract(engine: &mut dyn Engine) {
    let one = engine.open_tree("one").unwrap();
    let two = engine.open_tree("two").unwrap();
    assert_ne!(one, two);
    assert_eq!(engine.open_tree("one").unwrap(), one);

    engine.insert(one, b"k", b"v1").unwrap();
    engine.insert(one, b"k", b"v2").unwrap();
    assert_eq!(engine.get(one, b"k").unwrap(), Some(b"v2".to_vec()));
    assert_eq!(engine.get(two, b"k").unwrap(), None, "trees are separate");
    engine.remove(one, b"k").unwrap();
    assert_eq!(engine.get(one, b"k").unwrap(), None);

    for key in [&b"ab"[..], b"a", b"b", b"abc", b"aa"] {
        engine.insert(two, key, key).unwrap();
    }
    let keys = |prefix: &[u8]| -> Vec<Vec<u8>> {
        engine.scan_prefix(two, prefix).unwrap().map(|record| record.unwrap().0).collect()
    };
    assert_eq!(keys(b"ab"), vec![b"ab".to_vec(), b"abc".to_vec()]);
    assert_eq!(keys(b"a"), vec![b"a".to_vec(), b"aa".to_vec(), b"ab".to_vec(), b"abc".to_vec()]);
    assert_eq!(keys(b"").len(), 5);
    assert!(keys(b"c").is_empty());

    engine
        .commit(vec![
            Write::Remove { tree: two, key: b"a".to_vec() },
            Write::Insert { tree: one, key: b"x".to_vec(), value: b"y".to_vec() },
        ])
        .unwrap();
    assert_eq!(engine.get(two, b"a").unwrap(), None);
    assert_eq!(engine.get(one, b"x").unwrap(), Some(b"y".to_vec()));
    engine.persist(Durability::Buffer).unwrap();
    engine.persist(Durability::Sync).unwrap();
}

#[test]
fn engine_contract_in_memory() {
    engine_contract(&mut MemoryEngine::new());
}

#[test]
fn engine_contract_on_fjall() {
    let dir = tempfile::tempdir().unwrap();
    prepare_data_dir(dir.path()).unwrap();
    engine_contract(&mut FjallEngine::open(dir.path()).unwrap());
}

#[test]
fn a_directory_in_use_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Storage::open(dir.path()).unwrap();
    let err = Storage::open(dir.path()).err().expect("a store in use must not open twice");
    assert!(matches!(err, StorageError::Io { .. }), "{err}");
    assert!(err.to_string().ends_with("in use by another kadmq process"), "{err}");
}

#[test]
fn processes_preparing_one_directory_at_once_all_succeed() {
    // `kadmq id` beside a starting node: both prepare the same fresh
    // directory; neither may read the FORMAT file half written.
    for _ in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let results: Vec<_> = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..8).map(|_| scope.spawn(|| prepare_data_dir(&data))).collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        for result in results {
            result.unwrap();
        }
        let format = std::fs::read_to_string(data.join("FORMAT")).unwrap();
        assert_eq!(format, format!("kadmq-data {FORMAT_VERSION}\n"));
    }
}

#[test]
fn a_batch_holds_the_writes_made_in_it_and_its_extra_until_the_end() {
    let dir = tempfile::tempdir().unwrap();
    {
        let storage = Storage::open(dir.path()).unwrap();
        let other = Storage::in_memory();
        let record = storage.seen_write(7, 9, 1_000);
        let inside = storage
            .in_batch(vec![record], || {
                storage.put_delivery("c", 1, &delivery("q/t", None)).unwrap();
                // Not visible before the batch is committed.
                let before = storage.deliveries("c").unwrap().len();
                // Another storage is not part of the batch.
                other.put_retained(&message("x")).unwrap();
                assert_eq!(other.retained().unwrap().len(), 1);
                before
            })
            .unwrap();
        assert_eq!(inside, 0);
        assert_eq!(storage.deliveries("c").unwrap().len(), 1);
        assert_eq!(storage.seen().unwrap(), vec![((7, 9), 1_000)]);
        storage.flush().unwrap();
    }
    let storage = Storage::open(dir.path()).unwrap();
    assert_eq!(storage.seen().unwrap(), vec![((7, 9), 1_000)], "both survive a restart");
    assert_eq!(storage.deliveries("c").unwrap().len(), 1);
    storage.commit(vec![storage.seen_removal(7, 9)]).unwrap();
    assert!(storage.seen().unwrap().is_empty());
}

/// An engine whose `persist` fails while `failing` is set.
struct FailingPersist {
    inner: MemoryEngine,
    failing: std::sync::Arc<AtomicBool>,
}

impl Engine for FailingPersist {
    fn open_tree(&mut self, name: &'static str) -> Result<Tree> {
        self.inner.open_tree(name)
    }
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get(tree, key)
    }
    fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<()> {
        self.inner.insert(tree, key, value)
    }
    fn remove(&self, tree: Tree, key: &[u8]) -> Result<()> {
        self.inner.remove(tree, key)
    }
    fn scan_prefix<'a>(&'a self, tree: Tree, prefix: &[u8]) -> Result<Records<'a>> {
        self.inner.scan_prefix(tree, prefix)
    }
    fn commit(&self, writes: Vec<Write>) -> Result<()> {
        self.inner.commit(writes)
    }
    fn persist(&self, durability: Durability) -> Result<()> {
        match self.failing.load(Ordering::Relaxed) {
            true => Err(StorageError::Store(Box::new(std::io::Error::other("disk gone")))),
            false => self.inner.persist(durability),
        }
    }
}

/// A flush that could not persist leaves the writes pending: the next one
/// fails too (acknowledgements wait on it), until one succeeds.
#[test]
fn a_failed_persist_is_not_forgotten_by_the_next_flush() {
    let failing = std::sync::Arc::new(AtomicBool::new(true));
    let engine = FailingPersist { inner: MemoryEngine::new(), failing: failing.clone() };
    let storage = Storage::with_engine(Box::new(engine)).unwrap();
    storage.put_retained(&message("a/b")).unwrap();
    assert!(storage.flush().is_err());
    assert!(storage.flush().is_err(), "still not persisted");
    assert!(storage.sync().is_err());
    failing.store(false, Ordering::Relaxed);
    storage.flush().unwrap();
    assert!(!storage.is_dirty());
}
