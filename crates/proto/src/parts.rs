//! Sync messages larger than one frame travel in parts (`DocSync.more`).
//!
//! Automerge sends whatever a peer lacks in one sync message: after weeks offline, or to a new
//! device (a whole saved document), that can exceed the gRPC message limit. The sender splits a
//! message into parts of at most [`PART_BYTES`]; the receiver reassembles each document's parts,
//! holding at most a set number of bytes per stream, and (the server) per connection and per
//! customer ([`Budget`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{ApiError, pb};

/// The most message bytes one frame carries.
pub const PART_BYTES: usize = 1 << 20;

/// Splits `sync` into frames of at most [`PART_BYTES`] message bytes (one frame when it fits).
/// The last part carries every field but the message's earlier bytes.
pub fn split(mut sync: pb::DocSync) -> Vec<pb::DocSync> {
    if sync.message.len() <= PART_BYTES {
        return vec![sync];
    }
    let message = std::mem::take(&mut sync.message);
    let mut chunks: Vec<&[u8]> = message.chunks(PART_BYTES).collect();
    let last = chunks.pop().unwrap_or_default();
    let mut parts: Vec<pb::DocSync> = chunks
        .into_iter()
        .map(|chunk| pb::DocSync {
            doc_id: sync.doc_id.clone(),
            message: chunk.to_vec(),
            more: true,
            ..pb::DocSync::default()
        })
        .collect();
    parts.push(pb::DocSync { message: last.to_vec(), more: false, ..sync });
    parts
}

/// A server frame as the frames that go on the wire.
pub fn split_server_frame(frame: pb::ServerFrame) -> Vec<pb::ServerFrame> {
    match frame.frame {
        Some(pb::server_frame::Frame::Sync(sync)) => split(sync)
            .into_iter()
            .map(|part| pb::ServerFrame { frame: Some(pb::server_frame::Frame::Sync(part)) })
            .collect(),
        frame => vec![pb::ServerFrame { frame }],
    }
}

/// A device frame as the frames that go on the wire.
pub fn split_client_frame(frame: pb::ClientFrame) -> Vec<pb::ClientFrame> {
    match frame.frame {
        Some(pb::client_frame::Frame::Sync(sync)) => split(sync)
            .into_iter()
            .map(|part| pb::ClientFrame { frame: Some(pb::client_frame::Frame::Sync(part)) })
            .collect(),
        frame => vec![pb::ClientFrame { frame }],
    }
}

/// What an unfinished message costs besides its bytes: its 16-byte id and the map entry
/// holding it, so that parts with empty messages are not free.
pub const ENTRY_BYTES: usize = 64;

/// The most documents whose messages one stream may have in parts at once. A sender splits one
/// message at a time (the SDK does), so a stream needs one; a few allow for other clients.
pub const MAX_PARTIAL_DOCS: usize = 16;

/// A limit on the bytes of unfinished messages held by several reassemblies together: all the
/// streams of one customer, or of one connection. Reassemblies take from it as parts arrive and
/// give back as messages complete or streams end.
#[derive(Debug)]
pub struct Budget {
    held: AtomicUsize,
    limit: usize,
    /// What the refusal names: "this customer", "this connection".
    whose: &'static str,
}

impl Budget {
    /// A budget of `limit` bytes for `whose` unfinished messages.
    pub fn new(limit: usize, whose: &'static str) -> Arc<Self> {
        Arc::new(Self { held: AtomicUsize::new(0), limit, whose })
    }

    /// Bytes held against it now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    fn take(&self, bytes: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|after| *after <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Reassembles the parts arriving on one stream.
///
/// Every byte held counts, ids and entries included ([`ENTRY_BYTES`]), against the stream's own
/// limit and against every shared [`Budget`] it was given; a part that would pass one is refused
/// with `RESOURCE_EXHAUSTED`. A part's id is checked (16 bytes) before anything is held for it.
#[derive(Debug)]
pub struct Reassembly {
    partial: HashMap<Vec<u8>, Vec<u8>>,
    held: usize,
    limit: usize,
    budgets: Vec<Arc<Budget>>,
}

impl Reassembly {
    /// Holds at most `limit` bytes of unfinished messages at once.
    pub fn new(limit: usize) -> Self {
        Self { partial: HashMap::new(), held: 0, limit, budgets: Vec::new() }
    }

