//! TLS 1.3 with rustls and the ring provider.
//!
//! The server does its own accepting rather than tonic's (`listen.rs`), to pin TLS 1.3, bound
//! each handshake in time, and cap handshakes in progress; finished connections are handed to
//! tonic.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ConfigError;

/// Installs ring as the process's rustls provider (idempotent).
pub fn install_ring_provider() {
    // Fails only when a provider is already installed, which is what we want either way.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Where the server's certificate and key live, and whether they were generated.
#[derive(Clone, Debug)]
pub struct CertPaths {
    /// The PEM certificate (give it to clients as their CA for a self-signed server).
    pub cert: PathBuf,
    /// The PEM private key.
    pub key: PathBuf,
    /// True when the certificate was generated (self-signed for localhost).
    pub self_signed: bool,
}

/// Generates a self-signed certificate for `localhost` in `<data>/tls/` unless one exists.
pub fn ensure_self_signed(data: &Path) -> Result<CertPaths, ConfigError> {
    let dir = data.join("tls");
    let paths =
        CertPaths { cert: dir.join("cert.pem"), key: dir.join("key.pem"), self_signed: true };
    if paths.cert.exists() && paths.key.exists() {
        return Ok(paths);
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| ConfigError(format!("cannot create {}: {e}", dir.display())))?;
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let certified = rcgen::generate_simple_self_signed(names)
        .map_err(|e| ConfigError(format!("cannot generate a certificate: {e}")))?;
    cubby_crypto::keys::write_private_file(
        &paths.key,
        certified.signing_key.serialize_pem().as_bytes(),
    )
    .map_err(|e| ConfigError(format!("cannot write {}: {e}", paths.key.display())))?;
    std::fs::write(&paths.cert, certified.cert.pem())
        .map_err(|e| ConfigError(format!("cannot write {}: {e}", paths.cert.display())))?;
    Ok(paths)
}

/// A rustls server config: TLS 1.3 only, ALPN `h2`.
pub fn server_config(paths: &CertPaths) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| ConfigError(format!("certificate {}: {e}", paths.cert.display())))?;
    if certs.is_empty() {
        return Err(ConfigError(format!(
            "certificate {} holds no certificate",
            paths.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&paths.key)
        .map_err(|e| ConfigError(format!("private key {}: {e}", paths.key.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| ConfigError(format!("TLS: {e}")))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| ConfigError(format!("TLS certificate and key do not match: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
