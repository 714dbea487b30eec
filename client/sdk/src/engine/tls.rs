//! TLS to the server, done by the SDK itself rather than tonic: with the CA the app pinned
//! (`ClientBuilder::with_ca_pem`), or else the operating system's trust store through
//! rustls-platform-verifier (ring, as everywhere in Cubby), or Mozilla's roots on a system
//! without one; over TCP or the app's own transport.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use rustls::{ClientConfig, RootCertStore};

use super::transport::{Dialed, Dialer, Transport};
use crate::ClientError;

/// Dials the server (TCP, or the app's transport) and runs TLS over what it dialed.
#[derive(Clone)]
pub(crate) struct TlsConnector {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    /// `host:port`, for TCP.
    addr: String,
    dialer: Option<Dialer>,
}

impl TlsConnector {
    /// TLS to `host` (at `port`), trusting `ca_pem` if given and the system's store if not.
    pub(crate) fn new(
        host: &str,
        port: u16,
        ca_pem: Option<&[u8]>,
        dialer: Option<Dialer>,
    ) -> Result<Self, ClientError> {
        let bad =
            |what: &str, e: &dyn std::fmt::Display| ClientError::Config(format!("{what}: {e}"));
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
        Ok(Self { config: Arc::new(config), name, addr: format!("{host}:{port}"), dialer })
    }
}

impl tower_service::Service<tonic::codegen::http::Uri> for TlsConnector {
    type Response = TokioIo<Box<dyn Transport>>;
    type Error = std::io::Error;
    type Future = Dialed;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let tls = tokio_rustls::TlsConnector::from(self.config.clone());
        let (name, addr, dialer) = (self.name.clone(), self.addr.clone(), self.dialer.clone());
        Box::pin(async move {
            let io: Box<dyn Transport> = match dialer {
                Some(mut dialer) => {
                    dialer.call(tonic::codegen::http::Uri::default()).await?.into_inner()
                }
                None => {
                    let tcp = tokio::net::TcpStream::connect(&addr).await?;
                    tcp.set_nodelay(true)?;
                    Box::new(tcp)
                }
            };
            let secured: Box<dyn Transport> = Box::new(tls.connect(name, io).await?);
            Ok(TokioIo::new(secured))
        })
    }
}
