//! `cubby admin`: the business's Admin API, with a service token, ids in base58.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Subcommand;
use cubby_client::{ClientError, StaticToken};

use crate::{Cli, parse_id, parse_value, when};

#[derive(Subcommand)]
pub(crate) enum AdminCommand {
    /// List the customers who have used Cubby: subject, documents, bytes, devices, last seen.
    Customers,
    /// List a customer's documents (private ones are not shown): id, title, bytes, updated.
    Docs {
        /// The customer's subject.
        subject: String,
    },
    /// Create a document in a customer's store; prints its id.
    Create {
        /// The customer's subject.
        subject: String,
        /// Its title.
        #[arg(long)]
        title: String,
    },
    /// Print a customer's document as JSON.
    Read {
        /// The customer's subject.
        subject: String,
        /// The document id (from `cubby admin docs`).
        id: String,
    },
    /// Change a customer's document as one change (all edits or none); prints it after.
    /// Paths are JSON Pointers (`/settings/theme`, `/items/0`); values are JSON, or text.
    /// Edits apply in this order: every --set, every --insert, every --delete.
    Change {
        /// The customer's subject.
        subject: String,
        /// The document id.
        id: String,
        /// Set PATH to VALUE (missing parent maps are created).
        #[arg(long = "set", value_name = "PATH=VALUE")]
        sets: Vec<String>,
        /// Insert VALUE into a list before the index at PATH (`/items/-` appends).
        #[arg(long = "insert", value_name = "PATH=VALUE")]
        inserts: Vec<String>,
        /// Delete the map key or list element at PATH.
        #[arg(long = "delete", value_name = "PATH")]
        deletes: Vec<String>,
    },
    /// Download a customer's data (without their private documents) as a tar archive.
    Export {
        /// The customer's subject.
        subject: String,
        /// Where to write the archive.
        #[arg(long)]
        out: PathBuf,
    },
    /// Erase a customer: everything of theirs becomes unreadable and their devices wipe.
    Erase {
        /// The customer's subject.
        subject: String,
        /// Confirm: erase everything.
        #[arg(long)]
        yes: bool,
    },
}

/// Waits for `call` at most `secs` seconds.
async fn within<T>(
    secs: u64,
    call: impl std::future::Future<Output = Result<T, ClientError>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(Duration::from_secs(secs), call).await {
        Ok(answer) => Ok(answer?),
        Err(_) => bail!("the server did not answer within {secs} s"),
    }
}

/// `PATH=VALUE` of an admin edit.
fn path_value(text: &str) -> anyhow::Result<(String, serde_json::Value)> {
    let (path, value) =
        text.split_once('=').ok_or_else(|| anyhow!("{text:?}: write an edit as PATH=VALUE"))?;
    if !path.starts_with('/') {
        bail!("{path:?}: a path is a JSON Pointer, starting with / (e.g. /settings/theme)");
    }
    Ok((path.to_owned(), parse_value(value)))
}

/// Runs an admin command: no local store, one call to the Admin API.
pub(crate) async fn run(cli: &Cli, command: &AdminCommand) -> anyhow::Result<()> {
    use cubby_client::{Admin, Edit};
    let server = cli.server.as_deref().ok_or_else(|| anyhow!("set --server or CUBBY_SERVER"))?;
    let token = cli.token.clone().ok_or_else(|| {
        anyhow!("the admin API needs a service token: set --token or CUBBY_TOKEN")
    })?;
    let ca = match &cli.ca {
        Some(ca) => Some(
            std::fs::read(ca)
                .with_context(|| format!("cannot read CA certificate {}", ca.display()))?,
        ),
        None => None,
    };
    let admin = Admin::new(server, StaticToken::new(token), ca)?;
    let secs = cli.timeout;
    match command {
        AdminCommand::Customers => {
            for c in within(secs, admin.customers()).await? {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    c.subject,
                    c.documents,
                    c.bytes,
                    c.devices,
                    when(c.last_seen_ms)
                );
            }
        }
        AdminCommand::Docs { subject } => {
            for (id, meta) in within(secs, admin.documents(subject)).await? {
                println!("{id}\t{}\t{}\t{}", meta.title, meta.size, when(meta.updated_ms));
            }
        }
        AdminCommand::Create { subject, title } => {
            let id = within(secs, admin.create(subject, title)).await?;
            println!("{id}");
        }
        AdminCommand::Read { subject, id } => {
            let doc = within(secs, admin.read(subject, parse_id(id)?)).await?;
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        AdminCommand::Change { subject, id, sets, inserts, deletes } => {
            let mut edits = Vec::new();
            for set in sets {
                let (path, value) = path_value(set)?;
                edits.push(Edit::Set(path, value));
            }
            for insert in inserts {
                let (path, value) = path_value(insert)?;
                edits.push(Edit::Insert(path, value));
            }
            edits.extend(deletes.iter().map(|path| Edit::Delete(path.clone())));
            if edits.is_empty() {
                bail!("no edits: add --set PATH=VALUE, --insert PATH=VALUE or --delete PATH");
            }
            let changed = within(secs, admin.change(subject, parse_id(id)?, &edits)).await?;
            println!("{}", serde_json::to_string_pretty(&changed)?);
        }
        AdminCommand::Export { subject, out } => {
            let file = tokio::fs::File::create(out)
                .await
                .with_context(|| format!("cannot create {}", out.display()))?;
            let size = admin.export(subject, tokio::io::BufWriter::new(file)).await?;
            println!("exported {size} bytes to {}", out.display());
        }
        AdminCommand::Erase { subject, yes } => {
            if !yes {
                bail!("this erases the customer {subject:?} for good; add --yes to confirm");
            }
            let r = within(secs, admin.erase(subject)).await?;
            println!(
                "erased {subject}: {} documents ({} bytes), {} devices, {} audit entries",
                r.documents, r.bytes, r.devices, r.audit_entries
            );
        }
    }
    Ok(())
}
