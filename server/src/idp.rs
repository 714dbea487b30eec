//! A tenant's signing keys, and keeping them current.
//!
//! Keys come from the configuration (a PEM key), a JWKS file, a JWKS URL, or OpenID Connect
//! discovery at the issuer (`<issuer>/.well-known/openid-configuration`, whose `jwks_uri` names
//! the key set). Remote keys are fetched over HTTPS with rustls on ring, and loaded again:
//!
//! - in the background, as the key set's `Cache-Control: max-age` says (or every
//!   `limits.jwks_refresh_secs`), never more often than `limits.jwks_min_refresh_secs`;
//! - when a token names a key id the server does not know (the IdP rotated its keys), at most
//!   once per `limits.jwks_min_refresh_secs`, one load at a time however many tokens ask. The
//!   scheduled loads do not count: a rotation right after one is still picked up at once.
//!
//! A failed load keeps the keys already held: tokens signed with them still verify, tokens
//! naming any other key are refused (fail closed).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use cubby_crypto::jwt::{Validation, Verifier, VerifyingKey};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::{StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ConfigError;

/// The largest discovery document or key set read, in bytes.
const MAX_BODY_BYTES: usize = 1 << 20;
/// How long one HTTP request may take, connecting included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a key set is kept before it is fetched again, whatever its cache lifetime says.
const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);

/// Where a tenant's keys come from.
#[derive(Clone, Debug)]
pub(crate) enum Source {
    /// Given in the configuration: never loaded again.
    Fixed,
    /// A JWKS file, read again as a remote key set would be fetched.
    File(PathBuf),
    /// A JWKS over HTTPS.
    Url(Uri),
    /// An OpenID Connect discovery document, whose `jwks_uri` names the key set.
    Discovery(Uri),
}

/// How often keys are loaded again.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pacing {
    /// The least time between two loads.
    pub min: Duration,
    /// The time between background loads when the key set gives no cache lifetime.
    pub default: Duration,
}

/// One tenant's current keys and how to get new ones.
pub(crate) struct TenantKeys {
    tenant: String,
    validation: Validation,
    source: Source,
    fetcher: Option<Fetcher>,
    pacing: Pacing,
    /// Swapped whole by a successful load.
    verifier: RwLock<Arc<Verifier>>,
    /// When a token with an unknown key id last had keys loaded; held across that load, so
    /// the tokens asking meanwhile wait for it rather than load again.
    last_on_demand: tokio::sync::Mutex<Option<Instant>>,
    /// Held across every load: one at a time.
    loading: tokio::sync::Mutex<()>,
    /// Loads tried, and those that failed (kept keys), for metrics and tests.
    pub(crate) loads: AtomicU64,
    pub(crate) failures: AtomicU64,
}

