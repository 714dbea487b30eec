//! The customer's devices: registered on their first proven connect, bound to that key, and
//! revocable.
//!
//! A device id is bound to the Ed25519 key it first proved. A later stream for the same id must
//! prove the same key, so a bearer token alone cannot sync as a device whose key it does not
//! hold; a revoked device is refused for good.

use cubby_core::meta::unix_ms;
use cubby_core::{CustomerId, DeviceId};
use cubby_proto::{ApiError, pb};
use cubby_store::witness::LedgerEntry;
use cubby_store::{CustomerLocks, Records, Space, Store};
use serde::{Deserialize, Serialize};

use crate::audit::{self, Actor, Outcome};
use crate::durable::api_error;

/// Earlier tokens a device record keeps. An app that fetches a new token for every
/// connection of a flaky device would otherwise grow its record with each one; SDKs cache
/// their token until it is refused or about to expire, so a device uses a few per lifetime.
const EARLIER_TOKENS: usize = 16;

/// What the server keeps about a device (sealed in the customer's store).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct DeviceRecord {
    pub(crate) name: String,
    pub(crate) platform: String,
    pub(crate) public_key: Vec<u8>,
    pub(crate) first_seen_ms: u64,
    pub(crate) last_seen_ms: u64,
    #[serde(default)]
    pub(crate) revoked_ms: Option<u64>,
    /// SHA-256 and expiry of the token its latest stream used, refused once it is revoked.
    #[serde(default)]
    pub(crate) last_token: Option<([u8; 32], u64)>,
    /// Tokens it used before the last (on an earlier stream, or replaced on an open one) that
    /// were still accepted then, oldest first, at most [`EARLIER_TOKENS`]: refused with the
    /// last one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) earlier_tokens: Vec<([u8; 32], u64)>,
}

impl DeviceRecord {
    /// Every token revoking this device must refuse (SHA-256 and expiry).
    pub(crate) fn tokens(&self) -> impl Iterator<Item = ([u8; 32], u64)> + '_ {
        self.last_token.iter().chain(&self.earlier_tokens).copied()
    }

    /// Makes `token` the device's last token, keeping those it replaces that are still
    /// accepted (they expire at `expired_before` or later).
    fn use_token(&mut self, token: ([u8; 32], u64), expired_before: u64) {
        if self.last_token == Some(token) {
            return;
        }
        self.earlier_tokens.extend(self.last_token.replace(token));
        self.earlier_tokens.retain(|(hash, exp)| *exp >= expired_before && *hash != token.0);
        let surplus = self.earlier_tokens.len().saturating_sub(EARLIER_TOKENS);
        self.earlier_tokens.drain(..surplus);
    }

    pub(crate) fn info(&self, id: &DeviceId) -> pb::DeviceInfo {
        pb::DeviceInfo {
            device_id: id.as_bytes().to_vec(),
            name: self.name.clone(),
            platform: self.platform.clone(),
            public_key: self.public_key.clone(),
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.last_seen_ms,
            revoked_ms: self.revoked_ms.unwrap_or(0),
        }
    }
}

/// A device that has proven its key on a new stream.
pub(crate) struct Arrival<'a> {
    pub(crate) id: DeviceId,
    pub(crate) public_key: &'a [u8],
    pub(crate) name: &'a str,
    pub(crate) platform: &'a str,
    pub(crate) token: ([u8; 32], u64),
    /// Tokens that expired before this (seconds since the epoch) are no longer accepted.
    pub(crate) expired_before: u64,
    /// Its token was used by a device since revoked: refused, and nothing is registered or
    /// recorded for it (a revoked device presenting it is still told to wipe).
    pub(crate) token_denied: bool,
}

fn read(
    store: &dyn Store,
    customer: &CustomerId,
    id: &DeviceId,
) -> Result<Option<DeviceRecord>, ApiError> {
    match store.get_record(customer, Space::DEVICES, id.as_bytes()).map_err(api_error)? {
        Some(bytes) => {
            serde_json::from_slice(&bytes).map(Some).map_err(|_| ApiError::DataLoss("device"))
        }
        None => Ok(None),
    }
}

