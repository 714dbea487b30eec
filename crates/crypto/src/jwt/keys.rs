//! Issuers' public keys: from PEM, from a JWKS document, and verifying a signature with one.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::Value;

use super::{Algorithm, Family};

/// Why a key could not be configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The PEM or DER is not a public key.
    #[error("not a public key: {0}")]
    NotAPublicKey(String),
    /// The key type fits none of the issuer's algorithms.
    #[error("a {found} key cannot verify {algs}")]
    WrongKeyType {
        /// The key type found.
        found: &'static str,
        /// The configured algorithms.
        algs: String,
    },
    /// The JWKS document is not valid.
    #[error("invalid JWKS: {0}")]
    Jwks(String),
}

#[derive(Clone)]
pub(super) enum Material {
    /// Raw Ed25519 key, uncompressed EC point, or PKCS#1 RSA public key DER.
    Encoded(Vec<u8>),
    /// RSA modulus and exponent from a JWK.
    RsaComponents { n: Vec<u8>, e: Vec<u8> },
}

/// One public key that may verify an issuer's tokens.
#[derive(Clone)]
pub struct VerifyingKey {
    pub(super) family: Family,
    /// The one algorithm this key is for, when its JWK says (`alg`); otherwise any of its
    /// family the issuer accepts.
    pub(super) alg: Option<Algorithm>,
    pub(super) kid: Option<String>,
    pub(super) material: Material,
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("type", &self.family.name())
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish()
    }
}

const OID_ED25519: &str = "1.3.101.112";
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_RSA: &str = "1.2.840.113549.1.1.1";

impl VerifyingKey {
    /// A raw 32-byte Ed25519 public key.
    pub fn ed25519(raw: &[u8], kid: Option<String>) -> Self {
        Self {
            family: Family::Ed25519,
            alg: Some(Algorithm::EdDSA),
            kid,
            material: Material::Encoded(raw.to_vec()),
        }
    }

    /// The key id, if it has one.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// Whether this key can verify `alg` signatures.
    pub fn verifies(&self, alg: Algorithm) -> bool {
        self.family == alg.family() && self.alg.is_none_or(|pinned| pinned == alg)
    }

    /// A key from a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) block: Ed25519, P-256, P-384 or RSA.
    pub fn from_pem(pem: &str, kid: Option<String>) -> Result<Self, KeyError> {
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| KeyError::NotAPublicKey(e.to_string()))?;
        let spki = spki::SubjectPublicKeyInfoRef::try_from(der.as_ref())
            .map_err(|e| KeyError::NotAPublicKey(e.to_string()))?;
        let oid = spki.algorithm.oid.to_string();
        let family = match oid.as_str() {
            OID_ED25519 => Family::Ed25519,
            OID_EC_PUBLIC_KEY => {
                let curve = spki
                    .algorithm
                    .parameters_oid()
                    .map_err(|e| KeyError::NotAPublicKey(e.to_string()))?;
                match curve.to_string().as_str() {
                    OID_P256 => Family::P256,
                    OID_P384 => Family::P384,
                    other => {
                        return Err(KeyError::NotAPublicKey(format!("unsupported curve {other}")));
                    }
                }
            }
            OID_RSA => Family::Rsa,
            other => {
                return Err(KeyError::NotAPublicKey(format!("unsupported key type {other}")));
            }
        };
        let raw = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| KeyError::NotAPublicKey("unaligned key bits".into()))?;
        Ok(Self { family, alg: None, kid, material: Material::Encoded(raw.to_vec()) })
    }

    /// Every signing key in a JWKS document usable with one of `algs`; keys of other types,
    /// for other algorithms, for encryption, or malformed are skipped (one bad key does not
    /// take the others down with it). The set may hold none.
    pub fn from_jwks(json: &str, algs: &[Algorithm]) -> Result<Vec<Self>, KeyError> {
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
            if jwk.get("use").and_then(Value::as_str).is_some_and(|u| u != "sig") {
                continue;
            }
            // A key that names an algorithm Cubby does not accept (or a typo) is skipped.
            let alg = match jwk.get("alg").and_then(Value::as_str) {
                None => None,
                Some(name) => match Algorithm::from_name(name) {
                    Some(alg) => Some(alg),
                    None => continue,
                },
            };
            let kid = jwk.get("kid").and_then(Value::as_str).map(str::to_owned);
            let kty = jwk.get("kty").and_then(Value::as_str).unwrap_or_default();
            let crv = jwk.get("crv").and_then(Value::as_str).unwrap_or_default();
            let family = match (kty, crv) {
                ("OKP", "Ed25519") => Family::Ed25519,
                ("EC", "P-256") => Family::P256,
                ("EC", "P-384") => Family::P384,
                ("RSA", _) => Family::Rsa,
                _ => continue,
            };
            let key = Self { family, alg, kid, material: Material::Encoded(Vec::new()) };
            if !algs.iter().any(|&a| key.verifies(a)) {
                continue;
            }
            let material = match family {
                Family::Ed25519 => field("x").map(Material::Encoded),
                Family::P256 | Family::P384 => field("x").and_then(|x| {
                    let mut point = vec![4u8];
                    point.extend(x);
                    point.extend(field("y")?);
                    Ok(Material::Encoded(point))
                }),
                Family::Rsa => {
                    field("n").and_then(|n| Ok(Material::RsaComponents { n, e: field("e")? }))
                }
            };
            if let Ok(material) = material {
                out.push(Self { material, ..key });
            }
        }
        Ok(out)
    }

    pub(super) fn verify(&self, alg: Algorithm, message: &[u8], sig: &[u8]) -> bool {
        match (&self.material, alg.rsa()) {
            (Material::RsaComponents { n, e }, Some(params)) => {
                RsaPublicKeyComponents { n, e }.verify(params, message, sig).is_ok()
            }
            (Material::RsaComponents { .. }, None) => false,
            (Material::Encoded(raw), _) => {
                UnparsedPublicKey::new(alg.verification(), raw).verify(message, sig).is_ok()
            }
        }
    }
}