impl std::fmt::Debug for TenantKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantKeys")
            .field("tenant", &self.tenant)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl TenantKeys {
    /// Keys for `tenant` from `source`. A file is read now (an unreadable one is a start-up
    /// error); remote keys are fetched by [`TenantKeys::load`], so until then none are held.
    pub(crate) fn new(
        tenant: &str,
        validation: Validation,
        source: Source,
        fixed: Vec<VerifyingKey>,
        ca_file: Option<&Path>,
        pacing: Pacing,
    ) -> Result<Self, ConfigError> {
        let bad = |e: String| ConfigError(format!("tenant {tenant}: {e}"));
        let keys = match &source {
            Source::Fixed => fixed,
            Source::File(path) => read_file(path, &validation).map_err(bad)?,
            Source::Url(_) | Source::Discovery(_) => Vec::new(),
        };
        let fetcher = match &source {
            Source::Url(_) | Source::Discovery(_) => Some(Fetcher::new(ca_file).map_err(bad)?),
            Source::Fixed | Source::File(_) => None,
        };
        let verifier = Verifier::new(validation.clone(), keys).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            tenant: tenant.to_owned(),
            validation,
            source,
            fetcher,
            pacing,
            verifier: RwLock::new(Arc::new(verifier)),
            last_on_demand: tokio::sync::Mutex::new(None),
            loading: tokio::sync::Mutex::new(()),
            loads: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        })
    }

    /// The issuer this tenant's tokens carry.
    pub(crate) fn issuer(&self) -> &str {
        &self.validation.issuer
    }

    /// Whether keys are fetched over the network.
    pub(crate) fn is_remote(&self) -> bool {
        self.fetcher.is_some()
    }

    /// The keys now held.
    pub(crate) fn verifier(&self) -> Arc<Verifier> {
        self.verifier.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Loads keys again for a token naming a key id not among `seen`'s, unless a token did
    /// so within the least refresh interval. True when the keys now held differ from `seen`
    /// (this call or a concurrent one loaded new ones).
    pub(crate) async fn refresh_for_unknown_key(&self, seen: &Arc<Verifier>, now: Instant) -> bool {
        if matches!(self.source, Source::Fixed) {
            return false;
        }
        let mut last = self.last_on_demand.lock().await;
        if !Arc::ptr_eq(&self.verifier(), seen) {
            return true;
        }
        if last.is_some_and(|at| now.saturating_duration_since(at) < self.pacing.min) {
            return false;
        }
        let _one_at_a_time = self.loading.lock().await;
        // A scheduled load may have just brought the key: no fetch then, nor a use of the pace.
        if !Arc::ptr_eq(&self.verifier(), seen) {
            return true;
        }
        *last = Some(now);
        let loaded = self.load_now("a token named an unknown key id").await;
        loaded.is_ok() && !Arc::ptr_eq(&self.verifier(), seen)
    }

    /// Loads the keys now (`why`: at start-up, scheduled, or for an unknown key id). Returns
    /// how long the key set may be cached, when it says.
    pub(crate) async fn load(&self, why: &str) -> Result<Option<Duration>, String> {
        let _one_at_a_time = self.loading.lock().await;
        self.load_now(why).await
    }

    async fn load_now(&self, why: &str) -> Result<Option<Duration>, String> {
        self.loads.fetch_add(1, Ordering::Relaxed);
        let loaded = match (&self.source, &self.fetcher) {
            (Source::Fixed, _) => return Ok(None),
            (Source::File(path), _) => read_file(path, &self.validation).map(|keys| (keys, None)),
            (Source::Url(url), Some(fetcher)) => fetcher.key_set(url, &self.validation).await,
            (Source::Discovery(url), Some(fetcher)) => {
                match fetcher.discover(url, &self.validation.issuer).await {
                    Ok(jwks_uri) => fetcher.key_set(&jwks_uri, &self.validation).await,
                    Err(e) => Err(e),
                }
            }
            (Source::Url(_) | Source::Discovery(_), None) => Err("no HTTP client".into()),
        }
        .and_then(|(keys, max_age)| {
            let verifier =
                Verifier::new(self.validation.clone(), keys).map_err(|e| e.to_string())?;
            Ok((verifier, max_age))
        });
        match loaded {
            Ok((verifier, max_age)) => {
                let kids: Vec<_> = verifier.keys().iter().filter_map(|k| k.kid()).collect();
                tracing::info!(tenant = %self.tenant, why, keys = ?kids, "loaded the tenant's keys");
                *self.verifier.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(verifier);
                Ok(max_age)
            }
            Err(err) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                let held = self.verifier().keys().len();
                tracing::warn!(tenant = %self.tenant, source = ?self.source, why, %err, held,
                    "cannot load the tenant's keys; keeping the keys already held");
                Err(err)
            }
        }
    }

    /// Loads remote keys or a file again in the background until `stop`, as the key set's cache
    /// lifetime says, sooner after a failure. `first` is the outcome of the start-up load.
    pub(crate) fn spawn_refresher(
        self: Arc<Self>,
        first: Result<Option<Duration>, String>,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) {
        if matches!(self.source, Source::Fixed) {
            return;
        }
        tracker.spawn(async move {
            let mut outcome = first;
            let mut failures = 0u32;
            // Never more often than the least interval, nor than once a second.
            let floor = self.pacing.min.max(Duration::from_secs(1));
            loop {
                let wait = match &outcome {
                    Ok(max_age) => {
                        failures = 0;
                        max_age.unwrap_or(self.pacing.default)
                    }
                    Err(_) => {
                        // 1, 2, 4 … times the least interval (a second at least), up to the
                        // usual one.
                        failures = failures.saturating_add(1);
                        floor
                            .saturating_mul(1 << failures.min(10).saturating_sub(1))
                            .min(self.pacing.default)
                    }
                }
                .clamp(floor, MAX_REFRESH.max(floor));
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                outcome = self.load("scheduled").await;
            }
        });
    }
}

