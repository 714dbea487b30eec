//! `cubby-server restore`: a store accepted as it is, in a new epoch.

use std::path::PathBuf;
use std::sync::Arc;

use cubby_crypto::keys::{Keyring, MasterSecret};
use cubby_store::{EncryptedStore, Keys, StoreError};
use cubby_store_sled::{SledStore, WitnessDir};

use crate::{ConfigError, ServerConfig, StartError, master_key_path, store_path, witness_path};

/// What `cubby-server restore` reports.
#[derive(Debug)]
#[non_exhaustive]
pub struct Restored {
    /// The store directory (empty for a PostgreSQL database).
    pub store: PathBuf,
    /// Where the store's files came from, if they were copied in.
    pub from: Option<PathBuf>,
    /// Flushes the store holds.
    pub flushes: u64,
    /// Customers with a data key.
    pub customers: usize,
}

/// Accepts a store as it is and starts a new epoch (`cubby-server restore`). A PostgreSQL
/// database is accepted as it is (restored with PostgreSQL's tools beforehand; there is no
/// witness, so nothing is replayed). For sled: with `from`, the
/// store's directory is first replaced by a copy of `from` (an archive of `cubby-server backup`,
/// or a copy of `db/` taken with the server stopped); without, the store in place is accepted (restored by hand, or found damaged
/// and accepted). Erasures and revocations in the ledger stay in force. Devices that connect
/// afterwards offer back everything they hold. Run with the server stopped.
pub fn restore(
    config: &ServerConfig,
    from: Option<&std::path::Path>,
) -> Result<Restored, StartError> {
    let master = MasterSecret::read(&master_key_path(config))?;
    if let (crate::config::Backend::Postgres, Some(url)) = config.storage.backend()? {
        if from.is_some() {
            return Err(ConfigError(
                "this server stores in PostgreSQL: restore the database with pg_restore, psql or \
                 point-in-time recovery first, then run `cubby-server restore` without --from"
                    .into(),
            )
            .into());
        }
        let store = crate::connect_postgres(config, url)?;
        let vault =
            match EncryptedStore::begin_epoch_unwitnessed(store, Keyring::from_master(&master)) {
                Ok(vault) => vault,
                Err(StoreError::WrongMasterKey) => {
                    return Err(StartError::WrongMasterKey(config.data.clone()));
                }
                Err(source) => return Err(StartError::Database(source)),
            };
        let customers =
            vault.list_customers().map_err(StartError::Database)?.len().saturating_sub(1);
        return Ok(Restored { store: PathBuf::new(), from: None, flushes: 0, customers });
    }
    let db_path = store_path(config);
    let store_error = |source| StartError::Store { path: db_path.clone(), source };
    if let Some(from) = from {
        let copied = if from.is_file() {
            // An archive of `cubby-server backup`: unpacked beside the store, then copied in.
            let unpacked = db_path.with_extension("unpacked");
            let _ = std::fs::remove_dir_all(&unpacked);
            let copied = crate::backup::unpack(from, &unpacked)
                .and_then(|_| copy_store(&unpacked.join("db"), &db_path));
            let _ = std::fs::remove_dir_all(&unpacked);
            copied
        } else {
            copy_store(from, &db_path)
        };
        copied.map_err(|e| {
            ConfigError(format!("cannot copy the store from {}: {e}", from.display()))
        })?;
    }
    let witness = WitnessDir::open(&witness_path(config)).map_err(store_error)?;
    let sled = SledStore::open(&db_path).map_err(store_error)?;
    let vault =
        match EncryptedStore::begin_epoch(sled, Keyring::from_master(&master), Arc::new(witness)) {
            Ok(vault) => vault,
            Err(StoreError::WrongMasterKey) => {
                return Err(StartError::WrongMasterKey(config.data.clone()));
            }
            Err(source) => return Err(store_error(source)),
        };
    let flushes = vault.flushes();
    let customers = vault.list_customers().map_err(store_error)?.len().saturating_sub(1);
    drop(vault);
    Ok(Restored { store: db_path, from: from.map(ToOwned::to_owned), flushes, customers })
}

/// Replaces the store directory `to` with a copy of `from`: into a new directory beside it
/// first, then swapped in, so that a failed copy leaves the old store as it was.
fn copy_store(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    if !from.join("sled").is_dir() {
        return Err(std::io::Error::other(format!(
            "{} is not a copy of a store directory (it has no sled/ inside)",
            from.display()
        )));
    }
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let staging = to.with_extension("restoring");
    let _ = std::fs::remove_dir_all(&staging);
    copy_dir(from, &staging)?;
    let old = to.with_extension("replaced");
    let _ = std::fs::remove_dir_all(&old);
    if to.exists() {
        std::fs::rename(to, &old)?;
    }
    std::fs::rename(&staging, to)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
            std::fs::File::open(&target)?.sync_all()?;
        }
    }
    std::fs::File::open(to)?.sync_all()
}
