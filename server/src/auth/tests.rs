use super::*;
use cubby_crypto::keys::MasterSecret;
use serde_json::json;

const ISSUER: &str = "https://idp.example";

fn signer() -> TokenSigner {
    TokenSigner::from_pkcs8(&generate_pkcs8()).expect("a fresh key pair")
}

fn publish(path: &Path, signers: &[&TokenSigner]) {
    let keys: Vec<_> = signers.iter().map(|s| s.jwk()).collect();
    std::fs::write(path, json!({ "keys": keys }).to_string()).expect("write JWKS");
}

fn token(signer: &TokenSigner) -> String {
    let now = now();
    signer.sign_jwt(&json!({
        "iss": ISSUER, "aud": "cubby", "sub": "alice", "nbf": now, "exp": now + 600,
    }))
}

fn authenticator(jwks: &Path) -> Authenticator {
    authenticator_with(jwks, "")
}

/// An authenticator for tenant `acme`, its keys in `jwks`, with more of its settings.
fn authenticator_with(jwks: &Path, settings: &str) -> Authenticator {
    let data = jwks.parent().expect("a directory");
    let mut config = ServerConfig::dev(data, "127.0.0.1:0".parse().expect("address"));
    config.dev_tenant = Some(false);
    let tenant = format!(
        "name = 'acme'\nissuer = '{ISSUER}'\naudience = 'cubby'\nalgorithms = ['EdDSA']\n\
         jwks_file = '{}'\n{settings}",
        jwks.display()
    );
    config.tenants.push(toml::from_str(&tenant).expect("a tenant"));
    Authenticator::new(
        &config,
        Keyring::from_master(&MasterSecret::from_bytes([1; 32])),
        Clock::System,
    )
    .expect("the tenant configures")
}

fn reads(auth: &Authenticator) -> u64 {
    auth.tenants[0].keys.loads.load(std::sync::atomic::Ordering::Relaxed)
}

fn refused(result: Result<Caller, ApiError>) -> bool {
    matches!(result, Err(ApiError::Unauthenticated(_)))
}

#[tokio::test]
async fn row_17_a_flood_of_unknown_key_ids_reads_the_jwks_at_most_once_a_minute() {
    let dir = tempfile::tempdir().expect("temp dir");
    let jwks = dir.path().join("jwks.json");
    let (idp, rogue) = (signer(), signer());
    publish(&jwks, &[&idp]);
    let auth = authenticator(&jwks);
    let (start, forged) = (Instant::now(), token(&rogue));
    for i in 0..10_000 {
        let at = start + Duration::from_millis(i * 5); // 50 s of flood
        assert!(refused(auth.verify_at(&forged, now(), at).await), "unknown key accepted");
    }
    assert_eq!(reads(&auth), 1, "one read of the JWKS for 10,000 unknown key ids in 50 s");
    assert!(refused(auth.verify_at(&forged, now(), start + Duration::from_secs(61)).await));
    assert_eq!(reads(&auth), 2, "and one more a minute later");
    assert!(auth.verify_at(&token(&idp), now(), start).await.is_ok(), "real tokens still verify");
}

#[tokio::test]
async fn row_18_jwks_unreadable_during_a_key_rotation_keeps_cached_keys_and_fails_new_ones_closed()
{
    let dir = tempfile::tempdir().expect("temp dir");
    let jwks = dir.path().join("jwks.json");
    let (old, new) = (signer(), signer());
    publish(&jwks, &[&old]);
    let auth = authenticator(&jwks);
    let start = Instant::now();

    // The IdP starts signing with a new key while its key set cannot be had: gone, then
    // garbage.
    std::fs::remove_file(&jwks).expect("remove");
    assert!(refused(auth.verify_at(&token(&new), now(), start).await));
    assert!(auth.verify_at(&token(&old), now(), start).await.is_ok(), "cached keys keep working");
    std::fs::write(&jwks, "{ not json").expect("write");
    let later = start + Duration::from_secs(61);
    assert!(refused(auth.verify_at(&token(&new), now(), later).await));
    assert!(auth.verify_at(&token(&old), now(), later).await.is_ok());

    // The key set is back, with both keys: the new one verifies at the next allowed read.
    publish(&jwks, &[&old, &new]);
    let again = later + Duration::from_secs(60);
    assert!(
        auth.verify_at(&token(&new), now(), again).await.is_ok(),
        "the rotated key is picked up"
    );
    assert!(auth.verify_at(&token(&old), now(), again).await.is_ok());
    assert_eq!(reads(&auth), 3);
}

