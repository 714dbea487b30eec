//! Per-customer limits: how large one document may grow, how much history one customer may
//! store, and how many writes per second one customer may make. Each refusal is
//! `RESOURCE_EXHAUSTED` for that customer alone; nobody else notices.
//!
//! Sizes count document history as written (before encryption). A customer's total is read from
//! their documents' metadata the first time it is needed, then kept up to date as this node's
//! writes land. Another node's writes (heard on the bus) make it stale: it is read again at the
//! customer's next write, at most once a second, so nodes sharing a store let a customer past
//! the storage limit by at most a second of the others' writes. The write rate is counted per
//! node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
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

/// A customer's bytes of history, as this node knows them.
struct Usage {
    bytes: u64,
    /// When they were read from the store.
    read_at: Instant,
    /// Another node wrote for the customer since.
    stale: bool,
}

impl Usage {
    /// Whether the next write should read the store again.
    fn due(&self) -> bool {
        self.stale && self.read_at.elapsed() >= REREAD_AFTER
    }
}

/// How often, at most, a customer's usage is read again after another node wrote for them.
const REREAD_AFTER: Duration = Duration::from_secs(1);

/// Usage and rate state per customer.
pub(crate) struct Quotas {
    limits: QuotaLimits,
    usage: Mutex<HashMap<CustomerId, Usage>>,
    buckets: Mutex<HashMap<CustomerId, Bucket>>,
    metrics: Arc<Metrics>,
}

impl Quotas {
    pub(crate) fn new(limits: QuotaLimits, metrics: Arc<Metrics>) -> Self {
        Self { limits, usage: Mutex::default(), buckets: Mutex::default(), metrics }
    }

    /// Whether the customer's usage is known well enough that [`Quotas::reserve`] need not
    /// read the store.
    pub(crate) fn knows(&self, customer: &CustomerId) -> bool {
        self.usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(customer)
            .is_some_and(|usage| !usage.due())
    }

    /// Another node wrote for the customer: their usage is read again at their next write
    /// here (at most once a second).
    pub(crate) fn written_elsewhere(&self, customer: &CustomerId) {
        if let Some(usage) =
            self.usage.lock().unwrap_or_else(PoisonError::into_inner).get_mut(customer)
        {
            usage.stale = true;
        }
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
    /// reserves `bytes` of the customer's budget. Blocking unless [`Quotas::knows`] the
    /// customer: it reads their usage. Give it back with [`Quotas::release`] if the write does
    /// not land.
    pub(crate) fn reserve(
        &self,
        store: &dyn Store,
        customer: &CustomerId,
        document_bytes: u64,
        bytes: u64,
    ) -> Result<(), ApiError> {
        if !self.knows(customer) {
            let read_at = Instant::now();
            let bytes = history_bytes(&store.list_docs(customer).map_err(api_error)?);
            self.usage
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(*customer, Usage { bytes, read_at, stale: false });
        }
        self.reserve_known(customer, document_bytes, bytes)
    }

    /// [`Quotas::reserve`] with the usage this node knows, however stale: for a caller that
    /// must not block, once [`Quotas::knows`] said yes.
    pub(crate) fn reserve_known(
        &self,
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
        let mut usage = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        let used = &mut usage
            .entry(*customer)
            .or_insert(Usage { bytes: 0, read_at: Instant::now(), stale: false })
            .bytes;
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
            used.bytes = used.bytes.saturating_sub(bytes);
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

    #[tokio::test(start_paused = true)]
    async fn another_nodes_writes_count_once_heard() {
        use cubby_store::Docs;
        let limits =
            QuotaLimits { max_document_bytes: 1000, max_customer_bytes: 150, writes_per_sec: 100 };
        let quotas = Quotas::new(limits, Arc::default());
        let store = MemoryStore::new();
        quotas.reserve(&store, &ALICE, 10, 10).expect("fits");
        // Another node stores 120 bytes of Alice's history, and this node hears of it.
        let mut meta = DocMeta::new("elsewhere");
        meta.record_write(120);
        store.write_doc(&ALICE, &DocId::from_bytes([3; 16]), &meta, None).expect("write");
        quotas.written_elsewhere(&ALICE);
        assert!(quotas.knows(&ALICE), "read again at most once a second");
        tokio::time::advance(REREAD_AFTER).await;
        assert!(!quotas.knows(&ALICE), "read again at the next write");
        assert!(quotas.reserve(&store, &ALICE, 50, 50).is_err(), "120 stored elsewhere + 50");
        quotas.reserve(&store, &ALICE, 20, 20).expect("fits");
        assert!(quotas.knows(&ALICE));
    }
}
