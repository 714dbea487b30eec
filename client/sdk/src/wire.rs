//! The wire at the SDK's edge: the frames a device sends, and the bearer token on a request.

use cubby_core::{DocId, DocMeta};
use cubby_proto::pb;

/// A device's sync message for `doc`; with `create`, what the server needs to make the
/// document if it does not have it (its title and private flag).
pub(crate) fn sync(
    doc: DocId,
    message: Vec<u8>,
    create: Option<&DocMeta>,
) -> pb::client_frame::Frame {
    let create = create.map(|meta| pb::NewDoc { title: meta.title.clone(), private: meta.private });
    pb::client_frame::Frame::Sync(pb::DocSync {
        doc_id: doc.as_bytes().to_vec(),
        message,
        create,
        seq: 0,
        more: false,
    })
}

/// `request` with `authorization: Bearer <token>`; `Err` when the token has characters a
/// header cannot carry.
pub(crate) fn bearer<T>(request: &mut tonic::Request<T>, token: &str) -> Result<(), String> {
    let header = format!("Bearer {token}")
        .parse()
        .map_err(|_| "the token has characters a header cannot carry".to_owned())?;
    request.metadata_mut().insert("authorization", header);
    Ok(())
}
