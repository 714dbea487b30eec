//! Who is calling: bearer tokens from a tenant's identity provider, verified with ring.
//!
//! The customer is `(tenant, sub)` of a verified token, turned into an opaque store key with the
//! keyring's id hash. Nothing in a request body can name another customer.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cubby_core::CustomerId;
use cubby_crypto::jwt::{self, Algorithm, JwtError, Validation, Verifier, VerifyingKey};
use cubby_crypto::keys::{Keyring, write_private_file};
use cubby_crypto::signing::{TokenSigner, generate_pkcs8};
use cubby_proto::ApiError;
use tonic::metadata::MetadataMap;

use crate::config::{ConfigError, ServerConfig, TenantConfig};

/// The development tenant's name, issuer and audience.
pub const DEV_TENANT: &str = "dev";
/// The `iss` of development tokens.
pub const DEV_ISSUER: &str = "cubby-dev";
/// The `aud` of development tokens.
pub const DEV_AUDIENCE: &str = "cubby";

/// The longest subject (`sub`) Cubby accepts, in bytes, on every API: a token with a longer
/// one is refused, so every customer a token can reach can also be named to the admin API.
pub const MAX_SUBJECT_BYTES: usize = 1024;

/// The time of day tokens are judged by: their `exp` and `nbf`, how long a stream's token has
/// left, how long a refused token stays on the list.
#[derive(Clone, Copy, Debug, Default)]
pub enum Clock {
    /// The machine's clock.
    #[default]
    System,
    /// Another clock, read as a duration since the Unix epoch: the deterministic simulation's,
    /// whose time moves only as the simulation runs.
    Simulated(fn() -> Duration),
}

impl Clock {
    /// Now, as a duration since the Unix epoch.
    fn since_epoch(&self) -> Duration {
        match self {
            Clock::System => SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default(),
            Clock::Simulated(now) => now(),
        }
    }

    /// Now, in whole seconds since the Unix epoch.
    pub fn unix_now(&self) -> u64 {
        self.since_epoch().as_secs()
    }

    /// Time left until the Unix second `unix` (zero once it has passed), to the instant.
    pub fn until(&self, unix: u64) -> Duration {
        Duration::from_secs(unix).saturating_sub(self.since_epoch())
    }
}

/// A verified caller.
#[derive(Clone)]
pub struct Caller {
    /// The tenant whose issuer signed the token.
    pub tenant: String,
    /// The token's subject: the customer, or the business service for a service token.
    pub subject: String,
    /// The customer's store key (for a service token, the key its subject would have).
    pub customer: CustomerId,
    /// When the token expires, seconds since the Unix epoch.
    pub expires_at: u64,
    /// The token carries the tenant's admin scope: it is a service token for the admin API.
    pub admin: bool,
    /// SHA-256 of the token, for the revoked-token list.
    pub token_hash: [u8; 32],
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The subject identifies a person: it stays out of logs.
        f.debug_struct("Caller")
            .field("tenant", &self.tenant)
            .field("customer", &self.customer)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

struct Tenant {
    name: String,
    /// Swapped whole when the JWKS file is read again.
    verifier: RwLock<Arc<Verifier>>,
    admin_scope: String,
    jwks: Option<JwksFile>,
}

/// The most often a tenant's JWKS file is read again for a token whose key it does not know.
pub const JWKS_REFRESH_EVERY: Duration = Duration::from_secs(60);

/// A tenant's JWKS file, read again when a token names a key it lacks (an IdP key rotation),
/// at most once per [`JWKS_REFRESH_EVERY`].
struct JwksFile {
    path: PathBuf,
    validation: Validation,
    last_read: Mutex<Option<Instant>>,
    reads: AtomicU64,
}

impl Tenant {
    fn verifier(&self) -> Arc<Verifier> {
        self.verifier.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Reads the JWKS file again unless that happened within the last minute; true when new
    /// keys were installed. Failures keep the cached keys.
    fn refresh_keys(&self, now: Instant) -> bool {
        let Some(jwks) = &self.jwks else { return false };
        {
            let mut last = jwks.last_read.lock().unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|at| now.saturating_duration_since(at) < JWKS_REFRESH_EVERY) {
                return false;
            }
            *last = Some(now);
        }
        jwks.reads.fetch_add(1, Ordering::Relaxed);
        let keys = std::fs::read_to_string(&jwks.path)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                VerifyingKey::from_jwks(&text, jwks.validation.algorithm).map_err(|e| e.to_string())
            })
            .and_then(|keys| {
                Verifier::new(jwks.validation.clone(), keys).map_err(|e| e.to_string())
            });
        match keys {
            Ok(verifier) => {
                tracing::info!(tenant = %self.name,
                    "read the JWKS file again for an unknown key id");
                *self.verifier.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(verifier);
                true
            }
            Err(err) => {
                tracing::warn!(tenant = %self.name, path = %jwks.path.display(), %err,
                    "cannot read the JWKS file again; keeping the cached keys");
                false
            }
        }
    }
}

