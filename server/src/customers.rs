//! Who may act on a customer's store right now: erased customers, refused tokens, and the
//! streams that must close when a device is revoked or an account erased.
//!
//! Every customer request passes [`Customers::admit`] after its token verifies. The state here is
//! in memory, loaded from the store at start-up and written through on every change.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use cubby_core::{CustomerId, DeviceId};
use cubby_proto::ApiError;
use cubby_store::{Keys, Records, Space, Store, StoreError};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::auth::Caller;
use crate::durable::api_error;

/// Closes one stream, saying why.
#[derive(Clone, Default)]
pub(crate) struct Ejector {
    token: CancellationToken,
    reason: Arc<OnceLock<ApiError>>,
}

impl Ejector {
    fn eject(&self, reason: ApiError) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// Resolves once the stream must close; gives the status to close it with.
    pub(crate) async fn ejected(&self) -> ApiError {
        self.token.cancelled().await;
        self.reason.get().cloned().unwrap_or(ApiError::Internal)
    }
}

/// Who the customer is, kept sealed in their own store for the admin API's customer list.
#[derive(Serialize, Deserialize)]
pub(crate) struct Profile {
    pub(crate) tenant: String,
    pub(crate) subject: String,
}

#[derive(Default)]
struct Streams {
    next: u64,
    open: HashMap<CustomerId, HashMap<u64, (DeviceId, Ejector)>>,
}

/// The admission state.
pub(crate) struct Customers {
    store: Arc<crate::Vault>,
    /// Customers with an epoch of their own (see [`Customers::epoch`]), as read when this
    /// process first saw them.
    epochs: Mutex<HashMap<CustomerId, [u8; 16]>>,
    erased: RwLock<HashSet<CustomerId>>,
    /// Refused token hashes, with their expiry (seconds since the epoch).
    denied: RwLock<HashMap<[u8; 32], u64>>,
    /// Customers whose profile this process has written or seen.
    profiled: Mutex<HashSet<CustomerId>>,
    streams: Mutex<Streams>,
    work: crate::StorageWork,
}

impl Customers {
    /// Loads erased customers and refused tokens (blocking), dropping refusals of tokens that
    /// expired before `expired_before` (the clock leeway no longer accepts them anyway).
    pub(crate) fn load(
        store: Arc<crate::Vault>,
        erased: Vec<CustomerId>,
        expired_before: u64,
        work: crate::StorageWork,
    ) -> Result<Self, StoreError> {
        let mut denied = HashMap::new();
        for customer in store.list_customers()? {
            if customer == cubby_store::SYSTEM {
                continue;
            }
            for (key, value) in store.scan_records(&customer, Space::DENIED_TOKENS)? {
                let (Ok(hash), Ok(exp)) =
                    (<[u8; 32]>::try_from(key.as_slice()), <[u8; 8]>::try_from(value.as_slice()))
                else {
                    continue;
                };
                let exp = u64::from_be_bytes(exp);
                if exp > expired_before {
                    denied.insert(hash, exp);
                } else {
                    store.remove_record(&customer, Space::DENIED_TOKENS, &key)?;
                }
            }
        }
        Ok(Self {
            store,
            epochs: Mutex::new(HashMap::new()),
            erased: RwLock::new(erased.into_iter().collect()),
            denied: RwLock::new(denied),
            profiled: Mutex::new(HashSet::new()),
            streams: Mutex::new(Streams::default()),
            work,
        })
    }

    /// Whether the customer was erased.
    pub(crate) fn is_erased(&self, customer: &CustomerId) -> bool {
        self.erased.read().unwrap_or_else(PoisonError::into_inner).contains(customer)
    }

    /// Lets a verified customer token through, or says why not. Records the customer's profile
    /// the first time this process sees them.
    pub(crate) async fn admit(&self, caller: Caller) -> Result<Caller, ApiError> {
        let caller = self.admit_device_stream(caller).await?;
        if self.token_denied(&caller) {
            return Err(ApiError::Unauthenticated("this token was revoked with its device".into()));
        }
        Ok(caller)
    }

