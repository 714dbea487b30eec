//! A harness for end-to-end tests: a real `cubby-server` on `127.0.0.1:0` with its generated
//! TLS certificate and sled store in a temporary directory, and devices that are real SDK
//! clients with their own temporary local stores.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cubby_client::{Client, ClientBuilder, StaticToken};
use cubby_crypto::signing::DeviceKey;
use cubby_server::{RunningServer, ServerConfig, auth};
use tempfile::TempDir;

pub mod idp;
pub mod sim_disk;

/// splitmix64: a few lines of deterministic randomness, so a seeded schedule replays.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// A duration in `lo..hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next_u64() % (hi - lo).max(1))
    }
}

/// How long a test waits for a condition before failing.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A running server and its data directory.
pub struct TestServer {
    _dir: TempDir,
    config: ServerConfig,
    running: Option<RunningServer>,
    /// The server's self-signed certificate, for clients to trust.
    pub ca_pem: Vec<u8>,
}

impl TestServer {
    /// Starts a development-mode server on a free loopback port.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a development-mode server after `adjust` has changed its config.
    pub async fn start_with(adjust: impl FnOnce(&mut ServerConfig)) -> Self {
        Self::start_in(tempfile::tempdir().expect("temp dir"), adjust).await
    }

    /// Starts `n` nodes on one new PostgreSQL database ([`postgres_database`]), each a server
    /// of its own (its own store, pool and bus, as in a process of its own) on a copy of the
    /// first one's data directory (the same master key, development tenant and certificate).
    pub async fn start_postgres_cluster(n: usize, adjust: impl Fn(&mut ServerConfig)) -> Vec<Self> {
        let url = postgres_database().await;
        let mut nodes: Vec<Self> = Vec::with_capacity(n);
        for _ in 0..n {
            let dir = tempfile::tempdir().expect("temp dir");
            if let Some(first) = nodes.first() {
                copy_tree(first.data_dir(), dir.path());
            }
            let node = Self::start_in(dir, |config| {
                config.storage.url = Some(url.clone());
                adjust(config);
            })
            .await;
            nodes.push(node);
        }
        nodes
    }

    async fn start_in(dir: TempDir, adjust: impl FnOnce(&mut ServerConfig)) -> Self {
        init_logs();
        let mut config = ServerConfig::dev(dir.path(), SocketAddr::from(([127, 0, 0, 1], 0)));
        adjust(&mut config);
        let running = cubby_server::start(config.clone()).await.expect("server starts");
        // Restarts reuse the port clients already know.
        config.listen = running.local_addr();
        let ca_pem =
            std::fs::read(&running.cert().expect("TLS on").cert).expect("certificate readable");
        Self { _dir: dir, config, running: Some(running), ca_pem }
    }

    /// The running server.
    pub fn running(&self) -> &RunningServer {
        self.running.as_ref().expect("the server is running")
    }

    /// Stops the server, flushing everything (its data directory stays).
    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    /// Starts `n` server instances in this process that share one store (sled, in the first
    /// one's data directory) and one bus ([`cubby_server::bus::LocalBus`]), as the nodes of a
    /// cluster do, each on its own port with a copy of the first one's data directory (the same
    /// master key, development tenant and certificate). The nodes run without a witness (a
    /// store shared by several has none yet) and are not restarted.
    pub async fn start_cluster(n: usize) -> Vec<Self> {
        init_logs();
        let bus: Arc<dyn cubby_server::bus::Bus> = Arc::new(cubby_server::bus::LocalBus::default());
        let mut nodes: Vec<Self> = Vec::with_capacity(n);
        let mut store: Option<Arc<dyn cubby_store::Store>> = None;
        for _ in 0..n {
            let dir = tempfile::tempdir().expect("temp dir");
            if let Some(first) = nodes.first() {
                copy_tree(first.data_dir(), dir.path());
            }
            let config = ServerConfig::dev(dir.path(), SocketAddr::from(([127, 0, 0, 1], 0)));
            let store = store
                .get_or_insert_with(|| {
                    let sled = cubby_store_sled::SledStore::open(&dir.path().join("db"))
                        .expect("the cluster's store opens");
                    Arc::new(sled)
                })
                .clone();
            let listener = tokio::net::TcpListener::bind(config.listen).await.expect("binds");
            let platform = cubby_server::Platform {
                store,
                listener,
                work: cubby_server::StorageWork::BlockingPool,
                clock: auth::Clock::System,
                witness: None,
                bus: bus.clone(),
            };
            let running = cubby_server::start_on(config.clone(), platform).await.expect("starts");
            let mut config = config;
            config.listen = running.local_addr();
            let ca_pem =
                std::fs::read(&running.cert().expect("TLS on").cert).expect("certificate readable");
            nodes.push(Self { _dir: dir, config, running: Some(running), ca_pem });
        }
        nodes
    }

