//! What the health service says of the node: every service `SERVING` while its store can
//! take writes, `NOT_SERVING` while it cannot (a database that went away, until it answers
//! again; sled after an I/O error, until a restart), so that a load balancer sends devices to
//! the other nodes meanwhile.

use std::sync::Arc;
use std::time::Duration;

use cubby_proto::pb;
use cubby_store::Store;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::{StorageWork, account, admin, sync};

/// How often the store is asked whether it can take writes.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Watches the store for the health service. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct StorageHealth {
    wake: Arc<Notify>,
}

impl StorageHealth {
    /// Asks `store` every second whether it can take writes ([`Store::ready`]), and at once
    /// after a failed commit ([`StorageHealth::failed`]), and says so on `reporter` when the
    /// answer changes.
    pub(crate) fn watch(
        store: Arc<dyn Store>,
        reporter: HealthReporter,
        work: StorageWork,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        let wake = Arc::new(Notify::new());
        let woken = wake.clone();
        tracker.spawn(async move {
            let mut serving = true;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(CHECK_EVERY) => {}
                    () = woken.notified() => {}
                }
                let store = store.clone();
                let ready = work.run(move || store.ready()).await;
                let now = matches!(ready, Ok(Ok(())));
                if now == serving {
                    continue;
                }
                serving = now;
                match ready {
                    Ok(Ok(())) => tracing::info!("storage takes writes again; health SERVING"),
                    Ok(Err(err)) => {
                        tracing::error!(%err, "storage cannot take writes; health NOT_SERVING");
                    }
                    Err(err) => tracing::error!(%err, "checking storage failed; NOT_SERVING"),
                }
                set(&reporter, serving).await;
            }
        });
        Self { wake }
    }

    /// A commit failed: check the store now.
    pub(crate) fn failed(&self) {
        self.wake.notify_one();
    }
}

/// Sets every service's status (and the server's, `""`).
pub(crate) async fn set(reporter: &HealthReporter, serving: bool) {
    let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
    reporter.set_service_status("", status).await;
    for service in [
        <pb::sync_server::SyncServer<sync::SyncService> as tonic::server::NamedService>::NAME,
        <pb::account_server::AccountServer<account::AccountService> as tonic::server::NamedService>::NAME,
        <pb::admin_server::AdminServer<admin::AdminService> as tonic::server::NamedService>::NAME,
    ] {
        reporter.set_service_status(service, status).await;
    }
}
