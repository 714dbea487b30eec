//! Wrapped data keys, one small file per customer, outside sled.
//!
//! sled is log-structured: a removed value lingers in old segments until they are reused, so a
//! wrapped data key removed from sled could still be read off the disk. Keeping each key in its
//! own file lets erasure overwrite it in place, flush, and unlink it. Every change is durable when
//! it returns (write a temporary file, fsync, rename, fsync the directory).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use cubby_core::CustomerId;
use cubby_store::{CustomerLocks, Result, StoreError};

/// The key directory.
#[derive(Debug)]
pub(crate) struct KeyDir {
    dir: PathBuf,
    /// Serialise a customer's read-modify-write sequences within the process (sled's lock
    /// keeps other processes out of the whole store), one lock per stripe of customers, so that
    /// one customer's `fsync`s hold up no other customer's.
    locks: CustomerLocks,
}

fn io_error(err: io::Error) -> StoreError {
    if err.raw_os_error() == Some(28) || err.kind() == io::ErrorKind::StorageFull {
        return StoreError::Full;
    }
    StoreError::Backend(Box::new(err))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(name: &str) -> Option<[u8; 16]> {
    if name.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Writes key files read by [`KeyDir::read_all`] into `to` (created), durably; returns how many.
pub(crate) fn write_all(to: &Path, keys: &[(std::ffi::OsString, Vec<u8>)]) -> Result<usize> {
    fs::create_dir_all(to).map_err(io_error)?;
    for (name, bytes) in keys {
        let mut file = File::create(to.join(name)).map_err(io_error)?;
        file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io_error)?;
    }
    sync_dir(to).map_err(io_error)?;
    Ok(keys.len())
}

/// Makes the entries of `dir` (files created, renamed or removed in it) durable. Windows has no
/// such call (and opens no directory as a file); NTFS journals its directory changes itself.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

impl KeyDir {
    pub(crate) fn open(dir: PathBuf) -> Result<Self> {
        fs::create_dir_all(&dir).map_err(io_error)?;
        Ok(Self { dir, locks: CustomerLocks::default() })
    }

    /// Every key file's name and contents (not a temporary file of a write in progress).
    pub(crate) fn read_all(&self) -> Result<Vec<(std::ffi::OsString, Vec<u8>)>> {
        let mut all = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_error)? {
            let entry = entry.map_err(io_error)?;
            let name = entry.file_name();
            if name.to_str().and_then(unhex).is_some() {
                all.push((name, fs::read(entry.path()).map_err(io_error)?));
            }
        }
        Ok(all)
    }

    fn path(&self, customer: &CustomerId) -> PathBuf {
        self.dir.join(hex(customer.as_bytes()))
    }

    pub(crate) fn get(&self, customer: &CustomerId) -> Result<Option<Vec<u8>>> {
        match fs::read(self.path(customer)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(e)),
        }
    }

    /// Writes `bytes` as the customer's key, replacing any, durably.
    fn write(&self, customer: &CustomerId, bytes: &[u8]) -> Result<()> {
        let path = self.path(customer);
        let tmp = path.with_extension("tmp");
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_error)?;
        file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io_error)?;
        fs::rename(&tmp, &path).and_then(|()| sync_dir(&self.dir)).map_err(io_error)
    }

    pub(crate) fn put_if_absent(&self, customer: &CustomerId, wrapped: &[u8]) -> Result<Vec<u8>> {
        let _guard = self.locks.lock(customer);
        if let Some(existing) = self.get(customer)? {
            return Ok(existing);
        }
        self.write(customer, wrapped)?;
        Ok(wrapped.to_vec())
    }

    pub(crate) fn replace(
        &self,
        customer: &CustomerId,
        expected: &[u8],
        new: &[u8],
    ) -> Result<bool> {
        let _guard = self.locks.lock(customer);
        if self.get(customer)?.as_deref() != Some(expected) {
            return Ok(false);
        }
        self.write(customer, new)?;
        Ok(true)
    }

    /// Overwrites the key file with zeros in place, flushes, and unlinks it.
    pub(crate) fn destroy(&self, customer: &CustomerId) -> Result<()> {
        let _guard = self.locks.lock(customer);
        let path = self.path(customer);
        let mut file = match OpenOptions::new().write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error(e)),
        };
        let len = file.metadata().map_err(io_error)?.len();
        let zeros = vec![0u8; usize::try_from(len).unwrap_or(0)];
        file.write_all(&zeros).and_then(|()| file.sync_all()).map_err(io_error)?;
        drop(file);
        fs::remove_file(&path).and_then(|()| sync_dir(&self.dir)).map_err(io_error)
    }

    pub(crate) fn list(&self) -> Result<Vec<CustomerId>> {
        let mut customers = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_error)? {
            let name = entry.map_err(io_error)?.file_name();
            if let Some(id) = name.to_str().and_then(unhex) {
                customers.push(CustomerId::from_bytes(id));
            }
        }
        customers.sort();
        Ok(customers)
    }
}