    /// Starts the server again on the same data directory, port and settings.
    pub async fn restart(&mut self) {
        self.stop().await;
        let running = cubby_server::start(self.config.clone()).await.expect("restarts");
        self.running = Some(running);
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.config.listen)
    }

    /// The data directory (a temporary one unless the test chose another).
    pub fn data_dir(&self) -> &Path {
        &self.config.data
    }

    /// The store key of a development-tenant customer (for raw storage checks).
    pub fn customer_id(&self, subject: &str) -> cubby_core::CustomerId {
        use cubby_crypto::keys::{Keyring, MasterSecret};
        let master = MasterSecret::read(&self.data_dir().join("master.key")).expect("master key");
        let ids = Keyring::from_master(&master);
        cubby_core::CustomerId::from_bytes(ids.customer_id(auth::DEV_TENANT, subject))
    }

    /// A development token for `customer`.
    pub fn token(&self, customer: &str) -> String {
        self.token_for(customer, Duration::from_secs(3600))
    }

    /// A development token for `customer` valid for `ttl`.
    pub fn token_for(&self, customer: &str, ttl: Duration) -> String {
        let signer = auth::dev_signer(self.data_dir(), false).expect("dev tenant key exists");
        auth::dev_token(&signer, customer, ttl)
    }

    /// A development service token for the admin API (scope `cubby:admin`), for `service`.
    pub fn service_token(&self, service: &str) -> String {
        let signer = auth::dev_signer(self.data_dir(), false).expect("dev tenant key exists");
        auth::dev_service_token(&signer, service, Duration::from_secs(3600))
    }

    /// A document as the server holds it (the account API's JSON), read with `token`.
    pub async fn document_json(&self, token: &str, id: &[u8]) -> Result<String, tonic::Status> {
        use cubby_proto::pb;
        let mut account = pb::account_client::AccountClient::new(self.channel().await);
        let request = pb::GetDocumentRequest { doc_id: id.to_vec() };
        account.get_document(authed(request, token)).await.map(|r| r.into_inner().json)
    }

    /// A raw gRPC channel to the server over TLS, trusting its certificate.
    pub async fn channel(&self) -> tonic::transport::Channel {
        self.channel_with(|endpoint| endpoint).await
    }

    /// A raw channel whose endpoint `adjust` configured (for example its flow-control windows).
    pub async fn channel_with(
        &self,
        adjust: impl FnOnce(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
    ) -> tonic::transport::Channel {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem));
        let endpoint = tonic::transport::Endpoint::from_shared(self.url())
            .expect("valid url")
            .tls_config(tls)
            .expect("valid TLS config");
        adjust(endpoint).connect().await.expect("connects")
    }

    /// A client builder for this server (its URL and certificate) with the test devices' local
    /// key and tokens from `tokens`; the caller adds where the device stores and connects.
    pub fn client_builder(&self, tokens: impl cubby_client::TokenProvider) -> ClientBuilder {
        Client::builder()
            .with_local_key(LOCAL_KEY)
            .with_server(self.url())
            .with_token_provider(tokens)
            .with_ca_pem(self.ca_pem.clone())
    }

    /// A new device of `customer`, syncing in the background.
    pub async fn device(&self, customer: &str) -> Device {
        Device::open(self, customer, tempfile::tempdir().expect("temp dir"), true).await
    }
}

