//! Token verification against the attacks in BAD_INPUTS.md section B.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};

use super::*;
use crate::signing::{TokenSigner, generate_pkcs8};

const NOW: u64 = 1_800_000_000;
const RSA_PKCS8: &[u8] = include_bytes!("test-rsa.pk8");
const RSA_PUB_PEM: &str = include_str!("test-rsa.pub.pem");

fn validation(alg: Algorithm) -> Validation {
    Validation {
        issuer: "https://id.example".into(),
        audience: "cubby".into(),
        algorithm: alg,
        leeway_secs: 60,
    }
}

fn claims() -> Value {
    json!({"iss": "https://id.example", "aud": "cubby", "sub": "alice", "exp": NOW + 300, "iat": NOW})
}

fn encode(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

fn with_sig(input: String, sig: &[u8]) -> String {
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

struct Ed {
    signer: TokenSigner,
    verifier: Verifier,
}

fn ed() -> Ed {
    let signer = TokenSigner::from_pkcs8(&generate_pkcs8()).expect("fresh key");
    let verifier =
        Verifier::new(validation(Algorithm::EdDSA), vec![signer.verifying_key()]).expect("keys");
    Ed { signer, verifier }
}

fn rsa_sign(input: &str) -> Vec<u8> {
    let pair = RsaKeyPair::from_pkcs8(RSA_PKCS8).expect("fixture key");
    let mut sig = vec![0; pair.public().modulus_len()];
    pair.sign(&signature::RSA_PKCS1_SHA256, &SystemRandom::new(), input.as_bytes(), &mut sig)
        .expect("signs");
    sig
}

#[test]
fn eddsa_token_verifies() {
    let ed = ed();
    let got = ed.verifier.verify(&ed.signer.sign_jwt(&claims()), NOW).expect("valid");
    assert_eq!(got.sub, "alice");
    assert_eq!(got.exp, NOW + 300);
}

#[test]
fn es256_token_from_jwks_verifies() {
    let rng = SystemRandom::new();
    let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("generate");
    let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("parse");
    let point = pair.public_key().as_ref();
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])}]});
    let keys = VerifyingKey::from_jwks(&jwks.to_string(), Algorithm::ES256).expect("jwks");
    let verifier = Verifier::new(validation(Algorithm::ES256), keys).expect("keys");
    let input = encode(&json!({"alg": "ES256", "kid": "k1"}), &claims());
    let sig = pair.sign(&rng, input.as_bytes()).expect("sign");
    assert!(verifier.verify(&with_sig(input.clone(), sig.as_ref()), NOW).is_ok());
    let input = encode(&json!({"alg": "ES256", "kid": "other"}), &claims());
    let sig = pair.sign(&rng, input.as_bytes()).expect("sign");
    assert_eq!(verifier.verify(&with_sig(input, sig.as_ref()), NOW), Err(JwtError::UnknownKey));
}

#[test]
fn rs256_token_from_pem_and_jwks_verifies() {
    let input = encode(&json!({"alg": "RS256", "typ": "at+jwt"}), &claims());
    let token = with_sig(input.clone(), &rsa_sign(&input));
    let pem_key = VerifyingKey::from_pem(RSA_PUB_PEM, Algorithm::RS256, None).expect("pem");
    let verifier = Verifier::new(validation(Algorithm::RS256), vec![pem_key]).expect("keys");
    assert!(verifier.verify(&token, NOW).is_ok());

    let pair = RsaKeyPair::from_pkcs8(RSA_PKCS8).expect("fixture key");
    let public = pair.public();
    let components: RsaPublicKeyComponents<Vec<u8>> = public.into();
    let jwks = json!({"keys": [{"kty": "RSA", "n": URL_SAFE_NO_PAD.encode(&components.n),
        "e": URL_SAFE_NO_PAD.encode(&components.e)}]});
    let keys = VerifyingKey::from_jwks(&jwks.to_string(), Algorithm::RS256).expect("jwks");
    let verifier = Verifier::new(validation(Algorithm::RS256), keys).expect("keys");
    assert!(verifier.verify(&token, NOW).is_ok());
}

#[test]
fn ed25519_pem_key_verifies() {
    let signer = TokenSigner::from_pkcs8(&generate_pkcs8()).expect("fresh key");
    let Material::Encoded(raw) = &signer.verifying_key().material else { panic!("raw key") };
    let der = [hex_prefix(), raw.clone()].concat();
    let pem =
        format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", STANDARD.encode(der));
    let key = VerifyingKey::from_pem(&pem, Algorithm::EdDSA, None).expect("pem");
    let verifier = Verifier::new(validation(Algorithm::EdDSA), vec![key]).expect("keys");
    assert!(verifier.verify(&signer.sign_jwt(&claims()), NOW).is_ok());
    assert!(matches!(
        VerifyingKey::from_pem(&pem, Algorithm::RS256, None),
        Err(KeyError::WrongKeyType { .. })
    ));
}

fn hex_prefix() -> Vec<u8> {
    // SubjectPublicKeyInfo header for an Ed25519 key (RFC 8410).
    vec![0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00]
}

