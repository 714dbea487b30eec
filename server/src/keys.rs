//! Key-encryption key rotation while the server runs.
//!
//! `cubby-server keys rotate` appends a new KEK to the master key file. This task notices the
//! change (it checks the file every `key_reload_secs`), installs the new keyring, and re-wraps
//! every customer's data key with the new KEK in the background. Data keys themselves never
//! change, so reads and writes carry on throughout. Once nothing is wrapped with an old KEK,
//! `cubby-server keys retire N` removes it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cubby_crypto::keys::{Keyring, MasterSecret};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{StorageWork, Vault};

/// Re-wraps keys now and after every change of the master key file.
pub(crate) fn spawn_rotation(
    vault: Arc<Vault>,
    path: PathBuf,
    every: Duration,
    work: StorageWork,
    tracker: &TaskTracker,
    stop: CancellationToken,
) {
    tracker.spawn(async move {
        let mut seen = std::fs::read(&path).ok();
        // A rotation made while the server was down is finished now.
        rewrap(&vault, work).await;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let current = std::fs::read(&path).ok();
            if current.is_none() || current == seen {
                continue;
            }
            seen = current;
            match MasterSecret::read(&path) {
                Ok(master) => {
                    let keyring = Keyring::from_master(&master);
                    tracing::info!(
                        generation = keyring.current_generation(),
                        "master key file changed; re-wrapping data keys"
                    );
                    match vault.set_keyring(keyring) {
                        Ok(()) => rewrap(&vault, work).await,
                        Err(err) => tracing::error!(%err,
                            "the changed master key file is not this store's; keeping the old \
                             keys"),
                    }
                }
                Err(err) => tracing::error!(%err,
                    "master key file changed but does not read; keeping the old keys"),
            }
        }
    });
}

async fn rewrap(vault: &Arc<Vault>, work: StorageWork) {
    let vault = vault.clone();
    match work.run(move || vault.rewrap_keys()).await {
        Ok(Ok(0)) => {}
        Ok(Ok(count)) => {
            tracing::info!(count, "data keys re-wrapped with the current key-encryption key")
        }
        Ok(Err(err)) => {
            tracing::error!(%err, "re-wrapping data keys failed; will retry on the next change")
        }
        Err(err) => tracing::error!(%err, "re-wrap task failed"),
    }
}
