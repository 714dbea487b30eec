//! Building a [`Client`]: its local store, its device identity, and its server.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cubby_crypto::keys::{Keyring, MasterSecret};
use cubby_crypto::signing::{DeviceKey, generate_pkcs8};
use cubby_store::{EncryptedStore, Space, Store};
use cubby_store_sled::SledStore;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::task::TaskTracker;

use crate::{
    Client, ClientError, DeviceId, Inner, LOCAL, StoreError, SyncStatus, SyncTask, TokenProvider,
    engine,
};

/// Builds a [`Client`].
#[derive(Default)]
pub struct ClientBuilder {
    data_dir: Option<PathBuf>,
    local_key: Option<[u8; 32]>,
    server: Option<String>,
    token: Option<Arc<dyn TokenProvider>>,
    ca_pem: Option<Vec<u8>>,
    device_name: Option<String>,
    platform: Option<String>,
    autosync: bool,
    store: Option<Arc<dyn Store>>,
    dialer: Option<engine::Dialer>,
    inline_storage: bool,
    retry: Option<(Duration, Duration)>,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("data_dir", &self.data_dir)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// A builder that syncs once built (see [`ClientBuilder::with_autosync`]).
    pub(crate) fn new() -> Self {
        Self { autosync: true, ..Self::default() }
    }
}

impl ClientBuilder {
    /// Where the device keeps its local store (required).
    pub fn with_data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// The 32-byte key that encrypts the local store (required). Keep it in the platform's
    /// keychain; without it the local store is unreadable.
    pub fn with_local_key(mut self, key: [u8; 32]) -> Self {
        self.local_key = Some(key);
        self
    }

    /// The server, e.g. `https://cubby.example.com:7443`. Without it the client works offline.
    pub fn with_server(mut self, url: impl Into<String>) -> Self {
        self.server = Some(url.into());
        self
    }

    /// Where tokens come from (required with a server).
    pub fn with_token_provider(mut self, provider: impl TokenProvider) -> Self {
        self.token = Some(Arc::new(provider));
        self
    }

    /// A PEM certificate (or several) to trust instead of the operating system's trust store
    /// (a self-signed server, a company CA the devices do not have). Without it the system's
    /// store decides (rustls-platform-verifier; Mozilla's roots on a system without a store).
    pub fn with_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// A human name for this device, shown in the customer's device list.
    pub fn with_device_name(mut self, name: impl Into<String>) -> Self {
        self.device_name = Some(name.into());
        self
    }

    /// The platform, e.g. `ios`.
    pub fn with_platform(mut self, platform: impl Into<String>) -> Self {
        self.platform = Some(platform.into());
        self
    }

    /// How long sync waits before it tries to connect again after a failure: up to `first`
    /// (full jitter), doubling after each failure up to `longest` (default 1 s and 30 s). A
    /// connection that got up to date starts over from `first`; [`Client::reconnect_now`]
    /// cuts a wait short.
    pub fn with_retry_pauses(mut self, first: Duration, longest: Duration) -> Self {
        self.retry = Some((first, longest.max(first)));
        self
    }

    /// Whether to start syncing in the background at once (default true with a server). When
    /// off, call [`Client::start_sync`].
    pub fn with_autosync(mut self, on: bool) -> Self {
        self.autosync = on;
        self
    }

    /// Keeps the local store in `backend` instead of a sled store in the data directory. The
    /// client still encrypts every value with the local key. For tests and simulation (an
    /// in-memory backend), or a platform's own storage.
    pub fn with_store(mut self, backend: Arc<dyn Store>) -> Self {
        self.store = Some(backend);
        self
    }

    /// Reaches the server through `dial` instead of TCP; TLS still runs on top for an
    /// `https://` server, checked against the URL's host name. For a simulated network.
    pub fn with_transport<F, Fut, T>(mut self, dial: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = std::io::Result<T>> + Send + 'static,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        self.dialer = Some(engine::Dialer::new(dial));
        self
    }

    /// Runs local store calls on the calling task instead of the blocking pool. Only for a
    /// backend that never blocks (the deterministic simulation's in-memory disk).
    pub fn with_inline_storage(mut self, inline: bool) -> Self {
        self.inline_storage = inline;
        self
    }

    /// Opens the local store and, with a server, starts syncing.
    pub async fn build(self) -> Result<Client, ClientError> {
        let key = self
            .local_key
            .ok_or_else(|| ClientError::Config("with_local_key is required".into()))?;
        let remote = match self.server {
            Some(url) => {
                let token = self.token.ok_or_else(|| {
                    ClientError::Config("a server needs with_token_provider".into())
                })?;
                Some(engine::Remote::new(&url, token, self.ca_pem, self.dialer)?)
            }
            None => None,
        };
        let store = match self.store {
            Some(backend) => open_supplied(backend, key)?,
            None => {
                let dir = self
                    .data_dir
                    .ok_or_else(|| ClientError::Config("with_data_dir is required".into()))?;
                open_sled(dir, key).await?
            }
        };
        let (device_id, device_key) = identity(&*store)?;
        if let Some(remote) = &remote {
            check_account(&*store, remote).await?;
        }
        let (wake, wakes) = mpsc::unbounded_channel();
        let (status, _) = watch::channel(SyncStatus::Offline { failure: None });
        let inner = Arc::new(Inner {
            store,
            device_id,
            device_key,
            docs: Mutex::new(crate::loaded::Loaded::default()),
            wake,
            status,
            device_name: self.device_name.unwrap_or_else(|| "unnamed device".into()),
            platform: self.platform.unwrap_or_else(|| std::env::consts::OS.into()),
            events: broadcast::channel(256).0,
            tasks: TaskTracker::new(),
            inline_storage: self.inline_storage,
            foreign: std::sync::atomic::AtomicBool::new(false),
            paused: watch::channel(false).0,
            retry: self.retry.unwrap_or((engine::FIRST_BACKOFF, engine::MAX_BACKOFF)),
            reconnect: tokio::sync::Notify::new(),
        });
        let sync = Arc::new(crate::Syncing(Mutex::new(SyncTask::Idle(wakes))));
        let client = Client { inner, remote, sync };
        if self.autosync {
            client.start_sync();
        }
        Ok(client)
    }
}

