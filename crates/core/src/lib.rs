//! Cubby's sans-I/O core.
//!
//! This crate holds what the server and the client agree on, with no runtime, network, disk or
//! keys in it:
//!
//! - [`ids`]: document, device and customer ids and the change-feed sequence;
//! - [`session`]: one peer's side of the standard Automerge sync protocol for one document;
//! - [`graph`]: a document's change graph, which answers the sync protocol without the
//!   document;
//! - [`history`]: a document with what storage holds of it: rebuilt from its parts, the
//!   next chunk to store, and when and how it is compacted;
//! - [`lazy`]: a document kept as its change graph, its content applied when asked (the
//!   server's);
//! - [`json`]: reading a document as JSON and writing JSON values into it;
//! - [`meta`]: the metadata a store keeps beside each document.
//!
//! A round of sync between two replicas, with no I/O at all:
//!
//! ```
//! use automerge::{Automerge, ROOT, transaction::Transactable};
//! use cubby_core::session::PeerSession;
//!
//! let mut phone = Automerge::new();
//! phone.transact::<_, _, automerge::AutomergeError>(|tx| {
//!     tx.put(ROOT, "note", "milk")?;
//!     Ok(())
//! }).expect("a put on a fresh document cannot fail");
//! let mut server = Automerge::new();
//!
//! let (mut to_server, mut to_phone) = (PeerSession::new(), PeerSession::new());
//! loop {
//!     let a = to_server.generate(&phone);
//!     if let Some(msg) = &a { to_phone.receive(&mut server, msg)?; }
//!     let b = to_phone.generate(&server);
//!     if let Some(msg) = &b { to_server.receive(&mut phone, msg)?; }
//!     if a.is_none() && b.is_none() { break; }
//! }
//! assert_eq!(phone.get_heads(), server.get_heads());
//! # Ok::<(), cubby_core::session::SyncError>(())
//! ```

pub mod device;
pub mod document;
pub mod feed;
pub mod graph;
pub mod history;
pub mod ids;
pub mod json;
pub mod lazy;
pub mod meta;
pub mod session;

pub use ids::{ChunkId, CustomerId, DeviceId, DocId, IdError, Seq};
pub use meta::DocMeta;
