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
    /// The customer marked it private: the business's admin API cannot read or change it.
    #[serde(default)]
    pub private: bool,
}

/// Milliseconds since the Unix epoch, by the system clock (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl DocMeta {
    /// Metadata for a document created now.
    pub fn new(title: impl Into<String>) -> Self {
        let now = unix_ms();
        Self { title: title.into(), created_ms: now, updated_ms: now, size: 0, private: false }
    }

    /// Accounts for a write of `bytes` of history, now.
    pub fn record_write(&mut self, bytes: u64) {
        self.updated_ms = unix_ms();
        self.size += bytes;
    }

    /// Encodes the metadata for storage.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a struct of strings and integers always serializes")
    }

    /// Decodes metadata written by [`DocMeta::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}
