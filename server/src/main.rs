//! `cubby-server`: run the server, mint development tokens, create and rotate master keys.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cubby_crypto::keys::{KeyFileError, Keyring, MasterSecret};
use cubby_server::{ServerConfig, auth};

#[derive(Parser)]
#[command(name = "cubby-server", version, about = "The Cubby sync server")]
struct Cli {
    /// Data directory (database, generated certificate and keys), over the config file's.
    /// Default ./cubby-data.
    #[arg(long, env = "CUBBY_DATA", global = true)]
    data: Option<PathBuf>,
    /// Address to listen on (overrides the config file).
    #[arg(long, env = "CUBBY_LISTEN")]
    listen: Option<SocketAddr>,
    /// Serve Prometheus metrics at http://ADDR/metrics (over the config file's
    /// `[metrics] listen`; also CUBBY_METRICS).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Log lines as `text` for people or `json` (one object per line) for log collectors. The
    /// level is set with RUST_LOG (default `info`).
    #[arg(long, env = "CUBBY_LOG_FORMAT", global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// A TOML config file (see server/config/prod.toml). Without one: development mode. Every
    /// setting can also be given in the environment, over the file: CUBBY_ and its path in
    /// capitals (CUBBY_LIMITS_MAX_MESSAGE_BYTES=8388608, CUBBY_TLS_CERT=/etc/cubby/cert.pem).
    #[arg(long, env = "CUBBY_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Print a token for the development tenant.
    DevToken {
        /// The customer (token subject), or with --admin the business service.
        #[arg(long)]
        customer: String,
        /// A service token for the admin API (scope `cubby:admin`) instead of a customer token.
        #[arg(long)]
        admin: bool,
        /// Lifetime, e.g. 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Master keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Write a backup of the store to a file, while the server runs (or with it stopped).
    ///
    /// Consistent: it holds every change the server acknowledged before it began. Sealed as the
    /// store is: unreadable without the master key, which it does not hold (back that up
    /// separately). Put it back with `cubby-server restore --from FILE`.
    Backup {
        /// The archive to write (a tar file).
        #[arg(long)]
        out: PathBuf,
    },
    /// Accept the store as it is (restored from a backup, or damaged) and start a new epoch.
    ///
    /// Run with the server stopped, after the server refused to start because its store holds
    /// less than it acknowledged. Devices that connect afterwards offer back everything they
    /// hold, so every change any of them still has returns. Erasures and revocations made since
    /// the backup stay in force.
    Restore {
        /// First replace the store (`<data>/db`) with this backup: a file `cubby-server backup`
        /// wrote, or a copy of `<data>/db` taken with the server stopped. The witness
        /// directory is kept.
        #[arg(long)]
        from: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a new master key file (mode 0600). Back it up: without it the data is unreadable.
    Create {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Add a new key-encryption key to the master key file (the one --config names, or the
    /// data directory's). A running server re-wraps every data key with it in the background.
    Rotate,
    /// Retire a key-encryption key generation once no data key is wrapped with it; its material
    /// is deleted from the master key file.
    Retire {
        /// The generation, e.g. 1.
        generation: u32,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 =
        number.parse().map_err(|_| format!("{text:?} is not a duration like 30m or 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{text:?}: unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        // Each line carries its spans' fields: the call, its request id, the customer.
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(false).init(),
        LogFormat::Text => logs.init(),
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cubby-server: {err:#}");
            exit_code(&err)
        }
    }
}

/// Exits 78 (`EX_CONFIG`) when only an operator can fix it (the configuration, the master key,
/// a store that cannot be vouched for): a supervisor should not start it again. Anything else
/// (a port in use, a store locked by a process still stopping) exits 1 and may be retried.
fn exit_code(err: &anyhow::Error) -> ExitCode {
    use cubby_server::{ConfigError, StartError};
    let needs_operator = match err.downcast_ref::<StartError>() {
        Some(StartError::Listen { .. } | StartError::Store { .. }) => false,
        Some(_) => true,
        None => {
            err.downcast_ref::<ConfigError>().is_some()
                || err.downcast_ref::<KeyFileError>().is_some()
        }
    };
    if needs_operator { ExitCode::from(78) } else { ExitCode::FAILURE }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::DevToken { ref customer, admin, ttl }) => {
            let signer = auth::dev_signer(&config(&cli)?.data, false)?;
            let token = if admin {
                auth::dev_service_token(&signer, customer, ttl)
            } else {
                auth::dev_token(&signer, customer, ttl)
            };
            println!("{token}");
            Ok(())
        }
        Some(Command::Keys { command: KeysCommand::Create { out } }) => {
            MasterSecret::create(&out)?;
            println!("created master key {}", out.display());
            Ok(())
        }
        Some(Command::Keys { command: KeysCommand::Rotate }) => {
            let path = cubby_server::master_key_path(&config(&cli)?);
            let generation = MasterSecret::rotate(&path)?;
            println!(
                "added key-encryption key {generation} to {}; a running server re-wraps every \
                 data key with it",
                path.display()
            );
            Ok(())
        }
        Some(Command::Keys { command: KeysCommand::Retire { generation } }) => {
            let config = config(&cli)?;
            let path = cubby_server::master_key_path(&config);
            MasterSecret::retire(&path, generation, |generation| {
                let keys = cubby_server::wrapped_keys(&config).map_err(|e| KeyFileError::Io {
                    path: cubby_server::store_path(&config),
                    source: std::io::Error::other(e),
                })?;
                Ok(keys.iter().filter(|k| Keyring::generation_of(k) == Some(generation)).count())
            })?;
            println!("retired key-encryption key {generation} in {}", path.display());
            Ok(())
        }
        Some(Command::Backup { ref out }) => {
            let config = config(&cli)?;
            embedded_only(&config, "backup")?;
            let manifest = backup(&config, out)?;
            println!(
                "wrote a backup of the store to {} ({} bytes of records, {} flushes); keep the \
                 master key apart from it. Restore with: cubby-server restore --from {0}",
                out.display(),
                manifest.bytes,
                manifest.flushes
            );
            Ok(())
        }
        Some(Command::Restore { ref from }) => {
            let config = config(&cli)?;
            let restored = cubby_server::restore(&config, from.as_deref())?;
            if restored.store.as_os_str().is_empty() {
                println!(
                    "accepted the PostgreSQL database (customers: {}) and started a new epoch: \
                     devices that connect now offer back everything they hold. Start the nodes \
                     as usual.",
                    restored.customers
                );
                return Ok(());
            }
            if let Some(from) = &restored.from {
                println!(
                    "copied the store from {} into {}",
                    from.display(),
                    restored.store.display()
                );
            }
            println!(
                "accepted the store in {} ({} flushes, customers: {}) and started a new epoch: \
                 devices that connect now offer back everything they hold; erasures and \
                 revocations recorded since stay in force. Start the server as usual.",
                restored.store.display(),
                restored.flushes,
                restored.customers
            );
            Ok(())
        }
        None => {
            let config = config(&cli)?;
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            runtime.block_on(serve(config))
        }
    }
}

/// Writes a backup to `out`: through the running server's control socket, or from the store
/// itself when no server runs. Written beside `out` first and checked whole, then renamed.
/// Refuses a command that works on the embedded store's files when the store is PostgreSQL.
fn embedded_only(config: &ServerConfig, command: &str) -> anyhow::Result<()> {
    if config.storage.backend()?.0 == cubby_server::config::Backend::Postgres {
        anyhow::bail!(
            "`cubby-server {command}` works on the embedded store, and this server stores in \
             PostgreSQL: back that up with pg_dump or point-in-time recovery, with the master key \
             kept apart"
        );
    }
    Ok(())
}

fn backup(
    config: &ServerConfig,
    out: &std::path::Path,
) -> anyhow::Result<cubby_server::backup::Manifest> {
    use cubby_server::backup;
    let partial = out.with_extension("partial");
    let file = std::fs::File::create(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let mut writer = std::io::BufWriter::new(file);
    #[cfg(unix)]
    let asked =
        backup::request(&config.data, &mut writer).context("the running server's backup failed")?;
    #[cfg(not(unix))]
    let asked = None;
    let manifest = match asked {
        Some(manifest) => manifest,
        None => backup::offline(config, &mut writer).map_err(|e| {
            anyhow::anyhow!(
                "no server answers on {} and the store cannot be opened: {e}",
                backup::socket_path(&config.data).display()
            )
        })?,
    };
    let file = writer.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    backup::check(&partial).with_context(|| {
        format!("the backup in {} is not whole; it was left there", partial.display())
    })?;
    std::fs::rename(&partial, out)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), out.display()))?;
    Ok(manifest)
}

/// The settings: the config file (or development defaults), the environment over it, and the
/// flags over both.
fn config(cli: &Cli) -> anyhow::Result<ServerConfig> {
    let mut config = match &cli.config {
        Some(path) => ServerConfig::from_file(path)?,
        None => ServerConfig::dev_from_env(
            PathBuf::from("./cubby-data"),
            SocketAddr::from(([127, 0, 0, 1], 7443)),
        )?,
    };
    if let Some(data) = &cli.data {
        config.data.clone_from(data);
    }
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    if let Some(metrics) = cli.metrics {
        config.metrics.listen = Some(metrics);
    }
    Ok(config)
}

/// Ctrl-C or SIGTERM (what systemd and container runtimes send).
async fn wait_for_stop_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot listen for SIGTERM")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("cannot wait for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.context("cannot wait for Ctrl-C")?;
    Ok(())
}

/// Prints a status line. Never fails: a closed stdout (a pipe whose reader left) must not take
/// the server down.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

async fn serve(config: ServerConfig) -> anyhow::Result<()> {
    let dev = config.dev_tenant_enabled();
    let data = config.data.clone();
    let mut tenants: Vec<String> =
        config.tenants.iter().map(|t| format!("{} ({})", t.name, t.issuer)).collect();
    if dev {
        tenants.push("development".into());
    }
    let server = cubby_server::start(config).await?;
    let scheme = if server.cert().is_some() { "https" } else { "http" };
    say!("cubby-server listening on {scheme}://{}", server.local_addr());
    say!("data: {}", data.display());
    say!("tenants: {}", if tenants.is_empty() { "none".into() } else { tenants.join(", ") });
    match server.cert() {
        Some(cert) if cert.self_signed => {
            say!("self-signed TLS certificate: {} (clients: CUBBY_CA={0})", cert.cert.display())
        }
        Some(cert) => say!("TLS certificate: {}", cert.cert.display()),
        None => {}
    }
    if let Some(addr) = server.metrics_addr() {
        say!("metrics: http://{addr}/metrics");
    }
    if let Some(path) = server.master_key_created() {
        say!(
            "created master key {} (back it up; without it the data is unreadable)",
            path.display()
        );
    }
    if dev {
        say!(
            "development tenant on: cubby-server dev-token --data {} --customer alice",
            data.display()
        );
    }
    wait_for_stop_signal().await?;
    say!("shutting down");
    server.shutdown().await;
    Ok(())
}
