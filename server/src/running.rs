//! A running server, and its orderly shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cubby_store::StoreError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{StorageWork, Vault, docs, durable, tls};

/// A server that is accepting connections.
#[derive(Debug)]
pub struct RunningServer {
    pub(crate) addr: SocketAddr,
    pub(crate) metrics_addr: Option<SocketAddr>,
    pub(crate) cert: Option<tls::CertPaths>,
    pub(crate) master_key_created: Option<PathBuf>,
    pub(crate) stop: CancellationToken,
    /// Fails every open connection: a shutdown whose grace ran out.
    pub(crate) hangup: CancellationToken,
    /// How long a shutdown waits for connections to close on their own.
    pub(crate) grace: Duration,
    pub(crate) tracker: TaskTracker,
    pub(crate) serve: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    pub(crate) committer: durable::Committer,
    pub(crate) docs: docs::Docs,
    pub(crate) vault: Arc<Vault>,
    pub(crate) work: StorageWork,
}

impl RunningServer {
    /// The address it listens on (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address metrics are served on, when `[metrics] listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The TLS certificate it serves (`None` for plaintext).
    pub fn cert(&self) -> Option<&tls::CertPaths> {
        self.cert.as_ref()
    }

    /// The master key file, if this start created it.
    pub fn master_key_created(&self) -> Option<&PathBuf> {
        self.master_key_created.as_ref()
    }

    /// How many documents are loaded in memory (each has an actor).
    pub fn live_documents(&self) -> usize {
        self.docs.live()
    }

    /// How many customers' data keys each key-encryption key generation wraps (the store's own
    /// key check included). After a rotation, everything moves to the new generation.
    pub async fn key_generations(
        &self,
    ) -> Result<std::collections::BTreeMap<u32, usize>, StoreError> {
        let vault = self.vault.clone();
        self.work
            .run(move || vault.key_generations())
            .await
            .map_err(|e| StoreError::Backend(e.to_string().into()))?
    }

    /// Stops accepting, closes every stream, waits for pending writes to be flushed, and closes
    /// the store. Connections get `limits.shutdown_grace_secs` to close on their own; the
    /// server then hangs up on those left.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        // Connections close once their streams have ended, which needs the devices' side too: a
        // device gone silent (a suspended app, a dead network) holds them open until the keepalive
        // gives up on it.
        let served = match tokio::time::timeout(self.grace, &mut self.serve).await {
            Ok(served) => served,
            Err(_) => {
                tracing::warn!(
                    grace_secs = self.grace.as_secs(),
                    "connections still open after the shutdown grace; closing them"
                );
                self.hangup.cancel();
                self.serve.await
            }
        };
        match served {
            Ok(Err(err)) => tracing::warn!(%err, "server ended with an error"),
            Err(err) => tracing::warn!(%err, "server task failed"),
            Ok(Ok(())) => {}
        }
        self.tracker.close();
        self.tracker.wait().await;
        // Every other commit handle lived in a task or service that has now ended.
        drop(self.docs);
        self.committer.join().await;
    }
}
