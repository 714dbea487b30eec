//! Token verification against the attacks in BAD_INPUTS.md section B.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair, RsaPublicKeyComponents};
use serde_json::{Value, json};

use super::*;
use crate::signing::{TokenSigner, generate_pkcs8};

const NOW: u64 = 1_800_000_000;
const RSA_PKCS8: &[u8] = include_bytes!("test-rsa.pk8");
const RSA_PUB_PEM: &str = include_str!("test-rsa.pub.pem");

fn validation(alg: Algorithm) -> Validation {
    Validation::new("https://id.example", "cubby", &[alg])
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
    rsa_sign_with(&signature::RSA_PKCS1_SHA256, input)
}

fn rsa_sign_with(encoding: &'static dyn signature::RsaEncoding, input: &str) -> Vec<u8> {
    let pair = RsaKeyPair::from_pkcs8(RSA_PKCS8).expect("fixture key");
    let mut sig = vec![0; pair.public().modulus_len()];
    pair.sign(encoding, &SystemRandom::new(), input.as_bytes(), &mut sig).expect("signs");
    sig
}

/// The fixture RSA key as a JWK, with `alg` when given.
fn rsa_jwk(alg: Option<&str>) -> Value {
    let pair = RsaKeyPair::from_pkcs8(RSA_PKCS8).expect("fixture key");
    let components: RsaPublicKeyComponents<Vec<u8>> = pair.public().into();
    let mut jwk = json!({"kty": "RSA", "kid": "r1", "n": URL_SAFE_NO_PAD.encode(&components.n),
        "e": URL_SAFE_NO_PAD.encode(&components.e)});
    if let Some(alg) = alg {
        jwk["alg"] = json!(alg);
    }
    jwk
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
    let keys = VerifyingKey::from_jwks(&jwks.to_string(), &[Algorithm::ES256]).expect("jwks");
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
    let pem_key = VerifyingKey::from_pem(RSA_PUB_PEM, None).expect("pem");
    let verifier = Verifier::new(validation(Algorithm::RS256), vec![pem_key]).expect("keys");
    assert!(verifier.verify(&token, NOW).is_ok());

    let jwks = json!({"keys": [rsa_jwk(None)]});
    let keys = VerifyingKey::from_jwks(&jwks.to_string(), &[Algorithm::RS256]).expect("jwks");
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
    let key = VerifyingKey::from_pem(&pem, None).expect("pem");
    let verifier = Verifier::new(validation(Algorithm::EdDSA), vec![key.clone()]).expect("keys");
    assert!(verifier.verify(&signer.sign_jwt(&claims()), NOW).is_ok());
    assert!(matches!(
        Verifier::new(validation(Algorithm::RS256), vec![key]),
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
        vec![VerifyingKey::from_pem(RSA_PUB_PEM, None).expect("pem")],
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
        Err(JwtError::BadClaimType("exp".into()))
    );
    let mut c = claims();
    c["nbf"] = json!((NOW + 1000).to_string());
    assert_eq!(
        ed.verifier.verify(&ed.signer.sign_jwt(&c), NOW),
        Err(JwtError::BadClaimType("nbf".into()))
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
        JwtError::MissingClaim("exp".into()),
    );
    check(
        &|c| {
            c.as_object_mut().map(|m| m.remove("sub"));
        },
        JwtError::MissingClaim("sub".into()),
    );
    check(
        &|c| {
            c.as_object_mut().map(|m| m.remove("aud"));
        },
        JwtError::MissingClaim("aud".into()),
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

/// A token for `claims` signed with `alg` by the fixture RSA key.
fn rsa_token(alg: &str, encoding: &'static dyn signature::RsaEncoding, claims: &Value) -> String {
    let input = encode(&json!({"alg": alg, "kid": "r1"}), claims);
    let sig = rsa_sign_with(encoding, &input);
    with_sig(input, &sig)
}

#[test]
fn every_rsa_algorithm_verifies_with_one_key_and_only_the_listed_ones_are_accepted() {
    let cases: [(Algorithm, &'static dyn signature::RsaEncoding); 6] = [
        (Algorithm::RS256, &signature::RSA_PKCS1_SHA256),
        (Algorithm::RS384, &signature::RSA_PKCS1_SHA384),
        (Algorithm::RS512, &signature::RSA_PKCS1_SHA512),
        (Algorithm::PS256, &signature::RSA_PSS_SHA256),
        (Algorithm::PS384, &signature::RSA_PSS_SHA384),
        (Algorithm::PS512, &signature::RSA_PSS_SHA512),
    ];
    let all: Vec<Algorithm> = cases.iter().map(|c| c.0).collect();
    let jwks = json!({"keys": [rsa_jwk(None)]}).to_string();
    let keys = VerifyingKey::from_jwks(&jwks, &all).expect("jwks");
    let everything =
        Verifier::new(Validation::new("https://id.example", "cubby", &all), keys).expect("keys");
    let only_ps256 = Verifier::new(
        validation(Algorithm::PS256),
        VerifyingKey::from_jwks(&jwks, &[Algorithm::PS256]).expect("jwks"),
    )
    .expect("keys");
    for (alg, encoding) in cases {
        let token = rsa_token(alg.name(), encoding, &claims());
        assert!(everything.verify(&token, NOW).is_ok(), "{alg:?}");
        if alg == Algorithm::PS256 {
            assert!(only_ps256.verify(&token, NOW).is_ok());
        } else {
            assert_eq!(
                only_ps256.verify(&token, NOW),
                Err(JwtError::InvalidAlgorithm(alg.name().into())),
                "an algorithm off the list is refused"
            );
        }
    }
    // A PS256 signature presented as RS256 does not verify.
    let input = encode(&json!({"alg": "RS256", "kid": "r1"}), &claims());
    let sig = rsa_sign_with(&signature::RSA_PSS_SHA256, &input);
    assert_eq!(everything.verify(&with_sig(input, &sig), NOW), Err(JwtError::BadSignature));
}

#[test]
fn a_jwk_that_names_its_algorithm_verifies_that_one_only() {
    let jwks = json!({"keys": [rsa_jwk(Some("RS256"))]}).to_string();
    let algs = [Algorithm::RS256, Algorithm::PS256];
    let keys = VerifyingKey::from_jwks(&jwks, &algs).expect("jwks");
    let verifier =
        Verifier::new(Validation::new("https://id.example", "cubby", &algs), keys).expect("keys");
    let rs = rsa_token("RS256", &signature::RSA_PKCS1_SHA256, &claims());
    assert!(verifier.verify(&rs, NOW).is_ok());
    let ps = rsa_token("PS256", &signature::RSA_PSS_SHA256, &claims());
    assert_eq!(verifier.verify(&ps, NOW), Err(JwtError::UnknownKey), "pinned to RS256");
    // Keys for algorithms outside the list, for encryption, or unknown, are skipped.
    let mixed = json!({"keys": [rsa_jwk(Some("RS512")), rsa_jwk(Some("HS256")),
        {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"}, {"kty": "oct", "k": "c2VjcmV0"}]});
    assert!(
        VerifyingKey::from_jwks(&mixed.to_string(), &[Algorithm::RS256]).expect("jwks").is_empty()
    );
}

#[test]
fn es384_token_verifies() {
    let rng = SystemRandom::new();
    let alg = &signature::ECDSA_P384_SHA384_FIXED_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("generate");
    let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("parse");
    let point = pair.public_key().as_ref();
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-384", "kid": "p384",
        "x": URL_SAFE_NO_PAD.encode(&point[1..49]), "y": URL_SAFE_NO_PAD.encode(&point[49..])}]});
    let both = [Algorithm::ES256, Algorithm::ES384];
    let keys = VerifyingKey::from_jwks(&jwks.to_string(), &both).expect("jwks");
    assert_eq!(keys.len(), 1);
    let verifier =
        Verifier::new(Validation::new("https://id.example", "cubby", &both), keys).expect("keys");
    let input = encode(&json!({"alg": "ES384", "kid": "p384"}), &claims());
    let sig = pair.sign(&rng, input.as_bytes()).expect("sign");
    assert!(verifier.verify(&with_sig(input, sig.as_ref()), NOW).is_ok());
    // The P-384 key is not tried for an ES256 token.
    let input = encode(&json!({"alg": "ES256", "kid": "p384"}), &claims());
    assert_eq!(verifier.verify(&with_sig(input, &[0; 64]), NOW), Err(JwtError::UnknownKey));
}

#[test]
fn claim_names_follow_the_issuer_cognito_entra_keycloak() {
    let ed = ed();
    let mut rules = validation(Algorithm::EdDSA);
    rules.claims = ClaimNames {
        audience: "client_id".into(),
        subject: "oid".into(),
        required: vec![
            ("token_use".into(), "access".into()),
            ("realm_access.roles".into(), "user".into()),
        ],
        token_types: vec!["at+jwt".into()],
    };
    let verifier = Verifier::new(rules, ed.verifier.keys().to_vec()).expect("keys");
    let good = json!({"iss": "https://id.example", "client_id": "cubby", "sub": "pairwise",
        "oid": "00000000-0000-0000-0000-0000000000a1", "token_use": "access",
        "realm_access": {"roles": ["user"]}, "exp": NOW + 300});
    let sign = |claims: &Value, typ: Option<&str>| ed.signer.sign_jwt_typed(typ, claims);
    let claims = verifier.verify(&sign(&good, Some("application/AT+JWT")), NOW).expect("valid");
    assert_eq!(claims.sub, "00000000-0000-0000-0000-0000000000a1", "the subject claim is oid");

    assert_eq!(verifier.verify(&sign(&good, None), NOW), Err(JwtError::WrongType(String::new())));
    assert_eq!(
        verifier.verify(&sign(&good, Some("JWT")), NOW),
        Err(JwtError::WrongType("JWT".into())),
        "an ID token's typ"
    );
    let check = |edit: &dyn Fn(&mut Value), want: JwtError| {
        let mut c = good.clone();
        edit(&mut c);
        assert_eq!(verifier.verify(&sign(&c, Some("at+jwt")), NOW), Err(want));
    };
    check(&|c| c["token_use"] = json!("id"), JwtError::WrongClaim("token_use".into()));
    check(
        &|c| c["realm_access"]["roles"] = json!([]),
        JwtError::WrongClaim("realm_access.roles".into()),
    );
    check(&|c| c["client_id"] = json!("other"), JwtError::WrongAudience);
    check(
        &|c| {
            c.as_object_mut().map(|m| m.remove("oid"));
        },
        JwtError::MissingClaim("oid".into()),
    );
}

#[test]
fn a_claim_name_with_dots_is_read_whole_before_as_a_path() {
    let claims = json!({"https://acme.example/roles": ["admin"], "a": {"b": {"c": "deep"}}});
    let map = claims.as_object().expect("object");
    assert_eq!(claim(map, "https://acme.example/roles"), Some(&json!(["admin"])));
    assert_eq!(claim(map, "a.b.c"), Some(&json!("deep")));
    assert_eq!(claim(map, "a.x"), None);
    assert!(claim_has(&json!("read cubby:admin"), "cubby:admin", true));
    assert!(!claim_has(&json!("read cubby:admin"), "cubby:admin", false));
    assert!(claim_has(&json!(["cubby:admin"]), "cubby:admin", false));
}

#[test]
fn a_malformed_key_in_a_key_set_is_skipped_and_the_others_stay() {
    let ed = ed();
    let jwks = json!({"keys": [
        {"kty": "RSA", "kid": "broken", "n": "not base64!", "e": "AQAB"},
        {"kty": "EC", "crv": "P-256", "kid": "half", "x": "AAAA"},
        ed.signer.jwk(),
    ]});
    let algs = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];
    let keys = VerifyingKey::from_jwks(&jwks.to_string(), &algs).expect("jwks");
    assert_eq!(keys.len(), 1, "only the well-formed key");
    let verifier = Verifier::new(validation(Algorithm::EdDSA), keys).expect("keys");
    let token = ed.signer.sign_jwt(&claims());
    assert!(verifier.verify(&token, NOW).is_ok());
}