/// A token provider that makes development tokens for `customer` living `ttl` each, and the
/// count of the calls that asked for a fresh one.
pub fn counting_tokens(
    server: &TestServer,
    customer: &str,
    ttl: Duration,
) -> (impl cubby_client::TokenProvider, Arc<AtomicUsize>) {
    let signer = auth::dev_signer(server.data_dir(), false).expect("dev tenant key exists");
    let (fresh, customer) = (Arc::new(AtomicUsize::new(0)), customer.to_owned());
    let counted = fresh.clone();
    let provider = move |refresh: bool| {
        if refresh {
            counted.fetch_add(1, Ordering::SeqCst);
        }
        let token = auth::dev_token(&signer, &customer, ttl);
        async move { Ok::<_, cubby_client::TokenError>(token) }
    };
    (provider, fresh)
}

/// A device of the customer `tokens` issues tokens for, in `dir`, syncing in the background.
pub async fn client_with_tokens(
    server: &TestServer,
    dir: &Path,
    tokens: impl cubby_client::TokenProvider,
) -> Client {
    client(server, dir, tokens, true).await
}

/// The local key every test device encrypts its store with.
const LOCAL_KEY: [u8; 32] = [7; 32];

/// An SDK client of `server` with its store in `dir`, syncing in the background if `sync`.
async fn client(
    server: &TestServer,
    dir: &Path,
    tokens: impl cubby_client::TokenProvider,
    sync: bool,
) -> Client {
    server
        .client_builder(tokens)
        .with_data_dir(dir)
        .with_autosync(sync)
        .build()
        .await
        .expect("client builds")
}

/// A device: an SDK client with its own local store.
pub struct Device {
    /// Its local data directory.
    pub dir: TempDir,
    /// The client.
    pub client: Client,
    key: [u8; 32],
}

impl Device {
    /// Opens a device in `dir` (a reopen when the directory was used before).
    pub async fn open(server: &TestServer, customer: &str, dir: TempDir, sync: bool) -> Self {
        let tokens = StaticToken::new(server.token(customer));
        let client = client(server, dir.path(), tokens, sync).await;
        Self { dir, client, key: LOCAL_KEY }
    }

    /// The key its local store is encrypted with.
    pub fn key(&self) -> [u8; 32] {
        self.key
    }

    /// Closes the client, keeping the local store.
    pub async fn close(self) -> TempDir {
        self.client.shutdown().await;
        self.dir
    }
}

/// A device that speaks the sync protocol frame by frame, for tests of what the server does with
/// raw input. It has proved its key when `connect` returns.
pub struct RawStream {
    /// Frames to the server; dropping it ends the stream.
    pub tx: tokio::sync::mpsc::Sender<cubby_proto::pb::ClientFrame>,
    /// Frames from the server.
    pub inbound: tonic::Streaming<cubby_proto::pb::ServerFrame>,
}

impl RawStream {
    /// Connects as a new device with a fresh key.
    pub async fn connect(server: &TestServer, token: &str) -> Result<Self, tonic::Status> {
        let key = DeviceKey::from_pkcs8(&cubby_crypto::signing::generate_pkcs8()).expect("key");
        Self::connect_as(server, token, &key, cubby_crypto::random_array()).await
    }

    /// Connects as device `device_id` holding `key`, and answers the server's challenge.
    pub async fn connect_as(
        server: &TestServer,
        token: &str,
        key: &DeviceKey,
        device_id: [u8; 16],
    ) -> Result<Self, tonic::Status> {
        Self::connect_on(server.channel().await, token, key, device_id).await
    }

