//! Durable state in the data directory: retained messages, persistent
//! sessions and their queued / unacknowledged messages, the cluster outbox.
//!
//! Boundary: this typed layer is what the broker and the cluster see; it
//! turns records into bytes (values in MessagePack, keys laid out so one
//! client's deliveries are one prefix) over a small key-value [`Engine`]:
//! [`FjallEngine`] in the data directory, [`MemoryEngine`] for unit tests
//! ([`Storage::in_memory`]). Writes go to the engine's journal;
//! [`Storage::flush`] pushes the journal to the operating system, which is
//! what makes a write survive a SIGKILL. The broker calls it before it
//! acknowledges anything it promised to keep.
//!
//! Layout of the data directory:
//! - `FORMAT`: the text `kadmq-data <version>`; checked before anything else
//!   so an unknown or foreign directory is refused with a clear error
//!   ([`prepare_data_dir`]);
//! - `store/`: the fjall database.

mod data_dir;
mod engine;
mod fjall;
mod memory;
#[cfg(test)]
mod tests;

pub use self::fjall::FjallEngine;
pub use data_dir::{prepare_data_dir, FORMAT_VERSION};
pub use engine::{Durability, Engine, Records, Tree, Write};
pub use memory::MemoryEngine;

use crate::broker::message::Message;
use crate::protocol::{QoS, SubscriptionOptions};
use data_dir::FORMAT_FILE;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("data directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("data directory {path} is not a kadmq data directory (no {FORMAT_FILE} file, but not empty); use an empty directory or the right one")]
    Foreign { path: PathBuf },
    #[error("data directory {path} has format {found:?}; this kadmq reads format {FORMAT_VERSION}")]
    UnknownFormat { path: PathBuf, found: String },
    #[error("data directory {path}: the store is damaged or unreadable: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    /// A read or write the engine could not do.
    #[error("store: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("record in {keyspace} could not be decoded: {detail}")]
    Record { keyspace: &'static str, detail: String },
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// A persistent session as stored: enough to rebuild it after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSession {
    pub expiry_interval: u32,
    pub subscriptions: Vec<StoredSubscription>,
    /// QoS 2 packet ids received from the client and not yet released.
    pub incoming_qos2: Vec<u16>,
    /// When the client went away; `None` while connected.
    pub disconnected_at_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSubscription {
    pub filter: String,
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
}

/// A message owed to a persistent session: queued, or sent and not yet
/// acknowledged (then `packet_id` is set; `released` once PUBREC came).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredDelivery {
    pub message: Message,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    pub packet_id: Option<u16>,
    pub released: bool,
}

/// What [`Storage::flush`] runs first ([`Storage::before_flush`]).
pub type FlushHook = dyn Fn(&Storage) -> Result<()> + Send + Sync;

/// A write to a persistent session, as [`Storage::set_mirror`] sees it.
#[derive(Debug, Clone)]
pub enum Mirrored {
    Session(std::sync::Arc<str>, StoredSession),
    SessionRemoved(std::sync::Arc<str>),
    Delivery(std::sync::Arc<str>, u64, Box<StoredDelivery>),
    DeliveryRemoved(std::sync::Arc<str>, u64),
}

pub struct Storage {
    /// The data directory; empty for a store not opened from one.
    path: PathBuf,
    engine: Box<dyn Engine>,
    retained: Tree,
    sessions: Tree,
    deliveries: Tree,
    outbox: Tree,
    directory: Tree,
    replicas: Tree,
    fleet_retained: Tree,
    fleet_seen: Tree,
    /// Told of every write to a persistent session (the fleet copies them
    /// to the session's standby node); set once, by the cluster.
    mirror: std::sync::OnceLock<Box<dyn Fn(Mirrored) + Send + Sync>>,
    /// Run by [`Storage::flush`] before it persists (set once, by the cluster).
    before_flush: std::sync::OnceLock<Box<FlushHook>>,
    dirty: AtomicBool,
    /// Held across "clear dirty, persist": a caller that finds nothing
    /// dirty must still wait for a persist in progress that covers its write.
    flushing: parking_lot::Mutex<()>,
}

impl Storage {
    /// Opens (or creates) the data directory. Never panics on a damaged
    /// directory: it returns an error saying what is wrong.
    pub fn open(path: &Path) -> Result<Storage> {
        prepare_data_dir(path)?;
        let mut storage = Storage::with_engine(Box::new(FjallEngine::open(path)?))?;
        storage.path = path.to_path_buf();
        Ok(storage)
    }

    /// A store that lives as long as the value: for tests.
    pub fn in_memory() -> Storage {
        Storage::with_engine(Box::new(MemoryEngine::new())).expect("the in-memory engine opens any tree")
    }

    /// The typed layer over `engine` (its trees are opened here).
    pub fn with_engine(mut engine: Box<dyn Engine>) -> Result<Storage> {
        Ok(Storage {
            path: PathBuf::new(),
            retained: engine.open_tree("retained")?,
            sessions: engine.open_tree("sessions")?,
            deliveries: engine.open_tree("deliveries")?,
            outbox: engine.open_tree("outbox")?,
            directory: engine.open_tree("directory")?,
            replicas: engine.open_tree("replicas")?,
            fleet_retained: engine.open_tree("fleet_retained")?,
            fleet_seen: engine.open_tree("fleet_seen")?,
            mirror: std::sync::OnceLock::new(),
            before_flush: std::sync::OnceLock::new(),
            engine,
            dirty: AtomicBool::new(false),
            flushing: parking_lot::Mutex::new(()),
        })
    }

    /// The data directory (empty for [`Storage::in_memory`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    // --- retained messages -------------------------------------------------

    pub fn put_retained(&self, message: &Message) -> Result<()> {
        self.write_insert(self.retained, message.topic.as_bytes(), &encode(message))?;
        self.mark_dirty();
        Ok(())
    }

    pub fn remove_retained(&self, topic: &str) -> Result<()> {
        self.write_remove(self.retained, topic.as_bytes())?;
        self.mark_dirty();
        Ok(())
    }

    pub fn retained(&self) -> Result<Vec<Message>> {
        self.scan(self.retained, "retained", b"").map(|rows| rows.into_iter().map(|(_, m)| m).collect())
    }

    // --- the fleet's retained messages, at their shards' owners -----------

    /// Stores a fleet retained record (the cluster's packed form) under
    /// its topic.
    pub fn put_fleet_retained(&self, topic: &str, record: &[u8]) -> Result<()> {
        self.write_insert(self.fleet_retained, topic.as_bytes(), record)?;
        self.mark_dirty();
        Ok(())
    }

    pub fn remove_fleet_retained(&self, topic: &str) -> Result<()> {
        self.write_remove(self.fleet_retained, topic.as_bytes())?;
        self.mark_dirty();
        Ok(())
    }

    /// Every fleet retained record, as (topic, record), one at a time (a
    /// node may hold millions).
    pub fn for_each_fleet_retained(&self, mut each: impl FnMut(&[u8], &[u8]) -> Result<()>) -> Result<()> {
        for record in self.engine.scan_prefix(self.fleet_retained, b"")? {
            let (key, value) = record?;
            each(&key, &value)?;
        }
        Ok(())
    }

    // --- sessions ----------------------------------------------------------

    pub fn put_session(&self, client_id: &str, session: &StoredSession) -> Result<()> {
        self.write_insert(self.sessions, client_id.as_bytes(), &encode(session))?;
        self.mark_dirty();
        self.tell_mirror(|| Mirrored::Session(client_id.into(), session.clone()));
        Ok(())
    }

    /// Removes a session and every delivery owed to it.
    pub fn remove_session(&self, client_id: &str) -> Result<()> {
        let mut writes = vec![Write::Remove { tree: self.sessions, key: client_id.as_bytes().to_vec() }];
        self.removals_under(self.deliveries, &delivery_prefix(client_id), &mut writes)?;
        self.engine.commit(writes)?;
        self.mark_dirty();
        self.tell_mirror(|| Mirrored::SessionRemoved(client_id.into()));
        Ok(())
    }

    /// Has `mirror` told of every later write to a persistent session
    /// (called under the session's lock: it must only queue what it gets).
    /// Once; a second mirror is refused.
    pub fn set_mirror(&self, mirror: Box<dyn Fn(Mirrored) + Send + Sync>) -> bool {
        self.mirror.set(mirror).is_ok()
    }

    fn tell_mirror(&self, what: impl FnOnce() -> Mirrored) {
        if let Some(mirror) = self.mirror.get() {
            mirror(what());
        }
    }

    /// Adds to `writes` the removal of every record of `tree` under `prefix`.
    fn removals_under(&self, tree: Tree, prefix: &[u8], writes: &mut Vec<Write>) -> Result<()> {
        for record in self.engine.scan_prefix(tree, prefix)? {
            let (key, _) = record?;
            writes.push(Write::Remove { tree, key });
        }
        Ok(())
    }

    pub fn sessions(&self) -> Result<Vec<(String, StoredSession)>> {
        self.scan(self.sessions, "sessions", b"")?
            .into_iter()
            .map(|(key, s)| Ok((String::from_utf8_lossy(&key).into_owned(), s)))
            .collect()
    }

    // --- deliveries --------------------------------------------------------

    pub fn put_delivery(&self, client_id: &str, seq: u64, delivery: &StoredDelivery) -> Result<()> {
        self.write_insert(self.deliveries, &delivery_key(client_id, seq), &encode(delivery))?;
        self.mark_dirty();
        self.tell_mirror(|| Mirrored::Delivery(client_id.into(), seq, Box::new(delivery.clone())));
        Ok(())
    }

    pub fn remove_delivery(&self, client_id: &str, seq: u64) -> Result<()> {
        self.write_remove(self.deliveries, &delivery_key(client_id, seq))?;
        self.mark_dirty();
        self.tell_mirror(|| Mirrored::DeliveryRemoved(client_id.into(), seq));
        Ok(())
    }

    // --- the fleet's session directory and replicas ------------------------
    // Records another node's sessions: what this node keeps as one of a
    // client's directory owners (a record per client, the cluster's own
    // encoding) and as its standby (a copy of its deliveries). Never
    // mirrored: they are copies already.

    pub fn put_directory(&self, client_id: &str, record: &[u8]) -> Result<()> {
        self.write_insert(self.directory, client_id.as_bytes(), record)?;
        self.mark_dirty();
        Ok(())
    }

    pub fn remove_directory(&self, client_id: &str) -> Result<()> {
        self.write_remove(self.directory, client_id.as_bytes())?;
        self.mark_dirty();
        Ok(())
    }

    /// Every directory record: (client id, record).
    pub fn directory(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        for record in self.engine.scan_prefix(self.directory, b"")? {
            let (key, value) = record?;
            out.push((String::from_utf8_lossy(&key).into_owned(), value));
        }
        Ok(out)
    }

    /// Keeps a copy of delivery `seq` that `home` owes `client_id`. Copies
    /// are kept per home: while a session moves, the node it leaves and the
    /// node it reaches both number deliveries for it.
    pub fn put_replica(&self, client_id: &str, home: u64, seq: u64, delivery: &StoredDelivery) -> Result<()> {
        self.write_insert(self.replicas, &replica_key(client_id, Some(home), Some(seq)), &encode(delivery))?;
        self.mark_dirty();
        Ok(())
    }

    pub fn remove_replica(&self, client_id: &str, home: u64, seq: u64) -> Result<()> {
        self.write_remove(self.replicas, &replica_key(client_id, Some(home), Some(seq)))?;
        self.mark_dirty();
        Ok(())
    }

    /// Replaces the copy of what `home` owes `client_id` with `deliveries`
    /// (`home` = `None`: every home's copy).
    pub fn replace_replicas(
        &self,
        client_id: &str,
        home: Option<u64>,
        deliveries: &[(u64, StoredDelivery)],
    ) -> Result<()> {
        let mut writes = Vec::new();
        self.removals_under(self.replicas, &replica_key(client_id, home, None), &mut writes)?;
        if let Some(home) = home {
            for (seq, delivery) in deliveries {
                let key = replica_key(client_id, Some(home), Some(*seq));
                writes.push(Write::Insert { tree: self.replicas, key, value: encode(delivery) });
            }
        }
        self.engine.commit(writes)?;
        self.mark_dirty();
        Ok(())
    }

    /// Every copy kept of what is owed to `client_id`: per home, in order.
    pub fn replicas(&self, client_id: &str) -> Result<Vec<StoredDelivery>> {
        let rows = self.scan(self.replicas, "replicas", &replica_key(client_id, None, None))?;
        Ok(rows.into_iter().map(|(_, delivery)| delivery).collect())
    }

    /// The deliveries owed to `client_id`, in sequence order.
    pub fn deliveries(&self, client_id: &str) -> Result<Vec<(u64, StoredDelivery)>> {
        let (name, prefix) = ("deliveries", delivery_prefix(client_id));
        self.scan(self.deliveries, name, &prefix)?
            .into_iter()
            .map(|(key, d)| {
                let seq = key
                    .get(prefix.len()..)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .ok_or(StorageError::Record { keyspace: name, detail: "bad key".into() })?;
                Ok((seq, d))
            })
            .collect()
    }

    // --- cluster outbox ----------------------------------------------------

    /// Keeps a QoS 1/2 message forwarded to other nodes until they
    /// acknowledge it (`record` is the cluster's own encoding).
    pub fn put_outbox(&self, id: u64, record: &[u8]) -> Result<()> {
        self.write_insert(self.outbox, &id.to_be_bytes(), record)?;
        self.mark_dirty();
        Ok(())
    }

    /// The write of outbox record `id` (for [`Storage::commit`]).
    pub fn outbox_write(&self, id: u64, record: &[u8]) -> Write {
        Write::Insert { tree: self.outbox, key: id.to_be_bytes().to_vec(), value: record.to_vec() }
    }

    /// The removal of outbox record `id` (for [`Storage::commit`]).
    pub fn outbox_removal(&self, id: u64) -> Write {
        Write::Remove { tree: self.outbox, key: id.to_be_bytes().to_vec() }
    }

    /// Applies `writes` as one atomic batch.
    pub fn commit(&self, writes: Vec<Write>) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        self.engine.commit(writes)?;
        self.mark_dirty();
        Ok(())
    }

    /// Sets what every [`Storage::flush`] runs first, once: the cluster's
    /// outbox writes the messages it holds unwritten (group commit).
    pub fn before_flush(&self, hook: Box<FlushHook>) -> bool {
        self.before_flush.set(hook).is_ok()
    }

    pub fn remove_outbox(&self, id: u64) -> Result<()> {
        self.write_remove(self.outbox, &id.to_be_bytes())?;
        self.mark_dirty();
        Ok(())
    }

    /// Every outbox record, oldest id first.
    pub fn outbox(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for record in self.engine.scan_prefix(self.outbox, b"")? {
            let (key, value) = record?;
            let id = <[u8; 8]>::try_from(key.as_slice())
                .map(u64::from_be_bytes)
                .map_err(|_| StorageError::Record { keyspace: "outbox", detail: "bad key".into() })?;
            out.push((id, value));
        }
        Ok(out)
    }

    // --- durability --------------------------------------------------------

    /// Runs `f`, and makes every write it makes to this storage (on this
    /// thread), with `extra`, one atomic batch: a restart sees all or none
    /// of them. (Used to record that a QoS 2 message was delivered in the
    /// same batch as its deliveries.)
    pub fn in_batch<T>(&self, extra: Vec<Write>, f: impl FnOnce() -> T) -> Result<T> {
        /// Puts the outer batch back however the scope ends (a panic in
        /// `f` included), so no later write on this thread is captured.
        struct Scope(Option<(usize, Vec<Write>)>);
        impl Drop for Scope {
            fn drop(&mut self) {
                let outer = self.0.take();
                let _ = BATCH.try_with(|b| *b.borrow_mut() = outer);
            }
        }
        let me = self as *const Storage as usize;
        let scope = Scope(BATCH.with(|b| b.borrow_mut().replace((me, Vec::new()))));
        let result = f();
        let taken = BATCH.with(|b| b.borrow_mut().take());
        drop(scope);
        let (_, mut writes) = taken.expect("ours");
        writes.extend(extra);
        if !writes.is_empty() {
            self.engine.commit(writes)?;
            self.mark_dirty();
        }
        Ok(result)
    }

    fn batching(&self, write: Write) -> std::result::Result<(), Write> {
        let me = self as *const Storage as usize;
        BATCH.with(|b| match &mut *b.borrow_mut() {
            Some((owner, writes)) if *owner == me => {
                writes.push(write);
                Ok(())
            }
            _ => Err(write),
        })
    }

    fn write_insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<()> {
        match self.batching(Write::Insert { tree, key: key.to_vec(), value: value.to_vec() }) {
            Ok(()) => Ok(()),
            Err(_) => self.engine.insert(tree, key, value),
        }
    }

    fn write_remove(&self, tree: Tree, key: &[u8]) -> Result<()> {
        match self.batching(Write::Remove { tree, key: key.to_vec() }) {
            Ok(()) => Ok(()),
            Err(_) => self.engine.remove(tree, key),
        }
    }

    /// The write recording that QoS 2 message `id` of node `origin` was
    /// delivered here at `at_ms` (for [`Storage::in_batch`]).
    pub fn seen_write(&self, origin: u64, id: u64, at_ms: u64) -> Write {
        Write::Insert { tree: self.fleet_seen, key: seen_key(origin, id), value: at_ms.to_be_bytes().to_vec() }
    }

    /// The removal of the record [`Storage::seen_write`] made (for
    /// [`Storage::commit`]).
    pub fn seen_removal(&self, origin: u64, id: u64) -> Write {
        Write::Remove { tree: self.fleet_seen, key: seen_key(origin, id) }
    }

    /// Every recorded QoS 2 delivery: ((origin, id), when).
    pub fn seen(&self) -> Result<Vec<((u64, u64), u64)>> {
        let mut out = Vec::new();
        for record in self.engine.scan_prefix(self.fleet_seen, b"")? {
            let (key, value) = record?;
            let number = |b: &[u8]| b.try_into().map(u64::from_be_bytes).ok();
            match (key.get(..8).and_then(number), key.get(8..16).and_then(number), number(&value)) {
                (Some(origin), Some(id), Some(at)) if key.len() == 16 => out.push(((origin, id), at)),
                _ => {
                    return Err(StorageError::Record {
                        keyspace: "fleet_seen",
                        detail: "not two numbers and a time".into(),
                    })
                }
            }
        }
        Ok(out)
    }

    fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// Whether writes were made since the last flush.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Hands buffered journal writes to the operating system, so they
    /// survive the process being killed. Cheap when nothing was written.
    pub fn flush(&self) -> Result<()> {
        let _flushing = self.flushing.lock();
        if let Some(hook) = self.before_flush.get() {
            hook(self)?;
        }
        if self.dirty.swap(false, Ordering::AcqRel) {
            if let Err(err) = self.engine.persist(Durability::Buffer) {
                // Still not persisted: the next flush tries again (and
                // fails too, rather than answering Ok over unsaved writes).
                self.dirty.store(true, Ordering::Release);
                return Err(err);
            }
        }
        Ok(())
    }

    /// Flushes and fsyncs: used at shutdown.
    pub fn sync(&self) -> Result<()> {
        let _flushing = self.flushing.lock();
        // What the hook could not write is lost; the rest is still synced.
        let written = self.before_flush.get().map_or(Ok(()), |hook| hook(self));
        self.dirty.store(false, Ordering::Release);
        if let Err(err) = self.engine.persist(Durability::Sync) {
            self.dirty.store(true, Ordering::Release);
            return Err(err);
        }
        written
    }

    /// The records of `tree` under `prefix`, decoded (`name` is for errors).
    fn scan<T: DeserializeOwned>(&self, tree: Tree, name: &'static str, prefix: &[u8]) -> Result<Vec<(Vec<u8>, T)>> {
        let mut out = Vec::new();
        for record in self.engine.scan_prefix(tree, prefix)? {
            let (key, value) = record?;
            let record = rmp_serde::from_slice(&value)
                .map_err(|err| StorageError::Record { keyspace: name, detail: err.to_string() })?;
            out.push((key, record));
        }
        Ok(out)
    }
}

