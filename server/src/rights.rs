//! The customer's rights over their data: export (portability) and erasure.
//!
//! An export is a tar archive streamed in chunks as it is built:
//!
//! ```text
//! cubby-export/documents/<id>.automerge   the document's full Automerge binary (Automerge::save)
//! cubby-export/documents/<id>.json        the same document rendered as JSON
//! cubby-export/devices.json               the device list
//! cubby-export/audit.json                 the audit log
//! cubby-export/manifest.json              ids, titles, heads, sizes and SHA-256 of every file
//! ```
//!
//! Erasure crypto-shreds: the customer is refused from the first moment, their streams close,
//! their live documents are dropped from memory, and the store destroys their data key durably
//! before removing their records.

use std::io::Write;

use cubby_core::history;
use cubby_core::meta::unix_ms;
use cubby_core::{CustomerId, DocMeta};
use cubby_proto::{ApiError, pb};
use cubby_store::{Space, Store};
use serde_json::json;
use tokio::sync::mpsc;

use crate::Shared;
use crate::audit;
use crate::devices;
use crate::durable::api_error;

/// Bytes per streamed export chunk.
const EXPORT_CHUNK: usize = 64 * 1024;

/// Sends what is written as export chunks (from a blocking thread).
struct ChunkWriter {
    tx: mpsc::Sender<Result<pb::ExportChunk, tonic::Status>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(EXPORT_CHUNK));
        self.tx.blocking_send(Ok(pb::ExportChunk { data })).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "export receiver gone")
        })
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= EXPORT_CHUNK {
            self.send()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Adds one file to the archive and describes it for the manifest.
fn add_file(
    tar: &mut tar::Builder<ChunkWriter>,
    path: &str,
    data: &[u8],
) -> Result<serde_json::Value, ApiError> {
    let mut header = tar::Header::new_ustar();
    header.set_size(data.len() as u64);
    header.set_mode(0o600);
    header.set_mtime(unix_ms() / 1000);
    tar.append_data(&mut header, format!("cubby-export/{path}"), data).map_err(|err| {
        tracing::debug!(%err, "export stream ended");
        ApiError::Unavailable("the export stream closed".into())
    })?;
    Ok(json!({"path": path, "size": data.len(), "sha256": hex(&cubby_crypto::sha256(data))}))
}

/// Writes the customer's export archive (blocking). `business` leaves private documents out.
fn write_export(
    store: &dyn Store,
    customer: &CustomerId,
    business: bool,
    out: ChunkWriter,
) -> Result<(), ApiError> {
    let mut tar = tar::Builder::new(out);
    let mut documents = Vec::new();
    for (id, _, meta) in store.list_docs(customer).map_err(api_error)? {
        let meta = DocMeta::decode(&meta).map_err(|_| ApiError::DataLoss("document"))?;
        if business && meta.private {
            continue; // Nothing of a private document reaches the business, its title included.
        }
        let mut entry = json!({
            "id": id.to_string(), "title": meta.title, "created_ms": meta.created_ms,
            "updated_ms": meta.updated_ms, "private": meta.private,
        });
        // A document deleted since the listing is simply left out.
        let Some(records) = store.load(customer, &id).map_err(api_error)? else { continue };
        let doc = history::rebuild(
            records.snapshot.as_ref().map(|s| s.bytes.as_slice()),
            records.chunks.iter().map(|(_, b)| b.as_slice()),
        )
        .map_err(|_| ApiError::DataLoss("document"))?;
        let binary = doc.save();
        let rendered = serde_json::to_vec_pretty(&cubby_core::json::to_json(&doc))
            .expect("JSON values always serialize");
        entry["heads"] = doc.get_heads().iter().map(|h| h.to_string()).collect();
        entry["automerge"] = add_file(&mut tar, &format!("documents/{id}.automerge"), &binary)?;
        entry["json"] = add_file(&mut tar, &format!("documents/{id}.json"), &rendered)?;
        documents.push(entry);
    }
    let device_list: Vec<_> = devices::list(store, customer)?
        .into_iter()
        .map(|(id, d)| {
            json!({"id": id.to_string(), "name": d.name, "platform": d.platform,
                   "public_key": hex(&d.public_key), "first_seen_ms": d.first_seen_ms,
                   "last_seen_ms": d.last_seen_ms, "revoked_ms": d.revoked_ms})
        })
        .collect();
    let audit_log: Vec<_> = audit::list(store, customer)
        .map_err(api_error)?
        .into_iter()
        .map(|e| {
            json!({"at_ms": e.at_ms, "actor": e.actor, "action": e.action,
                   "target": e.target, "outcome": e.outcome})
        })
        .collect();
    let pretty = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("JSON serializes");
    let devices_file = add_file(&mut tar, "devices.json", &pretty(&json!(device_list)))?;
    let audit_file = add_file(&mut tar, "audit.json", &pretty(&json!(audit_log)))?;
    let manifest = json!({
        "format": "cubby-export-v1",
        "exported_ms": unix_ms(),
        "documents": documents,
        "devices": devices_file,
        "audit": audit_file,
    });
    add_file(&mut tar, "manifest.json", &pretty(&manifest))?;
    let mut out =
        tar.into_inner().map_err(|_| ApiError::Unavailable("the export stream closed".into()))?;
    out.flush().map_err(|_| ApiError::Unavailable("the export stream closed".into()))
}

impl Shared {
    /// Starts streaming the customer's export, after recording it in their audit log.
    pub(crate) async fn export(
        &self,
        customer: CustomerId,
        actor: audit::Actor<'_>,
    ) -> Result<mpsc::Receiver<Result<pb::ExportChunk, tonic::Status>>, ApiError> {
        let business = matches!(actor, audit::Actor::Business(_));
        let actor = actor.to_string();
        let store = self.store.clone();
        self.blocking(move || {
            audit::record(&*store, &customer, &actor, "export", "", audit::Outcome::Ok)
                .map_err(api_error)
        })
        .await?;
        let (tx, rx) = mpsc::channel(4);
        let store = self.store.clone();
        let writer = ChunkWriter { tx: tx.clone(), buf: Vec::with_capacity(EXPORT_CHUNK) };
        self.tracker.spawn_blocking(move || {
            if let Err(err) = write_export(&*store, &customer, business, writer) {
                let _ = tx.blocking_send(Err(err.into()));
            }
        });
        Ok(rx)
    }

    /// Erases the customer and returns the receipt.
    pub(crate) async fn erase(&self, customer: CustomerId) -> Result<pb::ErasureReceipt, ApiError> {
        let store = self.store.clone();
        let (documents, bytes, device_count, audit_entries) = self
            .blocking(move || {
                let docs = store.list_docs(&customer).map_err(api_error)?;
                let bytes = crate::quota::history_bytes(&docs);
                let devices = store.scan_records(&customer, Space::DEVICES).map_err(api_error)?;
                let audit = store.scan_records(&customer, Space::AUDIT).map_err(api_error)?;
                Ok((docs.len() as u64, bytes, devices.len() as u64, audit.len() as u64))
            })
            .await?;
        // Refuse the customer from now on and close their streams, then drop their documents
        // from memory, then crypto-shred.
        self.customers.erasing(&customer);
        self.docs.evict_customer(&customer);
        self.quotas.forget(&customer);
        let store = self.store.clone();
        self.blocking(move || store.erase_customer(&customer).map_err(api_error)).await?;
        // The other nodes sharing the store do the same (the key is gone from the store).
        self.publish(crate::bus::Event::Erased { customer });
        tracing::info!(customer = %customer, documents, "customer erased");
        Ok(pb::ErasureReceipt {
            erased_ms: unix_ms(),
            documents,
            bytes,
            devices: device_count,
            audit_entries,
        })
    }
}
