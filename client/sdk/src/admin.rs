//! The business's side: the server's Admin API, for a backend holding a service token (a token
//! from the tenant's issuer that grants the tenant's admin scope). Customers are named by their
//! subject in the identity provider; documents by their id. Every call is recorded in the
//! customer's audit log, and documents the customer marked private are out of reach.
//!
//! ```no_run
//! # async fn run() -> Result<(), cubby_client::ClientError> {
//! let admin = cubby_client::Admin::new(
//!     "https://cubby.example.com",
//!     cubby_client::StaticToken::new("eyJ..."),
//!     None,
//! )?;
//! for customer in admin.customers().await? {
//!     println!("{} has {} documents", customer.subject, customer.documents);
//! }
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;

use cubby_core::{DocId, DocMeta};
use cubby_proto::pb;
use tokio::io::AsyncWrite;

use crate::account::{authed, refused, write_export};
use crate::engine::Remote;
use crate::{ClientError, ErasureReceipt, TokenProvider};

/// A customer who has used Cubby, with their usage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CustomerUsage {
    /// Their subject in the tenant's identity provider.
    pub subject: String,
    /// Documents, private ones included.
    pub documents: u64,
    /// Bytes of document history.
    pub bytes: u64,
    /// Devices registered.
    pub devices: u64,
    /// When a device of theirs was last seen, milliseconds since the Unix epoch; 0 if never.
    pub last_seen_ms: u64,
}

/// One edit of [`Admin::change`], at a JSON Pointer path (RFC 6901) such as `/settings/theme`.
#[derive(Clone, Debug, PartialEq)]
pub enum Edit {
    /// Sets the value at the path; missing parent maps are created.
    Set(String, serde_json::Value),
    /// Deletes the map key or list element at the path.
    Delete(String),
    /// Inserts into a list before the index at the path (`-` appends).
    Insert(String, serde_json::Value),
}

/// A client of the Admin API.
pub struct Admin {
    remote: Remote,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

fn doc_meta(info: Option<pb::DocInfo>) -> Result<(DocId, DocMeta), ClientError> {
    let info = info.ok_or_else(|| crate::account::bad_answer("no document"))?;
    let id = cubby_proto::doc_id(&info.doc_id)
        .map_err(|_| crate::account::bad_answer("a bad document id"))?;
    Ok((id, cubby_proto::doc_meta(&info)))
}

impl Admin {
    /// An Admin API client of `server` (`https://host:port`), with service tokens from `tokens`
    /// and, for a server whose certificate no public CA issued, its CA certificate (PEM).
    pub fn new(
        server: &str,
        tokens: impl TokenProvider,
        ca_pem: Option<Vec<u8>>,
    ) -> Result<Self, ClientError> {
        Ok(Self { remote: Remote::new(server, Arc::new(tokens), ca_pem, None)? })
    }

    /// Every customer who has used Cubby (all pages).
    pub async fn customers(&self) -> Result<Vec<CustomerUsage>, ClientError> {
        let (mut admin, token) = self.remote.admin().await?;
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let asked = pb::ListCustomersRequest { page_size: 1000, page_token };
            let page =
                admin.list_customers(authed(asked, &token)?).await.map_err(refused)?.into_inner();
            all.extend(page.customers.into_iter().map(|c| CustomerUsage {
                subject: c.subject,
                documents: c.documents,
                bytes: c.bytes,
                devices: c.devices,
                last_seen_ms: c.last_seen_ms,
            }));
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            page_token = page.next_page_token;
        }
    }

    /// The customer's documents that are not private.
    pub async fn documents(&self, subject: &str) -> Result<Vec<(DocId, DocMeta)>, ClientError> {
        let (mut admin, token) = self.remote.admin().await?;
        let asked = pb::CustomerRequest { subject: subject.into() };
        let listed = admin
            .list_customer_documents(authed(asked, &token)?)
            .await
            .map_err(refused)?
            .into_inner();
        listed.documents.into_iter().map(|info| doc_meta(Some(info))).collect()
    }

    /// Creates a document in the customer's store; their devices receive it.
    pub async fn create(&self, subject: &str, title: &str) -> Result<DocId, ClientError> {
        let (mut admin, token) = self.remote.admin().await?;
        let asked =
            pb::CreateCustomerDocumentRequest { subject: subject.into(), title: title.into() };
        let info = admin.create_customer_document(authed(asked, &token)?).await.map_err(refused)?;
        Ok(doc_meta(Some(info.into_inner()))?.0)
    }

    /// A document of the customer, as JSON.
    pub async fn read(&self, subject: &str, doc: DocId) -> Result<serde_json::Value, ClientError> {
        let (mut admin, token) = self.remote.admin().await?;
        let asked =
            pb::DocumentRequest { subject: subject.into(), doc_id: doc.as_bytes().to_vec() };
        let read = admin.read_document(authed(asked, &token)?).await.map_err(refused)?;
        serde_json::from_str(&read.into_inner().json)
            .map_err(|e| crate::account::bad_answer(&format!("bad JSON: {e}")))
    }

    /// Applies `edits` to a document of the customer as one change (all or none); their
    /// connected devices see it live. Returns the document after it.
    pub async fn change(
        &self,
        subject: &str,
        doc: DocId,
        edits: &[Edit],
    ) -> Result<serde_json::Value, ClientError> {
        use pb::edit::Op;
        let (mut admin, token) = self.remote.admin().await?;
        let edits = edits
            .iter()
            .map(|edit| match edit {
                Edit::Set(path, value) => {
                    pb::Edit { path: path.clone(), op: Some(Op::SetJson(value.to_string())) }
                }
                Edit::Delete(path) => {
                    pb::Edit { path: path.clone(), op: Some(Op::Delete(pb::Delete {})) }
                }
                Edit::Insert(path, value) => {
                    pb::Edit { path: path.clone(), op: Some(Op::InsertJson(value.to_string())) }
                }
            })
            .collect();
        let asked = pb::ChangeDocumentRequest {
            subject: subject.into(),
            doc_id: doc.as_bytes().to_vec(),
            edits,
        };
        let changed = admin.change_document(authed(asked, &token)?).await.map_err(refused)?;
        serde_json::from_str(&changed.into_inner().json)
            .map_err(|e| crate::account::bad_answer(&format!("bad JSON: {e}")))
    }

    /// Writes the customer's export (a tar archive, as their own export but without private
    /// documents) to `out`; returns its size.
    pub async fn export(
        &self,
        subject: &str,
        out: impl AsyncWrite + Unpin,
    ) -> Result<u64, ClientError> {
        let (mut admin, token) = self.remote.admin().await?;
        let asked = pb::CustomerRequest { subject: subject.into() };
        let chunks =
            admin.export_customer(authed(asked, &token)?).await.map_err(refused)?.into_inner();
        write_export(chunks, out).await
    }

    /// Erases the customer: everything of theirs becomes unreadable, their devices wipe.
    pub async fn erase(&self, subject: &str) -> Result<ErasureReceipt, ClientError> {
        let (mut admin, token) = self.remote.admin().await?;
        let asked = pb::CustomerRequest { subject: subject.into() };
        let receipt = admin.erase_customer(authed(asked, &token)?).await.map_err(refused)?;
        Ok(receipt.into_inner().into())
    }
}
