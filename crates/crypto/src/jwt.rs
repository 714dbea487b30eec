//! JWT access-token verification with ring.
//!
//! Each issuer has a list of accepted algorithms: a token whose header names any other
//! (including `none` and every `HS*`, which Cubby never accepts) is refused before a key is
//! looked at, so a public key can never be used as an HMAC secret, and a key verifies only the
//! algorithms of its type (and only its JWK's `alg`, when it names one). `exp`, `iss`, the
//! audience and the subject are required; `exp`, `nbf` and `iat` must be JSON numbers (a string
//! `exp` is refused, not skipped); clock leeway is bounded. Where an issuer puts the audience,
//! the subject and its token type is configurable ([`ClaimNames`]).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature;
use serde_json::{Map, Value};

/// A signature algorithm Cubby accepts. Never `none` or an `HS*` (a public key is not a secret).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Algorithm {
    /// Ed25519.
    EdDSA,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// ECDSA on P-384 with SHA-384.
    ES384,
    /// RSASSA-PKCS1-v1_5 with SHA-256, 2048 to 8192 bits.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384, 2048 to 8192 bits.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512, 2048 to 8192 bits.
    RS512,
    /// RSASSA-PSS with SHA-256, 2048 to 8192 bits.
    PS256,
    /// RSASSA-PSS with SHA-384, 2048 to 8192 bits.
    PS384,
    /// RSASSA-PSS with SHA-512, 2048 to 8192 bits.
    PS512,
}

/// The kind of public key an algorithm verifies with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Ed25519,
    P256,
    P384,
    Rsa,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Self::Ed25519 => "Ed25519",
            Self::P256 => "P-256",
            Self::P384 => "P-384",
            Self::Rsa => "RSA",
        }
    }
}

impl Algorithm {
    /// Every algorithm, in the order of [`Algorithm::name`]s a tenant config lists.
    pub const ALL: [Algorithm; 9] = [
        Self::EdDSA,
        Self::ES256,
        Self::ES384,
        Self::RS256,
        Self::RS384,
        Self::RS512,
        Self::PS256,
        Self::PS384,
        Self::PS512,
    ];

    /// The name in a JWT header.
    pub fn name(self) -> &'static str {
        match self {
            Self::EdDSA => "EdDSA",
            Self::ES256 => "ES256",
            Self::ES384 => "ES384",
            Self::RS256 => "RS256",
            Self::RS384 => "RS384",
            Self::RS512 => "RS512",
            Self::PS256 => "PS256",
            Self::PS384 => "PS384",
            Self::PS512 => "PS512",
        }
    }

    /// The algorithm a JWT header names, if Cubby accepts it at all.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    fn family(self) -> Family {
        match self {
            Self::EdDSA => Family::Ed25519,
            Self::ES256 => Family::P256,
            Self::ES384 => Family::P384,
            _ => Family::Rsa,
        }
    }

    /// ring's parameters for an RSA algorithm.
    fn rsa(self) -> Option<&'static signature::RsaParameters> {
        Some(match self {
            Self::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            Self::RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            Self::RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
            Self::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
            Self::PS384 => &signature::RSA_PSS_2048_8192_SHA384,
            Self::PS512 => &signature::RSA_PSS_2048_8192_SHA512,
            Self::EdDSA | Self::ES256 | Self::ES384 => return None,
        })
    }

    fn verification(self) -> &'static dyn signature::VerificationAlgorithm {
        match (self, self.rsa()) {
            (_, Some(rsa)) => rsa,
            (Self::EdDSA, None) => &signature::ED25519,
            (Self::ES256, None) => &signature::ECDSA_P256_SHA256_FIXED,
            (_, None) => &signature::ECDSA_P384_SHA384_FIXED,
        }
    }
}

fn names(algs: &[Algorithm]) -> String {
    algs.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
}

/// Why a token was refused. Each maps to `UNAUTHENTICATED`; the text is safe to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// Not three base64url parts of JSON.
    #[error("malformed token")]
    Malformed,
    /// The header names an algorithm other than the issuer's pinned one.
    #[error("token algorithm {0:?} is not accepted")]
    InvalidAlgorithm(String),
    /// The header's `typ` is not one the issuer's access tokens carry (empty: none, where
    /// one is required).
    #[error("token type {0:?} is not an access token of this issuer")]
    WrongType(String),
    /// The header lists critical extensions this verifier does not implement.
    #[error("token has critical extensions")]
    CriticalExtension,
    /// No configured key matches the token.
    #[error("no key matches the token")]
    UnknownKey,
    /// The signature does not verify.
    #[error("bad token signature")]
    BadSignature,
    /// A required claim is absent.
    #[error("token lacks the {0} claim")]
    MissingClaim(String),
    /// A claim has the wrong JSON type (for example `exp` as a string).
    #[error("token claim {0} has the wrong type")]
    BadClaimType(String),
    /// A claim the issuer's tokens must carry with a given value has another.
    #[error("token claim {0} does not have the required value")]
    WrongClaim(String),
    /// `exp` is past, beyond the leeway.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future, beyond the leeway.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("token issuer is not accepted")]
    WrongIssuer,
    /// `aud` does not include the configured audience.
    #[error("token audience is not accepted")]
    WrongAudience,
}

