//! What the services share, and what a node does with what the other nodes tell it.

use std::sync::Arc;

use cubby_proto::ApiError;
use cubby_store::Store;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{Limits, StorageWork, Vault, auth, bus, customers, devices, docs, hub, quota, sync};

/// What the services share.
pub(crate) struct Shared {
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) auth: auth::Authenticator,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) customers: customers::Customers,
    pub(crate) quotas: Arc<quota::Quotas>,
    pub(crate) devices: devices::Devices,
    pub(crate) docs: docs::Docs,
    pub(crate) hub: Arc<hub::Hub>,
    /// What the nodes sharing the store tell each other, and this node's id on it.
    pub(crate) bus: Arc<dyn bus::Bus>,
    pub(crate) node: bus::NodeId,
    pub(crate) limits: Limits,
    pub(crate) tracker: TaskTracker,
    pub(crate) stop: CancellationToken,
    pub(crate) work: StorageWork,
    /// Limits on sync messages in parts, per customer and per connection.
    pub(crate) part_budgets: sync::PartBudgets,
    /// The store itself, for what only it does: epochs and the ledger.
    pub(crate) vault: Arc<Vault>,
}

impl Shared {
    /// Tells every node sharing the store (this one too) of `event`.
    pub(crate) fn publish(&self, event: bus::Event) {
        self.bus.publish(bus::Envelope { from: self.node, event });
    }

    /// What this node does with an event on the bus. Events of its own it has acted on
    /// already, but for the changes its streams announce from here.
    pub(crate) fn on_event(&self, envelope: &bus::Envelope) {
        let own = envelope.from == self.node;
        match &envelope.event {
            bus::Event::Changed(changed) => {
                if !own {
                    // A document loaded here takes in what the other node stored, before any
                    // device asks it (its mailbox is in order).
                    self.docs.refresh(changed.customer, changed.doc);
                    self.quotas.written_elsewhere(&changed.customer);
                }
                self.hub.publish(changed.customer, hub::Announcement::heard(changed, !own));
            }
            _ if own => {}
            bus::Event::Erased { customer } => {
                self.customers.erasing(customer);
                self.docs.evict_customer(customer);
                self.vault.forget_key(customer);
            }
            bus::Event::Revoked { customer, device, tokens } => {
                self.customers.revoked_elsewhere(customer, device, tokens);
            }
            bus::Event::Epoch { customer, epoch } => {
                self.customers.epoch_elsewhere(customer, *epoch);
            }
        }
    }

    /// Authenticates a customer request: a verified customer token whose account exists and
    /// whose token was not revoked.
    pub(crate) async fn customer(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<auth::Caller, ApiError> {
        self.customers.admit(self.auth.authenticate(metadata).await?).await
    }

    /// Authenticates a business request: a verified service token with the admin scope.
    pub(crate) async fn business(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<auth::Caller, ApiError> {
        let caller = self.auth.authenticate(metadata).await?;
        if !caller.admin {
            return Err(ApiError::PermissionDenied(
                "the admin API needs a service token with the admin scope".into(),
            ));
        }
        Ok(caller)
    }

    /// Runs blocking store work off the async workers.
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        self.work.run(work).await?
    }
}
