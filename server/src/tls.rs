//! TLS 1.3 with rustls and the ring provider.
//!
//! The server does its own accepting rather than tonic's (`listen.rs`), to pin TLS 1.3, bound
//! each handshake in time, and cap handshakes in progress; finished connections are handed to
//! tonic.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

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

/// The certificate served, read again when its files change (a renewal): new connections get
/// the new one, open ones keep theirs.
#[derive(Debug)]
pub struct ServedCert {
    paths: CertPaths,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' contents when last read, to tell a change.
    read: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl ResolvesServerCert for ServedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

/// Reads a certificate chain and its key, checked to belong together.
fn certified_key(
    paths: &CertPaths,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, ConfigError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
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
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| ConfigError(format!("private key {}: {e}", paths.key.display())))?;
    CertifiedKey::from_der(certs, key, &rustls::crypto::ring::default_provider()).map_err(|e| {
        ConfigError(format!(
            "TLS certificate {} and key {} do not match: {e}",
            paths.cert.display(),
            paths.key.display()
        ))
    })
}

fn read_pair(paths: &CertPaths) -> Result<(Vec<u8>, Vec<u8>), ConfigError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))
    };
    Ok((read(&paths.cert)?, read(&paths.key)?))
}

impl ServedCert {
    /// Reads the certificate and key at `paths`.
    pub fn load(paths: &CertPaths) -> Result<Self, ConfigError> {
        let (cert, key) = read_pair(paths)?;
        let current = certified_key(paths, &cert, &key)?;
        Ok(Self {
            paths: paths.clone(),
            current: RwLock::new(Arc::new(current)),
            read: Mutex::new((cert, key)),
        })
    }

    /// Reads the files again; if they changed and hold a certificate with its key, serves it
    /// from now on and returns true. A half-written or mismatched pair (a renewal in progress)
    /// keeps the old one, and is tried again at the next look.
    pub fn reload(&self) -> Result<bool, ConfigError> {
        let (cert, key) = read_pair(&self.paths)?;
        let mut read = self.read.lock().unwrap_or_else(PoisonError::into_inner);
        if read.0 == cert && read.1 == key {
            return Ok(false);
        }
        let renewed = certified_key(&self.paths, &cert, &key)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(renewed);
        *read = (cert, key);
        Ok(true)
    }

    /// Looks at the files every `every` until `stop`, serving a renewed certificate to new
    /// connections.
    pub fn spawn_reload(
        self: Arc<Self>,
        every: Duration,
        tracker: &tokio_util::task::TaskTracker,
        stop: tokio_util::sync::CancellationToken,
    ) {
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut failing = false;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let served = self.clone();
                match tokio::task::spawn_blocking(move || served.reload()).await {
                    Ok(Ok(true)) => {
                        failing = false;
                        tracing::info!(cert = %self.paths.cert.display(),
                            "the TLS certificate changed; new connections get the new one");
                    }
                    Ok(Ok(false)) => failing = false,
                    Ok(Err(err)) if !failing => {
                        failing = true;
                        tracing::warn!(%err, "cannot read the TLS certificate again; serving the \
                            one already loaded");
                    }
                    Ok(Err(_)) | Err(_) => {}
                }
            }
        });
    }
}

/// A rustls server config serving `cert`: TLS 1.3 only, ALPN `h2`.
pub fn server_config(cert: Arc<ServedCert>) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| ConfigError(format!("TLS: {e}")))?
    .with_no_client_auth()
    .with_cert_resolver(cert);
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

    /// A certificate for `localhost` and its key, as PEM.
    fn pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        (params.self_signed(&key).expect("certificate").pem(), key.serialize_pem())
    }

    #[test]
    fn a_renewal_is_served_once_its_key_matches_and_a_half_written_pair_keeps_the_old_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let paths = CertPaths {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            self_signed: false,
        };
        let ((cert1, key1), (cert2, key2)) = (pair(), pair());
        std::fs::write(&paths.cert, cert1).expect("write");
        std::fs::write(&paths.key, key1).expect("write");
        let served = ServedCert::load(&paths).expect("loads");
        let current = || served.current.read().unwrap_or_else(PoisonError::into_inner).clone();
        let first = current();
        assert!(!served.reload().expect("reads"), "unchanged files: nothing to do");

        // The new certificate is written, its key not yet: the old pair stays.
        std::fs::write(&paths.cert, cert2).expect("write");
        assert!(served.reload().is_err(), "a certificate without its key is refused");
        assert!(Arc::ptr_eq(&current(), &first), "the old pair is still served");

        std::fs::write(&paths.key, key2).expect("write");
        assert!(served.reload().expect("reads"), "the renewed pair is taken");
        assert!(!Arc::ptr_eq(&current(), &first));
        assert!(!served.reload().expect("reads"));
    }
}
