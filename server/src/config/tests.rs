use super::*;

#[test]
fn example_configs_parse() {
    for name in ["dev.toml", "prod.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config").join(name);
        let config = ServerConfig::from_file(&path).expect(name);
        assert!(config.limits.max_message_bytes > 0);
        if name == "prod.toml" {
            // Its tenants configure: URLs, keys and algorithms agree.
            let ids = cubby_crypto::keys::Keyring::from_master(
                &cubby_crypto::keys::MasterSecret::from_bytes([1; 32]),
            );
            crate::auth::Authenticator::new(&config, ids, crate::auth::Clock::System)
                .expect("the example's tenants configure");
            assert_eq!(config.metrics.listen, Some("127.0.0.1:9100".parse().expect("addr")));
        }
    }
}

#[test]
fn config_without_master_key_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "listen = \"127.0.0.1:0\"\n").expect("write");
    let err = ServerConfig::from_file(&path).expect_err("no master key");
    assert!(err.0.contains("master_key_file"), "{err}");
}

#[test]
fn durations_are_written_as_people_write_them() {
    let text = "master_key_file = \"k\"\n[limits]\nslow_consumer_secs = \"2m\"\n\
                idle_document_secs = 45\napply_deadline_ms = \"3s\"\n\
                key_reload_secs = \"1d\"\n";
    let config: ServerConfig = toml::from_str(text).expect("parses");
    assert_eq!(config.limits.slow_consumer_secs, 120);
    assert_eq!(config.limits.idle_document_secs, 45);
    assert_eq!(config.limits.apply_deadline_ms, 3_000);
    assert_eq!(config.limits.key_reload_secs, 86_400);
    for bad in ["\"5 parsecs\"", "\"1500ms\"", "\"soon\""] {
        let text = format!("[limits]\nslow_consumer_secs = {bad}\n");
        assert!(toml::from_str::<ServerConfig>(&text).is_err(), "{bad}");
    }
}

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

#[test]
fn the_environment_sets_any_setting_over_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("c.toml");
    let file = "master_key_file = \"k\"\nlisten = \"127.0.0.1:1\"\n\
                [limits]\nmax_message_bytes = 1\n";
    std::fs::write(&path, file).expect("write");
    let vars = env(&[
        ("CUBBY_LISTEN", "127.0.0.1:7000"),
        ("CUBBY_DATA", "/srv/cubby"),
        ("CUBBY_LIMITS_MAX_MESSAGE_BYTES", "8388608"),
        ("CUBBY_LIMITS_SLOW_CONSUMER_SECS", "45s"),
        ("CUBBY_TLS_CERT", "/etc/cubby/cert.pem"),
        ("CUBBY_TLS_KEY", "/etc/cubby/key.pem"),
        ("CUBBY_DEV_TENANT", "true"),
        (
            "CUBBY_TENANTS",
            "[{ name = \"app\", issuer = \"https://id.example\", audience = \"cubby\", \
             algorithm = \"RS256\", jwks_file = \"/etc/jwks.json\" }]",
        ),
        // Another tool's variable, and one that is not Cubby's at all: left alone.
        ("CUBBY_HOME", "/home/someone"),
        ("PATH", "/usr/bin"),
    ]);
    let config = ServerConfig::from_file_and(&path, vars).expect("loads");
    assert_eq!(config.listen, "127.0.0.1:7000".parse().expect("addr"));
    assert_eq!(config.data, PathBuf::from("/srv/cubby"));
    assert_eq!(config.limits.max_message_bytes, 8 << 20);
    assert_eq!(config.limits.slow_consumer_secs, 45);
    assert_eq!(config.tls.cert, Some(PathBuf::from("/etc/cubby/cert.pem")));
    assert!(config.dev_tenant_enabled());
    assert_eq!(config.tenants.len(), 1);
    assert_eq!(config.tenants[0].issuer, "https://id.example");

    let misspelt = env(&[("CUBBY_LIMITS_MAX_MESAGE_BYTES", "1")]);
    let err = ServerConfig::from_file_and(&path, misspelt).expect_err("no such setting");
    assert!(err.0.contains("CUBBY_LIMITS_MAX_MESAGE_BYTES"), "{err}");
    let dev = ServerConfig::dev_and(
        "/tmp/d",
        default_listen(),
        env(&[("CUBBY_LIMITS_MAX_HANDSHAKES", "9"), ("CUBBY_METRICS", "127.0.0.1:9100")]),
    )
    .expect("development defaults");
    assert_eq!(dev.limits.max_handshakes, 9);
    assert_eq!(dev.metrics.listen, Some("127.0.0.1:9100".parse().expect("addr")));
    let long = env(&[("CUBBY_METRICS_LISTEN", "0.0.0.0:9100")]);
    let config = ServerConfig::from_file_and(&path, long).expect("loads");
    assert_eq!(config.metrics.listen, Some("0.0.0.0:9100".parse().expect("addr")));
    assert!(dev.dev_tenant_enabled());
}

