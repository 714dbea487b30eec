//! [`CubbyClient`]: one device's view of one customer's store.

use std::sync::Arc;
use std::time::Duration;

use cubby_client as sdk;

use crate::document::Document;
use crate::error::{CubbyError, TokenError};
use crate::listen::{DocumentListener, StatusListener, Subscription};
use crate::on_runtime;
use crate::types::{AuditEntry, DeviceInfo, Discarded, DocumentInfo, ErasureReceipt, SyncStatus};

/// Supplies access tokens from the app's identity provider.
#[uniffi::export(with_foreign)]
pub trait TokenProvider: Send + Sync {
    /// A current token. `refresh` is true when the server refused the last one or asked for a
    /// fresh one: fetch a new one rather than return a cached one. Called on a Cubby thread
    /// (never the app's main thread), so it may block while it asks the identity provider.
    fn token(&self, refresh: bool) -> Result<String, TokenError>;
}

/// How to open a client.
#[derive(Clone, Debug, uniffi::Record)]
pub struct ClientConfig {
    /// Where the device keeps its local store (one client per directory).
    pub data_dir: String,
    /// The 32-byte key that encrypts the local store. Keep it in the platform's keychain.
    pub local_key: Vec<u8>,
    /// The server's URL (`https://cubby.example.com:7443`); none keeps the client offline.
    #[uniffi(default = None)]
    pub server: Option<String>,
    /// The PEM certificate of a CA to trust for the server (a development server's own);
    /// without it the operating system's trust store decides.
    #[uniffi(default = None)]
    pub ca_pem: Option<String>,
    /// This device's name as the customer sees it in their device list.
    #[uniffi(default = None)]
    pub device_name: Option<String>,
    /// This device's platform (`ios`, `android`, ...); the operating system's name if none.
    #[uniffi(default = None)]
    pub platform: Option<String>,
    /// Start syncing as soon as the client is open.
    #[uniffi(default = true)]
    pub autosync: bool,
    /// The first and longest pause, in milliseconds, before sync tries to connect again
    /// after a failure (the SDK's defaults if none).
    #[uniffi(default = None)]
    pub retry_pauses_ms: Option<Vec<u64>>,
}

/// One device's view of one customer's store: documents kept on this device, encrypted, and
/// synced with the server in the background. Share one per data directory across the app.
#[derive(uniffi::Object)]
pub struct CubbyClient {
    client: sdk::Client,
}

/// The app's provider, as the SDK asks for it: on the blocking pool, since the app's code may
/// block.
struct ForeignTokens(Arc<dyn TokenProvider>);

impl sdk::TokenProvider for ForeignTokens {
    fn token(&self, refresh: bool) -> sdk::TokenFuture {
        let provider = self.0.clone();
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || provider.token(refresh)).await {
                Ok(Ok(token)) => Ok(token),
                Ok(Err(err)) => Err(sdk::TokenError(err.to_string())),
                Err(err) => Err(sdk::TokenError(format!("the token provider failed: {err}"))),
            }
        })
    }
}

impl CubbyClient {
    fn sdk(&self) -> sdk::Client {
        self.client.clone()
    }
}