/// Whether the claims grant `scope`, in a space-separated `scope` string or an `scp` list.
fn has_scope(claims: &serde_json::Map<String, serde_json::Value>, scope: &str) -> bool {
    let in_string = claims
        .get("scope")
        .and_then(|v| v.as_str())
        .is_some_and(|s| s.split_ascii_whitespace().any(|s| s == scope));
    let in_list = claims
        .get("scp")
        .and_then(|v| v.as_array())
        .is_some_and(|list| list.iter().any(|s| s.as_str() == Some(scope)));
    in_string || in_list
}

/// Verifies tokens for every configured tenant.
pub struct Authenticator {
    tenants: Vec<Tenant>,
    ids: Keyring,
    clock: Clock,
    leeway_secs: u64,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.tenants.iter().map(|t| t.name.as_str()).collect();
        f.debug_struct("Authenticator").field("tenants", &names).finish()
    }
}

fn now() -> u64 {
    Clock::System.unix_now()
}

fn dev_key_path(data: &Path) -> PathBuf {
    data.join("dev-tenant.key")
}

/// Loads the development tenant's signing key, creating it on first use.
pub fn dev_signer(data: &Path, create: bool) -> Result<TokenSigner, ConfigError> {
    let path = dev_key_path(data);
    if !path.exists() && create {
        write_private_file(&path, &generate_pkcs8())
            .map_err(|e| ConfigError(format!("cannot create {}: {e}", path.display())))?;
    }
    let bytes = std::fs::read(&path).map_err(|e| {
        ConfigError(format!(
            "cannot read the development tenant key {} ({e}); start the server once with this \
             data directory first",
            path.display()
        ))
    })?;
    TokenSigner::from_pkcs8(&bytes)
        .map_err(|_| ConfigError(format!("{} is not a key pair", path.display())))
}

/// A development token for `subject`, valid for `ttl`. Every token is distinct (`jti`).
pub fn dev_token(signer: &TokenSigner, subject: &str, ttl: Duration) -> String {
    dev_token_with(signer, subject, ttl, None, now())
}

/// [`dev_token`] issued at `clock`'s now: the simulation's tokens live in simulated time.
pub fn dev_token_at(signer: &TokenSigner, subject: &str, ttl: Duration, clock: Clock) -> String {
    dev_token_with(signer, subject, ttl, None, clock.unix_now())
}

/// A development service token for the admin API (scope `cubby:admin`), for `service`.
pub fn dev_service_token(signer: &TokenSigner, service: &str, ttl: Duration) -> String {
    dev_token_with(signer, service, ttl, Some(crate::config::DEFAULT_ADMIN_SCOPE), now())
}

fn dev_token_with(
    signer: &TokenSigner,
    subject: &str,
    ttl: Duration,
    scope: Option<&str>,
    now: u64,
) -> String {
    let jti = bs58::encode(cubby_crypto::random_array::<12>()).into_string();
    let mut claims = serde_json::json!({
        "iss": DEV_ISSUER, "aud": DEV_AUDIENCE, "sub": subject,
        "iat": now, "nbf": now, "exp": now + ttl.as_secs(), "jti": jti,
    });
    if let Some(scope) = scope {
        claims["scope"] = scope.into();
    }
    signer.sign_jwt(&claims)
}

