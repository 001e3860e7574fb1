//! The key-value engine under [`Storage`](super::Storage): named trees of
//! byte keys and values, prefix scans, atomic batches, persist.
//!
//! Boundary: bytes only. What a key or a value means (client ids, sequence
//! numbers, MessagePack records) is the typed layer's business; an engine
//! only keeps what it is given and says when that is durable. Modelled on
//! garage's `db` crate (`src/db/lib.rs`): one small trait, one
//! implementation per store ([`FjallEngine`](super::FjallEngine) on disk,
//! [`MemoryEngine`](super::MemoryEngine) for unit tests).

use super::Result;

/// A tree opened with [`Engine::open_tree`]: a handle valid for the engine
/// that returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tree(pub(super) usize);

/// Records as scans return them, in key order.
pub type Records<'a> = Box<dyn Iterator<Item = Result<(Vec<u8>, Vec<u8>)>> + 'a>;

/// One write of a batch given to [`Engine::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Insert { tree: Tree, key: Vec<u8>, value: Vec<u8> },
    Remove { tree: Tree, key: Vec<u8> },
}

/// How far [`Engine::persist`] pushes the writes made so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Handed to the operating system: survives the process being killed.
    Buffer,
    /// Flushed to the disk (fsync): survives the machine losing power.
    Sync,
}

pub trait Engine: Send + Sync {
    /// Opens the tree called `name`, creating it if needed; the same name
    /// gives the same tree. Trees are opened before the engine is shared.
    fn open_tree(&mut self, name: &'static str) -> Result<Tree>;

    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>>;

    fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<()>;

    fn remove(&self, tree: Tree, key: &[u8]) -> Result<()>;

    /// Every record of `tree` whose key starts with `prefix` (all of them
    /// for an empty prefix), in key order.
    fn scan_prefix<'a>(&'a self, tree: Tree, prefix: &[u8]) -> Result<Records<'a>>;

    /// Applies `writes` at once: a reader, and a restart, sees all or none.
    fn commit(&self, writes: Vec<Write>) -> Result<()>;

    /// Makes the writes so far as durable as `durability` says.
    fn persist(&self, durability: Durability) -> Result<()>;
}
