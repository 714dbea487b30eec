//! Access tokens from the app's identity provider.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Why a token could not be had.
#[derive(Debug, thiserror::Error)]
#[error("token provider failed: {0}")]
pub struct TokenError(pub String);

/// A boxed future returned by a [`TokenProvider`].
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, TokenError>> + Send>>;

/// Supplies access tokens from the app's identity provider.
pub trait TokenProvider: Send + Sync + 'static {
    /// A current token. `refresh` is true when the server refused the last one (expired or
    /// revoked) or asked for a fresh one because it is about to expire: fetch a new one rather
    /// than returning a cached token. A fresh token is sent on the open sync stream, which then
    /// lasts until that token expires.
    fn token(&self, refresh: bool) -> TokenFuture;
}

impl<F, Fut> TokenProvider for F
where
    F: Fn(bool) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, TokenError>> + Send + 'static,
{
    fn token(&self, refresh: bool) -> TokenFuture {
        Box::pin(self(refresh))
    }
}

/// A fixed token (scripts and tests). It is never refreshed.
#[derive(Clone)]
pub struct StaticToken(Arc<str>);

impl StaticToken {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into().into())
    }
}

impl fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StaticToken(..)")
    }
}

impl TokenProvider for StaticToken {
    fn token(&self, _refresh: bool) -> TokenFuture {
        let token = self.0.to_string();
        Box::pin(async move { Ok(token) })
    }
}