#[tokio::test]
async fn a_refused_token_says_which_issuer_or_key_to_configure() {
    let dir = tempfile::tempdir().expect("temp dir");
    let jwks = dir.path().join("jwks.json");
    let (idp, rogue) = (signer(), signer());
    publish(&jwks, &[&idp]);
    let auth = authenticator(&jwks);
    let message = |result: Result<Caller, ApiError>| match result {
        Err(ApiError::Unauthenticated(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    };

    let now = now();
    let elsewhere = idp.sign_jwt(&json!({
        "iss": "https://other.example", "aud": "cubby", "sub": "alice", "exp": now + 600,
    }));
    let m = message(auth.verify(&elsewhere).await);
    assert!(m.contains("\"https://other.example\"") && m.contains("issuer"), "{m}");

    let m = message(auth.verify(&token(&rogue)).await);
    assert!(m.contains("\"acme\"") && m.contains("kid"), "{m}");
    assert!(!m.contains("alice"), "the subject is not echoed: {m}");
}

#[tokio::test]
async fn where_the_audience_subject_and_admin_permission_are_is_the_tenants_choice() {
    let dir = tempfile::tempdir().expect("temp dir");
    let jwks = dir.path().join("jwks.json");
    let idp = signer();
    publish(&jwks, &[&idp]);
    let now = now();
    let sign = |claims: serde_json::Value| {
        let mut all = json!({ "iss": ISSUER, "exp": now + 600 });
        all.as_object_mut()
            .expect("an object")
            .extend(claims.as_object().cloned().unwrap_or_default());
        idp.sign_jwt(&all)
    };

    // Cognito access tokens: the app is in `client_id`, no `aud`, `token_use` says access.
    let cognito = authenticator_with(
        &jwks,
        "audience_claim = 'client_id'\nrequired_claims = { token_use = 'access' }\n\
         admin_claim = 'cognito:groups'\nadmin_scope = 'cubby-admins'",
    );
    let access = sign(json!({ "client_id": "cubby", "sub": "u1", "token_use": "access" }));
    let caller = cognito.verify(&access).await.expect("a Cognito access token");
    assert!(!caller.admin);
    let id_token = sign(json!({ "aud": "cubby", "sub": "u1", "token_use": "id" }));
    assert!(refused(cognito.verify(&id_token).await), "an ID token is not an access token");
    let admin = sign(json!({ "client_id": "cubby", "sub": "svc", "token_use": "access",
        "cognito:groups": ["staff", "cubby-admins"] }));
    assert!(cognito.verify(&admin).await.expect("a group member").admin);

    // Entra ID app tokens: the permission in `roles`, the customer in `oid`.
    let entra = authenticator_with(&jwks, "subject_claim = 'oid'\nadmin_claim = 'roles'");
    let app = sign(json!({ "aud": "cubby", "sub": "pairwise", "oid": "object-1",
        "roles": ["cubby:admin"], "scope": "nothing" }));
    let caller = entra.verify(&app).await.expect("an Entra app token");
    assert!(caller.admin && caller.subject == "object-1");
    assert_eq!(caller.customer, entra.customer_id("acme", "object-1"));
    let scoped = sign(json!({ "aud": "cubby", "oid": "o", "scope": "cubby:admin" }));
    assert!(!entra.verify(&scoped).await.expect("a token").admin, "only `roles` counts");

    // The default: `scope` (space-separated) or `scp` (a list, as Okta writes it).
    let plain = authenticator(&jwks);
    let okta = sign(json!({ "aud": "cubby", "sub": "svc", "scp": ["openid", "cubby:admin"] }));
    assert!(plain.verify(&okta).await.expect("a token").admin);
    let auth0 = sign(json!({ "aud": ["cubby", "x"], "sub": "svc", "scope": "a cubby:admin" }));
    assert!(plain.verify(&auth0).await.expect("a token").admin);
    // Auth0 without RBAC: a customer's app may ask for the scope; only the backend's
    // client-credentials tokens carry `gty`.
    let auth0 = authenticator_with(&jwks, "admin_required_claims = { gty = 'client-credentials' }");
    let asked = sign(json!({ "aud": "cubby", "sub": "user", "scope": "cubby:admin" }));
    assert!(!auth0.verify(&asked).await.expect("a customer token").admin);
    let backend = sign(json!({ "aud": "cubby", "sub": "app@clients", "scope": "cubby:admin",
        "gty": "client-credentials" }));
    assert!(auth0.verify(&backend).await.expect("a service token").admin);
    let no_sub = sign(json!({ "aud": "cubby" }));
    assert!(refused(plain.verify(&no_sub).await), "a token without a subject is refused");
}