    /// Like [`RawStream::connect_as`], over `channel`.
    pub async fn connect_on(
        channel: tonic::transport::Channel,
        token: &str,
        key: &DeviceKey,
        device_id: [u8; 16],
    ) -> Result<Self, tonic::Status> {
        use cubby_proto::pb;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let hello = pb::Hello {
            device_id: device_id.to_vec(),
            public_key: key.public_key().to_vec(),
            device_name: "raw test device".into(),
            ..Default::default()
        };
        tx.try_send(pb::ClientFrame { frame: Some(pb::client_frame::Frame::Hello(hello)) })
            .expect("room for the hello");
        let mut sync = pb::sync_client::SyncClient::new(channel);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut inbound = sync.connect(authed(stream, token)).await?.into_inner();
        let first = tokio::time::timeout(DEADLINE, inbound.message())
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("no challenge"))??;
        let Some(pb::ServerFrame { frame: Some(pb::server_frame::Frame::Challenge(challenge)) }) =
            first
        else {
            panic!("the server's first frame is not a challenge: {first:?}");
        };
        let proof = pb::Proof { signature: key.prove(&device_id, &challenge.nonce) };
        tx.send(pb::ClientFrame { frame: Some(pb::client_frame::Frame::Proof(proof)) })
            .await
            .map_err(|_| tonic::Status::cancelled("stream closed"))?;
        Ok(Self { tx, inbound })
    }

    /// Sends one frame.
    pub async fn send(&self, frame: cubby_proto::pb::client_frame::Frame) {
        self.tx
            .send(cubby_proto::pb::ClientFrame { frame: Some(frame) })
            .await
            .expect("the stream is open");
    }

    /// The next frame, `Ok(None)` when the stream ended, or the status it ended with. Panics
    /// after [`DEADLINE`].
    pub async fn next(
        &mut self,
    ) -> Result<Option<cubby_proto::pb::server_frame::Frame>, tonic::Status> {
        let message = tokio::time::timeout(DEADLINE, self.inbound.message())
            .await
            .expect("a frame or the end of the stream in time")?;
        Ok(message.and_then(|m| m.frame))
    }

    /// Reads frames until the stream ends; returns the status it ended with, if any.
    pub async fn until_closed(&mut self) -> Option<tonic::Status> {
        loop {
            match self.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    }
}

/// With `CUBBY_TEST_LOG=debug` (any `RUST_LOG`-style filter) tests print the server's and
/// clients' logs.
fn init_logs() {
    if let Ok(filter) = std::env::var("CUBBY_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

/// `request` with `authorization: Bearer <token>`.
pub fn authed<T>(request: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(request);
    let header = format!("Bearer {token}").parse().expect("token is header-safe");
    request.metadata_mut().insert("authorization", header);
    request
}

/// Waits until `check` returns true, polling, or panics after [`DEADLINE`] with `what`.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_within(DEADLINE, what, check).await;
}

/// Polls `check` until it returns true, failing the test after `within`.
pub async fn eventually_within<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Copies a directory tree: its directories and files (not a running server's socket).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("readable") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        let kind = entry.file_type().expect("type");
        if kind.is_dir() {
            copy_tree(&entry.path(), &target);
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("readable dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// A new, empty database on the tests' PostgreSQL server (`CUBBY_TEST_POSTGRES_URL`, which
/// `tests/run.sh` sets; by hand, `source tests/postgres.sh && postgres_start`). Returns its URL.
/// The server is a throwaway one, removed with everything in it after the tests.
pub async fn postgres_database() -> String {
    let url = std::env::var("CUBBY_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "CUBBY_TEST_POSTGRES_URL is not set: this test needs a PostgreSQL server. \
             `bash tests/run.sh` starts one; by hand: source tests/postgres.sh && postgres_start"
        )
    });
    let (client, connection) =
        tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("the test database");
    tokio::spawn(connection);
    let id: [u8; 8] = cubby_crypto::random_array();
    let name = format!("cubby_t_{}", id.iter().map(|b| format!("{b:02x}")).collect::<String>());
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("a database");
    let (base, _) = url.rsplit_once('/').expect("a URL with a database name");
    format!("{base}/{name}")
}
