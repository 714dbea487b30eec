//! JWT access-token verification with ring.
//!
//! The algorithm is pinned per issuer: a token whose header names any other algorithm (including
//! `none` and every `HS*`) is refused before a key is looked at, so a public key can never be
//! used as an HMAC secret. `exp`, `iss`, `aud` and `sub` are required; `exp`, `nbf` and `iat` must
//! be JSON numbers (a string `exp` is refused, not skipped); clock leeway is bounded.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::{Map, Value};

/// A signature algorithm Cubby accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Algorithm {
    /// Ed25519.
    EdDSA,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, 2048 to 8192 bits.
    RS256,
}

impl Algorithm {
    /// The name in a JWT header.
    pub fn name(self) -> &'static str {
        match self {
            Self::EdDSA => "EdDSA",
            Self::ES256 => "ES256",
            Self::RS256 => "RS256",
        }
    }
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
    /// The header's `typ` says this is not an access token.
    #[error("token type {0:?} is not an access token")]
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
    MissingClaim(&'static str),
    /// A claim has the wrong JSON type (for example `exp` as a string).
    #[error("token claim {0} has the wrong type")]
    BadClaimType(&'static str),
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

/// Why a key could not be configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The PEM or DER is not a public key.
    #[error("not a public key: {0}")]
    NotAPublicKey(String),
    /// The key type does not match the issuer's algorithm.
    #[error("a {found} key cannot verify {alg}")]
    WrongKeyType {
        /// The key type found.
        found: &'static str,
        /// The configured algorithm.
        alg: &'static str,
    },
    /// The JWKS document is not valid.
    #[error("invalid JWKS: {0}")]
    Jwks(String),
}

#[derive(Clone)]
enum Material {
    /// Raw Ed25519 key, uncompressed P-256 point, or PKCS#1 RSA public key DER.
    Encoded(Vec<u8>),
    /// RSA modulus and exponent from a JWK.
    RsaComponents { n: Vec<u8>, e: Vec<u8> },
}

/// One public key that may verify an issuer's tokens.
#[derive(Clone)]
pub struct VerifyingKey {
    alg: Algorithm,
    kid: Option<String>,
    material: Material,
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingKey").field("alg", &self.alg).field("kid", &self.kid).finish()
    }
}

const OID_ED25519: &str = "1.3.101.112";
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_RSA: &str = "1.2.840.113549.1.1.1";

impl VerifyingKey {
    /// A raw 32-byte Ed25519 public key.
    pub fn ed25519(raw: &[u8], kid: Option<String>) -> Self {
        Self { alg: Algorithm::EdDSA, kid, material: Material::Encoded(raw.to_vec()) }
    }

    /// A key from a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) block, checked against `alg`.
    pub fn from_pem(pem: &str, alg: Algorithm, kid: Option<String>) -> Result<Self, KeyError> {
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| KeyError::NotAPublicKey(e.to_string()))?;
        let spki = spki::SubjectPublicKeyInfoRef::try_from(der.as_ref())
            .map_err(|e| KeyError::NotAPublicKey(e.to_string()))?;
        let oid = spki.algorithm.oid.to_string();
        let found = match oid.as_str() {
            OID_ED25519 => (Algorithm::EdDSA, "Ed25519"),
            OID_EC_PUBLIC_KEY => {
                let curve = spki
                    .algorithm
                    .parameters_oid()
                    .map_err(|e| KeyError::NotAPublicKey(e.to_string()))?;
                if curve.to_string() != OID_P256 {
                    return Err(KeyError::NotAPublicKey(format!("unsupported curve {curve}")));
                }
                (Algorithm::ES256, "P-256")
            }
            OID_RSA => (Algorithm::RS256, "RSA"),
            other => {
                return Err(KeyError::NotAPublicKey(format!("unsupported key type {other}")));
            }
        };
        if found.0 != alg {
            return Err(KeyError::WrongKeyType { found: found.1, alg: alg.name() });
        }
        let raw = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| KeyError::NotAPublicKey("unaligned key bits".into()))?;
        Ok(Self { alg, kid, material: Material::Encoded(raw.to_vec()) })
    }

    /// Every key in a JWKS document usable with `alg`; keys of other types are skipped.
    pub fn from_jwks(json: &str, alg: Algorithm) -> Result<Vec<Self>, KeyError> {
        let doc: Value = serde_json::from_str(json).map_err(|e| KeyError::Jwks(e.to_string()))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| KeyError::Jwks("no \"keys\" array".into()))?;
        let mut out = Vec::new();
        for jwk in keys {
            let field = |name: &str| -> Result<Vec<u8>, KeyError> {
                let text = jwk
                    .get(name)
                    .and_then(Value::as_str)
                    .ok_or_else(|| KeyError::Jwks(format!("key lacks {name:?}")))?;
                URL_SAFE_NO_PAD
                    .decode(text)
                    .map_err(|_| KeyError::Jwks(format!("{name:?} is not base64url")))
            };
            if jwk.get("alg").and_then(Value::as_str).is_some_and(|a| a != alg.name()) {
                continue;
            }
            if jwk.get("use").and_then(Value::as_str).is_some_and(|u| u != "sig") {
                continue;
            }
            let kid = jwk.get("kid").and_then(Value::as_str).map(str::to_owned);
            let kty = jwk.get("kty").and_then(Value::as_str).unwrap_or_default();
            let crv = jwk.get("crv").and_then(Value::as_str).unwrap_or_default();
            let material = match (alg, kty, crv) {
                (Algorithm::EdDSA, "OKP", "Ed25519") => Material::Encoded(field("x")?),
                (Algorithm::ES256, "EC", "P-256") => {
                    let mut point = vec![4u8];
                    point.extend(field("x")?);
                    point.extend(field("y")?);
                    Material::Encoded(point)
                }
                (Algorithm::RS256, "RSA", _) => {
                    Material::RsaComponents { n: field("n")?, e: field("e")? }
                }
                _ => continue,
            };
            out.push(Self { alg, kid, material });
        }
        if out.is_empty() {
            return Err(KeyError::Jwks(format!("no {} key in the set", alg.name())));
        }
        Ok(out)
    }

    fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        let alg: &dyn signature::VerificationAlgorithm = match self.alg {
            Algorithm::EdDSA => &signature::ED25519,
            Algorithm::ES256 => &signature::ECDSA_P256_SHA256_FIXED,
            Algorithm::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
        };
        match &self.material {
            Material::Encoded(raw) => UnparsedPublicKey::new(alg, raw).verify(message, sig).is_ok(),
            Material::RsaComponents { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
                .is_ok(),
        }
    }
}

