//! What the engine tells the app: where syncing stands, and why it stopped.

use cubby_core::DocId;

/// Where syncing stands.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncStatus {
    /// Not connected; `failure` says why the last attempt ended.
    Offline {
        /// The last failure, if any.
        failure: Option<SyncFailure>,
    },
    /// Connecting to the server.
    Connecting,
    /// Connected, `done` of `total` documents synced in this round.
    Syncing {
        /// Documents finished.
        done: usize,
        /// Documents in this round.
        total: usize,
    },
    /// Connected, and this device and the server hold the same changes.
    UpToDate,
    /// Connected, but the server refused this device's changes to some documents for now: a
    /// limit of the customer's (writes per second, a document's or the account's size). They
    /// stay on this device and are offered again after a pause (1 s, doubling to 30 s while
    /// refused); every other document keeps syncing on the same connection.
    Refused {
        /// The server's refusal (of the document refused longest).
        failure: SyncFailure,
        /// Every document paused, by id.
        documents: Vec<DocId>,
    },
    /// The app paused syncing (`Client::pause_sync`): nothing is sent or received until it
    /// resumes.
    Paused,
    /// The server told this device to wipe its local copy, and it did; syncing has stopped.
    Wiped {
        /// Why.
        reason: WipeReason,
    },
}

/// Why the server told a device to wipe its local copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WipeReason {
    /// The customer revoked this device.
    DeviceRevoked,
    /// The customer's account was erased.
    AccountErased,
}

/// Why a sync connection ended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyncFailure {
    /// The server could not be reached.
    #[error("server unreachable: {0}")]
    Unreachable(String),
    /// This client cannot talk to the server as it is set up: TLS refused the server's
    /// certificate (give the client the server's CA), or the server's answer was not what the
    /// URL's scheme promised (`http://` for a server that speaks TLS). Waiting will not help.
    #[error("cannot use the server as configured: {0}")]
    Misconfigured(String),
    /// The server refused the token.
    #[error("token rejected: {0}")]
    Unauthenticated(String),
    /// The server refused this device or customer.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The server told this device to wipe its local copy.
    #[error("the server told this device to wipe: {0:?}")]
    Wipe(WipeReason),
    /// The token speaks for another account than the one whose data this device holds: nothing
    /// is synced (a device's data directory belongs to one account; use another for another).
    #[error(
        "this device's data belongs to another account than the token's; use another data \
         directory for this account"
    )]
    WrongAccount,
    /// The app paused syncing (`Client::pause_sync`).
    #[error("sync is paused")]
    Paused,
    /// Anything else the server or the local store said.
    #[error("{0}")]
    Other(String),
}
