//! Each customer's audit log: append-only, sealed like every other record.
//!
//! Entries are keyed by time (big-endian milliseconds) plus random bytes, so a scan lists them
//! oldest first and two entries in the same millisecond never collide. Nothing but erasure of
//! the whole account removes an entry.

use cubby_core::CustomerId;
use cubby_core::meta::unix_ms;
use cubby_proto::pb;
use cubby_store::{Space, Store, StoreError};
use serde::{Deserialize, Serialize};

/// Who acted.
pub(crate) enum Actor<'a> {
    /// The customer, with their own token.
    Customer,
    /// One of the customer's devices.
    Device(&'a cubby_core::DeviceId),
    /// The business's backend, with a service token for this subject.
    Business(&'a str),
}

impl std::fmt::Display for Actor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Customer => f.write_str("customer"),
            Self::Device(id) => write!(f, "device:{id}"),
            Self::Business(service) => write!(f, "business:{service}"),
        }
    }
}

/// One entry, as stored.
#[derive(Serialize, Deserialize)]
struct Entry {
    at_ms: u64,
    actor: String,
    action: String,
    target: String,
    outcome: String,
}

/// Whether the audited action went ahead.
#[derive(Clone, Copy)]
pub(crate) enum Outcome {
    Ok,
    Denied,
}

/// Appends an entry and makes it durable before returning (blocking).
pub(crate) fn record(
    store: &dyn Store,
    customer: &CustomerId,
    actor: &str,
    action: &str,
    target: &str,
    outcome: Outcome,
) -> Result<(), StoreError> {
    append(store, customer, actor, action, target, outcome)?;
    store.flush()
}

/// Appends an entry; durable at the caller's next flush (blocking).
pub(crate) fn append(
    store: &dyn Store,
    customer: &CustomerId,
    actor: &str,
    action: &str,
    target: &str,
    outcome: Outcome,
) -> Result<(), StoreError> {
    let at_ms = unix_ms();
    let entry = Entry {
        at_ms,
        actor: actor.into(),
        action: action.into(),
        target: target.into(),
        outcome: match outcome {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
        }
        .into(),
    };
    let key = [at_ms.to_be_bytes(), cubby_crypto::random_array::<8>()].concat();
    let value = serde_json::to_vec(&entry).expect("strings and integers always serialize");
    store.put_record(customer, Space::AUDIT, &key, &value)
}

/// The whole log, oldest first (blocking).
pub(crate) fn list(
    store: &dyn Store,
    customer: &CustomerId,
) -> Result<Vec<pb::AuditEntry>, StoreError> {
    store
        .scan_records(customer, Space::AUDIT)?
        .into_iter()
        .map(|(_, value)| {
            let e: Entry =
                serde_json::from_slice(&value).map_err(|_| StoreError::Corrupt("audit entry"))?;
            Ok(pb::AuditEntry {
                at_ms: e.at_ms,
                actor: e.actor,
                action: e.action,
                target: e.target,
                outcome: e.outcome,
            })
        })
        .collect()
}