fn read_file(path: &Path, validation: &Validation) -> Result<Vec<VerifyingKey>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    usable_keys(&text, validation).map_err(|e| format!("{}: {e}", path.display()))
}

/// The keys of a JWKS usable with the tenant's algorithms; none is an error.
fn usable_keys(text: &str, validation: &Validation) -> Result<Vec<VerifyingKey>, String> {
    let keys = VerifyingKey::from_jwks(text, &validation.algorithms).map_err(|e| e.to_string())?;
    if keys.is_empty() {
        let algs: Vec<_> = validation.algorithms.iter().map(|a| a.name()).collect();
        return Err(format!("the key set has no signing key for {}", algs.join(", ")));
    }
    Ok(keys)
}

/// Checks a URL keys may be fetched from: HTTPS, or plain HTTP to this machine only.
pub(crate) fn fetch_url(text: &str) -> Result<Uri, String> {
    let uri: Uri = text.parse().map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    let host = uri.host().unwrap_or_default();
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => Ok(uri),
        Some("http") if is_loopback(host) => Ok(uri),
        Some("http") => Err(format!(
            "{text:?}: keys are fetched over HTTPS (plain HTTP only from this machine)"
        )),
        _ => Err(format!("{text:?} is not an https:// URL")),
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The discovery document's URL for `issuer`: `/.well-known/openid-configuration` appended to
/// it, as OpenID Connect Discovery says.
pub(crate) fn discovery_url(issuer: &str) -> String {
    format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'))
}

/// An HTTPS client for one tenant's IdP: the public web's roots, and the tenant's own CA.
struct Fetcher {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl Fetcher {
    fn new(ca_file: Option<&Path>) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("ca_file {} holds no certificate", path.display()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self { client: Client::builder(TokioExecutor::new()).build(connector) })
    }

    /// GETs `url`: its body, and how long it may be cached (`Cache-Control: max-age` less
    /// `Age`).
    async fn get(&self, url: &Uri) -> Result<(Bytes, Option<Duration>), String> {
        let request = hyper::Request::get(url.clone())
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, concat!("cubby-server/", env!("CARGO_PKG_VERSION")))
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let fetch = async {
            let response = self.client.request(request).await.map_err(|e| error_chain(&e))?;
            let status = response.status();
            if status != StatusCode::OK {
                let whither = response
                    .headers()
                    .get(hyper::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .map(|to| format!(" to {to} (configure that URL)"))
                    .unwrap_or_default();
                return Err(format!("{url} answered {status}{whither}"));
            }
            let max_age = cache_lifetime(response.headers());
            let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| format!("{url}: {e}"))?
                .to_bytes();
            Ok((body, max_age))
        };
        tokio::time::timeout(FETCH_TIMEOUT, fetch)
            .await
            .map_err(|_| format!("{url} did not answer within {}s", FETCH_TIMEOUT.as_secs()))?
    }

    /// Reads the discovery document at `url` and returns its `jwks_uri`, after checking that
    /// the document is the configured issuer's.
    async fn discover(&self, url: &Uri, issuer: &str) -> Result<Uri, String> {
        #[derive(serde::Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: String,
        }
        let (body, _) = self.get(url).await?;
        let doc: Discovery = serde_json::from_slice(&body)
            .map_err(|e| format!("{url} is not a discovery document: {e}"))?;
        if doc.issuer != issuer {
            return Err(format!(
                "{url} is the discovery document of issuer {:?}, not {issuer:?}",
                doc.issuer
            ));
        }
        let jwks_uri = fetch_url(&doc.jwks_uri)?;
        // Plain HTTP is for an IdP on this machine: a remote discovery document may not send
        // the server to its own loopback.
        if jwks_uri.scheme_str() == Some("http") && url.scheme_str() != Some("http") {
            return Err(format!("{url} names a plain-HTTP jwks_uri {jwks_uri}; use HTTPS"));
        }
        Ok(jwks_uri)
    }

    async fn key_set(
        &self,
        url: &Uri,
        validation: &Validation,
    ) -> Result<(Vec<VerifyingKey>, Option<Duration>), String> {
        let (body, max_age) = self.get(url).await?;
        let text = std::str::from_utf8(&body).map_err(|_| format!("{url} is not UTF-8"))?;
        let keys = usable_keys(text, validation).map_err(|e| format!("{url}: {e}"))?;
        Ok((keys, max_age))
    }
}

