//! The customer's rights, from a device: see and revoke devices, mark documents private, export
//! everything, read the audit log, erase the account. Each is one call to the server's Account
//! service, so each needs the server to be reachable.

use std::future::Future;

use cubby_core::{DeviceId, DocId, DocMeta};
use cubby_proto::pb;
use cubby_proto::pb::account_client::AccountClient;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tonic::transport::Channel;

use crate::engine::{WipeReason, wipe_reason};
use crate::{Client, ClientError};

/// A device of the customer, as the server knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its id.
    pub id: DeviceId,
    /// Its name, e.g. "Ana's phone".
    pub name: String,
    /// Its platform, e.g. "ios".
    pub platform: String,
    /// When it first connected, milliseconds since the Unix epoch.
    pub first_seen_ms: u64,
    /// When it last connected.
    pub last_seen_ms: u64,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<u64>,
    /// Whether it is the device this client runs on.
    pub this_device: bool,
}

/// One entry of the customer's audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    /// When, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Who: `customer`, `device:<id>` or `business:<service>`.
    pub actor: String,
    /// What, e.g. `admin.read`, `device.revoke`, `export`.
    pub action: String,
    /// What it was done to (a document or device id), or empty.
    pub target: String,
    /// `ok` or `denied`.
    pub outcome: String,
}

/// What an account erasure removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErasureReceipt {
    /// When, milliseconds since the Unix epoch.
    pub erased_ms: u64,
    /// Documents erased.
    pub documents: u64,
    /// Bytes of document history erased.
    pub bytes: u64,
    /// Devices forgotten.
    pub devices: u64,
    /// Audit entries erased.
    pub audit_entries: u64,
}

impl From<pb::ErasureReceipt> for ErasureReceipt {
    fn from(r: pb::ErasureReceipt) -> Self {
        Self {
            erased_ms: r.erased_ms,
            documents: r.documents,
            bytes: r.bytes,
            devices: r.devices,
            audit_entries: r.audit_entries,
        }
    }
}

/// Writes an export's chunks to `out` as they arrive; returns its size in bytes.
pub(crate) async fn write_export(
    mut chunks: tonic::Streaming<pb::ExportChunk>,
    mut out: impl AsyncWrite + Unpin,
) -> Result<u64, ClientError> {
    let mut size = 0;
    while let Some(chunk) = chunks.message().await.map_err(refused)? {
        out.write_all(&chunk.data).await.map_err(ClientError::Io)?;
        size += chunk.data.len() as u64;
    }
    out.flush().await.map_err(ClientError::Io)?;
    Ok(size)
}

pub(crate) fn refused(status: tonic::Status) -> ClientError {
    ClientError::refused(&status)
}

/// An answer from the server the client cannot read.
pub(crate) fn bad_answer(what: &str) -> ClientError {
    ClientError::server(crate::ErrorCode::Internal, format!("the server sent {what}"))
}

pub(crate) fn authed<T>(message: T, token: &str) -> Result<tonic::Request<T>, ClientError> {
    let mut request = tonic::Request::new(message);
    crate::wire::bearer(&mut request, token)
        .map_err(|e| ClientError::server(crate::ErrorCode::Unauthenticated, e))?;
    Ok(request)
}

impl Client {
    fn remote(&self) -> Result<&crate::engine::Remote, ClientError> {
        self.remote.as_ref().ok_or_else(|| ClientError::Config("no server configured".into()))
    }

    /// Handles a refusal that tells this device to wipe (revoked, or the account erased).
    async fn refused_or_wiped(&self, status: tonic::Status) -> ClientError {
        if let Some(reason) = wipe_reason(&status) {
            let _ = self.stop_sync();
            self.inner.wipe(reason).await;
        }
        refused(status)
    }

