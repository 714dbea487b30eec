//! Who is calling: bearer tokens from a tenant's identity provider, verified with ring.
//!
//! The customer is `(tenant, sub)` of a verified token, turned into an opaque store key with the
//! keyring's id hash. Nothing in a request body can name another customer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cubby_core::CustomerId;
use cubby_crypto::jwt::{self, Algorithm, ClaimNames, JwtError, Validation, VerifyingKey};
use cubby_crypto::keys::{Keyring, write_private_file};
use cubby_crypto::signing::{TokenSigner, generate_pkcs8};
use cubby_proto::ApiError;
use tonic::metadata::MetadataMap;

use crate::config::{ConfigError, ServerConfig, TenantConfig};
use crate::idp::{self, Pacing, Source, TenantKeys};
use crate::metrics::{Metrics, TenantLabels};

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
    keys: Arc<TenantKeys>,
    /// Where the admin permission is; `None`: `scope`, or `scp`.
    admin_claim: Option<String>,
    admin_scope: String,
    /// Claims a service token must also carry.
    admin_required: Vec<(String, String)>,
}

impl Tenant {
    /// Whether the claims grant the tenant's admin permission.
    fn grants_admin(&self, claims: &serde_json::Map<String, serde_json::Value>) -> bool {
        let has = |name: &str| {
            jwt::claim(claims, name).is_some_and(|v| jwt::claim_has(v, &self.admin_scope, true))
        };
        let granted = match &self.admin_claim {
            Some(name) => has(name),
            None => has("scope") || has("scp"),
        };
        granted
            && self.admin_required.iter().all(|(name, value)| {
                jwt::claim(claims, name).is_some_and(|v| jwt::claim_has(v, value, false))
            })
    }
}

