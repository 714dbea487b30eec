//! The SDK's values as records and enums the foreign languages can hold. Ids are strings (the
//! SDK's base58 form), times are milliseconds since the Unix epoch.

use cubby_client as sdk;

/// A document's metadata.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct DocumentInfo {
    /// Its id.
    pub id: String,
    /// Its title.
    pub title: String,
    /// When it was created.
    pub created_ms: u64,
    /// When it last changed.
    pub updated_ms: u64,
    /// Bytes of its stored history.
    pub size: u64,
    /// The customer marked it private: the business cannot read or change it.
    pub private: bool,
}

impl DocumentInfo {
    pub(crate) fn new(id: sdk::DocId, meta: sdk::DocMeta) -> Self {
        Self {
            id: id.to_string(),
            title: meta.title,
            created_ms: meta.created_ms,
            updated_ms: meta.updated_ms,
            size: meta.size,
            private: meta.private,
        }
    }
}

/// Where syncing stands.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Enum)]
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
        done: u64,
        /// Documents in this round.
        total: u64,
    },
    /// Connected, and this device and the server hold the same changes.
    UpToDate,
    /// Connected, but the server refused changes to some documents for now (a limit of the
    /// customer's); they stay on this device and are offered again later.
    Refused {
        /// The server's refusal.
        failure: SyncFailure,
        /// The documents paused.
        documents: Vec<String>,
    },
    /// The app paused syncing.
    Paused,
    /// The server told this device to wipe its local copy, and it did: syncing has stopped
    /// and this client can do nothing more.
    Wiped {
        /// Why.
        reason: WipeReason,
    },
}

impl From<&sdk::SyncStatus> for SyncStatus {
    fn from(status: &sdk::SyncStatus) -> Self {
        match status {
            sdk::SyncStatus::Offline { failure } => {
                Self::Offline { failure: failure.as_ref().map(SyncFailure::from) }
            }
            sdk::SyncStatus::Connecting => Self::Connecting,
            sdk::SyncStatus::Syncing { done, total } => {
                Self::Syncing { done: *done as u64, total: *total as u64 }
            }
            sdk::SyncStatus::UpToDate => Self::UpToDate,
            sdk::SyncStatus::Refused { failure, documents } => Self::Refused {
                failure: failure.into(),
                documents: documents.iter().map(ToString::to_string).collect(),
            },
            sdk::SyncStatus::Paused => Self::Paused,
            sdk::SyncStatus::Wiped { reason } => Self::Wiped { reason: (*reason).into() },
            // A status this binding does not know yet reads as offline, never as up to date.
            _ => Self::Offline { failure: None },
        }
    }
}

/// Why the server told a device to wipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum WipeReason {
    /// The customer revoked this device.
    DeviceRevoked,
    /// The customer's account was erased.
    AccountErased,
}

impl From<sdk::WipeReason> for WipeReason {
    fn from(reason: sdk::WipeReason) -> Self {
        match reason {
            sdk::WipeReason::AccountErased => Self::AccountErased,
            _ => Self::DeviceRevoked,
        }
    }
}

/// What kind of failure ended a sync connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum SyncFailureKind {
    /// The server could not be reached; sync keeps trying.
    Unreachable,
    /// The client cannot talk to the server as configured (its certificate does not verify,
    /// `http://` for a TLS server): waiting will not help.
    Misconfigured,
    /// The server refused the token.
    Unauthenticated,
    /// The server refused this device or customer.
    PermissionDenied,
    /// The server told this device to wipe.
    Wipe,
    /// The token is another account's than the one whose data this device holds.
    WrongAccount,
    /// The app paused syncing.
    Paused,
    /// Anything else.
    Other,
}

/// Why a sync connection ended.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct SyncFailure {
    /// What kind of failure.
    pub kind: SyncFailureKind,
    /// What happened, for people.
    pub message: String,
}

