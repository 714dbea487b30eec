//! `cubby-server` settings: one TOML file, every field with its unit and default.
//!
//! With no file the server runs in development mode: a self-signed certificate, a master key and
//! a development tenant are created in the data directory on first start. With a file, the master
//! key must already exist (`cubby-server keys create`), and tenants come from the file.
//!
//! Every setting can also be given in the environment, which wins over the file: `CUBBY_` and
//! the setting's path in capitals, `_` for `.` (`CUBBY_LISTEN`, `CUBBY_TLS_CERT`,
//! `CUBBY_LIMITS_MAX_MESSAGE_BYTES`, `CUBBY_METRICS_LISTEN` or just `CUBBY_METRICS`;
//! `CUBBY_TENANTS` takes a TOML array of tables). A value is
//! read as TOML (a number, `true`), or else as text. Durations (`*_secs`, `*_ms`) are written
//! as people write them, in the file or the environment: `30s`, `5m`, `2h`, `1d`, `250ms`, or
//! a bare number in the field's unit.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cubby_crypto::jwt::Algorithm;
use serde::{Deserialize, Serialize};

/// Everything `cubby-server` can be told.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:7443`; port 0 picks a free port.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Data directory (sled database, generated certificate and keys). Default `./cubby-data`.
    #[serde(default = "default_data")]
    pub data: PathBuf,
    /// Master key file (created by `cubby-server keys create`). Required with a config file;
    /// in development mode defaults to `<data>/master.key`, created on first start.
    pub master_key_file: Option<PathBuf>,
    /// Where the server keeps what a restore of its store must not undo: the anchor (how many
    /// flushes the store made durable) and the ledger (erasures and revocations). Default
    /// `<data>/witness`. Never restore it with a backup of the store; better, keep it on another
    /// volume than `data`.
    pub witness_dir: Option<PathBuf>,
    /// Accept tokens from the development tenant (`cubby-server dev-token`). Default: on in
    /// development mode, off with a config file.
    pub dev_tenant: Option<bool>,
    /// Transport security.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// The business apps whose identity providers this server trusts.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Where documents are stored.
    #[serde(default)]
    pub storage: StorageConfig,
}

/// Where documents are stored: sled in the data directory (the default), or a PostgreSQL
/// database that several nodes share.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `sled` or `postgres`. Default: `postgres` when `url` is set, else `sled`.
    pub backend: Option<Backend>,
    /// The PostgreSQL database, as libpq reads a URL
    /// (`postgresql://cubby:PASSWORD@db.example.com:5432/cubby`). Also `CUBBY_STORAGE_URL`, or
    /// `CUBBY_DATABASE_URL`. It never appears in logs. The master key stays a file outside the
    /// database; the database holds only what the master key seals.
    pub url: Option<String>,
    /// A PEM file of the CA that signed the database's certificate. With it, or with
    /// `sslmode=require` in `url`, the connection is TLS (rustls), and the database's
    /// certificate is always verified (against this CA, else Mozilla's roots). Without either,
    /// the connection is plain: keep the database on a private network or a local socket.
    pub ca_file: Option<PathBuf>,
    /// How a node learns what the other nodes on the database wrote (PostgreSQL only):
    /// `listen` (default) reads as soon as a `NOTIFY` wakes it, and also every `bus_poll_ms`;
    /// `poll` only reads every `bus_poll_ms`, where notifications cannot reach the nodes (a
    /// pooler in transaction mode; an engine with them off). Either way every change is read
    /// from the database itself, so a lost notification delays a change and never loses one.
    #[serde(default)]
    pub bus: BusMode,
    /// How often a node reads what the other nodes wrote, milliseconds, whatever woke it or
    /// not. Erasures, revocations and changes reach the other nodes within about this long
    /// without a notification. Default 250.
    #[serde(default = "default_bus_poll_ms", deserialize_with = "duration::millis")]
    pub bus_poll_ms: u64,
}

fn default_bus_poll_ms() -> u64 {
    250
}

/// How the nodes on one database wake each other (`[storage] bus`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BusMode {
    /// `LISTEN`/`NOTIFY`, with polling behind it.
    #[default]
    Listen,
    /// Polling alone.
    Poll,
}

/// A storage backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// sled, embedded, in `<data>/db`.
    Sled,
    /// A PostgreSQL database (`storage.url`).
    Postgres,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: None,
            url: None,
            ca_file: None,
            bus: BusMode::default(),
            bus_poll_ms: default_bus_poll_ms(),
        }
    }
}

