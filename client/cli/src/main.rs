//! `cubby`: the Cubby command-line client, for people and scripts.
//!
//! Each invocation is one device: its local store lives in `--home` (`CUBBY_HOME`). Edits are
//! saved locally first and synced when a server is reachable; `sync` and `watch` talk to the
//! server. Errors print one line naming the problem and exit non-zero.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand};
use cubby_client::{Client, ClientError, DocId, StaticToken, StoreError, SyncFailure};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

mod admin;
mod token_command;
mod watch;
use admin::AdminCommand;
use token_command::TokenCommand;

#[derive(Parser)]
#[command(name = "cubby", version, about = "The Cubby command-line client")]
struct Cli {
    /// The server, e.g. https://localhost:7443.
    #[arg(long, env = "CUBBY_SERVER", global = true)]
    server: Option<String>,
    /// An access token from the app's identity provider.
    #[arg(long, env = "CUBBY_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// A shell command that prints a fresh access token (run when one is needed, and again when
    /// the server refuses it or asks for a fresh one): `watch` then outlives a token's expiry.
    #[arg(long, env = "CUBBY_TOKEN_COMMAND", global = true, conflicts_with = "token")]
    token_command: Option<String>,
    /// This device's local data directory [default: ~/.cubby].
    #[arg(long, env = "CUBBY_HOME", global = true)]
    home: Option<PathBuf>,
    /// A PEM certificate to trust (the dev server's self-signed one) instead of the system's
    /// trust store.
    #[arg(long, env = "CUBBY_CA", global = true)]
    ca: Option<PathBuf>,
    /// Seconds to wait for the server before giving up.
    #[arg(long, default_value_t = 30, global = true)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Documents.
    Doc {
        #[command(subcommand)]
        command: DocCommand,
    },
    /// Sync with the server until this device is up to date, then exit.
    Sync,
    /// Stay connected and print each change from another device as one JSON line.
    Watch,
    /// List the customer's devices; `revoke ID` cuts one off and wipes it.
    Devices {
        #[command(subcommand)]
        command: Option<DevicesCommand>,
    },
    /// Download everything the server holds about the customer as a tar archive.
    Export {
        /// Where to write the archive.
        #[arg(long)]
        out: PathBuf,
    },
    /// Show the customer's audit log: every business access, device registration and revocation.
    Audit,
    /// The customer's account.
    Account {
        #[command(subcommand)]
        command: AccountCommand,
    },
    /// The business's admin API: reach a customer's store with a service token (--token or
    /// CUBBY_TOKEN: a token from the tenant's issuer granting its admin scope). Customers are
    /// named by their subject in the identity provider; documents by the ids these commands
    /// print. No local store is used.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// Revoke a device: its streams close, it can never sync again, and it wipes its data.
    Revoke {
        /// The device id (from `cubby devices`).
        id: String,
    },
}

#[derive(Subcommand)]
enum AccountCommand {
    /// Erase the account on the server, and this device's copy. There is no undo.
    Delete {
        /// Confirm: erase everything.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum DocCommand {
    /// Create a document; prints its id.
    Create {
        /// Its title.
        #[arg(long)]
        title: String,
    },
    /// List the documents on this device.
    List,
    /// Set KEY to VALUE (JSON if it parses as JSON, otherwise a string). An object updates the
    /// one there field by field, so only what changed is recorded and others' concurrent edits
    /// of other fields survive. A string replaces the one there whole, and the document keeps
    /// every version in its history: for long text that changes, use --text.
    Put {
        /// The document id.
        id: String,
        /// A key of the document's root.
        key: String,
        /// The value.
        value: String,
        /// Store VALUE as collaborative text: putting it again records only the characters that
        /// changed, and concurrent edits by others elsewhere in it survive (each character
        /// costs some memory when the document is loaded).
        #[arg(long)]
        text: bool,
    },
    /// Print this device's copy of a document as JSON. It is as of this device's last sync
    /// (`--sync` syncs first); a document this device does not have is fetched.
    Get {
        /// The document id.
        id: String,
        /// Sync with the server first, so that the copy printed is the server's latest.
        #[arg(long)]
        sync: bool,
    },
    /// Give a document a new title, on the server and on every device.
    Rename {
        /// The document id.
        id: String,
        /// The new title.
        title: String,
    },
    /// Delete a document for good, on the server and on every device.
    Delete {
        /// The document id.
        id: String,
    },
    /// Make a document private: the business's admin API can then neither read nor change it.
    Private {
        /// The document id.
        id: String,
        /// Make it shared again instead.
        #[arg(long)]
        off: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(runtime) => runtime,
            Err(err) => {
                eprintln!("cubby: cannot start: {err}");
                return ExitCode::FAILURE;
            }
        };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cubby: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the device's local-store key, creating it on first use. A phone keeps this in its
/// keychain; the CLI keeps it in a 0600 file beside the store.
fn local_key(home: &Path) -> anyhow::Result<[u8; 32]> {
    let path = home.join("local.key");
    if !path.exists() {
        std::fs::create_dir_all(home)
            .with_context(|| format!("cannot create {}", home.display()))?;
        cubby_crypto::keys::write_private_file(&path, &cubby_crypto::random_array::<32>())
            .with_context(|| format!("cannot create {}", path.display()))?;
    }
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    bytes.try_into().map_err(|_| anyhow!("{} is not a 32-byte key", path.display()))
}

async fn open(cli: &Cli) -> anyhow::Result<Client> {
    let home = match &cli.home {
        Some(home) => home.clone(),
        None => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".cubby"))
            .ok_or_else(|| anyhow!("set --home or CUBBY_HOME"))?,
    };
    let mut builder = Client::builder()
        .with_data_dir(&home)
        .with_local_key(local_key(&home)?)
        .with_device_name(format!("cubby CLI ({})", home.display()))
        .with_autosync(false);
    if let Some(server) = &cli.server {
        builder = match (&cli.token, &cli.token_command) {
            (_, Some(command)) => builder.with_token_provider(TokenCommand::new(command)),
            (Some(token), None) => builder.with_token_provider(StaticToken::new(token.clone())),
            (None, None) => bail!(
                "a server needs a token: set --token or CUBBY_TOKEN, or --token-command or \
                 CUBBY_TOKEN_COMMAND"
            ),
        };
        builder = builder.with_server(server);
        if let Some(ca) = &cli.ca {
            let pem = std::fs::read(ca)
                .with_context(|| format!("cannot read CA certificate {}", ca.display()))?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                bail!(
                    "the CA certificate file {} (--ca or CUBBY_CA) has no PEM certificate in it: \
                     give the server's certificate (the server prints its path at start)",
                    ca.display()
                );
            }
            builder = builder.with_ca_pem(pem);
        }
    }
    builder.build().await.map_err(|err| match err {
        ClientError::Store(StoreError::InUse) => {
            anyhow!("the local store in {} is in use by another cubby process", home.display())
        }
        ClientError::Store(e) => anyhow!("cannot open the local store in {}: {e}", home.display()),
        other => anyhow!(other),
    })
}

