//! `cubby.v1.Account`: the customer's own documents, unary.

use std::sync::Arc;

use cubby_core::{DocId, DocMeta};
use cubby_proto::{ApiError, pb};
use tonic::{Request, Response, Status};

use crate::Shared;
use crate::docs::DocMsg;
use crate::durable::api_error;

/// The Account service.
pub(crate) struct AccountService {
    pub(crate) shared: Arc<Shared>,
}

#[tonic::async_trait]
impl pb::account_server::Account for AccountService {
    async fn list_documents(
        &self,
        request: Request<pb::ListDocumentsRequest>,
    ) -> Result<Response<pb::ListDocumentsResponse>, Status> {
        let caller = self.shared.auth.authenticate(request.metadata())?;
        let store = self.shared.store.clone();
        let docs = tokio::task::spawn_blocking(move || store.list_docs(&caller.customer))
            .await
            .map_err(|_| ApiError::Internal)?
            .map_err(api_error)?;
        let documents = docs
            .into_iter()
            .map(|(id, meta)| {
                let meta = DocMeta::decode(&meta).map_err(|_| ApiError::DataLoss("document"))?;
                Ok(cubby_proto::doc_info(&id, &meta))
            })
            .collect::<Result<_, ApiError>>()?;
        Ok(Response::new(pb::ListDocumentsResponse { documents }))
    }

    async fn create_document(
        &self,
        request: Request<pb::CreateDocumentRequest>,
    ) -> Result<Response<pb::DocInfo>, Status> {
        let caller = self.shared.auth.authenticate(request.metadata())?;
        let title = request.into_inner().title;
        if title.len() > 1024 {
            return Err(ApiError::InvalidArgument("title is longer than 1024 bytes".into()).into());
        }
        let doc = DocId::from_bytes(cubby_crypto::random_array());
        let info = self
            .shared
            .docs
            .ask(caller.customer, doc, |reply| DocMsg::Create { title, reply })
            .await?;
        Ok(Response::new(info))
    }

    async fn delete_document(
        &self,
        request: Request<pb::DeleteDocumentRequest>,
    ) -> Result<Response<pb::DeleteDocumentResponse>, Status> {
        let caller = self.shared.auth.authenticate(request.metadata())?;
        let doc = cubby_proto::doc_id(&request.into_inner().doc_id)?;
        self.shared.docs.ask(caller.customer, doc, |reply| DocMsg::Delete { reply }).await?;
        Ok(Response::new(pb::DeleteDocumentResponse {}))
    }

    async fn get_document(
        &self,
        request: Request<pb::GetDocumentRequest>,
    ) -> Result<Response<pb::GetDocumentResponse>, Status> {
        let caller = self.shared.auth.authenticate(request.metadata())?;
        let doc = cubby_proto::doc_id(&request.into_inner().doc_id)?;
        let (info, json) =
            self.shared.docs.ask(caller.customer, doc, |reply| DocMsg::Read { reply }).await?;
        Ok(Response::new(pb::GetDocumentResponse { info: Some(info), json: json.to_string() }))
    }
}
