//! The wire at the server's edge of a sync stream: what a device is told, as domain values
//! ([`ToDevice`]) inside the server, and as `pb::ServerFrame`s only here, on the way out.

use std::sync::Arc;

use cubby_core::{DocId, Seq};
use cubby_proto::{ApiError, pb};

use crate::hub::Announcement;

/// Something a device is told on its sync stream.
#[derive(Debug)]
pub(crate) enum ToDevice {
    /// Prove your key (`Challenge`).
    Challenge { nonce: [u8; 32], epoch: Vec<u8>, account: [u8; 16] },
    /// A document changed; `pushed` when its actor sends the change right behind.
    Changed { announcement: Arc<Announcement>, pushed: bool },
    /// Everything changed before `cursor` has been announced.
    CaughtUp { cursor: Seq },
    /// A sync message of `doc`, made when it was at feed position `seq`.
    Sync { doc: DocId, message: Vec<u8>, seq: Seq },
    /// A sync message about the document with this id (as the device sent it) was refused.
    Refused { doc: Vec<u8>, error: ApiError },
    /// The stream's token expires soon: send a fresh one.
    TokenExpiring { seconds_left: u64 },
}

impl ToDevice {
    /// A refusal of a sync message about `doc`.
    pub(crate) fn refused(doc: &DocId, error: ApiError) -> Self {
        Self::Refused { doc: doc.as_bytes().to_vec(), error }
    }
}

/// The frame for `message`.
pub(crate) fn frame(message: ToDevice) -> pb::ServerFrame {
    use pb::server_frame::Frame;
    let frame = match message {
        ToDevice::Challenge { nonce, epoch, account } => Frame::Challenge(pb::Challenge {
            nonce: nonce.to_vec(),
            epoch,
            account: account.to_vec(),
        }),
        ToDevice::Changed { announcement: a, pushed } => Frame::Changed(pb::DocChanged {
            doc_id: a.doc.as_bytes().to_vec(),
            seq: a.seq.0,
            // The frame names the document; its metadata need not again (18 bytes of each
            // announcement, a fifth of a small one).
            info: a.info.as_ref().map(|meta| pb::DocInfo {
                doc_id: Vec::new(),
                ..cubby_proto::doc_info(&a.doc, meta)
            }),
            deleted: a.info.is_none(),
            pushed,
        }),
        ToDevice::CaughtUp { cursor } => Frame::CaughtUp(pb::CaughtUp { cursor: cursor.0 }),
        ToDevice::Sync { doc, message, seq } => Frame::Sync(pb::DocSync {
            doc_id: doc.as_bytes().to_vec(),
            message,
            create: None,
            seq: seq.0,
            more: false,
        }),
        ToDevice::Refused { doc, error } => Frame::Error(pb::DocError {
            doc_id: doc,
            code: error.code() as i32,
            message: error.to_string(),
        }),
        ToDevice::TokenExpiring { seconds_left } => {
            Frame::TokenExpiring(pb::TokenExpiring { seconds_left })
        }
    };
    pb::ServerFrame { frame: Some(frame) }
}