#[test]
fn row_12_alg_none_is_refused() {
    let ed = ed();
    let token = format!("{}.", encode(&json!({"alg": "none"}), &claims()));
    assert_eq!(ed.verifier.verify(&token, NOW), Err(JwtError::InvalidAlgorithm("none".into())));
}

#[test]
fn row_13_rsa_public_key_as_hmac_secret_is_refused() {
    let verifier = Verifier::new(
        validation(Algorithm::RS256),
        vec![VerifyingKey::from_pem(RSA_PUB_PEM, Algorithm::RS256, None).expect("pem")],
    )
    .expect("keys");
    let input = encode(&json!({"alg": "HS256"}), &claims());
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, RSA_PUB_PEM.as_bytes());
    let token = with_sig(input.clone(), ring::hmac::sign(&key, input.as_bytes()).as_ref());
    assert_eq!(verifier.verify(&token, NOW), Err(JwtError::InvalidAlgorithm("HS256".into())));
}

#[test]
fn row_20_clock_skew_within_the_leeway_passes_and_beyond_it_fails() {
    let ed = ed();
    let mut c = claims();
    c["exp"] = json!(NOW - 30);
    assert!(ed.verifier.verify(&ed.signer.sign_jwt(&c), NOW).is_ok(), "30 s skew is tolerated");
    c["exp"] = json!(NOW - 300);
    assert_eq!(ed.verifier.verify(&ed.signer.sign_jwt(&c), NOW), Err(JwtError::Expired));
    let mut c = claims();
    c["nbf"] = json!(NOW + 30);
    assert!(ed.verifier.verify(&ed.signer.sign_jwt(&c), NOW).is_ok());
    c["nbf"] = json!(NOW + 300);
    assert_eq!(ed.verifier.verify(&ed.signer.sign_jwt(&c), NOW), Err(JwtError::NotYetValid));
}

#[test]
fn row_16_string_exp_and_nbf_are_refused_not_skipped() {
    let ed = ed();
    let mut c = claims();
    c["exp"] = json!((NOW - 1000).to_string());
    assert_eq!(
        ed.verifier.verify(&ed.signer.sign_jwt(&c), NOW),
        Err(JwtError::BadClaimType("exp"))
    );
    let mut c = claims();
    c["nbf"] = json!((NOW + 1000).to_string());
    assert_eq!(
        ed.verifier.verify(&ed.signer.sign_jwt(&c), NOW),
        Err(JwtError::BadClaimType("nbf"))
    );
}

#[test]
fn row_15_wrong_issuer_audience_type_and_missing_claims_are_refused() {
    let ed = ed();
    let check = |edit: &dyn Fn(&mut Value), want: JwtError| {
        let mut c = claims();
        edit(&mut c);
        assert_eq!(ed.verifier.verify(&ed.signer.sign_jwt(&c), NOW), Err(want));
    };
    check(&|c| c["iss"] = json!("https://other-tenant.example"), JwtError::WrongIssuer);
    check(&|c| c["aud"] = json!("another-app"), JwtError::WrongAudience);
    check(&|c| c["aud"] = json!(["a", "b"]), JwtError::WrongAudience);
    check(
        &|c| {
            c.as_object_mut().map(|m| m.remove("exp"));
        },
        JwtError::MissingClaim("exp"),
    );
    check(
        &|c| {
            c.as_object_mut().map(|m| m.remove("sub"));
        },
        JwtError::MissingClaim("sub"),
    );
    check(
        &|c| {
            c.as_object_mut().map(|m| m.remove("aud"));
        },
        JwtError::MissingClaim("aud"),
    );
    let mut c = claims();
    c["aud"] = json!(["x", "cubby"]);
    assert!(ed.verifier.verify(&ed.signer.sign_jwt(&c), NOW).is_ok(), "aud arrays are searched");
}

#[test]
fn tampered_and_malformed_tokens_are_refused() {
    let ed = ed();
    let token = ed.signer.sign_jwt(&claims());
    let parts: Vec<&str> = token.split('.').collect();
    let mut evil = claims();
    evil["sub"] = json!("mallory");
    let forged = format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(evil.to_string()), parts[2]);
    assert_eq!(ed.verifier.verify(&forged, NOW), Err(JwtError::BadSignature));
    let other = TokenSigner::from_pkcs8(&generate_pkcs8()).expect("key");
    let mut c = claims();
    c["kid"] = json!(null);
    let foreign = other.sign_jwt(&c);
    assert_eq!(ed.verifier.verify(&foreign, NOW), Err(JwtError::UnknownKey));
    for bad in ["", "a.b", "a.b.c.d", "!!.!!.!!", &format!("{}.{}.", parts[0], parts[1])] {
        assert!(ed.verifier.verify(bad, NOW).is_err(), "{bad:?}");
    }
    let id_token = with_sig(encode(&json!({"alg": "EdDSA", "typ": "id_token"}), &claims()), b"x");
    assert_eq!(ed.verifier.verify(&id_token, NOW), Err(JwtError::WrongType("id_token".into())));
}