fn write(
    store: &dyn Store,
    customer: &CustomerId,
    id: &DeviceId,
    record: &DeviceRecord,
) -> Result<(), ApiError> {
    let bytes = serde_json::to_vec(record).expect("strings, bytes and integers always serialize");
    store.put_record(customer, Space::DEVICES, id.as_bytes(), &bytes).map_err(api_error)
}

fn clip(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Device records are read, changed and written under their customer's lock, so a
/// registration and a revocation of the same device never interleave, and no customer's wait
/// on storage holds up another's.
#[derive(Default)]
pub(crate) struct Devices {
    locks: CustomerLocks,
}

impl Devices {
    /// Admits a device whose proof verified: registers it on first sight, refuses a revoked one,
    /// one whose key differs from the registered key, or one presenting a refused token (and then
    /// writes nothing), and records when it was last seen (blocking).
    pub(crate) fn admit(
        &self,
        store: &dyn Store,
        customer: &CustomerId,
        arrival: &Arrival<'_>,
    ) -> Result<(), ApiError> {
        let _guard = self.locks.lock(customer);
        let now = unix_ms();
        let record = match read(store, customer, &arrival.id)? {
            Some(record) if record.revoked_ms.is_some() => return Err(ApiError::DeviceRevoked),
            Some(record) if record.public_key != arrival.public_key => {
                return Err(ApiError::PermissionDenied(
                    "this device id is registered with another key".into(),
                ));
            }
            _ if arrival.token_denied => {
                return Err(ApiError::Unauthenticated(
                    "this token was revoked with its device".into(),
                ));
            }
            Some(mut record) => {
                record.name = clip(arrival.name, 256);
                record.platform = clip(arrival.platform, 64);
                record.last_seen_ms = now;
                record.use_token(arrival.token, arrival.expired_before);
                record
            }
            None => {
                let record = DeviceRecord {
                    name: clip(arrival.name, 256),
                    platform: clip(arrival.platform, 64),
                    public_key: arrival.public_key.to_vec(),
                    first_seen_ms: now,
                    last_seen_ms: now,
                    revoked_ms: None,
                    last_token: Some(arrival.token),
                    earlier_tokens: Vec::new(),
                };
                write(store, customer, &arrival.id, &record)?;
                let target = arrival.id.to_string();
                audit::record(
                    store,
                    customer,
                    &Actor::Device(&arrival.id).to_string(),
                    "device.register",
                    &target,
                    Outcome::Ok,
                )
                .map_err(api_error)?;
                return Ok(());
            }
        };
        write(store, customer, &arrival.id, &record)
    }

    /// Records the fresh token a connected device sent on its stream, keeping the tokens it
    /// replaces that expire at `expired_before` or later; refuses a device revoked meanwhile
    /// (blocking).
    pub(crate) fn renew(
        &self,
        store: &dyn Store,
        customer: &CustomerId,
        id: &DeviceId,
        token: ([u8; 32], u64),
        expired_before: u64,
    ) -> Result<(), ApiError> {
        let _guard = self.locks.lock(customer);
        let mut record = read(store, customer, id)?.ok_or(ApiError::NotFound("device"))?;
        if record.revoked_ms.is_some() {
            return Err(ApiError::DeviceRevoked);
        }
        record.use_token(token, expired_before);
        write(store, customer, id, &record)
    }

    /// Revokes a device durably and returns its record (blocking): the revocation goes in the
    /// ledger first, so that no restore of the store undoes it. The caller closes its streams
    /// and refuses its tokens.
    pub(crate) fn revoke(
        &self,
        vault: &crate::Vault,
        customer: &CustomerId,
        id: &DeviceId,
    ) -> Result<DeviceRecord, ApiError> {
        let store: &dyn Store = vault;
        let _guard = self.locks.lock(customer);
        let mut record = read(store, customer, id)?.ok_or(ApiError::NotFound("device"))?;
        if record.revoked_ms.is_some() {
            return Err(ApiError::FailedPrecondition("the device is already revoked".into()));
        }
        let at_ms = unix_ms();
        let entry = LedgerEntry::Revoked {
            customer: *customer,
            device: *id.as_bytes(),
            at_ms,
            tokens: record.tokens().collect(),
        };
        vault.append_ledger(&entry).map_err(api_error)?;
        record.revoked_ms = Some(at_ms);
        write(store, customer, id, &record)?;
        audit::record(
            store,
            customer,
            &Actor::Customer.to_string(),
            "device.revoke",
            &id.to_string(),
            Outcome::Ok,
        )
        .map_err(api_error)?;
        Ok(record)
    }
}

/// Puts back every revocation in the ledger that the store lacks (a restored store): the device
/// record is marked revoked (made, if the store never saw the device), and the tokens it used
/// are refused again while they would be accepted (those that expired before `expired_before`
/// no longer are). Erased customers are left alone. Blocking; at start, before `Customers`
/// loads the refused tokens.
pub(crate) fn replay_revocations(
    vault: &crate::Vault,
    expired_before: u64,
) -> Result<usize, ApiError> {
    let mut replayed = 0;
    for entry in vault.ledger().map_err(api_error)? {
        let LedgerEntry::Revoked { customer, device, at_ms, tokens } = entry else { continue };
        if vault.erased_at(&customer).map_err(api_error)?.is_some() {
            continue;
        }
        let id = DeviceId::from_bytes(device);
        let mut changed = false;
        let mut record = match read(vault, &customer, &id)? {
            Some(record) => record,
            None => {
                changed = true;
                DeviceRecord {
                    name: "revoked device".into(),
                    platform: String::new(),
                    public_key: Vec::new(),
                    first_seen_ms: at_ms,
                    last_seen_ms: at_ms,
                    revoked_ms: None,
                    last_token: None,
                    earlier_tokens: Vec::new(),
                }
            }
        };
        if record.revoked_ms.is_none() {
            record.revoked_ms = Some(at_ms);
            changed = true;
        }
        if changed {
            write(vault, &customer, &id, &record)?;
            replayed += 1;
        }
        for (hash, expires) in tokens.into_iter().filter(|(_, exp)| *exp > expired_before) {
            let space = Space::DENIED_TOKENS;
            if vault.get_record(&customer, space, &hash).map_err(api_error)?.is_none() {
                vault
                    .put_record(&customer, space, &hash, &expires.to_be_bytes())
                    .map_err(api_error)?;
            }
        }
    }
    vault.flush().map_err(api_error)?;
    Ok(replayed)
}

/// Every device of the customer (blocking).
pub(crate) fn list(
    store: &dyn Store,
    customer: &CustomerId,
) -> Result<Vec<(DeviceId, DeviceRecord)>, ApiError> {
    store
        .scan_records(customer, Space::DEVICES)
        .map_err(api_error)?
        .into_iter()
        .map(|(key, value)| {
            let id = DeviceId::from_slice(&key).map_err(|_| ApiError::DataLoss("device"))?;
            let record =
                serde_json::from_slice(&value).map_err(|_| ApiError::DataLoss("device"))?;
            Ok((id, record))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(record: &DeviceRecord) -> Vec<u8> {
        record.tokens().map(|(hash, _)| hash[0]).collect()
    }

    #[test]
    fn a_device_keeps_its_earlier_tokens_while_they_are_accepted_and_a_few_at_most() {
        let mut record = DeviceRecord {
            name: String::new(),
            platform: String::new(),
            public_key: Vec::new(),
            first_seen_ms: 0,
            last_seen_ms: 0,
            revoked_ms: None,
            last_token: Some(([0; 32], 100)),
            earlier_tokens: Vec::new(),
        };
        record.use_token(([1; 32], 200), 50);
        assert_eq!(hashes(&record), [1, 0]);
        record.use_token(([1; 32], 200), 50);
        assert_eq!(hashes(&record), [1, 0], "the same token again changes nothing");
        record.use_token(([2; 32], 300), 150);
        assert_eq!(hashes(&record), [2, 1], "token 0 expired before 150");
        for n in 3..40 {
            record.use_token(([n; 32], 1_000), 0);
        }
        let kept = hashes(&record);
        assert_eq!(kept.len(), 1 + EARLIER_TOKENS);
        assert_eq!(kept[0], 39);
        assert_eq!(&kept[1..], (23..39).collect::<Vec<u8>>(), "the newest earlier tokens");
    }
}