/// The rules one issuer's tokens must meet.
#[derive(Clone, Debug)]
pub struct Validation {
    /// The exact `iss`.
    pub issuer: String,
    /// A value the audience claim must be or contain.
    pub audience: String,
    /// The algorithms accepted; a token naming any other is refused before a key is looked at.
    pub algorithms: Vec<Algorithm>,
    /// Seconds of clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Where this issuer puts what Cubby reads.
    pub claims: ClaimNames,
}

impl Validation {
    /// Rules for `issuer`'s tokens for `audience`, signed with one of `algorithms`, with a
    /// minute's leeway and the standard claim names.
    pub fn new(issuer: &str, audience: &str, algorithms: &[Algorithm]) -> Self {
        Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            algorithms: algorithms.to_vec(),
            leeway_secs: 60,
            claims: ClaimNames::default(),
        }
    }
}

/// Where an issuer puts the claims Cubby reads, and what else a token must carry. A claim name
/// is looked up whole first (`cognito:groups`, `https://acme.example/roles`), then as a dotted
/// path into nested objects (`realm_access.roles`).
#[derive(Clone, Debug)]
pub struct ClaimNames {
    /// The claim holding the audience: `aud`, or `client_id` for Cognito access tokens.
    pub audience: String,
    /// The claim naming the customer: `sub`, or a stable id such as Entra's `oid`.
    pub subject: String,
    /// Claims that must have a given value (a string equal to it, or a list holding it), such
    /// as `token_use = "access"` (Cognito) or `typ = "Bearer"` (Keycloak).
    pub required: Vec<(String, String)>,
    /// The header `typ` values accepted (compared without case and without `application/`).
    /// Empty: no `typ`, `JWT` or `at+jwt`; otherwise a `typ` is required.
    pub token_types: Vec<String>,
}

impl Default for ClaimNames {
    fn default() -> Self {
        Self {
            audience: "aud".into(),
            subject: "sub".into(),
            required: Vec::new(),
            token_types: Vec::new(),
        }
    }
}

/// The claim `name` of `claims`: the top-level claim of that name, or else the value at that
/// dotted path.
pub fn claim<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(value) = claims.get(name) {
        return Some(value);
    }
    let mut parts = name.split('.');
    let mut value = claims.get(parts.next()?)?;
    for part in parts {
        value = value.as_object()?.get(part)?;
    }
    Some(value)
}

/// Whether a claim's value is `wanted`, holds it in a list, or (`words`) holds it among the
/// space-separated words of a string (as `scope` does).
pub fn claim_has(value: &Value, wanted: &str, words: bool) -> bool {
    match value {
        Value::String(s) if words => s.split_ascii_whitespace().any(|w| w == wanted),
        Value::String(s) => s == wanted,
        Value::Array(items) => items.iter().any(|item| item.as_str() == Some(wanted)),
        _ => false,
    }
}

/// The verified claims of a token.
#[derive(Clone, Debug, PartialEq)]
pub struct Claims {
    /// The subject: the customer (or the business service) the token speaks for, read from
    /// the issuer's subject claim.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// All claims, for callers that need more (such as `scope`).
    pub all: Map<String, Value>,
}

/// Verifies one issuer's tokens.
#[derive(Clone, Debug)]
pub struct Verifier {
    validation: Validation,
    keys: Vec<VerifyingKey>,
}

fn decode_json(part: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| JwtError::Malformed)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(JwtError::Malformed),
    }
}

/// The issuer a token claims, read without verifying anything, to pick the verifier.
pub fn unverified_issuer(token: &str) -> Result<String, JwtError> {
    let payload = token.split('.').nth(1).ok_or(JwtError::Malformed)?;
    let claims = decode_json(payload)?;
    claims
        .get("iss")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or(JwtError::MissingClaim("iss".into()))
}

/// A token's issuer and subject, unverified: for a client to tell whose token it holds (the
/// server verifies; a client has no keys to). `None` for a token that is not a JWT with both.
pub fn unverified_identity(token: &str) -> Option<(String, String)> {
    let claims = decode_json(token.split('.').nth(1)?).ok()?;
    let claim = |name| claims.get(name).and_then(Value::as_str).map(str::to_owned);
    Some((claim("iss")?, claim("sub")?))
}