#[uniffi::export]
impl CubbyClient {
    /// Opens the local store in `config.data_dir` (creating it and this device's identity on
    /// first use) and, with a server, starts syncing. `tokens` is asked for a token whenever
    /// the client connects.
    #[uniffi::constructor(default(tokens = None))]
    pub async fn open(
        config: ClientConfig,
        tokens: Option<Arc<dyn TokenProvider>>,
    ) -> Result<Arc<Self>, CubbyError> {
        on_runtime(async move {
            let key: [u8; 32] = config.local_key.as_slice().try_into().map_err(|_| {
                CubbyError::Config(format!(
                    "local_key must be 32 bytes, not {}",
                    config.local_key.len()
                ))
            })?;
            let mut builder = sdk::Client::builder()
                .with_data_dir(&config.data_dir)
                .with_local_key(key)
                .with_autosync(config.autosync);
            if let Some(server) = config.server {
                builder = builder.with_server(server);
            }
            if let Some(tokens) = tokens {
                builder = builder.with_token_provider(ForeignTokens(tokens));
            }
            if let Some(pem) = config.ca_pem {
                builder = builder.with_ca_pem(pem);
            }
            if let Some(name) = config.device_name {
                builder = builder.with_device_name(name);
            }
            if let Some(platform) = config.platform {
                builder = builder.with_platform(platform);
            }
            if let Some(pauses) = config.retry_pauses_ms {
                let [first, longest] = pauses[..] else {
                    return Err(CubbyError::Config(
                        "retry_pauses_ms takes two numbers: the first and the longest pause".into(),
                    ));
                };
                builder = builder.with_retry_pauses(
                    Duration::from_millis(first),
                    Duration::from_millis(longest),
                );
            }
            Ok(Arc::new(Self { client: builder.build().await? }))
        })
        .await
    }

    /// This installation's device id.
    pub fn device_id(&self) -> String {
        self.client.device_id().to_string()
    }

    /// Creates a document on this device; it reaches the server on the next sync.
    pub async fn create(&self, title: String) -> Result<Arc<Document>, CubbyError> {
        let client = self.sdk();
        on_runtime(async move { Ok(Document::new(client.create(&title).await?, client)) }).await
    }

    /// Opens a document this device holds.
    pub async fn open_document(&self, id: String) -> Result<Arc<Document>, CubbyError> {
        let client = self.sdk();
        on_runtime(async move {
            let id = parse_doc(&id)?;
            Ok(Document::new(client.open(id).await?, client))
        })
        .await
    }

    /// The documents this device holds.
    pub async fn list(&self) -> Result<Vec<DocumentInfo>, CubbyError> {
        let client = self.sdk();
        on_runtime(async move {
            let docs = client.list().await?;
            Ok(docs.into_iter().map(|(id, meta)| DocumentInfo::new(id, meta)).collect())
        })
        .await
    }

    /// Ids of the documents with changes the server does not hold yet.
    pub async fn unsynced(&self) -> Result<Vec<String>, CubbyError> {
        let client = self.sdk();
        on_runtime(
            async move { Ok(client.unsynced().await?.iter().map(ToString::to_string).collect()) },
        )
        .await
    }

    /// Documents deleted elsewhere while this device had changes to them the server never
    /// got; each is returned once.
    pub async fn take_discarded(&self) -> Result<Vec<Discarded>, CubbyError> {
        let client = self.sdk();
        on_runtime(async move {
            let discarded = client.take_discarded().await?;
            Ok(discarded
                .into_iter()
                .map(|d| Discarded { id: d.id.to_string(), title: d.title })
                .collect())
        })
        .await
    }

    /// The sync status now.
    pub fn status(&self) -> SyncStatus {
        SyncStatus::from(&*self.client.status().borrow())
    }

    /// Calls `listener` with the status now and each change after it, until the returned
    /// subscription is cancelled or dropped.
    pub fn subscribe_status(&self, listener: Arc<dyn StatusListener>) -> Arc<Subscription> {
        Subscription::status(self.client.status(), listener)
    }

    /// Calls `listener` with every document event on this device from now on.
    pub fn subscribe_events(&self, listener: Arc<dyn DocumentListener>) -> Arc<Subscription> {
        Subscription::events(self.client.events(), None, listener)
    }

    /// Starts background sync if it is not running (a client opened with `autosync` off).
    pub fn start_sync(&self) {
        let _runtime = crate::runtime().enter();
        self.client.start_sync();
    }

    /// Stops syncing until `resume_sync`: edits stay on this device, marked unsynced.
    pub fn pause_sync(&self) {
        self.client.pause_sync();
    }