/// Syncs until up to date. With a token command, a refused token is not the end: the engine
/// reconnects at once with a fresh one from the command, and this waits for that attempt too.
async fn sync(cli: &Cli, client: &Client) -> Result<(), SyncFailure> {
    let attempts = async {
        let mut refreshed = false;
        loop {
            match client.wait_until_synced().await {
                Err(SyncFailure::Unauthenticated(_))
                    if cli.token_command.is_some() && !refreshed =>
                {
                    refreshed = true;
                    // The refusal is the status until the engine's next attempt starts.
                    let mut status = client.status();
                    let _ = status
                        .wait_for(|s| !matches!(s, cubby_client::SyncStatus::Offline { .. }))
                        .await;
                }
                done => return done,
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(cli.timeout), attempts).await {
        Ok(result) => result,
        Err(_) => Err(SyncFailure::Unreachable(format!("not up to date after {} s", cli.timeout))),
    }
}

/// After a local edit: push it if a server is configured. An unreachable server is fine (the
/// edit is saved and syncs later); a refused token, or a server this client is not set up to
/// use (its certificate not trusted, `http://` for TLS), is an error.
async fn push(cli: &Cli, client: &Client) -> anyhow::Result<()> {
    if cli.server.is_none() {
        return Ok(());
    }
    match sync(cli, client).await {
        Ok(()) => Ok(()),
        Err(SyncFailure::Unreachable(why)) => {
            eprintln!(
                "cubby: saved on this device; not synced yet (server unreachable: {why}); run `cubby sync` later"
            );
            Ok(())
        }
        Err(failure) => bail!("saved on this device, but sync failed: {failure}"),
    }
}

fn parse_id(text: &str) -> anyhow::Result<DocId> {
    text.parse().map_err(|_| anyhow!("{text:?} is not a document id"))
}

fn parse_value(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_owned()))
}