fn numeric(claims: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(v), _) => Ok(Some(v)),
            (None, Some(f)) if f >= 0.0 && f.is_finite() => Ok(Some(f as u64)),
            _ => Err(JwtError::BadClaimType(name.into())),
        },
        Some(_) => Err(JwtError::BadClaimType(name.into())),
    }
}

/// A header `typ` in the form compared: lower case, without `application/`.
fn media_type(typ: &str) -> String {
    let typ = typ.to_ascii_lowercase();
    typ.strip_prefix("application/").map(str::to_owned).unwrap_or(typ)
}

impl Verifier {
    /// A verifier for one issuer. Every key must fit one of its algorithms; there may be none
    /// yet (keys fetched later), and then every token is refused as [`JwtError::UnknownKey`].
    pub fn new(validation: Validation, keys: Vec<VerifyingKey>) -> Result<Self, KeyError> {
        if let Some(key) =
            keys.iter().find(|k| !validation.algorithms.iter().any(|&a| k.verifies(a)))
        {
            return Err(KeyError::WrongKeyType {
                found: key.family.name(),
                algs: names(&validation.algorithms),
            });
        }
        Ok(Self { validation, keys })
    }

    /// The rules this verifier applies.
    pub fn validation(&self) -> &Validation {
        &self.validation
    }

    /// The keys it verifies with.
    pub fn keys(&self) -> &[VerifyingKey] {
        &self.keys
    }

    /// Verifies `token` at `now` (seconds since the Unix epoch).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, JwtError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header = decode_json(h)?;
        let name = header.get("alg").and_then(Value::as_str).ok_or(JwtError::Malformed)?;
        let alg = Algorithm::from_name(name)
            .filter(|a| self.validation.algorithms.contains(a))
            .ok_or_else(|| JwtError::InvalidAlgorithm(name.to_owned()))?;
        let names = &self.validation.claims;
        match header.get("typ") {
            None if names.token_types.is_empty() => {}
            None => return Err(JwtError::WrongType(String::new())),
            Some(typ) => {
                let typ = typ.as_str().ok_or(JwtError::Malformed)?;
                let accepted = if names.token_types.is_empty() {
                    ["jwt", "at+jwt"].contains(&media_type(typ).as_str())
                } else {
                    names.token_types.iter().any(|t| media_type(t) == media_type(typ))
                };
                if !accepted {
                    return Err(JwtError::WrongType(typ.to_owned()));
                }
            }
        }
        if header.contains_key("crit") {
            return Err(JwtError::CriticalExtension);
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(kid)) => Some(kid.as_str()),
            Some(_) => return Err(JwtError::Malformed),
        };
        let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| JwtError::Malformed)?;
        let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
        let mut candidates = self
            .keys
            .iter()
            .filter(|k| k.verifies(alg))
            .filter(|k| kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid)
            .peekable();
        if candidates.peek().is_none() {
            return Err(JwtError::UnknownKey);
        }
        if !candidates.any(|k| k.verify(alg, signed, &sig)) {
            return Err(JwtError::BadSignature);
        }

        let claims = decode_json(p)?;
        let leeway = self.validation.leeway_secs;
        let exp = numeric(&claims, "exp")?.ok_or(JwtError::MissingClaim("exp".into()))?;
        if now > exp.saturating_add(leeway) {
            return Err(JwtError::Expired);
        }
        if numeric(&claims, "nbf")?.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
            return Err(JwtError::NotYetValid);
        }
        numeric(&claims, "iat")?;
        match claims.get("iss") {
            Some(Value::String(iss)) if *iss == self.validation.issuer => {}
            Some(Value::String(_)) => return Err(JwtError::WrongIssuer),
            Some(_) => return Err(JwtError::BadClaimType("iss".into())),
            None => return Err(JwtError::MissingClaim("iss".into())),
        }
        match claim(&claims, &names.audience) {
            Some(aud) if claim_has(aud, &self.validation.audience, false) => {}
            Some(Value::String(_) | Value::Array(_)) => return Err(JwtError::WrongAudience),
            Some(_) => return Err(JwtError::BadClaimType(names.audience.clone())),
            None => return Err(JwtError::MissingClaim(names.audience.clone())),
        }
        for (name, wanted) in &names.required {
            match claim(&claims, name) {
                Some(value) if claim_has(value, wanted, false) => {}
                Some(_) => return Err(JwtError::WrongClaim(name.clone())),
                None => return Err(JwtError::MissingClaim(name.clone())),
            }
        }
        let sub = match claim(&claims, &names.subject) {
            Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
            Some(Value::String(_)) | None => {
                return Err(JwtError::MissingClaim(names.subject.clone()));
            }
            Some(_) => return Err(JwtError::BadClaimType(names.subject.clone())),
        };
        Ok(Claims { sub, exp, all: claims })
    }
}

mod keys;

#[cfg(test)]
use keys::Material;
pub use keys::{KeyError, VerifyingKey};

#[cfg(test)]
mod tests;
