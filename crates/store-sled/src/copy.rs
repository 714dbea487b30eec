//! A copy of the whole store, taken between two writes: every write holds the store's gate
//! shared, a copy holds it alone while it takes the entries and keys.

use std::path::Path;

use cubby_store::{Result, StoreError};

use crate::{SledStore, backend, files, keys};

/// What [`SledStore::copy_to`] copied.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct Copied {
    /// Entries copied from sled, in every tree.
    pub entries: u64,
    /// Bytes of keys and values copied from sled.
    pub bytes: u64,
    /// Wrapped data keys copied.
    pub keys: usize,
}

/// The database for a write, held open to a copy of the store until the write is done.
pub(crate) struct Writing<'a> {
    db: &'a sled::Db,
    _gate: Entered<'a>,
}

impl<'a> Writing<'a> {
    /// `db` for a write, holding `gate` shared.
    pub(crate) fn new(db: &'a sled::Db, gate: &'a parking_lot::RwLock<()>) -> Self {
        Self { db, _gate: Entered::new(gate) }
    }
}

thread_local! {
    /// How many holds of a store's gate this thread has (a write inside a write).
    static HOLDS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// A shared hold of the gate. The outermost hold on a thread queues behind a waiting copy (so a
/// stream of writes cannot starve it); a nested one does not (which would deadlock).
pub(crate) struct Entered<'a> {
    _guard: parking_lot::RwLockReadGuard<'a, ()>,
}

impl<'a> Entered<'a> {
    pub(crate) fn new(gate: &'a parking_lot::RwLock<()>) -> Self {
        let holds = HOLDS.get();
        let guard = if holds == 0 { gate.read() } else { gate.read_recursive() };
        HOLDS.set(holds + 1);
        Self { _guard: guard }
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        HOLDS.set(HOLDS.get().saturating_sub(1));
    }
}

impl std::ops::Deref for Writing<'_> {
    type Target = sled::Db;

    fn deref(&self) -> &sled::Db {
        self.db
    }
}

impl SledStore {
    /// Copies the whole store into the directory `to` (a new store directory: `sled/` and
    /// `keys/`), consistent: writes wait while its entries and keys are taken (reads go on),
    /// so the copy holds the store as it was between two writes, which is a state a crash
    /// could leave and the store opens from. The copy is then flushed and synced with writes
    /// going again. The values are copied as they are, sealed: the copy is as unreadable as
    /// the store without the master key.
    pub fn copy_to(&self, to: &Path) -> Result<Copied> {
        self.healthy()?;
        let io = |e: std::io::Error| StoreError::Backend(Box::new(e));
        std::fs::create_dir_all(to).map_err(io)?;
        let copy = sled::Config::new().path(to.join("sled")).open().map_err(backend)?;
        let (mut entries, mut bytes) = (0u64, 0u64);
        let keys = {
            let _alone = self.gate.write();
            for name in self.db.tree_names() {
                let (from, into) = (
                    self.db.open_tree(&name).map_err(backend)?,
                    copy.open_tree(&name).map_err(backend)?,
                );
                for entry in from.iter() {
                    let (k, v) = entry.map_err(backend)?;
                    entries += 1;
                    bytes += (k.len() + v.len()) as u64;
                    into.insert(k, v).map_err(backend)?;
                }
            }
            self.keys.read_all()?
        };
        copy.flush().map_err(backend)?;
        drop(copy);
        // What sled's flush leaves undone (see `files.rs`), for the copy too.
        files::SledFiles::open(&to.join("sled")).and_then(|f| f.sync()).map_err(io)?;
        let keys = keys::write_all(&to.join("keys"), &keys)?;
        keys::sync_dir(to).map_err(io)?;
        Ok(Copied { entries, bytes, keys })
    }
}