async fn open_doc(
    cli: &Cli,
    client: &Client,
    id: DocId,
) -> anyhow::Result<cubby_client::DocHandle> {
    match client.open(id).await {
        Ok(doc) => Ok(doc),
        Err(ClientError::UnknownDocument(_)) if cli.server.is_some() => {
            // Maybe another device created it: sync, then look again.
            sync(cli, client).await.map_err(|f| anyhow!("sync failed: {f}"))?;
            client.open(id).await.map_err(|_| anyhow!("unknown document {id}"))
        }
        Err(ClientError::UnknownDocument(_)) => bail!("unknown document {id}"),
        Err(err) => Err(err.into()),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Admin { command } = &cli.command {
        return admin::run(&cli, command).await;
    }
    let client = open(&cli).await?;
    let result = command(&cli, &client).await;
    client.shutdown().await;
    result
}

async fn command(cli: &Cli, client: &Client) -> anyhow::Result<()> {
    match &cli.command {
        Command::Doc { command: DocCommand::Create { title } } => {
            let doc = client.create(title).await?;
            println!("{}", doc.id());
            push(cli, client).await
        }
        Command::Doc { command: DocCommand::List } => {
            for (id, meta) in client.list().await? {
                println!("{id}\t{}", meta.title);
            }
            Ok(())
        }
        Command::Doc { command: DocCommand::Put { id, key, value, text } } => {
            let doc = open_doc(cli, client, parse_id(id)?).await?;
            if *text {
                doc.put_text(key, value).await?;
            } else {
                doc.put(key, parse_value(value)).await?;
            }
            push(cli, client).await
        }
        Command::Doc { command: DocCommand::Get { id, sync: first } } => {
            if *first {
                sync(cli, client).await.map_err(|f| anyhow!("sync failed: {f}"))?;
            }
            let doc = open_doc(cli, client, parse_id(id)?).await?;
            println!("{}", serde_json::to_string_pretty(&doc.to_json())?);
            if !*first {
                let changed = when(doc.meta().updated_ms);
                eprintln!(
                    "this device's copy, last changed {changed}: it may miss edits made \
                     elsewhere since its last sync (--sync gets them first)"
                );
            }
            Ok(())
        }
        Command::Sync => {
            if cli.server.is_none() {
                bail!("no server configured: set --server or CUBBY_SERVER");
            }
            let synced = sync(cli, client).await;
            // Offline edits that lost to a deletion elsewhere: said, never dropped silently.
            let discarded = client.take_discarded().await?;
            for lost in &discarded {
                eprintln!(
                    "cubby: document {} ({:?}) was deleted elsewhere; this device's unsynced changes to it were discarded",
                    lost.id, lost.title
                );
            }
            synced.map_err(|f| anyhow!("sync failed: {f}"))?;
            let docs = client.list().await?.len();
            if !discarded.is_empty() {
                bail!(
                    "up to date ({}), but changes to {} were discarded",
                    count(docs, "document"),
                    count(discarded.len(), "deleted document")
                );
            }
            println!("up to date ({})", count(docs, "document"));
            Ok(())
        }
        Command::Watch => {
            if cli.server.is_none() {
                bail!("no server configured: set --server or CUBBY_SERVER");
            }
            watch::watch(client).await
        }
        Command::Doc { command: DocCommand::Rename { id, title } } => {
            let meta = client.rename(parse_id(id)?, title).await?;
            println!("{id}\t{}", meta.title);
            Ok(())
        }
        Command::Doc { command: DocCommand::Delete { id } } => {
            client.delete(parse_id(id)?).await?;
            println!("{id}\tdeleted");
            Ok(())
        }
        Command::Doc { command: DocCommand::Private { id, off } } => {
            let meta = client.set_private(parse_id(id)?, !off).await?;
            println!("{id}\t{}", if meta.private { "private" } else { "shared" });
            Ok(())
        }
        Command::Devices { command: None } => {
            for d in client.devices().await? {
                let state = match d.revoked_ms {
                    Some(at) => format!("revoked {}", when(at)),
                    None => format!("last seen {}", when(d.last_seen_ms)),
                };
                let this = if d.this_device { "\t(this device)" } else { "" };
                println!("{}\t{}\t{}\t{state}{this}", d.id, d.name, d.platform);
            }
            Ok(())
        }
        Command::Devices { command: Some(DevicesCommand::Revoke { id }) } => {
            let id = id.parse().map_err(|_| anyhow!("{id:?} is not a device id"))?;
            let device = client.revoke_device(id).await?;
            println!("revoked {}\t{}", device.id, device.name);
            Ok(())
        }
        Command::Export { out } => {
            let file = tokio::fs::File::create(out)
                .await
                .with_context(|| format!("cannot create {}", out.display()))?;
            let size = client.export(tokio::io::BufWriter::new(file)).await?;
            println!("exported {size} bytes to {}", out.display());
            Ok(())
        }
        Command::Audit => {
            for e in client.audit().await? {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    when(e.at_ms),
                    e.actor,
                    e.action,
                    e.target,
                    e.outcome
                );
            }
            Ok(())
        }
        Command::Admin { .. } => unreachable!("admin commands use no local store"),
        Command::Account { command: AccountCommand::Delete { yes } } => {
            if !yes {
                bail!(
                    "this erases the account and every device's copy for good; add --yes to confirm"
                );
            }
            let r = client.delete_account().await?;
            println!(
                "erased: {} documents ({} bytes), {} devices, {} audit entries; this device's copy is wiped",
                r.documents, r.bytes, r.devices, r.audit_entries
            );
            Ok(())
        }
    }
}

/// A time the server recorded, as RFC 3339 in UTC (`2026-12-07T13:34:22Z`).
fn when(ms: u64) -> String {
    let at =
        i64::try_from(ms / 1000).ok().and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok());
    at.and_then(|at| at.format(&Rfc3339).ok()).unwrap_or_else(|| format!("{ms} ms after 1970"))
}

/// `n` and `noun`, plural unless one.
pub(crate) fn count(n: usize, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
}
