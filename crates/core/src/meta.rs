//! The metadata a store keeps beside each document.

use serde::{Deserialize, Serialize};

/// What a customer's store knows about a document besides its content.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocMeta {
    /// A human title, set at creation.
    pub title: String,
    /// Milliseconds since the Unix epoch when the document was created.
    pub created_ms: u64,
    /// Milliseconds since the Unix epoch of the last change.
    pub updated_ms: u64,
    /// Bytes of the document's stored history (snapshot plus change chunks, before encryption).
    pub size: u64,
}

impl DocMeta {
    /// Encodes the metadata for storage.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a struct of strings and integers always serializes")
    }

    /// Decodes metadata written by [`DocMeta::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}