/// Verifies tokens for every configured tenant.
pub struct Authenticator {
    tenants: Vec<Tenant>,
    ids: Keyring,
    clock: Clock,
    leeway_secs: u64,
    metrics: Arc<Metrics>,
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

/// Where a configured tenant's keys come from, and the keys given inline.
fn tenant_source(t: &TenantConfig) -> Result<(Source, Vec<VerifyingKey>), ConfigError> {
    let bad = |e: String| ConfigError(format!("tenant {}: {e}", t.name));
    let given = [t.jwks_file.is_some(), t.public_key_pem.is_some(), t.jwks_url.is_some()];
    if given.iter().filter(|&&g| g).count() > 1 {
        return Err(bad("set at most one of jwks_file, public_key_pem and jwks_url".into()));
    }
    if t.discovery_url.is_some() && given.contains(&true) {
        return Err(
            bad("discovery_url is for keys found by discovery; drop it or the keys".into()),
        );
    }
    if let Some(pem) = &t.public_key_pem {
        let key = VerifyingKey::from_pem(pem, None).map_err(|e| bad(e.to_string()))?;
        return Ok((Source::Fixed, vec![key]));
    }
    if let Some(path) = &t.jwks_file {
        return Ok((Source::File(path.clone()), Vec::new()));
    }
    if let Some(url) = &t.jwks_url {
        return Ok((Source::Url(idp::fetch_url(url).map_err(bad)?), Vec::new()));
    }
    let url = t.discovery_url.clone().unwrap_or_else(|| idp::discovery_url(&t.issuer));
    Ok((Source::Discovery(idp::fetch_url(&url).map_err(bad)?), Vec::new()))
}

impl Authenticator {
    /// Builds verifiers for the configured tenants (and the development tenant if enabled).
    /// Keys from files and the configuration are loaded now; keys from the network by
    /// [`Authenticator::start_refreshing`].
    pub fn new(config: &ServerConfig, ids: Keyring, clock: Clock) -> Result<Self, ConfigError> {
        let limits = &config.limits;
        let leeway_secs = limits.token_leeway_secs;
        let pacing = Pacing {
            min: Duration::from_secs(limits.jwks_min_refresh_secs),
            default: Duration::from_secs(limits.jwks_refresh_secs.max(1)),
        };
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
                algorithms: t.algorithms.clone(),
                leeway_secs,
                claims: ClaimNames {
                    audience: t.audience_claim.clone(),
                    subject: t.subject_claim.clone(),
                    required: t.required_claims.clone().into_iter().collect(),
                    token_types: t.token_types.clone(),
                },
            };
            let (source, fixed) = tenant_source(t)?;
            let keys =
                TenantKeys::new(&t.name, validation, source, fixed, t.ca_file.as_deref(), pacing)?;
            tenants.push(Tenant {
                name: t.name.clone(),
                keys: Arc::new(keys),
                admin_claim: t.admin_claim.clone(),
                admin_scope: t.admin_scope.clone(),
                admin_required: t.admin_required_claims.clone().into_iter().collect(),
            });
        }
        if config.dev_tenant_enabled() {
            let signer = dev_signer(&config.data, true)?;
            let mut validation = Validation::new(DEV_ISSUER, DEV_AUDIENCE, &[Algorithm::EdDSA]);
            validation.leeway_secs = leeway_secs;
            let keys = TenantKeys::new(
                DEV_TENANT,
                validation,
                Source::Fixed,
                vec![signer.verifying_key()],
                None,
                pacing,
            )?;
            tenants.push(Tenant {
                name: DEV_TENANT.into(),
                keys: Arc::new(keys),
                admin_claim: None,
                admin_scope: crate::config::DEFAULT_ADMIN_SCOPE.into(),
                admin_required: Vec::new(),
            });
        }
        if tenants.is_empty() {
            return Err(ConfigError(
                "no tenants configured and the development tenant is off".into(),
            ));
        }
        let mut issuers: Vec<_> = tenants.iter().map(|t| t.keys.issuer().to_owned()).collect();
        issuers.sort();
        if issuers.windows(2).any(|w| w[0] == w[1]) {
            return Err(ConfigError("two tenants share an issuer".into()));
        }
        Ok(Self { tenants, ids, clock, leeway_secs, metrics: Arc::default() })
    }

    /// Counts refused tokens in `metrics`.
    pub(crate) fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Fetches every remote tenant's keys (all at once, each within its fetch timeout), then
    /// keeps them and JWKS files current in the background until `stop`. A tenant whose keys
    /// cannot be had yet is logged and tried again; its tokens are refused meanwhile.
    pub(crate) async fn start_refreshing(
        &self,
        tracker: &tokio_util::task::TaskTracker,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let first = futures_util::future::join_all(self.tenants.iter().map(|t| async {
            if t.keys.is_remote() { t.keys.load("at start").await } else { Ok(None) }
        }))
        .await;
        for (tenant, first) in self.tenants.iter().zip(first) {
            tenant.keys.clone().spawn_refresher(first, tracker, stop.clone());
        }
    }

    /// Each tenant's name, key loads tried and key loads failed, for metrics.
    pub(crate) fn key_loads(&self) -> Vec<(String, u64, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let loads = |t: &Tenant| {
            (t.name.clone(), t.keys.loads.load(Relaxed), t.keys.failures.load(Relaxed))
        };
        self.tenants.iter().map(loads).collect()
    }

    /// Verifies a raw token.
    ///
    /// A refusal is logged at INFO with its reason (never the token or its subject), so an
    /// operator whose IdP is misconfigured sees why in the server's log.
    pub async fn verify(&self, token: &str) -> Result<Caller, ApiError> {
        let verified = self.verify_at(token, self.clock.unix_now(), Instant::now()).await;
        if let Err(err) = &verified {
            let issuer = jwt::unverified_issuer(token).ok();
            let tenant = self
                .tenants
                .iter()
                .find(|t| Some(t.keys.issuer()) == issuer.as_deref())
                .map_or("unknown", |t| t.name.as_str());
            self.metrics
                .tokens_refused
                .get_or_create(&TenantLabels { tenant: tenant.into() })
                .inc();
            tracing::info!(tenant, reason = %err, "token refused");
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

    /// Verifies a raw token at `unix_now`; `mono_now` paces loading keys again.
    async fn verify_at(
        &self,
        token: &str,
        unix_now: u64,
        mono_now: Instant,
    ) -> Result<Caller, ApiError> {
        let refuse = |e: JwtError| ApiError::Unauthenticated(format!("invalid token: {e}"));
        let issuer = jwt::unverified_issuer(token).map_err(refuse)?;
        let tenant = self.tenants.iter().find(|t| t.keys.issuer() == issuer).ok_or_else(|| {
            // The caller sent this issuer; naming it back (shortened) tells an operator which
            // `issuer` their tenant config is missing.
            let shown: String = issuer.chars().take(120).collect();
            ApiError::Unauthenticated(format!(
                "invalid token: issuer {shown:?} is not a configured tenant's issuer"
            ))
        })?;
        let held = tenant.keys.verifier();
        let claims = match held.verify(token, unix_now) {
            // The IdP may have rotated its keys: load them again (paced).
            Err(JwtError::UnknownKey)
                if tenant.keys.refresh_for_unknown_key(&held, mono_now).await =>
            {
                tenant.keys.verifier().verify(token, unix_now)
            }
            verified => verified,
        }
        .map_err(|e| match e {
            JwtError::UnknownKey => ApiError::Unauthenticated(format!(
                "invalid token: no key of tenant {:?} matches its `kid` (keys are loaded again \
                 at most once per limits.jwks_min_refresh_secs)",
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
            admin: tenant.grants_admin(&claims.all),
            subject: claims.sub,
            expires_at: claims.exp,
            token_hash: cubby_crypto::sha256(token.as_bytes()),
        })
    }

    /// The store key of `subject` in `tenant`.
    pub fn customer_id(&self, tenant: &str, subject: &str) -> CustomerId {
        CustomerId::from_bytes(self.ids.customer_id(tenant, subject))
    }

    /// Verifies the `authorization: Bearer` header of a request, and names the keyed customer
    /// on the call's span (`rpc`).
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, ApiError> {
        let header = metadata
            .get("authorization")
            .ok_or_else(|| ApiError::Unauthenticated("missing authorization header".into()))?;
        let token =
            header.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).ok_or_else(|| {
                ApiError::Unauthenticated("authorization must be `Bearer <token>`".into())
            })?;
        let caller = self.verify(token.trim()).await?;
        crate::rpc::record_customer(&caller.customer);
        Ok(caller)
    }
}

#[cfg(test)]
mod tests;
