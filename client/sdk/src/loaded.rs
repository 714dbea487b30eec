//! The documents a client has loaded: one copy of each at most, loaded by one loader at a time,
//! kept while a handle, the sync engine or a queued write holds it (see `doc`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError, Weak};

use cubby_core::{DocId, DocMeta};
use cubby_store::{Space, Store, StoreError};

use crate::doc::{DocEvent, DocShared};
use crate::{ClientError, Inner, LOCAL};

/// The loaded copies of documents.
#[derive(Default)]
pub(crate) struct Loaded {
    copies: HashMap<DocId, Weak<DocShared>>,
    /// Per document being loaded or deleted, the gate its loaders and deleters pass one at a
    /// time. Two reading the store at once could each make a copy: the first registered,
    /// written and dropped while the second still read, the second would miss that write. One
    /// at a time, a loader reads only while no copy exists, and a copy lives until its writes
    /// are done (`doc::writer`). A document created on this device is registered without the
    /// gate (`Inner::adopt`), so a loader that finds it registered when it is done reading
    /// takes that copy instead. Two deleters (the app's call and the server's announcement of
    /// it) take turns too: the first deletes and tells, the second finds nothing.
    gates: HashMap<DocId, Arc<tokio::sync::Mutex<()>>>,
    /// Per document, the feed position of the newest server metadata taken (see
    /// [`Inner::take_server_meta`]).
    meta_seq: HashMap<DocId, u64>,
    /// Documents being deleted from the local store: none is loaded meanwhile (a copy loaded
    /// in the gap could write the document back after the deletion).
    deleting: HashSet<DocId>,
}

impl Loaded {
    /// The loaded copy of `id`; an error if it is being deleted.
    fn copy(&self, id: DocId) -> Result<Option<Arc<DocShared>>, ClientError> {
        if let Some(shared) = self.copies.get(&id).and_then(Weak::upgrade) {
            return Ok(Some(shared));
        }
        if self.deleting.contains(&id) {
            return Err(ClientError::UnknownDocument(id));
        }
        Ok(None)
    }

    /// The gate of `id` (see `gates`); give it back with [`Loaded::passed`].
    fn gate(&mut self, id: DocId) -> Arc<tokio::sync::Mutex<()>> {
        self.gates.entry(id).or_default().clone()
    }

    /// Forgets `id`'s gate if nobody else holds it.
    fn passed(&mut self, id: DocId, gate: &Arc<tokio::sync::Mutex<()>>) {
        // The map's and the caller's: nobody waits.
        if Arc::strong_count(gate) == 2 {
            self.gates.remove(&id);
        }
    }

    fn register(&mut self, shared: &Arc<DocShared>) {
        self.copies.retain(|_, weak| weak.strong_count() > 0);
        self.copies.insert(shared.id, Arc::downgrade(shared));
    }
}

impl Inner {
    /// Takes the title and private flag the server held for a document at feed position `seq`,
    /// if this device has the document and has not taken metadata from a later position: an
    /// announcement still on its way when `set_private` answered is older than that answer.
    pub(crate) async fn take_server_meta(
        self: &Arc<Self>,
        id: DocId,
        server: DocMeta,
        seq: u64,
    ) -> Result<(), ClientError> {
        let shared = match self.doc(id).await {
            Ok(shared) => shared,
            Err(ClientError::UnknownDocument(_)) => return Ok(()),
            Err(err) => return Err(err),
        };
        let stored = {
            let mut docs = self.docs.lock().unwrap_or_else(PoisonError::into_inner);
            let taken = docs.meta_seq.entry(id).or_default();
            if seq < *taken {
                return Ok(());
            }
            *taken = seq;
            // Stored even when the loaded copy had it already: whoever changed that copy may
            // not have stored it yet, and the caller may read the store next.
            shared.take_server_meta(&server)
        };
        stored.done().await
    }

    /// The loaded document, loading it from the local store if needed.
    pub(crate) async fn doc(self: &Arc<Self>, id: DocId) -> Result<Arc<DocShared>, ClientError> {
        let gate = {
            let mut docs = self.docs.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(shared) = docs.copy(id)? {
                return Ok(shared);
            }
            docs.gate(id)
        };
        let loaded = {
            let _turn = gate.lock().await;
            // Loaded by the loader before us.
            let loaded = self.docs.lock().unwrap_or_else(PoisonError::into_inner).copy(id);
            match loaded {
                Ok(Some(shared)) => Ok(shared),
                Ok(None) => self.load(id).await,
                Err(err) => Err(err),
            }
        };
        self.docs.lock().unwrap_or_else(PoisonError::into_inner).passed(id, &gate);
        loaded
    }

    /// Loads `id` from the local store and registers the copy; the caller passed its gate.
    async fn load(self: &Arc<Self>, id: DocId) -> Result<Arc<DocShared>, ClientError> {
        let shared = DocShared::open(self, id).await?;
        let mut docs = self.docs.lock().unwrap_or_else(PoisonError::into_inner);
        // A document created here is adopted without passing the gate (`Client::create`): if
        // it was meanwhile, its copy is the one.
        if let Some(existing) = docs.copy(id)? {
            return Ok(existing);
        }
        docs.register(&shared);
        Ok(shared)
    }

