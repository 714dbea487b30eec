//! Cubby's wire contract.
//!
//! The code generated from `proto/cubby/v1` lives in [`pb`]; the rest of Cubby converts at this
//! boundary with the validating helpers here, and maps errors to `tonic::Status` only through
//! [`ApiError`].

use cubby_core::{DocId, DocMeta};

pub mod codec;
pub mod parts;

/// Generated protobuf and gRPC code for `cubby.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("cubby.v1");
}

/// The encoded `FileDescriptorSet` of `cubby.v1`, for the gRPC reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/cubby_descriptor.bin"));

/// Everything an API call may answer besides success: a small closed set of gRPC codes with
/// short messages that never carry internal detail or another customer's data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such thing in the caller's store (also the answer for another customer's ids).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The caller is known but not allowed.
    #[error("{0}")]
    PermissionDenied(String),
    /// No valid credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// A limit was hit (size, rate, storage).
    #[error("{0}")]
    ResourceExhausted(String),
    /// Try again later (storage unavailable, shutting down).
    #[error("{0}")]
    Unavailable(String),
    /// Stored data failed authentication; the document is quarantined.
    #[error("stored data for this {0} is damaged")]
    DataLoss(&'static str),
    /// The request is valid but the state does not allow it (e.g. revoking a revoked device).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The device was revoked: refused, and told to wipe its local copy.
    #[error("this device was revoked")]
    DeviceRevoked,
    /// The customer's account was erased: refused, and devices told to wipe.
    #[error("this account was erased")]
    AccountErased,
    /// A bug; details are in the server log only.
    #[error("internal error")]
    Internal,
}

/// The metadata key that tells a device to wipe its local copy, and its values.
pub const WIPE_METADATA: &str = "cubby-wipe";
/// [`WIPE_METADATA`] for a revoked device.
pub const WIPE_REVOKED: &str = "device-revoked";
/// [`WIPE_METADATA`] for an erased account.
pub const WIPE_ERASED: &str = "account-erased";

impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        let message = err.to_string();
        match err {
            ApiError::InvalidArgument(_) => Self::invalid_argument(message),
            ApiError::NotFound(_) => Self::not_found(message),
            ApiError::PermissionDenied(_) => Self::permission_denied(message),
            ApiError::Unauthenticated(_) => Self::unauthenticated(message),
            ApiError::ResourceExhausted(_) => Self::resource_exhausted(message),
            ApiError::Unavailable(_) => Self::unavailable(message),
            ApiError::DataLoss(_) => Self::data_loss(message),
            ApiError::FailedPrecondition(_) => Self::failed_precondition(message),
            ApiError::DeviceRevoked => wipe(Self::permission_denied(message), WIPE_REVOKED),
            ApiError::AccountErased => wipe(Self::not_found(message), WIPE_ERASED),
            ApiError::Internal => Self::internal(message),
        }
    }
}

fn wipe(mut status: tonic::Status, reason: &'static str) -> tonic::Status {
    status
        .metadata_mut()
        .insert(WIPE_METADATA, tonic::metadata::MetadataValue::from_static(reason));
    status
}

impl ApiError {
    /// The gRPC code, for per-document errors carried inside a stream.
    pub fn code(&self) -> tonic::Code {
        tonic::Status::from(self.clone()).code()
    }
}

/// Reads a 16-byte device id from the wire.
pub fn device_id(bytes: &[u8]) -> Result<cubby_core::DeviceId, ApiError> {
    cubby_core::DeviceId::from_slice(bytes)
        .map_err(|_| ApiError::InvalidArgument("device_id must be 16 bytes".into()))
}

/// Reads a 16-byte document id from the wire.
pub fn doc_id(bytes: &[u8]) -> Result<DocId, ApiError> {
    DocId::from_slice(bytes)
        .map_err(|_| ApiError::InvalidArgument("doc_id must be 16 bytes".into()))
}

/// The wire form of a document's metadata.
pub fn doc_info(id: &DocId, meta: &DocMeta) -> pb::DocInfo {
    pb::DocInfo {
        doc_id: id.as_bytes().to_vec(),
        title: meta.title.clone(),
        created_ms: meta.created_ms,
        updated_ms: meta.updated_ms,
        size: meta.size,
        private: meta.private,
        seq: 0,
    }
}

/// Reads metadata from the wire (the id is validated separately).
pub fn doc_meta(info: &pb::DocInfo) -> DocMeta {
    DocMeta {
        title: info.title.clone(),
        created_ms: info.created_ms,
        updated_ms: info.updated_ms,
        size: info.size,
        private: info.private,
    }
}

impl std::fmt::Debug for pb::DocSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocSync")
            .field(
                "doc_id",
                &DocId::from_slice(&self.doc_id).map(|d| d.short()).unwrap_or_default(),
            )
            .field("message_bytes", &self.message.len())
            .field("seq", &self.seq)
            .field("more", &self.more)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for pb::Edit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let op = match &self.op {
            Some(pb::edit::Op::SetJson(_)) => "set",
            Some(pb::edit::Op::Delete(_)) => "delete",
            Some(pb::edit::Op::InsertJson(_)) => "insert",
            None => "none",
        };
        f.debug_struct("Edit").field("path", &self.path).field("op", &op).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for pb::ExportChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportChunk").field("bytes", &self.data.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn frames_round_trip_and_debug_hides_payloads() {
        let frame = pb::ClientFrame {
            frame: Some(pb::client_frame::Frame::Sync(pb::DocSync {
                doc_id: vec![1; 16],
                message: b"SECRET PAYLOAD".to_vec(),
                create: Some(pb::NewDoc { title: "t".into(), private: false }),
                seq: 0,
                more: false,
            })),
        };
        let decoded = pb::ClientFrame::decode(frame.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded, frame);
        assert!(!format!("{frame:?}").contains("SECRET"));
    }

    #[test]
    fn errors_map_to_their_codes() {
        assert_eq!(
            tonic::Status::from(ApiError::NotFound("document")).code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            tonic::Status::from(ApiError::NotFound("document")).message(),
            "document not found"
        );
        assert_eq!(ApiError::Internal.code(), tonic::Code::Internal);
        assert!(doc_id(&[0; 3]).is_err());
    }
}
