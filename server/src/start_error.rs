//! Why a server did not start.

use std::net::SocketAddr;
use std::path::PathBuf;

use cubby_crypto::keys::KeyFileError;
use cubby_store::{IntegrityError, StoreError};

use crate::{ConfigError, ServerConfig, store_path};

/// Why the server did not start. Each message tells the operator what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is wrong or incomplete.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The master key file is missing or unreadable.
    #[error(transparent)]
    MasterKey(#[from] KeyFileError),
    /// The master key does not open this data directory.
    #[error("the master key does not match the data in {0}; refusing to start")]
    WrongMasterKey(PathBuf),
    /// The store holds less than the server acknowledged, or is another store: the operator
    /// decides what to do.
    #[error(
        "refusing to start: the store in {path} cannot be vouched for: {reason}. Cubby wrote \
         nothing (though sled, opening the store, may have cut its log where it is damaged). \
         Either put the store's files back as they were, or accept the store as it is (a backup \
         restored on purpose, or damage you accept) with `cubby-server restore` and the same \
         --data or --config: the server then starts a new epoch, and every device offers back \
         what it holds"
    )]
    Integrity {
        /// The database directory.
        path: PathBuf,
        /// What is wrong.
        reason: IntegrityError,
    },
    /// The store could not be opened.
    #[error("cannot open the store in {path}: {source}")]
    Store {
        /// The database directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: StoreError,
    },
    /// The PostgreSQL database could not be opened (unreachable, refused, not durable, or
    /// migrated by a newer Cubby).
    #[error("cannot open the PostgreSQL database (storage.url): {0}")]
    Database(#[source] StoreError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl StartError {
    /// Why the store of `config`'s data directory did not open: the master key, its integrity
    /// check, or the store itself.
    pub(crate) fn opening(config: &ServerConfig, source: StoreError) -> Self {
        match source {
            StoreError::WrongMasterKey => Self::WrongMasterKey(config.data.clone()),
            StoreError::Integrity(reason) => Self::Integrity { path: store_path(config), reason },
            source => Self::Store { path: store_path(config), source },
        }
    }
}
