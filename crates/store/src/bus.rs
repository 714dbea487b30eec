//! What a store that several nodes share shows one node of the others' writes, for their
//! change bus (the server's `bus::log`; the PostgreSQL store logs them).

use cubby_core::{CustomerId, DocId, Seq};

/// What another node wrote, as the shared store's log shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Heard {
    /// A document moved to a new feed position: written, or deleted.
    Changed {
        /// The node that wrote it.
        writer: i64,
        /// Whose.
        customer: CustomerId,
        /// Which document.
        doc: DocId,
        /// Its feed position then (a later write may have moved it on since).
        seq: Seq,
    },
    /// An event another node published, as it published it.
    Event {
        /// The node that published it.
        writer: i64,
        /// The event's bytes.
        bytes: Vec<u8>,
    },
}