impl StorageConfig {
    /// The backend to use, and the database URL for PostgreSQL.
    pub fn backend(&self) -> Result<(Backend, Option<&str>), ConfigError> {
        let url = self.url.as_deref();
        match (self.backend, url) {
            (Some(Backend::Postgres) | None, Some(url)) => Ok((Backend::Postgres, Some(url))),
            (Some(Backend::Postgres), None) => Err(ConfigError(
                "storage.backend is postgres but storage.url is not set (or CUBBY_DATABASE_URL)"
                    .into(),
            )),
            (Some(Backend::Sled) | None, _) => Ok((Backend::Sled, None)),
        }
    }
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry the database password.
        f.debug_struct("StorageConfig")
            .field("backend", &self.backend)
            .field("url", &self.url.as_ref().map(|_| "(set)"))
            .field("ca_file", &self.ca_file)
            .field("bus", &self.bus)
            .field("bus_poll_ms", &self.bus_poll_ms)
            .finish()
    }
}

/// Where metrics are served.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the metrics listener (plain HTTP, `GET /metrics`, Prometheus text). Off when
    /// unset. Also `--metrics` and `CUBBY_METRICS`. Bind it to a private address: it tells how
    /// busy the server is, though never who its customers are.
    pub listen: Option<SocketAddr>,
}

/// TLS settings. TLS 1.3 only.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain. With `key`; without both, a self-signed certificate for
    /// `localhost` is generated in `<data>/tls/`.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
    /// Serve plaintext HTTP/2 instead of TLS. Local development behind a trusted proxy only.
    #[serde(default)]
    pub insecure_plaintext: bool,
}

