//! Durable state in the data directory: retained messages, persistent
//! sessions and their queued / unacknowledged messages.
//!
//! A small adapter over fjall (one keyspace per kind of record, values in
//! MessagePack) so the broker never sees the store. Writes go to fjall's
//! journal; [`Storage::flush`] pushes the journal to the operating system,
//! which is what makes a write survive a SIGKILL. The broker calls it before
//! it acknowledges anything it promised to keep.
//!
//! Layout of the data directory:
//! - `FORMAT`: the text `kadmq-data <version>`; checked before anything else
//!   so an unknown or foreign directory is refused with a clear error;
//! - `store/`: the fjall database.

use crate::broker::message::Message;
use crate::protocol::{QoS, SubscriptionOptions};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Bump when the on-disk records change incompatibly.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_FILE: &str = "FORMAT";

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
    #[error("store: {0}")]
    Store(#[from] fjall::Error),
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

pub struct Storage {
    path: PathBuf,
    db: Database,
    retained: Keyspace,
    sessions: Keyspace,
    deliveries: Keyspace,
    outbox: Keyspace,
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
        let store = path.join("store");
        let corrupt = |detail: String| StorageError::Corrupt { path: path.to_path_buf(), detail };
        // fjall reports damage as errors, but a store written by something
        // else can still reach an assertion; never let that reach the user.
        let opened = std::panic::catch_unwind(|| -> std::result::Result<_, fjall::Error> {
            let db = Database::builder(&store).open()?;
            let retained = db.keyspace("retained", KeyspaceCreateOptions::default)?;
            let sessions = db.keyspace("sessions", KeyspaceCreateOptions::default)?;
            let deliveries = db.keyspace("deliveries", KeyspaceCreateOptions::default)?;
            let outbox = db.keyspace("outbox", KeyspaceCreateOptions::default)?;
            Ok((db, retained, sessions, deliveries, outbox))
        });
        let (db, retained, sessions, deliveries, outbox) = match opened {
            Ok(Ok(parts)) => parts,
            Ok(Err(fjall::Error::Locked)) => {
                return Err(StorageError::Io {
                    path: path.to_path_buf(),
                    source: std::io::Error::other("in use by another kadmq process"),
                })
            }
            Ok(Err(err)) => return Err(corrupt(err.to_string())),
            Err(_) => return Err(corrupt("the store panicked while opening".into())),
        };
        Ok(Storage {
            path: path.to_path_buf(),
            db,
            retained,
            sessions,
            deliveries,
            outbox,
            dirty: AtomicBool::new(false),
            flushing: parking_lot::Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    // --- retained messages -------------------------------------------------

    pub fn put_retained(&self, message: &Message) -> Result<()> {
        self.retained.insert(message.topic.as_bytes(), encode(message))?;
        self.mark_dirty();
        Ok(())
    }

    pub fn remove_retained(&self, topic: &str) -> Result<()> {
        self.retained.remove(topic.as_bytes())?;
        self.mark_dirty();
        Ok(())
    }

    pub fn retained(&self) -> Result<Vec<Message>> {
        scan(&self.retained, "retained", b"").map(|rows| rows.into_iter().map(|(_, m)| m).collect())
    }

    // --- sessions ----------------------------------------------------------

    pub fn put_session(&self, client_id: &str, session: &StoredSession) -> Result<()> {
        self.sessions.insert(client_id.as_bytes(), encode(session))?;
        self.mark_dirty();
        Ok(())
    }

    /// Removes a session and every delivery owed to it.
    pub fn remove_session(&self, client_id: &str) -> Result<()> {
        let mut batch = self.db.batch();
        batch.remove(&self.sessions, client_id.as_bytes());
        for guard in self.deliveries.prefix(delivery_prefix(client_id)) {
            batch.remove(&self.deliveries, guard.key()?);
        }
        batch.commit()?;
        self.mark_dirty();
        Ok(())
    }

    pub fn sessions(&self) -> Result<Vec<(String, StoredSession)>> {
        scan(&self.sessions, "sessions", b"")?
            .into_iter()
            .map(|(key, s)| Ok((String::from_utf8_lossy(&key).into_owned(), s)))
            .collect()
    }

    // --- deliveries --------------------------------------------------------

    pub fn put_delivery(&self, client_id: &str, seq: u64, delivery: &StoredDelivery) -> Result<()> {
        self.deliveries.insert(delivery_key(client_id, seq), encode(delivery))?;
        self.mark_dirty();
        Ok(())
    }

    pub fn remove_delivery(&self, client_id: &str, seq: u64) -> Result<()> {
        self.deliveries.remove(delivery_key(client_id, seq))?;
        self.mark_dirty();
        Ok(())
    }

    /// The deliveries owed to `client_id`, in sequence order.
    pub fn deliveries(&self, client_id: &str) -> Result<Vec<(u64, StoredDelivery)>> {
        let prefix = delivery_prefix(client_id);
        scan(&self.deliveries, "deliveries", &prefix)?
            .into_iter()
            .map(|(key, d)| {
                let seq = key
                    .get(prefix.len()..)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .ok_or(StorageError::Record { keyspace: "deliveries", detail: "bad key".into() })?;
                Ok((seq, d))
            })
            .collect()
    }

    // --- cluster outbox ----------------------------------------------------

    /// Keeps a QoS 1/2 message forwarded to other nodes until they
    /// acknowledge it (`record` is the cluster's own encoding).
    pub fn put_outbox(&self, id: u64, record: &[u8]) -> Result<()> {
        self.outbox.insert(id.to_be_bytes(), record)?;
        self.mark_dirty();
        Ok(())
    }

    pub fn remove_outbox(&self, id: u64) -> Result<()> {
        self.outbox.remove(id.to_be_bytes())?;
        self.mark_dirty();
        Ok(())
    }

    /// Every outbox record, oldest id first.
    pub fn outbox(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for guard in self.outbox.prefix(b"") {
            let (key, value) = guard.into_inner()?;
            let id = <[u8; 8]>::try_from(&*key)
                .map(u64::from_be_bytes)
                .map_err(|_| StorageError::Record { keyspace: "outbox", detail: "bad key".into() })?;
            out.push((id, value.to_vec()));
        }
        Ok(out)
    }

    // --- durability --------------------------------------------------------

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
        if self.dirty.swap(false, Ordering::AcqRel) {
            self.db.persist(PersistMode::Buffer)?;
        }
        Ok(())
    }

    /// Flushes and fsyncs: used at shutdown.
    pub fn sync(&self) -> Result<()> {
        let _flushing = self.flushing.lock();
        self.dirty.store(false, Ordering::Release);
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }
}

/// Creates the data directory if needed and checks (or, when empty, writes)
/// its `FORMAT` file. Anything that puts files in the data directory calls
/// this first, so a directory is never half kadmq's.
pub fn prepare_data_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|source| StorageError::Io { path: path.to_path_buf(), source })?;
    check_format(path)
}

