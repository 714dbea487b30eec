//! TLS to the server, done by the SDK itself rather than tonic: with the CA the app pinned
//! (`ClientBuilder::with_ca_pem`), or else the operating system's trust store through
//! rustls-platform-verifier (ring, as everywhere in Cubby), or Mozilla's roots on a system
//! without one; over TCP or the app's own transport.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use rustls::{ClientConfig, RootCertStore};

use super::transport::Dialer;
use crate::ClientError;

/// A dialer of the server that runs TLS over what `inner` dials (TCP to `host:port` without
/// one), trusting `ca_pem` if given and the system's store if not.
pub(crate) fn tls_dialer(
    host: &str,
    port: u16,
    ca_pem: Option<&[u8]>,
    inner: Option<Dialer>,
) -> Result<Dialer, ClientError> {
    let (config, name) = client_config(host, ca_pem)?;
    let host = name.to_str().into_owned();
    let inner = inner.unwrap_or_else(|| {
        Dialer::new(move || {
            let host = host.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                Ok(tcp)
            }
        })
    });
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
    Ok(Dialer::new(move || {
        let (tls, name, dialing) = (tls.clone(), name.clone(), inner.dial());
        async move { tls.connect(name, dialing.await?.into_inner()).await }
    }))
}

/// The TLS client settings for `host`: the roots `ca_pem` names, else the system's store (else
/// Mozilla's roots), ALPN h2; and the name the server's certificate must have.
fn client_config(
    host: &str,
    ca_pem: Option<&[u8]>,
) -> Result<(ClientConfig, ServerName<'static>), ClientError> {
    let bad = |what: &str, e: &dyn std::fmt::Display| ClientError::Config(format!("{what}: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS", &e))?;
    let mut config = match ca_pem {
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem).filter_map(Result::ok) {
                roots.add(cert).map_err(|e| bad("the CA certificate given", &e))?;
            }
            if roots.is_empty() {
                return Err(ClientError::Config(
                    "the CA certificate given has no PEM certificate in it (a \
                         -----BEGIN CERTIFICATE----- block)"
                        .into(),
                ));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => match rustls_platform_verifier::Verifier::new(provider) {
            Ok(system) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(system))
                .with_no_client_auth(),
            // A system with no store (a bare container): Mozilla's roots, built in.
            Err(err) => {
                tracing::debug!(%err, "no system trust store; trusting Mozilla's roots");
                let roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        },
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| bad(&format!("server name {host:?}"), &e))?;
    Ok((config, name))
}
