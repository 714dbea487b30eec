//! `cubby.v1.Admin`: the business's backend acting on a customer's store.
//!
//! Callers hold a service token from the tenant's issuer with the tenant's admin scope, and name
//! customers by their subject; only that tenant's customers are reachable. Every call that
//! touches a customer (listings and usage included, and refused attempts) lands in the
//! customer's audit log before the answer goes out (an erasure removes the log with everything
//! else; its receipt goes to the caller). Documents the customer made private are refused, and
//! left out of listings and exports.

use std::sync::Arc;

use cubby_core::json::Edit;
use cubby_core::{CustomerId, DocId};
use cubby_proto::{ApiError, pb};

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::Shared;
use crate::account::checked_title;
use crate::audit::{self, Actor, Outcome};
use crate::auth::{self, Caller};
use crate::devices;
use crate::docs::DocMsg;
use crate::durable::api_error;
use crate::quota::history_bytes;

/// Edits in one change, at most.
const MAX_EDITS: usize = 1000;

/// The Admin service.
pub(crate) struct AdminService {
    pub(crate) shared: Arc<Shared>,
}

impl AdminService {
    /// The business caller and the customer it names, who must exist and not be erased.
    async fn target(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        subject: &str,
    ) -> Result<(Caller, CustomerId), ApiError> {
        let caller = self.shared.business(metadata).await?;
        if subject.is_empty() || subject.len() > auth::MAX_SUBJECT_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "subject must be 1 to {} bytes",
                auth::MAX_SUBJECT_BYTES
            )));
        }
        let customer = self.shared.auth.customer_id(&caller.tenant, subject);
        if self.shared.customers.is_erased(&customer) {
            return Err(ApiError::NotFound("customer"));
        }
        let store = self.shared.store.clone();
        let exists = self
            .shared
            .blocking(move || Ok(store.get_key(&customer).map_err(api_error)?.is_some()))
            .await?;
        if !exists {
            return Err(ApiError::NotFound("customer"));
        }
        Ok((caller, customer))
    }

    /// Records an admin action in the customer's audit log, durably.
    async fn audit(
        &self,
        customer: CustomerId,
        caller: &Caller,
        action: &'static str,
        target: String,
        outcome: Outcome,
    ) -> Result<(), ApiError> {
        let store = self.shared.store.clone();
        let actor = Actor::Business(&caller.subject).to_string();
        self.shared
            .blocking(move || {
                audit::record(&*store, &customer, &actor, action, &target, outcome)
                    .map_err(api_error)
            })
            .await
    }

    /// Audits the outcome of a document request and passes the result on.
    async fn audited<T>(
        &self,
        customer: CustomerId,
        caller: &Caller,
        action: &'static str,
        doc: &DocId,
        result: Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(ApiError::PermissionDenied(_)) => Outcome::Denied,
            // Nothing was reached: unknown documents are not audited.
            Err(_) => return result,
        };
        self.audit(customer, caller, action, doc.to_string(), outcome).await?;
        result
    }
}

fn edit_of(edit: pb::Edit) -> Result<(String, Edit), ApiError> {
    let parse = |text: &str| {
        serde_json::from_str(text).map_err(|_| {
            ApiError::InvalidArgument(format!("the value for {:?} is not JSON", edit.path))
        })
    };
    let op = match &edit.op {
        Some(pb::edit::Op::SetJson(text)) => Edit::Set(parse(text)?),
        Some(pb::edit::Op::InsertJson(text)) => Edit::Insert(parse(text)?),
        Some(pb::edit::Op::Delete(_)) => Edit::Delete,
        None => {
            return Err(ApiError::InvalidArgument(format!(
                "the edit at {:?} has no op",
                edit.path
            )));
        }
    };
    Ok((edit.path, op))
}

