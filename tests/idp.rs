//! A real OpenID provider for the tests: `oidc-provider` (npm) run by Node.js from
//! `tests/idp/provider.mjs`, serving HTTPS with a certificate from a test CA.
//!
//! Its npm packages are installed on first use (`npm ci`, under a lock, so that test binaries
//! running at once install once). Node.js and npm must be on the machine: a missing one fails
//! the test with what to install, it is never skipped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tempfile::TempDir;

/// The audience the provider's access tokens carry.
pub const AUDIENCE: &str = "cubby";
/// The scope that makes a token a service token for Cubby's admin API.
pub const ADMIN_SCOPE: &str = "cubby:admin";

type Https = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A running provider. Stopped (killed) when dropped.
pub struct Provider {
    child: Option<Child>,
    /// Its issuer, `https://localhost:PORT`.
    pub issuer: String,
    /// The CA that issued its certificate (PEM), for a tenant's `ca_file`.
    pub ca_file: PathBuf,
    client: IdpClient,
    _dir: TempDir,
}

/// Calls to a provider's endpoints. Cheap to clone.
#[derive(Clone)]
pub struct IdpClient {
    issuer: String,
    http: Https,
}

fn harness_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("idp")
}

/// Runs `npm ci` in the harness directory unless its packages are there. One process installs;
/// the others wait for it.
fn ensure_installed() {
    let dir = harness_dir();
    let installed = || dir.join("node_modules/oidc-provider/package.json").exists();
    let lock = dir.join(".installing");
    let deadline = Instant::now() + Duration::from_secs(600);
    while !installed() {
        match std::fs::create_dir(&lock) {
            Ok(()) => {
                let outcome = Command::new("npm")
                    .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                    .current_dir(&dir)
                    .status();
                let _ = std::fs::remove_dir(&lock);
                match outcome {
                    Ok(status) if status.success() => {}
                    Ok(status) => panic!("`npm ci` in {} failed: {status}", dir.display()),
                    Err(err) => panic!(
                        "cannot run npm ({err}): the OpenID provider tests need Node.js 20 or \
                         later with npm (apt-get install nodejs npm)"
                    ),
                }
            }
            Err(_) => {
                // Another test is installing; a lock left by a killed one goes after ten minutes.
                let age = std::fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|at| SystemTime::now().duration_since(at).ok());
                if age.is_some_and(|age| age > Duration::from_secs(600)) {
                    let _ = std::fs::remove_dir(&lock);
                }
                assert!(Instant::now() < deadline, "npm ci by another test did not finish");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// A test CA and a certificate it issued for `localhost` and 127.0.0.1 (not a CA itself), as
/// PEM files in `dir`: (ca, cert, key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "Cubby test IdP CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA certificate");
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).expect("names");
    let cert = params.signed_by(&key, &ca).expect("certificate");
    let paths = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&paths.0, ca.pem()).expect("write CA");
    std::fs::write(&paths.1, cert.pem()).expect("write certificate");
    std::fs::write(&paths.2, key.serialize_pem()).expect("write key");
    paths
}

impl Provider {
    /// Installs (once) and starts a provider on a free port; returns once it listens.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ca_file, cert, key) = certificates(dir.path());
        let harness = harness_dir();
        tokio::task::spawn_blocking(ensure_installed).await.expect("npm ci ran");
        let mut child = Command::new("node")
            .arg(harness.join("provider.mjs"))
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .args(["--port", "0", "--audience", AUDIENCE])
            .current_dir(&harness)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run node ({e}): install Node.js 20 or later"));
        let stdout = child.stdout.take().expect("piped stdout");
        let first = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
                .map(|_| line)
        });
        let line = tokio::time::timeout(Duration::from_secs(60), first)
            .await
            .expect("the provider says where it listens within a minute")
            .expect("read")
            .expect("read its first line");
        let said: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the provider's first line {line:?}: {e}"));
        let issuer = said["issuer"].as_str().expect("an issuer").to_owned();
        let client = IdpClient { issuer: issuer.clone(), http: https_client(&ca_file) };
        Self { child: Some(child), issuer, client, ca_file, _dir: dir }
    }

    /// A client of its endpoints.
    pub fn client(&self) -> IdpClient {
        self.client.clone()
    }

    /// Stops the provider: its endpoints are gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A `[[tenants]]` entry for this provider, its keys found by discovery.
    pub fn tenant_toml(&self, name: &str) -> String {
        format!(
            "name = '{name}'\nissuer = '{}'\naudience = '{AUDIENCE}'\n\
             algorithms = ['RS256', 'PS256', 'ES256', 'ES384', 'EdDSA']\nca_file = '{}'\n",
            self.issuer,
            self.ca_file.display()
        )
    }
}

impl IdpClient {
    /// An access token for `client` (`alice`, `bob` or `backend`), with `scope` if given.
    pub async fn token(&self, client: &str, scope: Option<&str>) -> Result<String, String> {
        let mut form = format!(
            "grant_type=client_credentials&client_id={client}&client_secret={client}-secret"
        );
        if let Some(scope) = scope {
            form.push_str(&format!("&scope={}", scope.replace(':', "%3A")));
        }
        let answer = self.post("/token", "application/x-www-form-urlencoded", form).await?;
        answer["access_token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no token: {answer}"))
    }

    /// Makes a new key of `alg` sign new tokens, keeping the old ones published. Returns its
    /// key id.
    pub async fn rotate(&self, alg: &str) -> String {
        let answer = self
            .post("/_test/rotate", "application/json", format!("{{\"alg\":\"{alg}\"}}"))
            .await
            .expect("rotates");
        answer["kid"].as_str().expect("a kid").to_owned()
    }

    /// How many times the key set was fetched.
    pub async fn jwks_fetches(&self) -> u64 {
        let answer =
            self.request(hyper::Method::GET, "/_test/jwks_fetches", "", String::new()).await;
        answer.expect("counted")["count"].as_u64().expect("a count")
    }

    /// A token provider for an SDK client: a token for `client` from the provider, fetched
    /// anew each time the SDK asks.
    pub fn tokens(&self, client: &'static str) -> impl cubby_client::TokenProvider {
        let idp = self.clone();
        move |_refresh: bool| {
            let idp = idp.clone();
            async move { idp.token(client, None).await.map_err(cubby_client::TokenError) }
        }
    }

    async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: String,
    ) -> Result<serde_json::Value, String> {
        self.request(hyper::Method::POST, path, content_type, body).await
    }

    async fn request(
        &self,
        method: hyper::Method,
        path: &str,
        content_type: &str,
        body: String,
    ) -> Result<serde_json::Value, String> {
        let mut request =
            hyper::Request::builder().method(method).uri(format!("{}{path}", self.issuer));
        if !content_type.is_empty() {
            request = request.header(hyper::header::CONTENT_TYPE, content_type);
        }
        let request = request.body(Full::new(Bytes::from(body))).map_err(|e| e.to_string())?;
        let response = self.http.request(request).await.map_err(|e| format!("{e:?}"))?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            return Err(format!("{path}: {status}: {text}"));
        }
        serde_json::from_str(&text).map_err(|e| format!("{path}: {e}: {text}"))
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.stop();
    }
}

fn https_client(ca_file: &Path) -> Https {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).expect("CA file") {
        roots.add(cert.expect("a certificate")).expect("a CA");
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

/// A JWT's header, decoded (no checks): to tell which key signed a token.
pub fn header(token: &str) -> serde_json::Value {
    use base64::Engine as _;
    let part = token.split('.').next().unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or_default()
}
