//! Tokens from a command the user names (`--token-command`, `CUBBY_TOKEN_COMMAND`): how the CLI
//! outlives a token's expiry, as kubectl's credential plugins do.

use std::sync::{Arc, Mutex, PoisonError};

use cubby_client::{TokenError, TokenFuture, TokenProvider};

/// Runs a shell command for a token, and again whenever a fresh one is asked for.
pub(crate) struct TokenCommand {
    command: Arc<str>,
    /// The last token the command printed.
    cached: Arc<Mutex<Option<String>>>,
}

impl TokenCommand {
    pub(crate) fn new(command: &str) -> Self {
        Self { command: command.into(), cached: Arc::default() }
    }
}

impl TokenProvider for TokenCommand {
    fn token(&self, refresh: bool) -> TokenFuture {
        let (command, cached) = (self.command.clone(), self.cached.clone());
        Box::pin(async move {
            if !refresh
                && let Some(token) = cached.lock().unwrap_or_else(PoisonError::into_inner).clone()
            {
                return Ok(token);
            }
            let run = move || std::process::Command::new("sh").arg("-c").arg(&*command).output();
            let ran = tokio::task::spawn_blocking(run).await;
            let out = ran.map_err(|e| TokenError(e.to_string()))?.map_err(|e| {
                TokenError(format!("cannot run the token command ({e}): check --token-command"))
            })?;
            if !out.status.success() {
                let said = String::from_utf8_lossy(&out.stderr);
                return Err(TokenError(format!(
                    "the token command failed ({}): {}",
                    out.status,
                    said.trim()
                )));
            }
            let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if token.is_empty() {
                return Err(TokenError("the token command printed no token".into()));
            }
            *cached.lock().unwrap_or_else(PoisonError::into_inner) = Some(token.clone());
            Ok(token)
        })
    }
}