/// Explicit limits (tonic leaves several unlimited by default).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest gRPC message accepted or sent, bytes. Default 4 MiB.
    pub max_message_bytes: usize,
    /// Concurrent HTTP/2 streams per connection. Default 64.
    pub max_concurrent_streams: u32,
    /// HTTP/2 streams reset by the client awaiting accept, per connection. Default 32.
    pub max_pending_reset_streams: usize,
    /// Seconds a new connection has to finish its TLS handshake and send the HTTP/2 preface;
    /// past it the connection is closed. Default 5.
    #[serde(deserialize_with = "duration::secs")]
    pub tls_handshake_timeout_secs: u64,
    /// TLS handshakes in progress at once before new connections make room: past it, a new
    /// connection closes the oldest handshake in progress that has run for a second already
    /// (with none that old, it is taken anyway, up to four times this, and closed beyond). So
    /// slow handshakes never keep new clients out. Default 256.
    pub max_handshakes: usize,
    /// Connections at once, at most (kept below the descriptor limit, `ulimit -n`, less 512 or a
    /// quarter of it).
    /// Calls on a connection over it are answered `UNAVAILABLE` and it is closed five seconds
    /// after it was accepted. Default 16384.
    pub max_connections: usize,
    /// Seconds between HTTP/2 keepalive pings. Default 30.
    #[serde(deserialize_with = "duration::secs")]
    pub keepalive_interval_secs: u64,
    /// Seconds to wait for a keepalive answer before closing. Default 20.
    #[serde(deserialize_with = "duration::secs")]
    pub keepalive_timeout_secs: u64,
    /// Seconds a shutdown waits for open connections to close before closing them itself (a
    /// device gone silent, such as a suspended app, holds it up until the HTTP/2 keepalive gives
    /// up on it). Default 10.
    #[serde(deserialize_with = "duration::secs")]
    pub shutdown_grace_secs: u64,
    /// Seconds a device has to send its Hello after opening a sync stream. Default 10.
    #[serde(deserialize_with = "duration::secs")]
    pub hello_timeout_secs: u64,
    /// Seconds a document with no connected device stays in memory. Default 60.
    #[serde(deserialize_with = "duration::secs")]
    pub idle_document_secs: u64,
    /// Sync messages one stream may have queued at documents at once. Default 32.
    pub max_inflight_per_stream: usize,
    /// Writes made durable by one flush at most (group commit). Default 1024.
    pub max_commit_batch: usize,
    /// A document's change chunks are folded into one snapshot once this many follow the last
    /// snapshot (or once they add up to 1 MiB). Default 256.
    pub compact_after_chunks: usize,
    /// Token clock leeway, seconds, for every tenant. Default 60.
    #[serde(deserialize_with = "duration::secs")]
    pub token_leeway_secs: u64,
    /// How long a device may leave the server's frames unread (with its queue full) before its
    /// stream is closed, seconds. Default 30.
    #[serde(deserialize_with = "duration::secs")]
    pub slow_consumer_secs: u64,
    /// How often the master key file is checked for a rotated key, seconds. Default 10.
    #[serde(deserialize_with = "duration::secs")]
    pub key_reload_secs: u64,
    /// Largest history one document may have, bytes (before encryption). Default 64 MiB.
    pub max_document_bytes: u64,
    /// Largest history one customer may store in all, bytes. Default 1 GiB. Nodes sharing a
    /// store read again what the others stored at most once a second.
    pub max_customer_bytes: u64,
    /// Bytes of sync messages in parts (`DocSync.more`) the server holds for one customer's
    /// streams together while they arrive, ids and bookkeeping included. One stream, and one
    /// connection, may hold up to `max_document_bytes`. Default 128 MiB.
    pub max_partial_bytes_per_customer: u64,
    /// Document writes one customer may make per second, sustained (bursts of five seconds'
    /// worth pass), counted by each node. Default 200.
    pub max_writes_per_sec: u32,
    /// How long applying one large sync message (over 64 KiB; it runs off the async workers) may
    /// take, milliseconds. Past it the message is refused with `RESOURCE_EXHAUSTED`, nothing of
    /// it is kept, and the customer's write budget is charged ten seconds. Default 10000.
    #[serde(deserialize_with = "duration::millis")]
    pub apply_deadline_ms: u64,
    /// The most often a tenant's keys are fetched (or its JWKS file read) again, seconds: for
    /// a token naming a key id the server does not know, or as the IdP's cache lifetime says.
    /// Default 60.
    #[serde(deserialize_with = "duration::secs")]
    pub jwks_min_refresh_secs: u64,
    /// How often a tenant's keys are fetched again in the background when the IdP gives no
    /// cache lifetime (`Cache-Control: max-age`), seconds. Lifetimes are honoured up to a
    /// day. Default 3600.
    #[serde(deserialize_with = "duration::secs")]
    pub jwks_refresh_secs: u64,
    /// How often the TLS certificate and key files are read for a renewal, seconds: a changed
    /// pair is served to new connections without a restart. Default 10.
    #[serde(deserialize_with = "duration::secs")]
    pub cert_reload_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 << 20,
            max_concurrent_streams: 64,
            max_pending_reset_streams: 32,
            tls_handshake_timeout_secs: 5,
            max_handshakes: 256,
            max_connections: 16_384,
            keepalive_interval_secs: 30,
            keepalive_timeout_secs: 20,
            shutdown_grace_secs: 10,
            hello_timeout_secs: 10,
            idle_document_secs: 60,
            max_inflight_per_stream: 32,
            max_commit_batch: 1024,
            compact_after_chunks: 256,
            token_leeway_secs: 60,
            slow_consumer_secs: 30,
            key_reload_secs: 10,
            max_document_bytes: 64 << 20,
            max_customer_bytes: 1 << 30,
            max_partial_bytes_per_customer: 128 << 20,
            max_writes_per_sec: 200,
            apply_deadline_ms: 10_000,
            jwks_min_refresh_secs: 60,
            jwks_refresh_secs: 3_600,
            cert_reload_secs: 10,
        }
    }
}