fn tenant_keys(t: &TenantConfig) -> Result<Vec<VerifyingKey>, ConfigError> {
    let bad = |e: jwt::KeyError| ConfigError(format!("tenant {}: {e}", t.name));
    match (&t.jwks_file, &t.public_key_pem) {
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("tenant {}: cannot read {}: {e}", t.name, path.display()))
            })?;
            VerifyingKey::from_jwks(&text, t.algorithm).map_err(bad)
        }
        (None, Some(pem)) => Ok(vec![VerifyingKey::from_pem(pem, t.algorithm, None).map_err(bad)?]),
        _ => Err(ConfigError(format!(
            "tenant {}: set exactly one of jwks_file or public_key_pem",
            t.name
        ))),
    }
}

impl Authenticator {
    /// Builds verifiers for the configured tenants (and the development tenant if enabled).
    pub fn new(config: &ServerConfig, ids: Keyring, clock: Clock) -> Result<Self, ConfigError> {
        let leeway_secs = config.limits.token_leeway_secs;
        let mut tenants = Vec::new();
        for t in &config.tenants {
            if t.name == DEV_TENANT || tenants.iter().any(|x: &Tenant| x.name == t.name) {
                return Err(ConfigError(format!(
                    "tenant name {:?} is reserved or repeated",
                    t.name
                )));
            }
            let validation = Validation {
                issuer: t.issuer.clone(),
                audience: t.audience.clone(),
                algorithm: t.algorithm,
                leeway_secs,
            };
            let verifier = Verifier::new(validation.clone(), tenant_keys(t)?)
                .map_err(|e| ConfigError(format!("tenant {}: {e}", t.name)))?;
            let jwks = t.jwks_file.clone().map(|path| JwksFile {
                path,
                validation,
                last_read: Mutex::new(None),
                reads: AtomicU64::new(0),
            });
            tenants.push(Tenant {
                name: t.name.clone(),
                verifier: RwLock::new(Arc::new(verifier)),
                admin_scope: t.admin_scope.clone(),
                jwks,
            });
        }
        if config.dev_tenant_enabled() {
            let signer = dev_signer(&config.data, true)?;
            let validation = Validation {
                issuer: DEV_ISSUER.into(),
                audience: DEV_AUDIENCE.into(),
                algorithm: Algorithm::EdDSA,
                leeway_secs,
            };
            let verifier = Verifier::new(validation, vec![signer.verifying_key()])
                .map_err(|e| ConfigError(format!("development tenant: {e}")))?;
            tenants.push(Tenant {
                name: DEV_TENANT.into(),
                verifier: RwLock::new(Arc::new(verifier)),
                admin_scope: crate::config::DEFAULT_ADMIN_SCOPE.into(),
                jwks: None,
            });
        }
        if tenants.is_empty() {
            return Err(ConfigError(
                "no tenants configured and the development tenant is off".into(),
            ));
        }
        let mut issuers: Vec<_> =
            tenants.iter().map(|t| t.verifier().validation().issuer.clone()).collect();
        issuers.sort();
        if issuers.windows(2).any(|w| w[0] == w[1]) {
            return Err(ConfigError("two tenants share an issuer".into()));
        }
        Ok(Self { tenants, ids, clock, leeway_secs })
    }

    /// Verifies a raw token.
    ///
    /// A refusal is logged at INFO with its reason (never the token or its subject), so an
    /// operator whose IdP is misconfigured sees why in the server's log.
    pub fn verify(&self, token: &str) -> Result<Caller, ApiError> {
        let verified = self.verify_at(token, self.clock.unix_now(), Instant::now());
        if let Err(err) = &verified {
            tracing::info!(reason = %err, "token refused");
        }
        verified
    }

