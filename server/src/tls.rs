//! TLS 1.3 with rustls and the ring provider.
//!
//! The server does its own accepting rather than tonic's (`listen.rs`), to pin TLS 1.3, bound
//! each handshake in time, and cap handshakes in progress; finished connections are handed to
//! tonic.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

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
    if marked_as_ca(&certs[0]) {
        tracing::warn!(
            cert = %paths.cert.display(),
            "the certificate is marked as a CA (basicConstraints CA:TRUE, what `openssl req -x509` \
             makes unless told otherwise); Cubby's SDK and other rustls clients refuse it \
             (CaUsedAsEndEntity). Make it with `-addext basicConstraints=critical,CA:FALSE`, or \
             have your CA issue one"
        );
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

/// Whether `leaf` is marked as a CA, which rustls clients (the SDK among them) refuse as a
/// server's certificate.
fn marked_as_ca(leaf: &CertificateDer<'static>) -> bool {
    // Checked against itself as the only root: the end-entity checks come before any search
    // for an issuer, so a CA flag is reported whoever signed the certificate.
    let mut roots = rustls::RootCertStore::empty();
    let Ok(()) = roots.add(leaf.clone()) else { return false };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(verifier) =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
    else {
        return false;
    };
    let Ok(name) = ServerName::try_from("localhost") else { return false };
    let checked = verifier.verify_server_cert(leaf, &[], &name, &[], UnixTime::now());
    matches!(
        checked,
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)))
            if matches!(other.0.downcast_ref(), Some(webpki::Error::CaUsedAsEndEntity))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(ca: bool) -> CertificateDer<'static> {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        if ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("certificate").der().clone()
    }

    #[test]
    fn a_certificate_marked_as_a_ca_is_told_apart() {
        assert!(marked_as_ca(&certificate(true)), "what `openssl req -x509` makes");
        assert!(!marked_as_ca(&certificate(false)), "what a server should present");
    }
}