impl From<&sdk::SyncFailure> for SyncFailure {
    fn from(failure: &sdk::SyncFailure) -> Self {
        use sdk::SyncFailure as F;
        let kind = match failure {
            F::Unreachable(_) => SyncFailureKind::Unreachable,
            F::Misconfigured(_) => SyncFailureKind::Misconfigured,
            F::Unauthenticated(_) => SyncFailureKind::Unauthenticated,
            F::PermissionDenied(_) => SyncFailureKind::PermissionDenied,
            F::Wipe(_) => SyncFailureKind::Wipe,
            F::WrongAccount => SyncFailureKind::WrongAccount,
            F::Paused => SyncFailureKind::Paused,
            _ => SyncFailureKind::Other,
        };
        Self { kind, message: failure.to_string() }
    }
}

/// Something happened to a document.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum DocumentEvent {
    /// This device changed it.
    Local,
    /// Changes from another device or the business arrived.
    Remote,
    /// The server acknowledged every change this device made to it.
    Synced,
    /// It was deleted; `discarded` says this device's unsynced changes to it were lost to the
    /// deletion.
    Deleted {
        /// Unsynced local changes were discarded.
        discarded: bool,
    },
    /// The listener fell so far behind that `count` events were dropped: read the document
    /// again rather than rely on the events missed.
    Missed {
        /// How many were dropped.
        count: u64,
    },
}

impl From<&sdk::DocEvent> for DocumentEvent {
    fn from(event: &sdk::DocEvent) -> Self {
        match event {
            sdk::DocEvent::Local => Self::Local,
            sdk::DocEvent::Remote => Self::Remote,
            sdk::DocEvent::Synced => Self::Synced,
            sdk::DocEvent::Deleted { discarded } => Self::Deleted { discarded: *discarded },
            sdk::DocEvent::Missed { count } => Self::Missed { count: *count },
            // An event this binding does not know yet: tell the app to look again.
            _ => Self::Missed { count: 1 },
        }
    }
}

/// A device of the customer, as the server knows it.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct DeviceInfo {
    /// Its id.
    pub id: String,
    /// Its name, e.g. "Ana's phone".
    pub name: String,
    /// Its platform, e.g. "ios".
    pub platform: String,
    /// When it first connected.
    pub first_seen_ms: u64,
    /// When it last connected.
    pub last_seen_ms: u64,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<u64>,
    /// Whether it is the device this client runs on.
    pub this_device: bool,
}

impl From<sdk::DeviceInfo> for DeviceInfo {
    fn from(d: sdk::DeviceInfo) -> Self {
        Self {
            id: d.id.to_string(),
            name: d.name,
            platform: d.platform,
            first_seen_ms: d.first_seen_ms,
            last_seen_ms: d.last_seen_ms,
            revoked_ms: d.revoked_ms,
            this_device: d.this_device,
        }
    }
}

/// One entry of the customer's audit log.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct AuditEntry {
    /// When.
    pub at_ms: u64,
    /// Who: `customer`, `device:<id>` or `business:<service>`.
    pub actor: String,
    /// What, e.g. `admin.read`, `device.revoke`, `export`.
    pub action: String,
    /// What it was done to (a document or device id), or empty.
    pub target: String,
    /// `ok` or `denied`.
    pub outcome: String,
}

impl From<sdk::AuditEntry> for AuditEntry {
    fn from(e: sdk::AuditEntry) -> Self {
        Self {
            at_ms: e.at_ms,
            actor: e.actor,
            action: e.action,
            target: e.target,
            outcome: e.outcome,
        }
    }
}

/// What an account erasure removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Record)]
pub struct ErasureReceipt {
    /// When.
    pub erased_ms: u64,
    /// Documents erased.
    pub documents: u64,
    /// Bytes of document history erased.
    pub bytes: u64,
    /// Devices forgotten.
    pub devices: u64,
    /// Audit entries erased.
    pub audit_entries: u64,
}

impl From<sdk::ErasureReceipt> for ErasureReceipt {
    fn from(r: sdk::ErasureReceipt) -> Self {
        Self {
            erased_ms: r.erased_ms,
            documents: r.documents,
            bytes: r.bytes,
            devices: r.devices,
            audit_entries: r.audit_entries,
        }
    }
}

/// A document deleted elsewhere while this device had changes to it the server never got.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct Discarded {
    /// The document's id.
    pub id: String,
    /// Its title when it was deleted.
    pub title: String,
}