    /// The clock tokens are judged by.
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Tokens that expired before this Unix second are no longer accepted; the clock leeway
    /// still accepts those that expired since.
    pub(crate) fn expired_before(&self) -> u64 {
        self.clock.unix_now().saturating_sub(self.leeway_secs)
    }

    /// Verifies a raw token at `unix_now`; `mono_now` paces re-reading a JWKS file.
    fn verify_at(&self, token: &str, unix_now: u64, mono_now: Instant) -> Result<Caller, ApiError> {
        let refuse = |e: JwtError| ApiError::Unauthenticated(format!("invalid token: {e}"));
        let issuer = jwt::unverified_issuer(token).map_err(refuse)?;
        let tenant =
            self.tenants.iter().find(|t| t.verifier().validation().issuer == issuer).ok_or_else(
                || {
                    // The caller sent this issuer; naming it back (shortened) tells an operator
                    // which `issuer` their tenant config is missing.
                    let shown: String = issuer.chars().take(120).collect();
                    ApiError::Unauthenticated(format!(
                        "invalid token: issuer {shown:?} is not a configured tenant's issuer"
                    ))
                },
            )?;
        let claims = match tenant.verifier().verify(token, unix_now) {
            // The IdP may have rotated its keys: read the JWKS again (at most once a minute).
            Err(JwtError::UnknownKey) if tenant.refresh_keys(mono_now) => {
                tenant.verifier().verify(token, unix_now)
            }
            verified => verified,
        }
        .map_err(|e| match e {
            JwtError::UnknownKey => ApiError::Unauthenticated(format!(
                "invalid token: no key of tenant {:?} matches its `kid` (a JWKS file is \
                 re-read at most once a minute)",
                tenant.name
            )),
            other => refuse(other),
        })?;
        if claims.sub.len() > MAX_SUBJECT_BYTES {
            return Err(ApiError::Unauthenticated(format!(
                "invalid token: its subject is longer than {MAX_SUBJECT_BYTES} bytes"
            )));
        }
        Ok(Caller {
            tenant: tenant.name.clone(),
            customer: self.customer_id(&tenant.name, &claims.sub),
            admin: has_scope(&claims.all, &tenant.admin_scope),
            subject: claims.sub,
            expires_at: claims.exp,
            token_hash: cubby_crypto::sha256(token.as_bytes()),
        })
    }

    /// The store key of `subject` in `tenant`.
    pub fn customer_id(&self, tenant: &str, subject: &str) -> CustomerId {
        CustomerId::from_bytes(self.ids.customer_id(tenant, subject))
    }

