//! Criterion benchmarks of what a tenant's identity provider costs the server: verifying one
//! token per signature algorithm, and taking in a fetched key set (parsing the JWKS and building
//! the verifier that is swapped in). `cargo bench -p cubby-bench --bench tokens`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use criterion::{Criterion, criterion_group, criterion_main};
use cubby_crypto::jwt::{Algorithm, Validation, Verifier, VerifyingKey};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};

/// The 2048-bit RSA key of the crypto crate's tests (ring cannot generate RSA keys).
const RSA_PKCS8: &[u8] = include_bytes!("../../crates/crypto/src/jwt/test-rsa.pk8");

const NOW: u64 = 1_800_000_000;

/// Signs a token's signing input.
type Sign = Box<dyn Fn(&[u8]) -> Vec<u8>>;

/// A signer for one algorithm: its public JWK and a function signing bytes.
struct Signer {
    alg: Algorithm,
    jwk: Value,
    sign: Sign,
}

fn rsa(alg: Algorithm, encoding: &'static dyn signature::RsaEncoding, kid: &str) -> Signer {
    let pair = RsaKeyPair::from_pkcs8(RSA_PKCS8).expect("fixture key");
    let public: signature::RsaPublicKeyComponents<Vec<u8>> = pair.public().into();
    let jwk = json!({ "kty": "RSA", "kid": kid, "use": "sig",
        "n": URL_SAFE_NO_PAD.encode(&public.n), "e": URL_SAFE_NO_PAD.encode(&public.e) });
    let sign = Box::new(move |input: &[u8]| {
        let mut sig = vec![0; pair.public().modulus_len()];
        pair.sign(encoding, &SystemRandom::new(), input, &mut sig).expect("signs");
        sig
    });
    Signer { alg, jwk, sign }
}

fn ecdsa(alg: Algorithm, kid: &str) -> Signer {
    let (signing, crv, half) = match alg {
        Algorithm::ES256 => (&signature::ECDSA_P256_SHA256_FIXED_SIGNING, "P-256", 32),
        _ => (&signature::ECDSA_P384_SHA384_FIXED_SIGNING, "P-384", 48),
    };
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(signing, &rng).expect("key");
    let pair = EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref(), &rng).expect("key");
    let point = pair.public_key().as_ref(); // 0x04 ‖ x ‖ y
    let jwk = json!({ "kty": "EC", "crv": crv, "kid": kid, "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(&point[1..=half]),
        "y": URL_SAFE_NO_PAD.encode(&point[1 + half..]) });
    let sign = Box::new(move |input: &[u8]| {
        pair.sign(&SystemRandom::new(), input).expect("signs").as_ref().to_vec()
    });
    Signer { alg, jwk, sign }
}

fn eddsa(kid: &str) -> Signer {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key");
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
    let jwk = json!({ "kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()) });
    let sign = Box::new(move |input: &[u8]| pair.sign(input).as_ref().to_vec());
    Signer { alg: Algorithm::EdDSA, jwk, sign }
}

fn signers() -> Vec<Signer> {
    vec![
        rsa(Algorithm::RS256, &signature::RSA_PKCS1_SHA256, "rs256"),
        rsa(Algorithm::RS384, &signature::RSA_PKCS1_SHA384, "rs384"),
        rsa(Algorithm::RS512, &signature::RSA_PKCS1_SHA512, "rs512"),
        rsa(Algorithm::PS256, &signature::RSA_PSS_SHA256, "ps256"),
        rsa(Algorithm::PS384, &signature::RSA_PSS_SHA384, "ps384"),
        rsa(Algorithm::PS512, &signature::RSA_PSS_SHA512, "ps512"),
        ecdsa(Algorithm::ES256, "es256"),
        ecdsa(Algorithm::ES384, "es384"),
        eddsa("eddsa"),
    ]
}

fn token(signer: &Signer) -> String {
    let header = json!({ "alg": signer.alg.name(), "typ": "at+jwt", "kid": signer.jwk["kid"] });
    let claims = json!({ "iss": "https://id.example", "aud": "cubby", "sub": "alice",
        "iat": NOW, "exp": NOW + 300, "scope": "openid cubby:admin" });
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = (signer.sign)(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// Verifying one token, by algorithm, against a key set holding every algorithm's key.
fn verify(c: &mut Criterion) {
    let signers = signers();
    let jwks = json!({ "keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>() });
    let keys = VerifyingKey::from_jwks(&jwks.to_string(), &Algorithm::ALL).expect("keys");
    let verifier =
        Verifier::new(Validation::new("https://id.example", "cubby", &Algorithm::ALL), keys)
            .expect("verifier");
    for signer in &signers {
        let token = token(signer);
        verifier.verify(&token, NOW).expect("the token verifies");
        c.bench_function(&format!("jwt_verify/{}", signer.alg.name()), |b| {
            b.iter(|| verifier.verify(std::hint::black_box(&token), NOW).expect("verifies"));
        });
    }
}

/// Taking in a fetched key set: parse the JWKS and build the verifier. A typical IdP publishes
/// two or three keys; Google publishes about as many.
fn jwks_refresh(c: &mut Criterion) {
    for n in [2usize, 8] {
        let keys: Vec<Value> = (0..n)
            .map(|i| {
                let alg = if i % 2 == 0 { Algorithm::RS256 } else { Algorithm::ES256 };
                match alg {
                    Algorithm::RS256 => {
                        rsa(alg, &signature::RSA_PKCS1_SHA256, &format!("k{i}")).jwk
                    }
                    _ => ecdsa(alg, &format!("k{i}")).jwk,
                }
            })
            .collect();
        let text = json!({ "keys": keys }).to_string();
        let algorithms = [Algorithm::RS256, Algorithm::ES256];
        c.bench_function(&format!("jwks_refresh/parse_and_install_{n}_keys"), |b| {
            b.iter(|| {
                let keys = VerifyingKey::from_jwks(std::hint::black_box(&text), &algorithms)
                    .expect("parses");
                Verifier::new(Validation::new("https://id.example", "cubby", &algorithms), keys)
                    .expect("installs")
            });
        });
    }
}

criterion_group!(benches, verify, jwks_refresh);
criterion_main!(benches);