/// Opens a supplied backend. A wiped one cannot be reused: the caller supplies a fresh one.
fn open_supplied(backend: Arc<dyn Store>, key: [u8; 32]) -> Result<Arc<dyn Store>, ClientError> {
    let keyring = Keyring::from_master(&MasterSecret::from_bytes(key));
    let store = EncryptedStore::open(backend, keyring)?;
    if store.erased_at(&LOCAL)?.is_some() {
        return Err(ClientError::Config(
            "this local store was wiped (device revoked or account erased); supply an empty one"
                .into(),
        ));
    }
    Ok(Arc::new(store))
}

/// Opens (or creates) the sled store in `dir`; a wiped store is cleared and started afresh.
async fn open_sled(dir: PathBuf, key: [u8; 32]) -> Result<Arc<dyn Store>, ClientError> {
    tokio::task::spawn_blocking(move || -> Result<Arc<dyn Store>, ClientError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| ClientError::Config(format!("cannot create {}: {e}", dir.display())))?;
        let open = || -> Result<EncryptedStore<SledStore>, ClientError> {
            let sled = SledStore::open(&dir.join("store"))?;
            let keyring = Keyring::from_master(&MasterSecret::from_bytes(key));
            Ok(EncryptedStore::open(sled, keyring)?)
        };
        let mut store = open()?;
        if store.erased_at(&LOCAL)?.is_some() {
            // Wiped (revoked or erased): what is left is unreadable. Start a new device.
            drop(store);
            std::fs::remove_dir_all(dir.join("store")).map_err(|e| {
                ClientError::Config(format!(
                    "cannot clear the wiped store in {}: {e}",
                    dir.display()
                ))
            })?;
            store = open()?;
        }
        Ok(Arc::new(store))
    })
    .await
    .map_err(|_| ClientError::Closed)?
}

/// Where the device keeps a digest of the issuer and subject of the token it first built with.
const ACCOUNT_HINT: &[u8] = b"account-hint";

/// Refuses to open a device's data with another account's token, before anything of it is
/// shown: a device's data belongs to one account (a family computer shared by two people must
/// not show one the other's). The token's issuer and subject are read from the token (when it is
/// a JWT) and kept as a digest on first use; the server confirms the account on every
/// connection (`Challenge.account`), which catches tokens that are not JWTs too.
async fn check_account(store: &dyn Store, remote: &engine::Remote) -> Result<(), ClientError> {
    let token = remote.token_for_check().await;
    let Some((issuer, subject)) = token.as_deref().and_then(cubby_crypto::jwt::unverified_identity)
    else {
        return Ok(()); // No token now (offline), or an opaque one: the server will tell.
    };
    let hint = cubby_crypto::sha256(
        &[b"cubby account hint v1\0".as_slice(), issuer.as_bytes(), b"\0", subject.as_bytes()]
            .concat(),
    );
    match store.get_record(&LOCAL, Space::LOCAL, ACCOUNT_HINT)? {
        Some(kept) if kept != hint => Err(ClientError::WrongAccount),
        Some(_) => Ok(()),
        None => {
            store.put_record(&LOCAL, Space::LOCAL, ACCOUNT_HINT, &hint)?;
            store.flush()?;
            Ok(())
        }
    }
}

/// The device's id and Ed25519 key, made on first run and kept in the encrypted local store.
fn identity(store: &dyn Store) -> Result<(DeviceId, DeviceKey), ClientError> {
    let id = store.get_record(&LOCAL, Space::LOCAL, b"device-id")?;
    let pkcs8 = store.get_record(&LOCAL, Space::LOCAL, b"device-key")?;
    if let (Some(id), Some(pkcs8)) = (id, pkcs8) {
        let id = DeviceId::from_slice(&id)
            .map_err(|_| ClientError::Store(StoreError::Corrupt("device id")))?;
        let key = DeviceKey::from_pkcs8(&pkcs8)
            .map_err(|_| ClientError::Store(StoreError::Corrupt("device key")))?;
        return Ok((id, key));
    }
    // A device id is bound to its key on the server: a new key always comes with a new id.
    let id = DeviceId::from_bytes(cubby_crypto::random_array());
    let pkcs8 = generate_pkcs8();
    let key = DeviceKey::from_pkcs8(&pkcs8).expect("a freshly generated key pair parses");
    store.put_record(&LOCAL, Space::LOCAL, b"device-key", &pkcs8)?;
    store.put_record(&LOCAL, Space::LOCAL, b"device-id", id.as_bytes())?;
    store.flush()?;
    Ok((id, key))
}