    /// Syncs again after `pause_sync`.
    pub fn resume_sync(&self) {
        let _runtime = crate::runtime().enter();
        self.client.resume_sync();
    }

    /// Connects at once if sync is waiting to try again (the app came to the foreground, or
    /// the network came back).
    pub fn reconnect_now(&self) {
        self.client.reconnect_now();
    }

    /// Waits until this device and the server hold the same changes, or until a sync attempt
    /// fails (sync keeps trying in the background either way).
    pub async fn wait_until_synced(&self) -> Result<(), CubbyError> {
        let client = self.sdk();
        on_runtime(async move { Ok(client.wait_until_synced().await?) }).await
    }

    /// Every device of the customer, revoked ones included.
    pub async fn devices(&self) -> Result<Vec<DeviceInfo>, CubbyError> {
        let client = self.sdk();
        on_runtime(async move {
            Ok(client.devices().await?.into_iter().map(DeviceInfo::from).collect())
        })
        .await
    }

    /// Revokes a device: it can never sync again, and it wipes its copy when told.
    pub async fn revoke_device(&self, id: String) -> Result<DeviceInfo, CubbyError> {
        let client = self.sdk();
        on_runtime(async move {
            let id = id
                .parse()
                .map_err(|_| CubbyError::InvalidArgument(format!("{id:?} is not a device id")))?;
            Ok(client.revoke_device(id).await?.into())
        })
        .await
    }

    /// Marks a document private (the business can neither read nor change it) or shared.
    pub async fn set_private(&self, id: String, private: bool) -> Result<DocumentInfo, CubbyError> {
        let client = self.sdk();
        on_runtime(async move {
            let id = parse_doc(&id)?;
            Ok(DocumentInfo::new(id, client.set_private(id, private).await?))
        })
        .await
    }

    /// Gives a document a new title, on the server and on this device.
    pub async fn rename(&self, id: String, title: String) -> Result<DocumentInfo, CubbyError> {
        let client = self.sdk();
        on_runtime(async move {
            let id = parse_doc(&id)?;
            Ok(DocumentInfo::new(id, client.rename(id, &title).await?))
        })
        .await
    }

    /// Deletes a document for good, on the server and on this device.
    pub async fn delete(&self, id: String) -> Result<(), CubbyError> {
        let client = self.sdk();
        on_runtime(async move { Ok(client.delete(parse_doc(&id)?).await?) }).await
    }

    /// Downloads everything the server holds about the customer as a tar archive into the
    /// file `path` (replaced if it exists); returns its size in bytes.
    pub async fn export(&self, path: String) -> Result<u64, CubbyError> {
        let client = self.sdk();
        on_runtime(async move {
            let file = tokio::fs::File::create(&path)
                .await
                .map_err(|e| CubbyError::Io(format!("cannot create {path}: {e}")))?;
            let size = client.export(file).await?;
            Ok(size)
        })
        .await
    }

    /// The customer's audit log, oldest first.
    pub async fn audit(&self) -> Result<Vec<AuditEntry>, CubbyError> {
        let client = self.sdk();
        on_runtime(
            async move { Ok(client.audit().await?.into_iter().map(AuditEntry::from).collect()) },
        )
        .await
    }

    /// Erases the customer's account on the server and wipes this device.
    pub async fn delete_account(&self) -> Result<ErasureReceipt, CubbyError> {
        let client = self.sdk();
        on_runtime(async move { Ok(client.delete_account().await?.into()) }).await
    }

    /// Stops syncing and closes the local store once the app's documents are released. Local
    /// data is already on disk; calls after this fail with `Closed`.
    pub async fn shutdown(&self) {
        let client = self.sdk();
        let _ = on_runtime(async move {
            client.shutdown().await;
            Ok(())
        })
        .await;
    }
}

fn parse_doc(id: &str) -> Result<sdk::DocId, CubbyError> {
    id.parse().map_err(|_| CubbyError::UnknownDocument(format!("{id:?} is not a document id")))
}