    /// Whether the caller's token was used by a device that has since been revoked.
    pub(crate) fn token_denied(&self, caller: &Caller) -> bool {
        self.denied.read().unwrap_or_else(PoisonError::into_inner).contains_key(&caller.token_hash)
    }

    /// Like [`Customers::admit`], but lets a refused token through: a sync stream checks it
    /// only after the device proved its key, so that a revoked device still learns it must wipe.
    pub(crate) async fn admit_device_stream(&self, caller: Caller) -> Result<Caller, ApiError> {
        if caller.admin {
            return Err(ApiError::PermissionDenied(
                "a service token cannot act as a customer; use the admin API".into(),
            ));
        }
        if self.is_erased(&caller.customer) {
            return Err(ApiError::AccountErased);
        }
        let first_sight =
            self.profiled.lock().unwrap_or_else(PoisonError::into_inner).insert(caller.customer);
        if first_sight {
            let store = self.store.clone();
            let (customer, profile) = (
                caller.customer,
                Profile { tenant: caller.tenant.clone(), subject: caller.subject.clone() },
            );
            let written = self
                .work
                .run(move || {
                    if store.get_record(&customer, Space::PROFILE, b"identity")?.is_none() {
                        let bytes = serde_json::to_vec(&profile).expect("strings always serialize");
                        store.put_record(&customer, Space::PROFILE, b"identity", &bytes)?;
                    }
                    store.customer_epoch(&customer)
                })
                .await
                .map_err(|_| ApiError::Internal)?;
            match written {
                Ok(epoch) => {
                    let mut epochs = self.epochs.lock().unwrap_or_else(PoisonError::into_inner);
                    epoch.map(|epoch| epochs.insert(caller.customer, epoch));
                }
                Err(err) => {
                    self.profiled
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&caller.customer);
                    return Err(api_error(err));
                }
            }
        }
        Ok(caller)
    }

    /// Registers a device stream; the returned ejector fires when it must close.
    pub(crate) fn open_stream(&self, customer: CustomerId, device: DeviceId) -> (u64, Ejector) {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        streams.next += 1;
        let id = streams.next;
        let ejector = Ejector::default();
        streams.open.entry(customer).or_default().insert(id, (device, ejector.clone()));
        (id, ejector)
    }

    /// Forgets a stream that ended.
    pub(crate) fn close_stream(&self, customer: &CustomerId, id: u64) {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(open) = streams.open.get_mut(customer) {
            open.remove(&id);
            if open.is_empty() {
                streams.open.remove(customer);
            }
        }
    }

    /// How many devices have a stream open, and how many streams are open.
    pub(crate) fn connected(&self) -> (u64, u64) {
        let streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        let mut devices = 0;
        let mut open = 0;
        let mut seen = Vec::new();
        for by_id in streams.open.values() {
            // A customer has a few devices: a sorted list beats a set.
            seen.clear();
            seen.extend(by_id.values().map(|(device, _)| *device));
            seen.sort_unstable();
            seen.dedup();
            devices += seen.len() as u64;
            open += by_id.len() as u64;
        }
        (devices, open)
    }

    /// Closes the streams of one device (or every device with `None`) with `reason`.
    fn eject(&self, customer: &CustomerId, device: Option<&DeviceId>, reason: &ApiError) -> usize {
        let streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        let mut closed = 0;
        for (d, ejector) in streams.open.get(customer).into_iter().flat_map(|m| m.values()) {
            if device.is_none_or(|device| device == d) {
                ejector.eject(reason.clone());
                closed += 1;
            }
        }
        closed
    }

    /// After a device was revoked: refuses its tokens while they would be accepted and closes
    /// its streams (blocking: the refusal is stored).
    pub(crate) fn revoked(
        &self,
        customer: &CustomerId,
        device: &DeviceId,
        tokens: impl IntoIterator<Item = ([u8; 32], u64)>,
    ) -> Result<(), ApiError> {
        let tokens: Vec<_> = tokens.into_iter().collect();
        if !tokens.is_empty() {
            tokens
                .iter()
                .try_for_each(|(hash, exp)| {
                    self.store.put_record(customer, Space::DENIED_TOKENS, hash, &exp.to_be_bytes())
                })
                .and_then(|()| self.store.flush())
                .map_err(api_error)?;
            self.denied.write().unwrap_or_else(PoisonError::into_inner).extend(tokens);
        }
        let closed = self.eject(customer, Some(device), &ApiError::DeviceRevoked);
        tracing::info!(device = %device.short(), streams = closed, "device revoked");
        Ok(())
    }

    /// Another node revoked a device: its tokens are refused here too, and its streams here
    /// close.
    pub(crate) fn revoked_elsewhere(
        &self,
        customer: &CustomerId,
        device: &DeviceId,
        tokens: &[([u8; 32], u64)],
    ) {
        self.denied.write().unwrap_or_else(PoisonError::into_inner).extend(tokens.iter().copied());
        let closed = self.eject(customer, Some(device), &ApiError::DeviceRevoked);
        tracing::info!(device = %device.short(), streams = closed, "device revoked on another node");
    }

    /// Another node started a new epoch for the customer: every stream of theirs here closes,
    /// so that each device reconnects into it.
    pub(crate) fn epoch_elsewhere(&self, customer: &CustomerId, epoch: [u8; 16]) {
        self.epochs.lock().unwrap_or_else(PoisonError::into_inner).insert(*customer, epoch);
        self.eject(customer, None, &new_epoch());
    }

    /// Marks the customer erased from now on and closes all their streams.
    pub(crate) fn erasing(&self, customer: &CustomerId) {
        self.erased.write().unwrap_or_else(PoisonError::into_inner).insert(*customer);
        self.eject(customer, None, &ApiError::AccountErased);
    }

    /// The server's epoch for the customer, as devices see it (`Challenge.epoch`): the store's
    /// epoch, then the customer's own if their store ever needed one. Known once the customer
    /// was admitted.
    pub(crate) fn epoch(&self, customer: &CustomerId) -> Vec<u8> {
        let own = self.epochs.lock().unwrap_or_else(PoisonError::into_inner).get(customer).copied();
        [self.store.epoch().as_slice(), own.as_ref().map_or(&[][..], |e| e.as_slice())].concat()
    }

    /// Starts a new epoch for the customer, durably (blocking): their store was found behind
    /// what a device had seen, so their devices must offer back what they hold. Every stream
    /// of theirs closes, so that each device reconnects into the new epoch.
    pub(crate) fn begin_epoch(&self, customer: &CustomerId) -> Result<[u8; 16], ApiError> {
        let epoch = self.store.begin_customer_epoch(customer).map_err(api_error)?;
        self.epochs.lock().unwrap_or_else(PoisonError::into_inner).insert(*customer, epoch);
        self.eject(customer, None, &new_epoch());
        Ok(epoch)
    }

    /// Reads the customer's profile (blocking).
    pub(crate) fn profile(&self, customer: &CustomerId) -> Result<Option<Profile>, ApiError> {
        match self.store.get_record(customer, Space::PROFILE, b"identity").map_err(api_error)? {
            Some(bytes) => {
                serde_json::from_slice(&bytes).map(Some).map_err(|_| ApiError::DataLoss("profile"))
            }
            None => Ok(None),
        }
    }
}

/// Why a customer's streams close when their store starts a new epoch.
fn new_epoch() -> ApiError {
    ApiError::Unavailable(
        "this server's copy of the account is behind what a device has seen; reconnect, and \
         offer back everything this device holds"
            .into(),
    )
}