/// The rules one issuer's tokens must meet.
#[derive(Clone, Debug)]
pub struct Validation {
    /// The exact `iss`.
    pub issuer: String,
    /// A value `aud` must be or contain.
    pub audience: String,
    /// The only algorithm accepted.
    pub algorithm: Algorithm,
    /// Seconds of clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u64,
}

/// The verified claims of a token.
#[derive(Clone, Debug, PartialEq)]
pub struct Claims {
    /// The subject: the customer (or the business service) the token speaks for.
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
        .ok_or(JwtError::MissingClaim("iss"))
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
            _ => Err(JwtError::BadClaimType(name)),
        },
        Some(_) => Err(JwtError::BadClaimType(name)),
    }
}

impl Verifier {
    /// A verifier for one issuer. Every key must be of the pinned algorithm.
    pub fn new(validation: Validation, keys: Vec<VerifyingKey>) -> Result<Self, KeyError> {
        if let Some(key) = keys.iter().find(|k| k.alg != validation.algorithm) {
            return Err(KeyError::WrongKeyType {
                found: key.alg.name(),
                alg: validation.algorithm.name(),
            });
        }
        Ok(Self { validation, keys })
    }

    /// The rules this verifier applies.
    pub fn validation(&self) -> &Validation {
        &self.validation
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
        let alg = header.get("alg").and_then(Value::as_str).ok_or(JwtError::Malformed)?;
        if alg != self.validation.algorithm.name() {
            return Err(JwtError::InvalidAlgorithm(alg.to_owned()));
        }
        if let Some(typ) = header.get("typ") {
            let typ = typ.as_str().ok_or(JwtError::Malformed)?;
            if !["JWT", "at+jwt", "application/at+jwt"].contains(&typ) {
                return Err(JwtError::WrongType(typ.to_owned()));
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
            .filter(|k| kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid)
            .peekable();
        if candidates.peek().is_none() {
            return Err(JwtError::UnknownKey);
        }
        if !candidates.any(|k| k.verify(signed, &sig)) {
            return Err(JwtError::BadSignature);
        }

        let claims = decode_json(p)?;
        let leeway = self.validation.leeway_secs;
        let exp = numeric(&claims, "exp")?.ok_or(JwtError::MissingClaim("exp"))?;
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
            Some(_) => return Err(JwtError::BadClaimType("iss")),
            None => return Err(JwtError::MissingClaim("iss")),
        }
        let audience = self.validation.audience.as_str();
        match claims.get("aud") {
            Some(Value::String(aud)) if aud == audience => {}
            Some(Value::Array(auds)) if auds.iter().any(|a| a.as_str() == Some(audience)) => {}
            Some(Value::String(_) | Value::Array(_)) => return Err(JwtError::WrongAudience),
            Some(_) => return Err(JwtError::BadClaimType("aud")),
            None => return Err(JwtError::MissingClaim("aud")),
        }
        let sub = match claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
            Some(Value::String(_)) | None => return Err(JwtError::MissingClaim("sub")),
            Some(_) => return Err(JwtError::BadClaimType("sub")),
        };
        Ok(Claims { sub, exp, all: claims })
    }
}

#[cfg(test)]
mod tests;