/// An error and its causes, each once.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text = format!("{text}: {line}");
        }
        source = cause.source();
    }
    text
}

/// How long a response may be cached: `Cache-Control: max-age` less `Age`; none for
/// `no-store`, `no-cache` or no `max-age`.
fn cache_lifetime(headers: &hyper::HeaderMap) -> Option<Duration> {
    let control = headers.get(hyper::header::CACHE_CONTROL)?.to_str().ok()?.to_ascii_lowercase();
    let mut max_age = None;
    for directive in control.split(',').map(str::trim) {
        if directive == "no-store" || directive == "no-cache" {
            return None;
        }
        if let Some(secs) = directive.strip_prefix("max-age=") {
            max_age = secs.trim_matches('"').parse::<u64>().ok();
        }
    }
    let age = headers
        .get(hyper::header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Some(Duration::from_secs(max_age?.saturating_sub(age)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> hyper::HeaderMap {
        let mut map = hyper::HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().expect("a header value"));
        }
        map
    }

    #[test]
    fn a_key_sets_cache_lifetime_is_its_max_age_less_its_age() {
        let lifetime = |pairs: &[(&'static str, &str)]| cache_lifetime(&headers(pairs));
        assert_eq!(
            lifetime(&[("cache-control", "public, max-age=3600")]),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            lifetime(&[("cache-control", "max-age=600, must-revalidate"), ("age", "100")]),
            Some(Duration::from_secs(500))
        );
        assert_eq!(
            lifetime(&[("cache-control", "max-age=60"), ("age", "90")]),
            Some(Duration::ZERO)
        );
        assert_eq!(lifetime(&[("cache-control", "no-store")]), None);
        assert_eq!(lifetime(&[("cache-control", "no-cache, max-age=60")]), None);
        assert_eq!(lifetime(&[]), None);
    }

    #[test]
    fn keys_come_over_https_or_from_this_machine() {
        assert!(fetch_url("https://login.example.com/keys").is_ok());
        assert!(fetch_url("http://127.0.0.1:8080/jwks").is_ok());
        assert!(fetch_url("http://localhost/jwks").is_ok());
        assert!(fetch_url("http://[::1]:9/jwks").is_ok());
        let refused = fetch_url("http://idp.example.com/jwks").expect_err("plain HTTP elsewhere");
        assert!(refused.contains("HTTPS"), "{refused}");
        assert!(fetch_url("ftp://idp.example.com/jwks").is_err());
        assert!(fetch_url("not a url").is_err());
        assert_eq!(
            discovery_url("https://acme.eu.auth0.com/"),
            "https://acme.eu.auth0.com/.well-known/openid-configuration"
        );
        assert_eq!(
            discovery_url("https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_abc"),
            "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_abc/.well-known/openid-configuration"
        );
    }
}
