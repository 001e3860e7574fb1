//! The on-disk [`Engine`]: fjall (an LSM tree with a journal) in the data
//! directory's `store/`, one fjall keyspace per tree.
//!
//! Boundary: the only file that names fjall. It turns fjall's failures
//! into [`StorageError`]s a user can act on: a directory in use by another
//! process, a damaged store (an error or even a panic inside fjall), never
//! a crash.

use super::engine::{Durability, Engine, Records, Tree, Write};
use super::{Result, StorageError};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

pub struct FjallEngine {
    /// The data directory, named in errors.
    data_dir: PathBuf,
    db: Database,
    trees: Vec<(&'static str, Keyspace)>,
}

impl From<fjall::Error> for StorageError {
    fn from(err: fjall::Error) -> StorageError {
        StorageError::Store(Box::new(err))
    }
}

/// The most a tree keeps in memory before it writes a segment to disk.
/// fjall's default (64 MiB of keys and values, some three times that in
/// memory with the skiplist and allocations) is per tree, a fixed cost of
/// every node however little it stores; 8 MiB keeps writes batched.
const MEMTABLE_BYTES: u64 = 8 << 20;
/// The journals' size past which fjall flushes the trees holding the
/// oldest one back (its default, 512 MiB, is disk a node holds on to
/// however little it stores; 64 MiB is fjall's minimum).
const JOURNAL_BYTES: u64 = 64 << 20;

impl FjallEngine {
    /// Opens (or creates) the store in `data_dir/store`. The caller has
    /// checked the data directory's format ([`super::prepare_data_dir`]).
    pub fn open(data_dir: &Path) -> Result<FjallEngine> {
        let store = data_dir.join("store");
        let db = guarded(data_dir, || Database::builder(&store).max_journaling_size(JOURNAL_BYTES).open())?;
        Ok(FjallEngine { data_dir: data_dir.to_path_buf(), db, trees: Vec::new() })
    }

    fn keyspace(&self, tree: Tree) -> &Keyspace {
        &self.trees[tree.0].1
    }
}

/// Runs one step of opening the store. fjall reports damage as errors, but
/// a store written by something else can still reach an assertion; never
/// let that reach the user.
fn guarded<T>(data_dir: &Path, open: impl FnOnce() -> fjall::Result<T>) -> Result<T> {
    let corrupt = |detail: String| StorageError::Corrupt { path: data_dir.to_path_buf(), detail };
    // Unwind safety: on a panic the half-opened store is dropped, never used.
    match std::panic::catch_unwind(AssertUnwindSafe(open)) {
        Ok(Ok(opened)) => Ok(opened),
        Ok(Err(fjall::Error::Locked)) => Err(StorageError::Io {
            path: data_dir.to_path_buf(),
            source: std::io::Error::other("in use by another kadmq process"),
        }),
        Ok(Err(err)) => Err(corrupt(err.to_string())),
        Err(_) => Err(corrupt("the store panicked while opening".into())),
    }
}

impl Engine for FjallEngine {
    fn open_tree(&mut self, name: &'static str) -> Result<Tree> {
        if let Some(index) = self.trees.iter().position(|(n, _)| *n == name) {
            return Ok(Tree(index));
        }
        let options = || KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES);
        let keyspace = guarded(&self.data_dir, || self.db.keyspace(name, options))?;
        self.trees.push((name, keyspace));
        Ok(Tree(self.trees.len() - 1))
    }

    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.keyspace(tree).get(key)?.map(|value| value.to_vec()))
    }

    fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<()> {
        Ok(self.keyspace(tree).insert(key, value)?)
    }

    fn remove(&self, tree: Tree, key: &[u8]) -> Result<()> {
        Ok(self.keyspace(tree).remove(key)?)
    }

    fn scan_prefix<'a>(&'a self, tree: Tree, prefix: &[u8]) -> Result<Records<'a>> {
        let records = self.keyspace(tree).prefix(prefix).map(|guard| {
            let (key, value) = guard.into_inner()?;
            Ok((key.to_vec(), value.to_vec()))
        });
        Ok(Box::new(records))
    }

    fn commit(&self, writes: Vec<Write>) -> Result<()> {
        let mut batch = self.db.batch();
        for write in writes {
            match write {
                Write::Insert { tree, key, value } => batch.insert(self.keyspace(tree), key, value),
                Write::Remove { tree, key } => batch.remove(self.keyspace(tree), key),
            }
        }
        Ok(batch.commit()?)
    }

    fn persist(&self, durability: Durability) -> Result<()> {
        let mode = match durability {
            Durability::Buffer => PersistMode::Buffer,
            Durability::Sync => PersistMode::SyncAll,
        };
        Ok(self.db.persist(mode)?)
    }
}
