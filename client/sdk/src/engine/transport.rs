//! How the engine reaches the server: the endpoint and TLS, an app's own transport, and what
//! a status from the server means for the device.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cubby_proto::pb;
use hyper_util::rt::TokioIo;
use tonic::transport::Endpoint;

use super::tls::tls_dialer;

use super::{MAX_MESSAGE, SyncFailure, WipeReason};
use crate::{ClientError, TokenProvider};

/// How to reach the server.
#[derive(Clone)]
pub(crate) struct Remote {
    endpoint: Endpoint,
    pub(super) token: Arc<dyn TokenProvider>,
    dialer: Option<Dialer>,
    /// The connection unary calls share, made at the first and kept (it reconnects by itself).
    calls: Arc<tokio::sync::OnceCell<tonic::transport::Channel>>,
    /// The URL is `http://`.
    plaintext: bool,
    /// For an `https://` URL: TLS, over TCP or `dialer`.
    tls: Option<Dialer>,
}

/// A byte stream to the server opened by the app's own transport.
pub(crate) trait Transport:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static
{
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Transport for T {}

type Dialed = std::pin::Pin<
    Box<dyn Future<Output = std::io::Result<TokioIo<Box<dyn Transport>>>> + Send + 'static>,
>;

/// A custom transport (`ClientBuilder::with_transport`), as the connector tonic dials with.
#[derive(Clone)]
pub(crate) struct Dialer(Arc<dyn Fn() -> Dialed + Send + Sync>);

impl Dialer {
    pub(crate) fn new<F, Fut, T>(dial: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::io::Result<T>> + Send + 'static,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        Self(Arc::new(move || {
            let dialing = dial();
            Box::pin(async move {
                let io: Box<dyn Transport> = Box::new(dialing.await?);
                Ok(TokioIo::new(io))
            })
        }))
    }
}

impl Dialer {
    /// Dials once.
    pub(super) fn dial(&self) -> Dialed {
        (self.0)()
    }
}

impl tower_service::Service<tonic::codegen::http::Uri> for Dialer {
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
        (self.0)()
    }
}

pub(super) fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        // Layers often repeat their cause in their own message: say each thing once.
        let said = s.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = s.source();
    }
    if let Some(hint) = tls_hint(err) {
        text.push_str("; ");
        text.push_str(hint);
    }
    text
}

/// What a failure to connect means: a server this client is not set up to trust (its TLS
/// refused: a configuration to fix, not a network to wait for), or one it cannot reach.
pub(crate) fn connect_failure(err: &tonic::transport::Error) -> SyncFailure {
    if refused_by_tls(err) {
        SyncFailure::Misconfigured(chain(err))
    } else {
        SyncFailure::Unreachable(chain(err))
    }
}

/// Whether TLS refused the connection (the server's certificate, most often).
fn refused_by_tls(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        let io_tls = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
        if e.is::<rustls::Error>() || io_tls.is_some_and(|inner| inner.is::<rustls::Error>()) {
            return true;
        }
        next = e.source();
    }
    false
}

/// The advice for a plain-text connection whose calls fail in the transport
/// ([`Remote::misconfigured`]).
pub(crate) const USE_HTTPS: &str = "the server's answer was not HTTP/2 in plain text: if it \
    speaks TLS (a Cubby server does unless run behind a proxy that ends TLS), use an https:// URL";

/// What to do about a refused server certificate, for the refusals a user can fix.
fn tls_hint(err: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use rustls::CertificateError as Cert;
    let mut next = Some(err);
    while let Some(e) = next {
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()?.get_ref()?.downcast_ref::<rustls::Error>()
        });
        if let Some(rustls::Error::InvalidCertificate(cert)) = tls {
            return match cert {
                Cert::Other(other)
                    if matches!(
                        other.0.downcast_ref::<webpki::Error>(),
                        Some(webpki::Error::CaUsedAsEndEntity)
                    ) =>
                {
                    Some(
                        "the server's certificate is marked as a CA (basicConstraints CA:TRUE, \
                         what `openssl req -x509` makes unless told otherwise), and TLS clients \
                         refuse a CA certificate as a server's: make it with `-addext \
                         basicConstraints=critical,CA:FALSE`, or have your CA issue one",
                    )
                }
                Cert::UnknownIssuer | Cert::BadSignature => Some(
                    "no certificate authority this device trusts signed the server's \
                     certificate (a copy of an older self-signed one?): give the client the server's CA certificate (the CLI's --ca \
                     or CUBBY_CA, the SDK's ClientBuilder::with_ca_pem)",
                ),
                Cert::NotValidForName | Cert::NotValidForNameContext { .. } => Some(
                    "the server's certificate does not name the host in the server URL: \
                     connect by a name the certificate lists",
                ),
                _ => None,
            };
        }
        next = e.source();
    }
    None
}

