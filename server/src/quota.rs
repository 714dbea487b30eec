//! Per-customer limits: how large one document may grow, how much history one customer may
//! store, and how many writes per second one customer may make. Each refusal is
//! `RESOURCE_EXHAUSTED` for that customer alone; nobody else notices.
//!
//! Sizes count document history as written (before encryption). A customer's total is read from
//! their documents' metadata the first time it is needed, then kept up to date as writes land.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::time::Instant;

use cubby_core::{CustomerId, DocId, DocMeta, Seq};
use cubby_proto::ApiError;
use cubby_store::Store;

use crate::durable::api_error;
use crate::metrics::Metrics;

/// Bytes of history in a customer's documents, from the metadata `Store::list_docs` returns
/// (what the storage limit counts).
pub(crate) fn history_bytes(docs: &[(DocId, Seq, Vec<u8>)]) -> u64 {
    docs.iter().filter_map(|(_, _, meta)| DocMeta::decode(meta).ok()).map(|meta| meta.size).sum()
}

/// The limits, from the config.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QuotaLimits {
    pub(crate) max_document_bytes: u64,
    pub(crate) max_customer_bytes: u64,
    pub(crate) writes_per_sec: u32,
}

/// A token bucket: `writes_per_sec` tokens a second, holding at most five seconds' worth.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Usage and rate state per customer.
pub(crate) struct Quotas {
    limits: QuotaLimits,
    usage: Mutex<HashMap<CustomerId, u64>>,
    buckets: Mutex<HashMap<CustomerId, Bucket>>,
    metrics: Arc<Metrics>,
}

impl Quotas {
    pub(crate) fn new(limits: QuotaLimits, metrics: Arc<Metrics>) -> Self {
        Self { limits, usage: Mutex::default(), buckets: Mutex::default(), metrics }
    }

    /// Whether the customer's usage is known (so [`Quotas::reserve`] will not touch the store).
    pub(crate) fn knows(&self, customer: &CustomerId) -> bool {
        self.usage.lock().unwrap_or_else(PoisonError::into_inner).contains_key(customer)
    }

    /// Runs `f` on the customer's rate bucket, refilled up to now, with the rate per second.
    fn bucket<T>(&self, customer: &CustomerId, f: impl FnOnce(&mut Bucket, f64) -> T) -> T {
        let rate = f64::from(self.limits.writes_per_sec.max(1));
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = buckets.entry(*customer).or_insert(Bucket { tokens: rate * 5.0, at: now });
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(rate * 5.0);
        bucket.at = now;
        f(bucket, rate)
    }

    /// Takes one write from the customer's rate budget.
    pub(crate) fn take_write(&self, customer: &CustomerId) -> Result<(), ApiError> {
        self.bucket(customer, |bucket, _| {
            if bucket.tokens < 1.0 {
                self.metrics.refused("rate");
                return Err(ApiError::ResourceExhausted(
                    "too many writes for this account; slow down".into(),
                ));
            }
            bucket.tokens -= 1.0;
            Ok(())
        })
    }

    /// Charges the customer's rate budget `seconds` worth of writes (work that ran too long).
    pub(crate) fn penalize(&self, customer: &CustomerId, seconds: f64) {
        self.metrics.refused("apply_time");
        self.bucket(customer, |bucket, rate| bucket.tokens -= rate * seconds);
    }

    /// Checks that a document of `document_bytes` after a write of `bytes` fits both limits, and
    /// reserves `bytes` of the customer's budget (blocking: the first call per customer reads
    /// their usage). Give it back with [`Quotas::release`] if the write does not land.
    pub(crate) fn reserve(
        &self,
        store: &dyn Store,
        customer: &CustomerId,
        document_bytes: u64,
        bytes: u64,
    ) -> Result<(), ApiError> {
        if document_bytes > self.limits.max_document_bytes {
            self.metrics.refused("document_size");
            return Err(ApiError::ResourceExhausted(format!(
                "the document would exceed its limit of {} bytes",
                self.limits.max_document_bytes
            )));
        }
        if !self.usage.lock().unwrap_or_else(PoisonError::into_inner).contains_key(customer) {
            let total = history_bytes(&store.list_docs(customer).map_err(api_error)?);
            self.usage
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(*customer)
                .or_insert(total);
        }
        let mut usage = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        let used = usage.entry(*customer).or_default();
        if *used + bytes > self.limits.max_customer_bytes {
            self.metrics.refused("account_storage");
            return Err(ApiError::ResourceExhausted(format!(
                "the account would exceed its storage limit of {} bytes",
                self.limits.max_customer_bytes
            )));
        }
        *used += bytes;
        Ok(())
    }

    /// Gives back bytes reserved for a write that did not land, or freed by a deletion.
    pub(crate) fn release(&self, customer: &CustomerId, bytes: u64) {
        if let Some(used) =
            self.usage.lock().unwrap_or_else(PoisonError::into_inner).get_mut(customer)
        {
            *used = used.saturating_sub(bytes);
        }
    }

    /// Forgets an erased customer.
    pub(crate) fn forget(&self, customer: &CustomerId) {
        self.usage.lock().unwrap_or_else(PoisonError::into_inner).remove(customer);
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner).remove(customer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cubby_store::MemoryStore;

    const ALICE: CustomerId = CustomerId::from_bytes([1; 16]);
    const BOB: CustomerId = CustomerId::from_bytes([2; 16]);

    #[test]
    fn limits_refuse_only_the_customer_over_them() {
        let limits =
            QuotaLimits { max_document_bytes: 100, max_customer_bytes: 150, writes_per_sec: 2 };
        let quotas = Quotas::new(limits, Arc::default());
        let store = MemoryStore::new();
        assert!(quotas.reserve(&store, &ALICE, 101, 1).is_err(), "document over its limit");
        quotas.reserve(&store, &ALICE, 100, 100).expect("fits");
        assert!(quotas.reserve(&store, &ALICE, 60, 60).is_err(), "account over its limit");
        quotas.reserve(&store, &BOB, 60, 60).expect("bob has his own budget");
        quotas.release(&ALICE, 100);
        quotas.reserve(&store, &ALICE, 60, 60).expect("fits after a release");
        // Five seconds' worth of burst, then refused; bob is not affected.
        for _ in 0..10 {
            quotas.take_write(&ALICE).expect("within the burst");
        }
        assert!(quotas.take_write(&ALICE).is_err());
        quotas.take_write(&BOB).expect("bob has his own rate");
    }
}