    /// Verifies the `authorization: Bearer` header of a request.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, ApiError> {
        let header = metadata
            .get("authorization")
            .ok_or_else(|| ApiError::Unauthenticated("missing authorization header".into()))?;
        let token =
            header.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).ok_or_else(|| {
                ApiError::Unauthenticated("authorization must be `Bearer <token>`".into())
            })?;
        self.verify(token.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cubby_crypto::keys::MasterSecret;
    use serde_json::json;

    const ISSUER: &str = "https://idp.example";

    fn signer() -> TokenSigner {
        TokenSigner::from_pkcs8(&generate_pkcs8()).expect("a fresh key pair")
    }

    fn publish(path: &Path, signers: &[&TokenSigner]) {
        let keys: Vec<_> = signers.iter().map(|s| s.jwk()).collect();
        std::fs::write(path, json!({ "keys": keys }).to_string()).expect("write JWKS");
    }

    fn token(signer: &TokenSigner) -> String {
        let now = now();
        signer.sign_jwt(&json!({
            "iss": ISSUER, "aud": "cubby", "sub": "alice", "nbf": now, "exp": now + 600,
        }))
    }

    fn authenticator(jwks: &Path) -> Authenticator {
        let data = jwks.parent().expect("a directory");
        let mut config = ServerConfig::dev(data, "127.0.0.1:0".parse().expect("address"));
        config.dev_tenant = Some(false);
        config.tenants.push(TenantConfig {
            name: "acme".into(),
            issuer: ISSUER.into(),
            audience: "cubby".into(),
            algorithm: Algorithm::EdDSA,
            jwks_file: Some(jwks.to_path_buf()),
            public_key_pem: None,
            admin_scope: crate::config::DEFAULT_ADMIN_SCOPE.into(),
        });
        Authenticator::new(
            &config,
            Keyring::from_master(&MasterSecret::from_bytes([1; 32])),
            Clock::System,
        )
        .expect("the tenant configures")
    }

    fn reads(auth: &Authenticator) -> u64 {
        auth.tenants[0].jwks.as_ref().map_or(0, |j| j.reads.load(Ordering::Relaxed))
    }

    fn refused(result: Result<Caller, ApiError>) -> bool {
        matches!(result, Err(ApiError::Unauthenticated(_)))
    }

    #[test]
    fn row_17_a_flood_of_unknown_key_ids_reads_the_jwks_at_most_once_a_minute() {
        let dir = tempfile::tempdir().expect("temp dir");
        let jwks = dir.path().join("jwks.json");
        let (idp, rogue) = (signer(), signer());
        publish(&jwks, &[&idp]);
        let auth = authenticator(&jwks);
        let (start, forged) = (Instant::now(), token(&rogue));
        for i in 0..10_000 {
            let at = start + Duration::from_millis(i * 5); // 50 s of flood
            assert!(refused(auth.verify_at(&forged, now(), at)), "unknown key accepted");
        }
        assert_eq!(reads(&auth), 1, "one read of the JWKS for 10,000 unknown key ids in 50 s");
        assert!(refused(auth.verify_at(&forged, now(), start + Duration::from_secs(61))));
        assert_eq!(reads(&auth), 2, "and one more a minute later");
        assert!(auth.verify_at(&token(&idp), now(), start).is_ok(), "real tokens still verify");
    }

    #[test]
    fn row_18_jwks_unreadable_during_a_key_rotation_keeps_cached_keys_and_fails_new_ones_closed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let jwks = dir.path().join("jwks.json");
        let (old, new) = (signer(), signer());
        publish(&jwks, &[&old]);
        let auth = authenticator(&jwks);
        let start = Instant::now();

        // The IdP starts signing with a new key while its key set cannot be had: gone, then
        // garbage.
        std::fs::remove_file(&jwks).expect("remove");
        assert!(refused(auth.verify_at(&token(&new), now(), start)));
        assert!(auth.verify_at(&token(&old), now(), start).is_ok(), "cached keys keep working");
        std::fs::write(&jwks, "{ not json").expect("write");
        let later = start + Duration::from_secs(61);
        assert!(refused(auth.verify_at(&token(&new), now(), later)));
        assert!(auth.verify_at(&token(&old), now(), later).is_ok());

        // The key set is back, with both keys: the new one verifies at the next allowed read.
        publish(&jwks, &[&old, &new]);
        let again = later + JWKS_REFRESH_EVERY;
        assert!(auth.verify_at(&token(&new), now(), again).is_ok(), "the rotated key is picked up");
        assert!(auth.verify_at(&token(&old), now(), again).is_ok());
        assert_eq!(reads(&auth), 3);
    }

    #[test]
    fn a_refused_token_says_which_issuer_or_key_to_configure() {
        let dir = tempfile::tempdir().expect("temp dir");
        let jwks = dir.path().join("jwks.json");
        let (idp, rogue) = (signer(), signer());
        publish(&jwks, &[&idp]);
        let auth = authenticator(&jwks);
        let message = |result: Result<Caller, ApiError>| match result {
            Err(ApiError::Unauthenticated(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        };

        let now = now();
        let elsewhere = idp.sign_jwt(&json!({
            "iss": "https://other.example", "aud": "cubby", "sub": "alice", "exp": now + 600,
        }));
        let m = message(auth.verify(&elsewhere));
        assert!(m.contains("\"https://other.example\"") && m.contains("issuer"), "{m}");

        let m = message(auth.verify(&token(&rogue)));
        assert!(m.contains("\"acme\"") && m.contains("kid"), "{m}");
        assert!(!m.contains("alice"), "the subject is not echoed: {m}");
    }
}