    /// Makes one call of the Account API with `request` over the client's connection for such
    /// calls. A token the server refuses is fetched fresh and the call made once more (a token
    /// that expired since the provider gave it); a refusal that tells this device to wipe
    /// wipes it.
    async fn account_call<Q, T, F, Fut>(&self, request: Q, call: F) -> Result<T, ClientError>
    where
        Q: Clone,
        F: Fn(AccountClient<Channel>, tonic::Request<Q>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let remote = self.remote()?;
        let mut fresh = false;
        loop {
            let (account, token) = remote.account(fresh).await?;
            match call(account, authed(request.clone(), &token)?).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status)
                    if status.code() == tonic::Code::Unauthenticated
                        && !fresh
                        && wipe_reason(&status).is_none() =>
                {
                    fresh = true;
                }
                Err(status) => match remote.misconfigured(&status) {
                    Some(why) => return Err(ClientError::Config(why)),
                    None => return Err(self.refused_or_wiped(status).await),
                },
            }
        }
    }

    /// Every device of the customer, revoked ones included.
    pub async fn devices(&self) -> Result<Vec<DeviceInfo>, ClientError> {
        let request = pb::ListDevicesRequest {};
        let response =
            self.account_call(request, |mut a, r| async move { a.list_devices(r).await }).await?;
        response.devices.into_iter().map(|d| self.device_info(d)).collect()
    }

    fn device_info(&self, d: pb::DeviceInfo) -> Result<DeviceInfo, ClientError> {
        let id =
            DeviceId::from_slice(&d.device_id).map_err(|_| bad_answer("a malformed device id"))?;
        Ok(DeviceInfo {
            id,
            name: d.name,
            platform: d.platform,
            first_seen_ms: d.first_seen_ms,
            last_seen_ms: d.last_seen_ms,
            revoked_ms: (d.revoked_ms != 0).then_some(d.revoked_ms),
            this_device: id == self.inner.device_id,
        })
    }

    /// Revokes a device: its streams close, it can never sync again, and it wipes its local
    /// copy when the server tells it. Revoking this device wipes this client.
    pub async fn revoke_device(&self, id: DeviceId) -> Result<DeviceInfo, ClientError> {
        let request = pb::RevokeDeviceRequest { device_id: id.as_bytes().to_vec() };
        let revoked =
            self.account_call(request, |mut a, r| async move { a.revoke_device(r).await }).await?;
        self.device_info(revoked)
    }

    /// Marks a document private (the business's admin API can then neither read nor change it)
    /// or shared again.
    pub async fn set_private(&self, doc: DocId, private: bool) -> Result<DocMeta, ClientError> {
        let request = pb::SetDocumentPrivateRequest { doc_id: doc.as_bytes().to_vec(), private };
        let info = self
            .account_call(request, |mut a, r| async move { a.set_document_private(r).await })
            .await?;
        self.take_answered_meta(doc, &info).await
    }

    /// Takes the title and private flag the server answered with, on this device too.
    async fn take_answered_meta(
        &self,
        doc: DocId,
        info: &pb::DocInfo,
    ) -> Result<DocMeta, ClientError> {
        let meta = cubby_proto::doc_meta(info);
        self.inner.take_server_meta(doc, meta.clone(), info.seq).await?;
        Ok(meta)
    }

    /// Gives a document a new title, on the server and on this device; other devices take it
    /// when they hear of the change.
    pub async fn rename(&self, doc: DocId, title: &str) -> Result<DocMeta, ClientError> {
        let id = doc.as_bytes().to_vec();
        let request = pb::RenameDocumentRequest { doc_id: id, title: title.to_owned() };
        let info = self
            .account_call(request, |mut a, r| async move { a.rename_document(r).await })
            .await?;
        self.take_answered_meta(doc, &info).await
    }

    /// Deletes a document for good, on the server and on this device (other devices delete
    /// their copies when they hear of it). This device's changes the server never got are
    /// discarded and reported as for any deletion ([`crate::DocEvent::Deleted`]).
    pub async fn delete(&self, doc: DocId) -> Result<(), ClientError> {
        let request = pb::DeleteDocumentRequest { doc_id: doc.as_bytes().to_vec() };
        self.account_call(request, |mut a, r| async move { a.delete_document(r).await }).await?;
        self.inner.delete_local(doc).await?;
        Ok(())
    }

    /// Downloads everything the server holds about the customer as a tar archive into `out`;
    /// returns its size in bytes.
    pub async fn export(&self, out: impl AsyncWrite + Unpin) -> Result<u64, ClientError> {
        let request = pb::ExportRequest {};
        let chunks =
            self.account_call(request, |mut a, r| async move { a.export(r).await }).await?;
        write_export(chunks, out).await
    }

    /// The customer's audit log, oldest first.
    pub async fn audit(&self) -> Result<Vec<AuditEntry>, ClientError> {
        let request = pb::ListAuditRequest {};
        let entries = self
            .account_call(request, |mut a, r| async move { a.list_audit(r).await })
            .await?
            .entries;
        Ok(entries
            .into_iter()
            .map(|e| AuditEntry {
                at_ms: e.at_ms,
                actor: e.actor,
                action: e.action,
                target: e.target,
                outcome: e.outcome,
            })
            .collect())
    }

    /// Erases the customer's account on the server (keys first, then data) and wipes this
    /// device. Other devices wipe on their next contact.
    pub async fn delete_account(&self) -> Result<ErasureReceipt, ClientError> {
        let request = pb::DeleteAccountRequest {};
        let receipt =
            self.account_call(request, |mut a, r| async move { a.delete_account(r).await }).await?;
        let _ = self.stop_sync();
        self.inner.wipe(WipeReason::AccountErased).await;
        Ok(receipt.into())
    }
}
