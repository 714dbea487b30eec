//! Budgets for sync messages that arrive in parts: shared by a customer's streams, and by the
//! streams of one connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use cubby_proto::parts::{Budget, Reassembly};

/// The shared limits on sync messages in parts: one [`Budget`] per customer and one per
/// connection, each held by the reassemblies of their streams while any is open.
#[derive(Default)]
pub(crate) struct PartBudgets {
    budgets: std::sync::Mutex<Budgets>,
}

#[derive(Default)]
struct Budgets {
    customers: HashMap<cubby_core::CustomerId, Weak<Budget>>,
    connections: HashMap<SocketAddr, Weak<Budget>>,
    /// How many entries there were after the last sweep of ended ones.
    swept: usize,
}

impl PartBudgets {
    /// A reassembly for a new stream of `customer` on the connection from `peer`.
    pub(super) fn reassembly(
        &self,
        limits: &crate::Limits,
        customer: cubby_core::CustomerId,
        peer: Option<SocketAddr>,
    ) -> Reassembly {
        let per_stream = limits.max_document_bytes as usize;
        let mut budgets = self.budgets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let budgets = &mut *budgets;
        if budgets.customers.len() + budgets.connections.len() > 2 * budgets.swept.max(64) {
            budgets.customers.retain(|_, b| b.strong_count() > 0);
            budgets.connections.retain(|_, b| b.strong_count() > 0);
            budgets.swept = budgets.customers.len() + budgets.connections.len();
        }
        fn shared<K: std::hash::Hash + Eq>(
            map: &mut HashMap<K, Weak<Budget>>,
            key: K,
            limit: usize,
            whose: &'static str,
        ) -> Arc<Budget> {
            let entry = map.entry(key).or_default();
            entry.upgrade().unwrap_or_else(|| {
                let budget = Budget::new(limit, whose);
                *entry = Arc::downgrade(&budget);
                budget
            })
        }
        let per_customer = limits.max_partial_bytes_per_customer as usize;
        let mut reassembly = Reassembly::new(per_stream).with_budget(shared(
            &mut budgets.customers,
            customer,
            per_customer,
            "this customer",
        ));
        if let Some(peer) = peer {
            let connection = shared(&mut budgets.connections, peer, per_stream, "this connection");
            reassembly = reassembly.with_budget(connection);
        }
        reassembly
    }
}
