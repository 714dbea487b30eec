//! Sync messages larger than one frame travel in parts (`DocSync.more`).
//!
//! Automerge sends whatever a peer lacks in one sync message: after weeks offline, or to a new
//! device (a whole saved document), that can exceed the gRPC message limit. The sender splits a
//! message into parts of at most [`PART_BYTES`]; the receiver reassembles each document's parts,
//! holding at most a set number of bytes per stream.

use std::collections::HashMap;

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

/// Reassembles the parts arriving on one stream.
#[derive(Debug)]
pub struct Reassembly {
    partial: HashMap<Vec<u8>, Vec<u8>>,
    held: usize,
    limit: usize,
}

impl Reassembly {
    /// Holds at most `limit` bytes of unfinished messages at once.
    pub fn new(limit: usize) -> Self {
        Self { partial: HashMap::new(), held: 0, limit }
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
        self.held += sync.message.len();
        if self.held > self.limit {
            return Err(ApiError::ResourceExhausted(
                "a sync message in parts is larger than this server accepts".into(),
            ));
        }
        if sync.more {
            self.partial.entry(sync.doc_id).or_default().extend_from_slice(&sync.message);
            return Ok(None);
        }
        let mut whole = self.partial.remove(&sync.doc_id).unwrap_or_default();
        whole.extend_from_slice(&sync.message);
        self.held -= whole.len();
        sync.message = whole;
        Ok(Some(sync))
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
