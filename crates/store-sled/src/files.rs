//! What `sled::Db::flush` leaves undone, done after it.
//!
//! sled 0.34 makes its log stable with `sync_file_range` on Linux (sled#928), which flushes
//! neither the drive's volatile write cache nor the file's metadata (sled#1452, open): its own
//! background thread `fsync`s the log only every half second. And it writes an item too large
//! for a quarter of a log segment (128 KiB by default: a large chunk or snapshot) to a file of its
//! own under `blobs/`, which nothing syncs. Either way a change the server acknowledged could be
//! lost to a power cut or a kernel crash. So after every flush the store `fdatasync`s the log and
//! `fsync`s each blob file it has not synced yet, then the blob directory.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::keys::sync_dir;

/// sled's files in its directory.
#[derive(Debug)]
pub(crate) struct SledFiles {
    /// The log, which holds everything but blobs.
    log: File,
    blobs: PathBuf,
    /// Blob files synced already, by name (sled names them by log position and never rewrites
    /// one).
    synced: Mutex<HashSet<OsString>>,
}

impl SledFiles {
    /// Opens the files of the sled database in `dir` (opened by sled already), and makes its
    /// configuration, which sled writes without a sync, and the directory entries durable.
    pub(crate) fn open(dir: &Path) -> io::Result<Self> {
        // Writable: Windows flushes a file only through a handle that may write to it.
        let writable = |name| File::options().read(true).write(true).open(dir.join(name));
        writable("conf")?.sync_all()?;
        let log = writable("db")?;
        sync_dir(dir)?;
        Ok(Self { log, blobs: dir.join("blobs"), synced: Mutex::default() })
    }

    /// Makes what sled has flushed durable: call after `sled::Db::flush`. Returns how many blob
    /// files it synced.
    pub(crate) fn sync(&self) -> io::Result<usize> {
        self.log.sync_data()?;
        let mut synced = self.synced.lock().unwrap_or_else(PoisonError::into_inner);
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(err) => return Err(err),
        };
        let mut present = HashSet::with_capacity(synced.len());
        let mut fresh = 0;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !synced.contains(&name) {
                match File::options().read(true).write(true).open(entry.path()) {
                    Ok(file) => file.sync_all()?,
                    // Removed meanwhile: sled wrote a newer version of what it held.
                    Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                    Err(err) => return Err(err),
                }
                fresh += 1;
            }
            present.insert(name);
        }
        if fresh > 0 {
            sync_dir(&self.blobs)?;
        }
        *synced = present;
        Ok(fresh)
    }
}