fn check_format(path: &Path) -> Result<()> {
    let io = |source| StorageError::Io { path: path.to_path_buf(), source };
    let format_file = path.join(FORMAT_FILE);
    let expected = format!("kadmq-data {FORMAT_VERSION}");
    match std::fs::read_to_string(&format_file) {
        Ok(found) if found.trim() == expected => Ok(()),
        Ok(found) => Err(StorageError::UnknownFormat { path: path.to_path_buf(), found: found.trim().to_string() }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let empty = std::fs::read_dir(path).map_err(io)?.next().is_none();
            if !empty {
                return Err(StorageError::Foreign { path: path.to_path_buf() });
            }
            std::fs::write(&format_file, format!("{expected}\n")).map_err(io)
        }
        Err(err) => Err(io(err)),
    }
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

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(value).expect("in-memory records always encode")
}

fn scan<T: DeserializeOwned>(keyspace: &Keyspace, name: &'static str, prefix: &[u8]) -> Result<Vec<(Vec<u8>, T)>> {
    let mut out = Vec::new();
    for guard in keyspace.prefix(prefix) {
        let (key, value) = guard.into_inner()?;
        let record = rmp_serde::from_slice(&value)
            .map_err(|err| StorageError::Record { keyspace: name, detail: err.to_string() })?;
        out.push((key.to_vec(), record));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MessageProperties;
    use bytes::Bytes;

    fn message(topic: &str) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"payload"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: MessageProperties { content_type: Some("text/plain".into()), ..Default::default() },
            expires_at_ms: Some(42),
            origin: Some("c".into()),
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
}
