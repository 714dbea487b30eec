//! Every gRPC call: a request id, a span, a count by method and status, and a log line when it
//! is refused.
//!
//! The id is the caller's `x-request-id` when it sent a sensible one, else a new one; it is sent
//! back in the response's `x-request-id`. Everything logged while serving the call (a stream's
//! task included) is inside the `rpc` span, which names the method and the id and, once the
//! token is verified, the keyed customer id: never a token or a subject.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use hyper::body::{Body, Frame, SizeHint};
use hyper::{HeaderMap, Request, Response};
use prost::Message;
use tonic::Code;
use tracing::Instrument;

use crate::metrics::{Metrics, RpcLabels};

/// The header carrying a request's id, both ways.
pub(crate) const REQUEST_ID: &str = "x-request-id";

/// Wraps the server's services.
#[derive(Clone, Debug)]
pub(crate) struct RpcLayer {
    known: Arc<HashSet<String>>,
    metrics: Arc<Metrics>,
}

impl RpcLayer {
    /// A layer counting calls of the methods in `descriptor_sets` by name (others as
    /// `unknown`, so that no caller can grow the label set).
    pub(crate) fn new(descriptor_sets: &[&[u8]], metrics: Arc<Metrics>) -> Self {
        let mut known = HashSet::new();
        for bytes in descriptor_sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(*bytes) else { continue };
            for file in set.file {
                for service in &file.service {
                    for method in &service.method {
                        known.insert(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        Self { known: Arc::new(known), metrics }
    }
}

impl<S> tower_layer::Layer<S> for RpcLayer {
    type Service = Rpc<S>;

    fn layer(&self, inner: S) -> Rpc<S> {
        Rpc { inner, layer: self.clone() }
    }
}

/// A service with [`RpcLayer`] around it.
#[derive(Clone, Debug)]
pub(crate) struct Rpc<S> {
    inner: S,
    layer: RpcLayer,
}

/// A request id the caller sent, if it is short and plain (it goes into logs).
fn given_id(headers: &HeaderMap) -> Option<String> {
    let id = headers.get(REQUEST_ID)?.to_str().ok()?;
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_.:".contains(c);
    (!id.is_empty() && id.len() <= 64 && id.chars().all(plain)).then(|| id.to_owned())
}

/// The status a response names in its headers (a call refused before any message: gRPC's
/// "trailers-only" response).
fn status_in(headers: &HeaderMap) -> Option<Code> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(Code::from_i32(code))
}

/// A status code as Prometheus labels usually spell gRPC's.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// What is left to do when a call ends: count it, and log a refusal. Dropped before either
/// (the caller went away while the call was served), it counts the call as cancelled.
struct Ending {
    metrics: Arc<Metrics>,
    method: String,
    span: tracing::Span,
    counted: bool,
}

impl Drop for Ending {
    fn drop(&mut self) {
        if !self.counted {
            self.count(Code::Cancelled, None);
        }
    }
}

impl Ending {
    fn ended(mut self, code: Code, message: Option<&str>) {
        self.count(code, message);
    }

    fn count(&mut self, code: Code, message: Option<&str>) {
        self.counted = true;
        let _entered = self.span.enter();
        let method = std::mem::take(&mut self.method);
        self.metrics.rpcs.get_or_create(&RpcLabels { method, code: code_name(code) }).inc();
        match code {
            Code::Ok => tracing::debug!("rpc done"),
            // Refusals are what an operator looks for: why a device cannot sync.
            Code::Unauthenticated
            | Code::PermissionDenied
            | Code::InvalidArgument
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::Unimplemented => {
                tracing::info!(
                    code = code_name(code),
                    reason = message.unwrap_or(""),
                    "rpc refused"
                )
            }
            Code::Cancelled => tracing::debug!("rpc cancelled by the caller"),
            _ => {
                tracing::info!(code = code_name(code), reason = message.unwrap_or(""), "rpc failed")
            }
        }
    }
}

fn message_in(headers: &HeaderMap) -> Option<String> {
    let text = headers.get("grpc-message")?.to_str().ok()?;
    // `grpc-message` is percent-encoded.
    let decoded = percent_encoding::percent_decode_str(text).decode_utf8_lossy();
    Some(decoded.chars().take(300).collect())
}

impl<S, B, ResBody> tower_service::Service<Request<B>> for Rpc<S>
where
    S: tower_service::Service<Request<B>, Response = Response<ResBody>> + Send,
    S::Future: Send + 'static,
    ResBody: Body,
{
    type Response = Response<Counted<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let path = request.uri().path();
        let method =
            if self.layer.known.contains(path) { path.to_owned() } else { "unknown".to_owned() };
        let id = given_id(request.headers())
            .unwrap_or_else(|| bs58::encode(cubby_crypto::random_array::<8>()).into_string());
        let span = tracing::info_span!("rpc", method = %method, request_id = %id,
            customer = tracing::field::Empty);
        let ending = Ending {
            metrics: self.layer.metrics.clone(),
            method,
            span: span.clone(),
            counted: false,
        };
        let called = self.inner.call(request).instrument(span);
        Box::pin(async move {
            let mut response = called.await?;
            if let Ok(value) = id.parse() {
                response.headers_mut().insert(REQUEST_ID, value);
            }
            let ending = match status_in(response.headers()) {
                Some(code) => {
                    ending.ended(code, message_in(response.headers()).as_deref());
                    None
                }
                None => Some(ending),
            };
            Ok(response.map(|inner| Counted { inner, ending }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts its call when its trailers go out (or the caller leaves).
    pub(crate) struct Counted<B> {
        #[pin]
        inner: B,
        // Counts the call as cancelled if the body is dropped before its end.
        ending: Option<Ending>,
    }
}

impl<B: Body> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = ready!(this.inner.poll_frame(cx));
        let ended = match &polled {
            Some(Ok(frame)) => frame.trailers_ref().map(|trailers| {
                (status_in(trailers).unwrap_or(Code::Unknown), message_in(trailers))
            }),
            Some(Err(_)) => Some((Code::Internal, None)),
            None => Some((Code::Unknown, None)),
        };
        if let Some((code, message)) = ended
            && let Some(ending) = this.ending.take()
        {
            ending.ended(code, message.as_deref());
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Records the caller's keyed customer id on the current call's span.
pub(crate) fn record_customer(customer: &cubby_core::CustomerId) {
    tracing::Span::current().record("customer", tracing::field::display(customer));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_id_is_taken_only_when_plain_and_short() {
        let headers = |id: &str| {
            let mut map = HeaderMap::new();
            map.insert(REQUEST_ID, id.parse().expect("a header"));
            map
        };
        assert_eq!(given_id(&headers("abc-123_x.y")).as_deref(), Some("abc-123_x.y"));
        assert_eq!(given_id(&headers("has space")), None);
        assert_eq!(given_id(&headers(&"a".repeat(65))), None);
        assert_eq!(given_id(&HeaderMap::new()), None);
    }
}
