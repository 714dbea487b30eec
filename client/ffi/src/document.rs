//! [`Document`]: a loaded document, read and changed as JSON.

use std::sync::Arc;

use cubby_client as sdk;

use crate::error::CubbyError;
use crate::listen::{DocumentListener, Subscription};
use crate::on_runtime;
use crate::types::DocumentInfo;

/// A document this device holds, loaded. Reads are immediate; each change is on this
/// device's disk when its call returns and reaches the server in the background.
#[derive(uniffi::Object)]
pub struct Document {
    doc: sdk::DocHandle,
    client: sdk::Client,
}

impl Document {
    pub(crate) fn new(doc: sdk::DocHandle, client: sdk::Client) -> Arc<Self> {
        Arc::new(Self { doc, client })
    }
}

#[uniffi::export]
impl Document {
    /// Its id.
    pub fn id(&self) -> String {
        self.doc.id().to_string()
    }

    /// Its metadata.
    pub fn info(&self) -> DocumentInfo {
        DocumentInfo::new(self.doc.id(), self.doc.meta())
    }

    /// The whole document as JSON text (Automerge text reads as a string).
    pub fn to_json(&self) -> String {
        self.doc.to_json().to_string()
    }

    /// The value at a key of the root map as JSON text, or none if the key is not set.
    pub fn get(&self, key: String) -> Option<String> {
        match self.doc.to_json() {
            serde_json::Value::Object(mut root) => root.remove(&key).map(|v| v.to_string()),
            _ => None,
        }
    }

    /// Sets a key of the root map to a JSON value given as text (`"2"`, `"\"milk\""`,
    /// `"{\"qty\": 2}"`). Only what differs changes, so another device's concurrent edits
    /// survive the merge: an object updates the map there field by field, a string over
    /// collaborative text splices in the difference. An array replaces the list whole.
    pub async fn put(&self, key: String, json: String) -> Result<(), CubbyError> {
        let value: serde_json::Value = serde_json::from_str(&json)
            .map_err(|e| CubbyError::InvalidChange(format!("the value is not JSON: {e}")))?;
        let doc = self.doc.clone();
        on_runtime(async move { Ok(doc.put(&key, value).await?) }).await
    }

    /// Sets a key of the root map to collaborative text (for strings people edit together).
    pub async fn put_text(&self, key: String, text: String) -> Result<(), CubbyError> {
        let doc = self.doc.clone();
        on_runtime(async move { Ok(doc.put_text(&key, &text).await?) }).await
    }

    /// Edits the text at a key: deletes `delete` characters at `pos` and inserts `insert`
    /// there (positions count Unicode code points). Refused with `InvalidChange` unless the
    /// key holds text and the range is inside it.
    pub async fn splice_text(
        &self,
        key: String,
        pos: u64,
        delete: u64,
        insert: String,
    ) -> Result<(), CubbyError> {
        let doc = self.doc.clone();
        let (pos, delete) = (usize::try_from(pos), usize::try_from(delete));
        let (Ok(pos), Ok(delete)) = (pos, delete) else {
            return Err(CubbyError::InvalidChange("the range is outside the text".into()));
        };
        on_runtime(async move { Ok(doc.splice_text(&key, pos, delete, &insert).await?) }).await
    }

    /// The document's current heads (hex change hashes): equal heads, equal documents.
    pub fn heads(&self) -> Vec<String> {
        self.doc.heads().iter().map(ToString::to_string).collect()
    }

    /// Calls `listener` with this document's events from now on, until the returned
    /// subscription is cancelled or dropped.
    pub fn subscribe(&self, listener: Arc<dyn DocumentListener>) -> Arc<Subscription> {
        Subscription::events(self.client.events(), Some(self.doc.id()), listener)
    }
}
