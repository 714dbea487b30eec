//! The app's handle to a loaded document.

use std::sync::Arc;

use automerge::transaction::Transaction;
use automerge::{Automerge, AutomergeError, ChangeHash, ROOT};
use cubby_core::{DocId, DocMeta};
use tokio::sync::broadcast;

use super::{DocEvent, DocShared};
use crate::{ClientError, Inner};

/// The app's handle to one document. Cheap to clone.
#[derive(Clone)]
pub struct DocHandle {
    shared: Arc<DocShared>,
    client: Arc<Inner>,
}

impl std::fmt::Debug for DocHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocHandle").field("id", &self.shared.id).finish_non_exhaustive()
    }
}

impl DocHandle {
    pub(crate) fn new(shared: Arc<DocShared>, client: Arc<Inner>) -> Self {
        Self { shared, client }
    }

    /// The document's id.
    pub fn id(&self) -> DocId {
        self.shared.id
    }

    /// The document's metadata.
    pub fn meta(&self) -> DocMeta {
        self.shared.meta()
    }

    /// Applies `f` as one Automerge transaction. Returns once the change is on this device's
    /// disk; it syncs in the background.
    pub async fn change<T>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, AutomergeError>,
    ) -> Result<T, ClientError> {
        self.change_with(f).await
    }

    /// Sets the document (its root map) to hold `value`, of a type that derives
    /// [`autosurgeon::Reconcile`], as one change. Only what differs is changed, as with
    /// [`DocHandle::put`], so another device's concurrent changes to other fields survive.
    pub async fn reconcile<R: autosurgeon::Reconcile>(&self, value: &R) -> Result<(), ClientError> {
        self.change_with(|tx| autosurgeon::reconcile(tx, value)).await
    }

    /// The document (its root map) read as a value of a type that derives
    /// [`autosurgeon::Hydrate`]; [`ClientError::Shape`] if it does not have that shape.
    pub fn hydrate<H: autosurgeon::Hydrate>(&self) -> Result<H, ClientError> {
        Ok(self.shared.read(autosurgeon::hydrate)?)
    }

    async fn change_with<T, E>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, E>,
    ) -> Result<T, ClientError>
    where
        ClientError: From<E>,
    {
        let id = self.shared.id;
        let (out, stored) = self.shared.change(f)?;
        let Some(stored) = stored else { return Ok(out) };
        // The engine may send the change while it is stored and flushed here: the server's copy
        // is durable on its own, and this call still returns only after the local flush.
        let _ = self.client.wake.send(id);
        stored.done().await?;
        self.shared.emit(DocEvent::Local);
        let _ = self.client.events.send((id, DocEvent::Local));
        Ok(out)
    }

    /// Sets a key of the root map to a JSON value (objects and arrays become maps and lists).
    /// Only what differs is changed, so that another device's concurrent changes survive the
    /// merge: an object set over a map updates it field by field (deleting the fields it
    /// lacks), a string set over Automerge text splices the difference in, and an equal value
    /// is left alone. An array replaces the list whole, and a string set over a string replaces
    /// it whole: the document's history keeps every version, so a long string that changes
    /// belongs in text ([`DocHandle::put_text`]), where a change records only what differs.
    pub async fn put(&self, key: &str, value: serde_json::Value) -> Result<(), ClientError> {
        let key = key.to_owned();
        self.change(move |tx| cubby_core::json::put_json(tx, &ROOT, &key, &value)).await
    }

    /// Sets a key of the root map to collaborative text holding `text`: text already there
    /// takes only the difference, spliced in, so that others' concurrent edits elsewhere in it
    /// survive (for strings people edit together; [`DocHandle::put`] of a string over text
    /// does the same).
    pub async fn put_text(&self, key: &str, text: &str) -> Result<(), ClientError> {
        let (key, text) = (key.to_owned(), text.to_owned());
        self.change(move |tx| cubby_core::json::put_text(tx, &ROOT, &key, &text)).await
    }

    /// Edits the text at a key of the root map: deletes `delete` characters at `pos` and
    /// inserts `insert` there (positions count Unicode code points). Refused (`invalid_change`)
    /// unless the key holds text ([`DocHandle::put_text`]) and the range is inside it.
    pub async fn splice_text(
        &self,
        key: &str,
        pos: usize,
        delete: usize,
        insert: &str,
    ) -> Result<(), ClientError> {
        let (key, insert) = (key.to_owned(), insert.to_owned());
        self.change(move |tx| cubby_core::json::splice_text(tx, &ROOT, &key, pos, delete, &insert))
            .await
    }

    /// The document rendered as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        self.shared.read(cubby_core::json::to_json)
    }

    /// Reads the document.
    pub fn read<R>(&self, f: impl FnOnce(&Automerge) -> R) -> R {
        self.shared.read(f)
    }

    /// The document's current heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.shared.read(Automerge::get_heads)
    }

    /// Events for this document from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<DocEvent> {
        self.shared.events.subscribe()
    }

    /// Events for this document from now on, as a stream. A reader that falls behind gets
    /// [`DocEvent::Missed`] in place of what it missed.
    pub fn events(&self) -> impl futures_util::Stream<Item = DocEvent> + Send + 'static {
        crate::event_stream(self.subscribe(), |count| DocEvent::Missed { count })
    }
}