    /// Forgets every loaded document's sync session: the server started a new epoch (see
    /// `Challenge.epoch`). The engine offers each back with what the server needs to make it.
    pub(crate) fn heal_sessions(&self) {
        self.loaded().iter().for_each(|doc| doc.forget_session());
    }

    /// Starts every loaded document's sync session over, for a new connection.
    pub(crate) fn reconnect_sessions(&self) {
        self.loaded().iter().for_each(|doc| doc.reconnect());
    }

    /// Every loaded copy (taken out of the lock, to act on each under its own).
    fn loaded(&self) -> Vec<Arc<DocShared>> {
        let docs = self.docs.lock().unwrap_or_else(PoisonError::into_inner);
        docs.copies.values().filter_map(Weak::upgrade).collect()
    }

    /// Registers `shared` as the loaded copy of its document, unless a copy is loaded already:
    /// then that one is returned, and `shared` is dropped. There is never more than one loaded
    /// copy of a document, or edits to one would be invisible to the other.
    pub(crate) fn adopt(&self, shared: Arc<DocShared>) -> Arc<DocShared> {
        let mut docs = self.docs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = docs.copies.get(&shared.id).and_then(Weak::upgrade) {
            return existing;
        }
        docs.register(&shared);
        shared
    }

    /// Forgets a document deleted on the server; a handle the app still holds refuses changes
    /// from now on (written back, they would make the document again).
    /// Returns the loaded copy, if there was one.
    /// Until [`Inner::forgotten`], the document is not loaded again.
    pub(crate) fn forget(&self, id: &DocId) -> Option<Arc<DocShared>> {
        let copy = {
            let mut docs = self.docs.lock().unwrap_or_else(PoisonError::into_inner);
            docs.deleting.insert(*id);
            docs.copies.remove(id)
        };
        let copy = copy.and_then(|weak| weak.upgrade())?;
        copy.mark_deleted();
        Some(copy)
    }

    /// The local store's deletion of a forgotten document is over.
    pub(crate) fn forgotten(&self, id: &DocId) {
        self.docs.lock().unwrap_or_else(PoisonError::into_inner).deleting.remove(id);
    }

    /// Forgets every loaded copy (the local store is being wiped).
    pub(crate) fn unload_all(&self) {
        self.docs.lock().unwrap_or_else(PoisonError::into_inner).copies.clear();
    }

    /// Deletes a document deleted on the server from this device: a handle the app holds
    /// refuses changes from now on, and unsynced local changes to it (offline edits that lost
    /// to the deletion) are recorded for [`crate::Client::take_discarded`] and told in the
    /// event. Returns whether this device held it.
    pub(crate) async fn delete_local(self: &Arc<Self>, id: DocId) -> Result<bool, ClientError> {
        let gate = self.docs.lock().unwrap_or_else(PoisonError::into_inner).gate(id);
        let deleted = {
            let _turn = gate.lock().await;
            self.delete_in_turn(id).await
        };
        self.docs.lock().unwrap_or_else(PoisonError::into_inner).passed(id, &gate);
        deleted
    }

    /// [`Inner::delete_local`], the document's gate passed.
    async fn delete_in_turn(self: &Arc<Self>, id: DocId) -> Result<bool, ClientError> {
        let copy = self.forget(&id);
        let delete = move |store: &dyn Store| {
            let Some((_, meta)) = store.doc_meta(&LOCAL, &id)? else { return Ok(None) };
            // Only this device's own changes count as discarded, not a document it was
            // offering back.
            let unsynced = store.get_record(&LOCAL, Space::UNSYNCED, id.as_bytes())?.is_some();
            if unsynced {
                let title = DocMeta::decode(&meta).map(|m| m.title).unwrap_or_default();
                store.put_record(&LOCAL, Space::DISCARDED, id.as_bytes(), title.as_bytes())?;
            }
            store.delete_doc(&LOCAL, &id)?;
            for space in [Space::SYNC_STATES, Space::UNSYNCED, Space::HEAL] {
                store.remove_record(&LOCAL, space, id.as_bytes())?;
            }
            store.flush()?;
            Ok::<_, StoreError>(Some(unsynced))
        };
        // On the loaded copy's writer, after the changes made to it before `forget`: each lands
        // before the deletion (and counts as discarded), or is refused.
        let deleted = match &copy {
            Some(copy) => copy.queue(move |store, _| Ok(delete(store)?)).done().await,
            None => self.blocking(delete).await,
        };
        self.forgotten(&id);
        let Some(discarded) = deleted? else { return Ok(false) };
        if discarded {
            tracing::warn!(device = %self.device_id.short(), doc = %id.short(),
                "deleted elsewhere: this device's unsynced changes to it are discarded");
        }
        if let Some(copy) = copy {
            copy.emit(DocEvent::Deleted { discarded });
        }
        let _ = self.events.send((id, DocEvent::Deleted { discarded }));
        Ok(true)
    }
}