/// One business app's identity provider.
///
/// Its public keys come from exactly one of `jwks_file`, `public_key_pem` and `jwks_url`, or,
/// with none of them, from OpenID Connect discovery at the issuer (or `discovery_url`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// A short stable name. Part of every customer's identity: never rename a tenant.
    pub name: String,
    /// The exact `iss` of its tokens.
    pub issuer: String,
    /// The audience its tokens must carry for this server.
    pub audience: String,
    /// The signature algorithms accepted (`algorithm` for one). Default `["RS256"]`.
    #[serde(default = "default_algorithms", alias = "algorithm", deserialize_with = "one_or_many")]
    pub algorithms: Vec<Algorithm>,
    /// A JWKS file with the issuer's public keys.
    pub jwks_file: Option<PathBuf>,
    /// Or one PEM public key (`-----BEGIN PUBLIC KEY-----`).
    pub public_key_pem: Option<String>,
    /// Or the issuer's JWKS over HTTPS.
    pub jwks_url: Option<String>,
    /// Where discovery is, when not at `<issuer>/.well-known/openid-configuration`.
    pub discovery_url: Option<String>,
    /// PEM certificates to trust, besides the public web roots, when fetching keys (an IdP
    /// behind a private CA).
    pub ca_file: Option<PathBuf>,
    /// The claim holding the audience. Default `aud`; `client_id` for Cognito access tokens.
    #[serde(default = "default_audience_claim")]
    pub audience_claim: String,
    /// The claim naming the customer. Default `sub`; for example `oid` for Entra ID.
    #[serde(default = "default_subject_claim")]
    pub subject_claim: String,
    /// The claim holding the business's admin permission: a space-separated string or a list
    /// (`scope`, `scp`, `roles`, `permissions`, `cognito:groups`, `realm_access.roles`).
    /// Default: `scope`, and `scp` as a list or a string.
    pub admin_claim: Option<String>,
    /// The value in `admin_claim` that makes a token a service token for the admin API.
    /// Default `cubby:admin`.
    #[serde(default = "default_admin_scope")]
    pub admin_scope: String,
    /// Claims a token must also carry, with the given value, to be a service token: for an IdP
    /// where a customer's own app could ask for the admin scope, something only the backend's
    /// tokens have, such as `{ gty = "client-credentials" }` (Auth0).
    #[serde(default)]
    pub admin_required_claims: BTreeMap<String, String>,
    /// Claims every token must carry with the given value (a string equal to it, or a list
    /// holding it): `{ token_use = "access" }` for Cognito, `{ typ = "Bearer" }` for Keycloak.
    #[serde(default)]
    pub required_claims: BTreeMap<String, String>,
    /// The header `typ` values accepted, such as `["at+jwt"]`; a token without one is then
    /// refused. Default: none, `JWT` or `at+jwt`.
    #[serde(default)]
    pub token_types: Vec<String>,
}

fn default_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::RS256]
}

fn default_audience_claim() -> String {
    "aud".into()
}

fn default_subject_claim() -> String {
    "sub".into()
}

/// One value or a list of them.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Algorithm>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        One(Algorithm),
        Many(Vec<Algorithm>),
    }
    let algorithms = match Written::deserialize(d).map_err(|_| {
        serde::de::Error::custom(format!(
            "algorithms: a list of {}",
            Algorithm::ALL.map(Algorithm::name).join(", ")
        ))
    })? {
        Written::One(one) => vec![one],
        Written::Many(many) => many,
    };
    if algorithms.is_empty() {
        return Err(serde::de::Error::custom("algorithms: name at least one"));
    }
    Ok(algorithms)
}

/// The admin scope when a tenant names none (and the development tenant's).
pub const DEFAULT_ADMIN_SCOPE: &str = "cubby:admin";

fn default_admin_scope() -> String {
    DEFAULT_ADMIN_SCOPE.into()
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7443))
}

fn default_data() -> PathBuf {
    PathBuf::from("./cubby-data")
}

impl ServerConfig {
    /// Development defaults: everything generated in `data` on first start.
    pub fn dev(data: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        Self {
            listen,
            data: data.into(),
            master_key_file: None,
            witness_dir: None,
            dev_tenant: Some(true),
            tls: TlsConfig::default(),
            limits: Limits::default(),
            tenants: Vec::new(),
            metrics: MetricsConfig::default(),
            storage: StorageConfig::default(),
        }
    }

    /// Reads a config file, and the environment over it (see the module docs). Relative paths
    /// are taken from the current directory.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_file_and(path, std::env::vars())
    }

    /// Development defaults (see [`ServerConfig::dev`]), and the environment over them.
    pub fn dev_from_env(data: impl Into<PathBuf>, listen: SocketAddr) -> Result<Self, ConfigError> {
        Self::dev_and(data, listen, std::env::vars())
    }

    /// [`ServerConfig::dev_from_env`] with `env` for the environment.
    pub fn dev_and(
        data: impl Into<PathBuf>,
        listen: SocketAddr,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = toml::Table::new();
        table.insert("listen".into(), toml::Value::String(listen.to_string()));
        let data: PathBuf = data.into();
        table.insert("data".into(), toml::Value::String(data.display().to_string()));
        overlay(&mut table, env)?;
        let mut config: Self =
            table.try_into().map_err(|e: toml::de::Error| ConfigError(format!("settings: {e}")))?;
        config.dev_tenant.get_or_insert(true);
        Ok(config)
    }

    /// [`ServerConfig::from_file`] with `env` for the environment.
    pub fn from_file_and(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
        let mut table: toml::Table = toml::from_str(&text)
            .map_err(|e| ConfigError(format!("config {}: {e}", path.display())))?;
        overlay(&mut table, env)?;
        let mut config: Self = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError(format!("config {}: {e}", path.display())))?;
        if config.master_key_file.is_none() {
            return Err(ConfigError(format!(
                "config {} must set master_key_file (create one with \
                 `cubby-server keys create --out FILE`)",
                path.display()
            )));
        }
        config.dev_tenant.get_or_insert(false);
        Ok(config)
    }

    /// Whether tokens from the development tenant are accepted.
    pub fn dev_tenant_enabled(&self) -> bool {
        self.dev_tenant.unwrap_or(true)
    }
}