    /// Also counts what it holds against `budget`.
    pub fn with_budget(mut self, budget: Arc<Budget>) -> Self {
        self.budgets.push(budget);
        self
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Takes one frame; returns the whole message once its last part has arrived.
    pub fn push(&mut self, mut sync: pb::DocSync) -> Result<Option<pb::DocSync>, ApiError> {
        let pending = self.partial.contains_key(&sync.doc_id);
        if !sync.more && !pending {
            return Ok(Some(sync));
        }
        if sync.message.len() > PART_BYTES {
            return Err(ApiError::InvalidArgument("a sync message part is over 1 MiB".into()));
        }
        if !pending {
            crate::doc_id(&sync.doc_id)?;
            if self.partial.len() >= MAX_PARTIAL_DOCS {
                return Err(ApiError::ResourceExhausted(format!(
                    "more than {MAX_PARTIAL_DOCS} documents have sync messages in parts at once"
                )));
            }
        }
        let cost = sync.message.len() + if pending { 0 } else { ENTRY_BYTES };
        self.take(cost)?;
        if sync.more {
            self.partial.entry(sync.doc_id).or_default().extend_from_slice(&sync.message);
            return Ok(None);
        }
        let mut whole = self.partial.remove(&sync.doc_id).unwrap_or_default();
        whole.extend_from_slice(&sync.message);
        self.give(whole.len() + ENTRY_BYTES);
        sync.message = whole;
        Ok(Some(sync))
    }

    fn take(&mut self, bytes: usize) -> Result<(), ApiError> {
        let refused = |whose: &str, limit: usize| {
            ApiError::ResourceExhausted(format!(
                "sync messages in parts held for {whose} would pass {limit} bytes"
            ))
        };
        if self.held + bytes > self.limit {
            return Err(refused("this stream", self.limit));
        }
        for (i, budget) in self.budgets.iter().enumerate() {
            if !budget.take(bytes) {
                self.budgets[..i].iter().for_each(|b| b.give(bytes));
                return Err(refused(budget.whose, budget.limit));
            }
        }
        self.held += bytes;
        Ok(())
    }

    fn give(&mut self, bytes: usize) {
        self.held -= bytes;
        self.budgets.iter().for_each(|b| b.give(bytes));
    }
}

impl Drop for Reassembly {
    fn drop(&mut self) {
        let held = self.held;
        self.give(held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(doc: u8, len: usize) -> pb::DocSync {
        pb::DocSync {
            doc_id: vec![doc; 16],
            message: (0..len).map(|i| i as u8).collect(),
            seq: 7,
            ..pb::DocSync::default()
        }
    }

    #[test]
    fn small_messages_pass_through_and_large_ones_round_trip_interleaved() {
        assert_eq!(split(frame(1, 10)), vec![frame(1, 10)]);
        let (a, b) = (frame(1, 3 * PART_BYTES + 5), frame(2, PART_BYTES + 1));
        let (parts_a, parts_b) = (split(a.clone()), split(b.clone()));
        assert_eq!(parts_a.len(), 4);
        assert!(parts_a.iter().all(|p| p.message.len() <= PART_BYTES));
        assert_eq!(parts_a.last().map(|p| p.seq), Some(7));
        let mut reassembly = Reassembly::new(8 * PART_BYTES);
        let mut whole = Vec::new();
        let mut parts_b = parts_b.into_iter();
        for part in parts_a {
            whole.extend(reassembly.push(part).expect("fits"));
            if let Some(part) = parts_b.next() {
                whole.extend(reassembly.push(part).expect("fits"));
            }
        }
        assert_eq!(whole, vec![b, a]);
        assert_eq!(reassembly.held, 0);
    }

    #[test]
    fn a_bad_id_is_refused_before_anything_is_held_and_ids_count() {
        let mut reassembly = Reassembly::new(PART_BYTES);
        let garbage = pb::DocSync { doc_id: vec![7; 4 << 20], more: true, ..Default::default() };
        assert!(matches!(reassembly.push(garbage), Err(ApiError::InvalidArgument(_))));
        assert_eq!(reassembly.held(), 0);
        // Empty parts of many documents are not free, and their number is bounded.
        let empty =
            |doc: u8| pb::DocSync { doc_id: vec![doc; 16], more: true, ..Default::default() };
        let mut outcome = Ok(None);
        for doc in 0..=MAX_PARTIAL_DOCS as u8 {
            outcome = reassembly.push(empty(doc));
            if outcome.is_err() {
                break;
            }
        }
        assert!(matches!(outcome, Err(ApiError::ResourceExhausted(_))), "{outcome:?}");
        assert_eq!(reassembly.held(), MAX_PARTIAL_DOCS * ENTRY_BYTES);
    }

    #[test]
    fn streams_sharing_a_budget_are_held_to_it_together_and_give_back_when_they_end() {
        let customer = Budget::new(3 * PART_BYTES, "this customer");
        let mut streams: Vec<Reassembly> =
            (0..4).map(|_| Reassembly::new(2 * PART_BYTES).with_budget(customer.clone())).collect();
        let part = |doc: u8| pb::DocSync {
            doc_id: vec![doc; 16],
            message: vec![0; PART_BYTES - ENTRY_BYTES],
            more: true,
            ..Default::default()
        };
        let mut refused = 0;
        for (i, stream) in streams.iter_mut().enumerate() {
            match stream.push(part(i as u8)) {
                Ok(None) => {}
                Err(ApiError::ResourceExhausted(why)) => {
                    assert!(why.contains("this customer"), "{why}");
                    refused += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(refused, 1, "three parts fit the customer's budget, the fourth does not");
        assert_eq!(customer.held(), 3 * PART_BYTES);
        // A message that completes gives its bytes back; so does a stream that ends.
        let last = pb::DocSync { doc_id: vec![0; 16], ..Default::default() };
        assert!(streams[0].push(last).expect("completes").is_some());
        assert_eq!(customer.held(), 2 * PART_BYTES);
        streams.truncate(1);
        assert_eq!(customer.held(), 0);
    }

    #[test]
    fn parts_beyond_the_limit_are_refused() {
        let mut reassembly = Reassembly::new(2 * PART_BYTES);
        let mut outcome = Ok(None);
        for part in split(frame(1, 4 * PART_BYTES)) {
            outcome = reassembly.push(part);
            if outcome.is_err() {
                break;
            }
        }
        assert!(matches!(outcome, Err(ApiError::ResourceExhausted(_))), "{outcome:?}");
        let oversized = pb::DocSync { more: true, ..frame(2, PART_BYTES + 1) };
        assert!(matches!(reassembly.push(oversized), Err(ApiError::InvalidArgument(_))));
    }
}
