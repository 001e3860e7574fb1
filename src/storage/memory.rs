//! An [`Engine`] in memory, for unit tests: one `BTreeMap` per tree behind
//! one lock.
//!
//! Boundary: nothing survives the value; [`Engine::persist`] has nothing to
//! do. One lock over every tree makes a batch atomic for free.

use super::engine::{Durability, Engine, Records, Tree, Write};
use super::Result;
use parking_lot::RwLock;
use std::collections::BTreeMap;

#[derive(Default)]
pub struct MemoryEngine {
    names: Vec<&'static str>,
    trees: RwLock<Vec<BTreeMap<Vec<u8>, Vec<u8>>>>,
}

impl MemoryEngine {
    pub fn new() -> MemoryEngine {
        MemoryEngine::default()
    }
}

impl Engine for MemoryEngine {
    fn open_tree(&mut self, name: &'static str) -> Result<Tree> {
        if let Some(index) = self.names.iter().position(|&n| n == name) {
            return Ok(Tree(index));
        }
        self.names.push(name);
        self.trees.get_mut().push(BTreeMap::new());
        Ok(Tree(self.names.len() - 1))
    }

    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.trees.read()[tree.0].get(key).cloned())
    }

    fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<()> {
        self.trees.write()[tree.0].insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn remove(&self, tree: Tree, key: &[u8]) -> Result<()> {
        self.trees.write()[tree.0].remove(key);
        Ok(())
    }

    fn scan_prefix<'a>(&'a self, tree: Tree, prefix: &[u8]) -> Result<Records<'a>> {
        // Copied out under the lock: a scan must not hold it while the
        // caller writes (remove_session scans, then commits).
        let records: Vec<_> = self.trees.read()[tree.0]
            .range(prefix.to_vec()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, value)| Ok((key.clone(), value.clone())))
            .collect();
        Ok(Box::new(records.into_iter()))
    }

    fn commit(&self, writes: Vec<Write>) -> Result<()> {
        let mut trees = self.trees.write();
        for write in writes {
            match write {
                Write::Insert { tree, key, value } => {
                    trees[tree.0].insert(key, value);
                }
                Write::Remove { tree, key } => {
                    trees[tree.0].remove(&key);
                }
            }
        }
        Ok(())
    }

    fn persist(&self, _durability: Durability) -> Result<()> {
        Ok(())
    }
}