/// Where a page of customers ends: the id in hex, which orders as the ids do (base58 does not:
/// its strings vary in length).
fn page_token(customer: &CustomerId) -> String {
    customer.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    type ExportCustomerStream = ReceiverStream<Result<pb::ExportChunk, Status>>;

    async fn list_customers(
        &self,
        request: Request<pb::ListCustomersRequest>,
    ) -> Result<Response<pb::ListCustomersResponse>, Status> {
        let caller = self.shared.business(request.metadata()).await?;
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => 100,
            n => n.min(1000) as usize,
        };
        let after = request.page_token;
        let shared = self.shared.clone();
        let (customers, next_page_token) = self
            .shared
            .blocking(move || {
                let store = &*shared.store;
                let mut page = Vec::new();
                let mut next = String::new();
                for customer in store.list_customers().map_err(api_error)? {
                    if customer == cubby_store::SYSTEM
                        || (!after.is_empty() && page_token(&customer) <= after)
                        || shared.customers.is_erased(&customer)
                    {
                        continue;
                    }
                    let Some(profile) = shared.customers.profile(&customer)? else { continue };
                    if profile.tenant != caller.tenant {
                        continue;
                    }
                    if page.len() == page_size {
                        next = page_token(&page.last().map_or(customer, |(c, _)| *c));
                        break;
                    }
                    let docs = store.list_docs(&customer).map_err(api_error)?;
                    let bytes = history_bytes(&docs);
                    let devices = devices::list(store, &customer)?;
                    let last_seen_ms =
                        devices.iter().map(|(_, d)| d.last_seen_ms).max().unwrap_or(0);
                    let actor = Actor::Business(&caller.subject).to_string();
                    audit::append(store, &customer, &actor, "admin.usage", "", Outcome::Ok)
                        .map_err(api_error)?;
                    page.push((
                        customer,
                        pb::CustomerUsage {
                            subject: profile.subject,
                            documents: docs.len() as u64,
                            bytes,
                            devices: devices.len() as u64,
                            last_seen_ms,
                        },
                    ));
                }
                // Every customer listed was read: their audit entries are durable before the
                // answer goes out.
                if !page.is_empty() {
                    store.flush().map_err(api_error)?;
                }
                Ok((page.into_iter().map(|(_, usage)| usage).collect(), next))
            })
            .await?;
        Ok(Response::new(pb::ListCustomersResponse { customers, next_page_token }))
    }

    async fn list_customer_documents(
        &self,
        request: Request<pb::CustomerRequest>,
    ) -> Result<Response<pb::ListDocumentsResponse>, Status> {
        let (caller, customer) =
            self.target(request.metadata(), &request.get_ref().subject).await?;
        self.audit(customer, &caller, "admin.list", String::new(), Outcome::Ok).await?;
        let mut documents = self.shared.documents(customer).await?;
        // Nothing of a private document reaches the business, its title included.
        documents.retain(|d| !d.private);
        Ok(Response::new(pb::ListDocumentsResponse { documents }))
    }

    async fn create_customer_document(
        &self,
        request: Request<pb::CreateCustomerDocumentRequest>,
    ) -> Result<Response<pb::DocInfo>, Status> {
        let (caller, customer) =
            self.target(request.metadata(), &request.get_ref().subject).await?;
        let title = checked_title(request.into_inner().title)?;
        let doc = DocId::from_bytes(cubby_crypto::random_array());
        let result = self
            .shared
            .docs
            .ask(customer, doc, |reply| DocMsg::Create { title, reply })
            .await
            .map(|summary| summary.info());
        Ok(Response::new(self.audited(customer, &caller, "admin.create", &doc, result).await?))
    }

    async fn read_document(
        &self,
        request: Request<pb::DocumentRequest>,
    ) -> Result<Response<pb::GetDocumentResponse>, Status> {
        let (caller, customer) =
            self.target(request.metadata(), &request.get_ref().subject).await?;
        let doc = cubby_proto::doc_id(&request.get_ref().doc_id)?;
        let result = self
            .shared
            .docs
            .ask(customer, doc, |reply| DocMsg::Read { business: true, reply })
            .await;
        let (info, json) = self.audited(customer, &caller, "admin.read", &doc, result).await?;
        let info = Some(info.info());
        Ok(Response::new(pb::GetDocumentResponse { info, json: json.to_string() }))
    }

    async fn change_document(
        &self,
        request: Request<pb::ChangeDocumentRequest>,
    ) -> Result<Response<pb::GetDocumentResponse>, Status> {
        let (caller, customer) =
            self.target(request.metadata(), &request.get_ref().subject).await?;
        let request = request.into_inner();
        let doc = cubby_proto::doc_id(&request.doc_id)?;
        if request.edits.is_empty() || request.edits.len() > MAX_EDITS {
            return Err(ApiError::InvalidArgument("send 1 to 1000 edits".into()).into());
        }
        let edits = request.edits.into_iter().map(edit_of).collect::<Result<Vec<_>, _>>()?;
        let result =
            self.shared.docs.ask(customer, doc, |reply| DocMsg::Edit { edits, reply }).await;
        let (info, json) = self.audited(customer, &caller, "admin.write", &doc, result).await?;
        let info = Some(info.info());
        Ok(Response::new(pb::GetDocumentResponse { info, json: json.to_string() }))
    }

    async fn export_customer(
        &self,
        request: Request<pb::CustomerRequest>,
    ) -> Result<Response<Self::ExportCustomerStream>, Status> {
        let (caller, customer) =
            self.target(request.metadata(), &request.get_ref().subject).await?;
        let chunks = self.shared.export(customer, Actor::Business(&caller.subject)).await?;
        Ok(Response::new(ReceiverStream::new(chunks)))
    }

    async fn erase_customer(
        &self,
        request: Request<pb::CustomerRequest>,
    ) -> Result<Response<pb::ErasureReceipt>, Status> {
        let (_, customer) = self.target(request.metadata(), &request.get_ref().subject).await?;
        Ok(Response::new(self.shared.erase(customer).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_order_as_the_customer_ids_do() {
        let mut ids: Vec<CustomerId> =
            (0..1000).map(|_| CustomerId::from_bytes(cubby_crypto::random_array())).collect();
        ids.sort();
        let by_token = |f: fn(&CustomerId) -> String| {
            let mut sorted = ids.clone();
            sorted.sort_by_key(f);
            sorted
        };
        assert_eq!(by_token(page_token), ids);
        // Why not the printed id: base58 strings vary in length, and sort differently.
        assert_ne!(by_token(|c| c.to_string()), ids);
    }
}
