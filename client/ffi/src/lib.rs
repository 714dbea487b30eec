//! Cubby's client SDK for Kotlin, Swift and Python: thin [UniFFI] wrappers over
//! [`cubby_client`], where every behaviour lives.
//!
//! What crosses the boundary, and how:
//!
//! - **Objects**: [`CubbyClient`] (one device's view of one customer's store) and [`Document`]
//!   (a loaded document), both shared by reference and safe to use from any thread.
//! - **Async calls**: every call that may touch the disk or the network is `async` in the
//!   foreign language (a coroutine in Python, a `suspend fun` in Kotlin, `async` in Swift). It
//!   runs on the runtime this library owns ([`runtime`]), so the app brings no Rust runtime.
//! - **Errors**: one flat error type, [`CubbyError`]: its variant is the stable code (the gRPC
//!   code the server answered with, or the client's own: offline, unknown document, ...) and it
//!   carries a message for people.
//! - **Callbacks**: the app's [`TokenProvider`], and listeners for the sync status
//!   ([`StatusListener`]) and for document events ([`DocumentListener`]). Subscribing returns a
//!   [`Subscription`] that stops the callbacks when cancelled or dropped.
//! - **Documents as JSON**: values go in and come out as JSON text (`put("milk", "2")`), which
//!   every language parses with its own library.
//!
//! [UniFFI]: https://mozilla.github.io/uniffi-rs/

use std::sync::{Mutex, OnceLock, PoisonError};

mod client;
mod document;
mod error;
mod listen;
mod types;

pub use client::{ClientConfig, CubbyClient, TokenProvider};
pub use document::Document;
pub use error::{CubbyError, TokenError};
pub use listen::{DocumentListener, StatusListener, Subscription};
pub use types::{
    AuditEntry, DeviceInfo, Discarded, DocumentEvent, DocumentInfo, ErasureReceipt, SyncFailure,
    SyncFailureKind, SyncStatus, WipeReason,
};

uniffi::setup_scaffolding!("cubby");

/// The runtime every call runs on: the SDK needs tokio, and the apps calling through the
/// bindings have none. Two workers: a device syncs one stream and the blocking pool does the
/// disk work. Built on first use; [`shutdown_runtime`] stops it for good.
static RUNTIME: Mutex<Option<tokio::runtime::Runtime>> = Mutex::new(None);
static HANDLE: OnceLock<tokio::runtime::Handle> = OnceLock::new();

fn runtime() -> &'static tokio::runtime::Handle {
    HANDLE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cubby")
            .enable_all()
            .build()
            .expect("the operating system refused to start Cubby's runtime threads");
        let handle = runtime.handle().clone();
        *RUNTIME.lock().unwrap_or_else(PoisonError::into_inner) = Some(runtime);
        handle
    })
}

/// Stops Cubby's threads for good, waiting up to two seconds for work in flight; every call
/// after it fails with `Closed`. For a language whose interpreter must not be called from
/// other threads while it exits: the Python package calls it from `atexit`, because a Cubby
/// thread still inside a callback (an async call's wake-up) when Python finalizes would be
/// killed by Python and abort the process. Call `shutdown` on clients first; never call this
/// from a Cubby callback.
#[uniffi::export]
pub fn shutdown_runtime() {
    let runtime = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(runtime) = runtime {
        runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    }
}

/// Runs `work` on [`runtime`] and waits for it from whatever executor the foreign language
/// polls with. A panic in `work` comes back as [`CubbyError::Internal`], never across the
/// boundary.
async fn on_runtime<T, F>(work: F) -> Result<T, CubbyError>
where
    F: Future<Output = Result<T, CubbyError>> + Send + 'static,
    T: Send + 'static,
{
    match runtime().spawn(work).await {
        Ok(result) => result,
        Err(err) if err.is_cancelled() => Err(CubbyError::Closed("Cubby has shut down".into())),
        Err(err) => Err(CubbyError::Internal(format!("the call failed inside Cubby: {err}"))),
    }
}

/// Sends the SDK's logs to standard error, filtered as `RUST_LOG` filters are
/// (`"cubby_client=debug"`). The first call wins; later calls change nothing.
#[uniffi::export]
pub fn init_logging(filter: String) {
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