impl Remote {
    pub(crate) fn new(
        url: &str,
        token: Arc<dyn TokenProvider>,
        ca_pem: Option<Vec<u8>>,
        dialer: Option<Dialer>,
    ) -> Result<Self, ClientError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let bad = |e: tonic::transport::Error| {
            ClientError::Config(format!("server {url:?}: {}", chain(&e)))
        };
        let https = url.starts_with("https://");
        if !https && !url.starts_with("http://") {
            return Err(ClientError::Config(format!("server {url:?} must start with https://")));
        }
        // TLS is the SDK's own (`tls.rs`): tonic dials plain HTTP/2 over it.
        let plain = if https { url.replacen("https://", "http://", 1) } else { url.to_owned() };
        let mut endpoint = Endpoint::from_shared(plain)
            .map_err(bad)?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        let tls = if https {
            let uri: tonic::codegen::http::Uri =
                url.parse().map_err(|e| ClientError::Config(format!("server {url:?}: {e}")))?;
            endpoint = endpoint.origin(uri.clone());
            let host = uri.host().unwrap_or_default();
            let port = uri.port_u16().unwrap_or(443);
            Some(tls_dialer(host, port, ca_pem.as_deref(), dialer.clone())?)
        } else {
            None
        };
        Ok(Self { endpoint, token, dialer, tls, calls: Arc::default(), plaintext: !https })
    }

    /// A connection to the server, over TCP or the custom transport.
    pub(super) async fn connect(
        &self,
    ) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        match (&self.tls, &self.dialer) {
            (Some(tls), _) => self.endpoint.connect_with_connector(tls.clone()).await,
            (None, Some(dialer)) => self.endpoint.connect_with_connector(dialer.clone()).await,
            (None, None) => self.endpoint.connect().await,
        }
    }

    /// What a call's failure means when it is a setting to fix: over `http://`, a call that
    /// fails in the transport (the answer was not HTTP/2 in plain text) most likely reached a
    /// server that speaks TLS.
    pub(crate) fn misconfigured(&self, status: &tonic::Status) -> Option<String> {
        // Seen as `Unknown` ("h2 protocol error") or `Cancelled` ("operation was canceled"),
        // depending on when the server hangs up.
        let broken = matches!(status.code(), tonic::Code::Unknown | tonic::Code::Cancelled);
        (self.plaintext && broken).then(|| format!("{USE_HTTPS} ({})", status.message()))
    }

    /// The sync failure `status` means on this connection.
    pub(crate) fn failure(&self, status: &tonic::Status) -> SyncFailure {
        self.misconfigured(status).map_or_else(|| classify(status), SyncFailure::Misconfigured)
    }

    /// A token to tell the account it speaks for, if the provider has one within a few seconds.
    pub(crate) async fn token_for_check(&self) -> Option<String> {
        let asked = tokio::time::timeout(Duration::from_secs(5), self.token.token(false));
        asked.await.ok()?.ok()
    }

    /// The shared connection for unary calls and a token (`fresh`: not one cached).
    async fn channel_and_token(
        &self,
        fresh: bool,
    ) -> Result<(tonic::transport::Channel, String), ClientError> {
        let token =
            self.token.token(fresh).await.map_err(|e| {
                ClientError::server(crate::ErrorCode::Unauthenticated, e.to_string())
            })?;
        let channel =
            self.calls.get_or_try_init(|| self.connect()).await.map_err(
                |e| match connect_failure(&e) {
                    SyncFailure::Misconfigured(why) => ClientError::Config(why),
                    other => ClientError::server(crate::ErrorCode::Offline, other.to_string()),
                },
            )?;
        Ok((channel.clone(), token))
    }

    /// A connected admin client and a current token.
    pub(crate) async fn admin(
        &self,
    ) -> Result<(pb::admin_client::AdminClient<tonic::transport::Channel>, String), ClientError>
    {
        let (channel, token) = self.channel_and_token(false).await?;
        let client = pb::admin_client::AdminClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok((client, token))
    }

    /// An account client on the shared connection and a token (`fresh`: not one cached), for
    /// one unary call.
    pub(crate) async fn account(
        &self,
        fresh: bool,
    ) -> Result<(pb::account_client::AccountClient<tonic::transport::Channel>, String), ClientError>
    {
        let (channel, token) = self.channel_and_token(fresh).await?;
        let client = pb::account_client::AccountClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok((client, token))
    }
}

/// Whether a status tells the device to wipe its local copy.
pub(crate) fn wipe_reason(status: &tonic::Status) -> Option<WipeReason> {
    match status.metadata().get(cubby_proto::WIPE_METADATA)?.to_str().ok()? {
        cubby_proto::WIPE_REVOKED => Some(WipeReason::DeviceRevoked),
        cubby_proto::WIPE_ERASED => Some(WipeReason::AccountErased),
        _ => None,
    }
}

pub(crate) fn classify(status: &tonic::Status) -> SyncFailure {
    if let Some(reason) = wipe_reason(status) {
        return SyncFailure::Wipe(reason);
    }
    let message = status.message().to_owned();
    match status.code() {
        tonic::Code::Unauthenticated => SyncFailure::Unauthenticated(message),
        tonic::Code::PermissionDenied => SyncFailure::PermissionDenied(message),
        tonic::Code::Unavailable
            if message.contains("transport") || message.contains("connect") =>
        {
            SyncFailure::Unreachable(message)
        }
        _ => SyncFailure::Other(format!("{:?}: {message}", status.code())),
    }
}