#[test]
fn unknown_fields_are_refused() {
    let err = toml::from_str::<ServerConfig>("master_key_file = \"k\"\nlisten_addr = \"x\"\n");
    assert!(err.is_err());
}

/// The README's identity-provider recipes are configurations that load as they are written.
#[test]
fn the_readme_identity_provider_recipes_configure() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("the README");
    let section = readme.split("### Identity providers").nth(1).expect("the section");
    let recipes = section
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a TOML block");
    #[derive(Deserialize)]
    struct Recipes {
        tenants: Vec<TenantConfig>,
    }
    let recipes: Recipes = toml::from_str(recipes).expect("the recipes parse");
    let names: Vec<&str> = recipes.tenants.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["auth0", "okta", "cognito", "firebase", "keycloak", "entra"]);
    let mut config = ServerConfig::dev("/nonexistent", default_listen());
    config.dev_tenant = Some(false);
    config.tenants = recipes.tenants;
    let ids = cubby_crypto::keys::Keyring::from_master(
        &cubby_crypto::keys::MasterSecret::from_bytes([1; 32]),
    );
    crate::auth::Authenticator::new(&config, ids, crate::auth::Clock::System)
        .expect("every recipe configures a tenant");
}

#[test]
fn a_database_url_in_the_environment_stores_in_postgres_and_stays_out_of_logs() {
    let url = "postgresql://cubby:hunter2@db.example:5432/cubby";
    let dev =
        ServerConfig::dev_and("/tmp/d", default_listen(), env(&[("CUBBY_DATABASE_URL", url)]))
            .expect("development defaults");
    assert_eq!(dev.storage.backend().expect("valid"), (Backend::Postgres, Some(url)));
    assert!(!format!("{dev:?}").contains("hunter2"), "the password stays out of Debug");

    let sled = ServerConfig::dev_and("/tmp/d", default_listen(), env(&[])).expect("defaults");
    assert_eq!(sled.storage.backend().expect("valid"), (Backend::Sled, None));
    let chosen = env(&[("CUBBY_STORAGE_BACKEND", "sled"), ("CUBBY_STORAGE_URL", url)]);
    let chosen = ServerConfig::dev_and("/tmp/d", default_listen(), chosen).expect("loads");
    assert_eq!(chosen.storage.backend().expect("valid").0, Backend::Sled);
    let missing = env(&[("CUBBY_STORAGE_BACKEND", "postgres")]);
    let missing = ServerConfig::dev_and("/tmp/d", default_listen(), missing).expect("loads");
    let err = missing.storage.backend().expect_err("postgres needs a URL");
    assert!(err.0.contains("CUBBY_DATABASE_URL"), "{err}");
}

#[test]
fn the_bus_listens_by_default_and_polls_when_told() {
    let dev = ServerConfig::dev_and("/tmp/d", default_listen(), env(&[])).expect("defaults");
    assert_eq!((dev.storage.bus, dev.storage.bus_poll_ms), (BusMode::Listen, 250));
    let told = env(&[("CUBBY_STORAGE_BUS", "poll"), ("CUBBY_STORAGE_BUS_POLL_MS", "100ms")]);
    let told = ServerConfig::dev_and("/tmp/d", default_listen(), told).expect("loads");
    assert_eq!((told.storage.bus, told.storage.bus_poll_ms), (BusMode::Poll, 100));
    let wrong = env(&[("CUBBY_STORAGE_BUS", "carrier-pigeon")]);
    assert!(ServerConfig::dev_and("/tmp/d", default_listen(), wrong).is_err());
}