/// The settings at the top of the file, which the environment may give as `CUBBY_<KEY>`.
const TOP_LEVEL: [&str; 6] =
    ["listen", "data", "master_key_file", "witness_dir", "dev_tenant", "tenants"];

/// Settings the environment may give by a shorter name.
const SHORTHANDS: [(&str, (&str, &str)); 2] =
    [("metrics", ("metrics", "listen")), ("database_url", ("storage", "url"))];

/// Puts the settings `env` gives (`CUBBY_...`, see the module docs) over `table`. A variable
/// that names no setting but starts like a section's (`CUBBY_LIMITS_...`, `CUBBY_TLS_...`) is
/// refused, so that a misspelt one is not ignored; other `CUBBY_` variables belong to other
/// tools (the CLI's `CUBBY_HOME`, `CUBBY_CONFIG` itself) and are left alone.
fn overlay(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let sections = [
        ("tls", toml::Table::try_from(TlsConfig::default())),
        ("limits", toml::Table::try_from(Limits::default())),
        ("metrics", toml::Table::try_from(MetricsConfig::default())),
        ("storage", toml::Table::try_from(StorageConfig::default())),
    ];
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("CUBBY_") else { continue };
        let key = rest.to_ascii_lowercase();
        let mut place = None;
        if TOP_LEVEL.contains(&key.as_str()) {
            place = Some((None, key.clone()));
        }
        if let Some((_, (section, field))) = SHORTHANDS.iter().find(|(short, _)| *short == key) {
            place = Some((Some(*section), (*field).to_owned()));
        }
        for (section, known) in &sections {
            let Some(field) = key.strip_prefix(&format!("{section}_")) else { continue };
            let known = known.as_ref().map_err(|e| ConfigError(e.to_string()))?;
            // Optional settings are absent from their section's default: name them here.
            let optional = matches!(
                (*section, field),
                ("tls", "cert" | "key")
                    | ("metrics", "listen")
                    | ("storage", "backend" | "url" | "ca_file")
            );
            if !known.contains_key(field) && !optional {
                return Err(ConfigError(format!(
                    "{name}: there is no setting {section}.{field} (see server/config/prod.toml)"
                )));
            }
            place = Some((Some(*section), field.to_owned()));
        }
        let Some((section, field)) = place else { continue };
        let value = parse_value(&value);
        let target = match section {
            None => &mut *table,
            Some(section) => table
                .entry(section)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| ConfigError(format!("{section} must be a table")))?,
        };
        target.insert(field, value);
    }
    Ok(())
}

/// An environment variable's value: TOML when it reads as a TOML value (a number, `true`, an
/// array of tables), text otherwise.
fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_owned()))
}

/// Durations as people write them: `30s`, `5m`, `2h`, `1d`, `250ms`, or a bare number in the
/// field's unit.
mod duration {
    use serde::{Deserialize, Deserializer, de::Error};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Number(u64),
        Text(String),
    }

    /// Milliseconds in `text`, or why not.
    pub(super) fn parse_ms(text: &str) -> Result<u64, String> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a duration like 30s, 5m or 250ms"))?;
        let ms = match unit.trim() {
            "ms" => Some(n),
            "s" => n.checked_mul(1_000),
            "m" => n.checked_mul(60_000),
            "h" => n.checked_mul(3_600_000),
            "d" => n.checked_mul(86_400_000),
            _ => return Err(format!("{text:?}: the unit must be ms, s, m, h or d")),
        };
        ms.ok_or_else(|| format!("{text:?} is too long"))
    }

    pub(super) fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Written::deserialize(d)? {
            Written::Number(n) => Ok(n),
            Written::Text(text) => {
                let ms = parse_ms(&text).map_err(D::Error::custom)?;
                if ms % 1_000 != 0 {
                    return Err(D::Error::custom(format!("{text:?}: give whole seconds")));
                }
                Ok(ms / 1_000)
            }
        }
    }

    pub(super) fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Written::deserialize(d)? {
            Written::Number(n) => Ok(n),
            Written::Text(text) => parse_ms(&text).map_err(D::Error::custom),
        }
    }
}

/// A configuration problem, described for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

#[cfg(test)]
mod tests;
