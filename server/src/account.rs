//! `cubby.v1.Account`: the customer's own documents, devices, export, erasure and audit log.

use std::sync::Arc;

use cubby_core::{DocId, DocMeta};
use cubby_proto::{ApiError, pb};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::Shared;
use crate::audit::{self, Actor};
use crate::devices;
use crate::docs::DocMsg;
use crate::durable::api_error;

/// Titles longer than this are refused.
const MAX_TITLE: usize = 1024;

/// `title` if it is short enough for a document's title.
pub(crate) fn checked_title(title: String) -> Result<String, ApiError> {
    if title.len() > MAX_TITLE {
        return Err(ApiError::InvalidArgument("title is longer than 1024 bytes".into()));
    }
    Ok(title)
}

impl Shared {
    /// Every document of the customer, with its metadata.
    pub(crate) async fn documents(
        &self,
        customer: cubby_core::CustomerId,
    ) -> Result<Vec<pb::DocInfo>, ApiError> {
        let store = self.store.clone();
        self.blocking(move || {
            store
                .list_docs(&customer)
                .map_err(api_error)?
                .into_iter()
                .map(|(id, _, meta)| {
                    let meta =
                        DocMeta::decode(&meta).map_err(|_| ApiError::DataLoss("document"))?;
                    Ok(cubby_proto::doc_info(&id, &meta))
                })
                .collect()
        })
        .await
    }
}

/// The Account service.
pub(crate) struct AccountService {
    pub(crate) shared: Arc<Shared>,
}

#[tonic::async_trait]
impl pb::account_server::Account for AccountService {
    type ExportStream = ReceiverStream<Result<pb::ExportChunk, Status>>;

    async fn list_documents(
        &self,
        request: Request<pb::ListDocumentsRequest>,
    ) -> Result<Response<pb::ListDocumentsResponse>, Status> {
        let caller = self.shared.customer(request.metadata()).await?;
        let documents = self.shared.documents(caller.customer).await?;
        Ok(Response::new(pb::ListDocumentsResponse { documents }))
    }

    async fn create_document(
        &self,
        request: Request<pb::CreateDocumentRequest>,
    ) -> Result<Response<pb::DocInfo>, Status> {
        let caller = self.shared.customer(request.metadata()).await?;
        let title = checked_title(request.into_inner().title)?;
        let doc = DocId::from_bytes(cubby_crypto::random_array());
        let info = self
            .shared
            .docs
            .ask(caller.customer, doc, |reply| DocMsg::Create { title, reply })
            .await?;
        Ok(Response::new(info.info()))
    }

    async fn delete_document(
        &self,
        request: Request<pb::DeleteDocumentRequest>,
    ) -> Result<Response<pb::DeleteDocumentResponse>, Status> {
        let caller = self.shared.customer(request.metadata()).await?;
        let doc = cubby_proto::doc_id(&request.into_inner().doc_id)?;
        self.shared.docs.ask(caller.customer, doc, |reply| DocMsg::Delete { reply }).await?;
        Ok(Response::new(pb::DeleteDocumentResponse {}))
    }

    async fn get_document(
        &self,
        request: Request<pb::GetDocumentRequest>,
    ) -> Result<Response<pb::GetDocumentResponse>, Status> {
        let caller = self.shared.customer(request.metadata()).await?;
        let doc = cubby_proto::doc_id(&request.into_inner().doc_id)?;
        let (info, json) = self
            .shared
            .docs
            .ask(caller.customer, doc, |reply| DocMsg::Read { business: false, reply })
            .await?;
        let info = Some(info.info());
        Ok(Response::new(pb::GetDocumentResponse { info, json: json.to_string() }))
    }

    async fn set_document_private(
        &self,
        request: Request<pb::SetDocumentPrivateRequest>,
    ) -> Result<Response<pb::DocInfo>, Status> {
        let caller = self.shared.customer(request.metadata()).await?;
        let request = request.into_inner();
        let doc = cubby_proto::doc_id(&request.doc_id)?;
        let private = Some(request.private);
        let info = self
            .shared
            .docs
            .ask(caller.customer, doc, |reply| DocMsg::SetMeta { title: None, private, reply })
            .await?;
        Ok(Response::new(info.info()))
    }

    async fn rename_document(
        &self,
        request: Request<pb::RenameDocumentRequest>,
    ) -> Result<Response<pb::DocInfo>, Status> {
        let caller = self.shared.customer(request.metadata()).await?;
        let request = request.into_inner();
        let doc = cubby_proto::doc_id(&request.doc_id)?;
        let title = Some(checked_title(request.title)?);
        let info = self
            .shared
            .docs
            .ask(caller.customer, doc, |reply| DocMsg::SetMeta { title, private: None, reply })
            .await?;
        Ok(Response::new(info.info()))
    }

    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let caller = self.shared.customer(request.metadata()).await?;
        let store = self.shared.store.clone();
        let list = self.shared.blocking(move || devices::list(&*store, &caller.customer)).await?;
        let devices = list.iter().map(|(id, record)| record.info(id)).collect();
        Ok(Response::new(pb::ListDevicesResponse { devices }))
    }

    async fn revoke_device(
        &self,
        request: Request<pb::RevokeDeviceRequest>,
    ) -> Result<Response<pb::DeviceInfo>, Status> {
        let caller = self.shared.customer(request.metadata()).await?;
        let device = cubby_proto::device_id(&request.into_inner().device_id)?;
        let shared = self.shared.clone();
        let record = self
            .shared
            .blocking(move || {
                let record = shared.devices.revoke(&shared.vault, &caller.customer, &device)?;
                shared.customers.revoked(&caller.customer, &device, record.tokens())?;
                Ok(record)
            })
            .await?;
        let tokens = record.tokens().collect();
        self.shared.publish(crate::bus::Event::Revoked {
            customer: caller.customer,
            device,
            tokens,
        });
        Ok(Response::new(record.info(&device)))
    }

    async fn export(
        &self,
        request: Request<pb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let caller = self.shared.customer(request.metadata()).await?;
        let chunks = self.shared.export(caller.customer, Actor::Customer).await?;
        Ok(Response::new(ReceiverStream::new(chunks)))
    }

    async fn delete_account(
        &self,
        request: Request<pb::DeleteAccountRequest>,
    ) -> Result<Response<pb::ErasureReceipt>, Status> {
        let caller = self.shared.customer(request.metadata()).await?;
        Ok(Response::new(self.shared.erase(caller.customer).await?))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let caller = self.shared.customer(request.metadata()).await?;
        let store = self.shared.store.clone();
        let entries = self
            .shared
            .blocking(move || audit::list(&*store, &caller.customer).map_err(api_error))
            .await?;
        Ok(Response::new(pb::ListAuditResponse { entries }))
    }
}