thread_local! {
    /// The batch [`Storage::in_batch`] collects on this thread: the storage
    /// it is for (its address) and the writes so far.
    static BATCH: std::cell::RefCell<Option<(usize, Vec<Write>)>> = const { std::cell::RefCell::new(None) };
}

fn seen_key(origin: u64, id: u64) -> Vec<u8> {
    let mut key = origin.to_be_bytes().to_vec();
    key.extend_from_slice(&id.to_be_bytes());
    key
}

fn delivery_prefix(client_id: &str) -> Vec<u8> {
    // MQTT strings cannot hold U+0000, so 0 ends the client id unambiguously.
    let mut key = Vec::with_capacity(client_id.len() + 9);
    key.extend_from_slice(client_id.as_bytes());
    key.push(0);
    key
}

fn delivery_key(client_id: &str, seq: u64) -> Vec<u8> {
    let mut key = delivery_prefix(client_id);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// A copy's key: the client's prefix, then the home's id and the
/// delivery's number there (each 8 bytes, big-endian, so a scan is in
/// order); cut short for the prefix of one home's or every home's copies.
fn replica_key(client_id: &str, home: Option<u64>, seq: Option<u64>) -> Vec<u8> {
    let mut key = delivery_prefix(client_id);
    for part in [home, seq].into_iter().flatten() {
        key.extend_from_slice(&part.to_be_bytes());
    }
    key
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(value).expect("in-memory records always encode")
}
