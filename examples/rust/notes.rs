//! A small notes app on Cubby's Rust SDK: notes live on this device, work offline, and sync to
//! every other device of the same customer.
//!
//! ```sh
//! cargo run -p cubby-client --example notes -- add buy milk
//! cargo run -p cubby-client --example notes -- list
//! cargo run -p cubby-client --example notes -- done <note>
//! ```
//!
//! Settings, as the other languages' examples: CUBBY_SERVER, CUBBY_CA, CUBBY_TOKEN_COMMAND,
//! NOTES_DIR.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use cubby_client::{Client, ClientError, DocHandle, TokenError};
use serde_json::json;

fn setting(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// The key that encrypts this device's store. A real app keeps it in the OS keychain.
fn local_key(device: &PathBuf) -> std::io::Result<[u8; 32]> {
    let path = device.join("local.key");
    if !path.exists() {
        std::fs::create_dir_all(device)?;
        let key: [u8; 32] = cubby_crypto::random_array();
        std::fs::write(&path, key)?;
    }
    let bytes = std::fs::read(&path)?;
    bytes.try_into().map_err(|_| std::io::Error::other("local.key is not 32 bytes"))
}

/// The customer's one notes document: found among those synced, or made on first use.
async fn notes_document(client: &Client) -> Result<DocHandle, ClientError> {
    if let Err(offline) = client.wait_until_synced().await {
        eprintln!("(offline: {offline}; showing this device's copy)");
    }
    match client.list().await?.into_iter().find(|(_, meta)| meta.title == "Notes") {
        Some((id, _)) => client.open(id).await,
        None => client.create("Notes").await,
    }
}

fn show(doc: &DocHandle) {
    let notes = doc.to_json();
    let mut notes: Vec<_> = notes.as_object().into_iter().flatten().collect();
    notes.sort_by_key(|(_, note)| note["at"].as_u64());
    if notes.is_empty() {
        println!("no notes yet: add one with `add TEXT`");
    }
    for (key, note) in notes {
        let done = if note["done"] == json!(true) { "x" } else { " " };
        println!("{key}  [{done}] {}", note["text"].as_str().unwrap_or_default());
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = PathBuf::from(setting("NOTES_DIR", "notes-device"));
    let ca = std::fs::read(setting("CUBBY_CA", "cubby-data/tls/cert.pem")).ok();
    let command =
        setting("CUBBY_TOKEN_COMMAND", "target/debug/cubby-server dev-token --customer alice");
    // Asks the identity provider (here, a command) for a token whenever Cubby connects.
    let tokens = move |_refresh: bool| {
        let command = command.clone();
        async move {
            let run = {
                let command = command.clone();
                move || {
                    let mut words = command.split_whitespace();
                    let program = words.next().unwrap_or_default();
                    std::process::Command::new(program).args(words).output()
                }
            };
            match tokio::task::spawn_blocking(run).await {
                Ok(Ok(out)) if out.status.success() => {
                    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
                }
                _ => Err(TokenError(format!("{command:?} failed"))),
            }
        }
    };
    let mut builder = Client::builder()
        .with_data_dir(device.join("store"))
        .with_local_key(local_key(&device)?)
        .with_server(setting("CUBBY_SERVER", "https://localhost:7443"))
        .with_token_provider(tokens)
        .with_device_name("notes (Rust)");
    if let Some(ca) = ca {
        builder = builder.with_ca_pem(ca);
    }
    let client = builder.build().await?;
    let doc = notes_document(&client).await?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["add", ref words @ ..] => {
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
            let key =
                format!("{:06x}", u32::from_le_bytes(cubby_crypto::random_array()) & 0xff_ffff);
            doc.put(
                &key,
                json!({"text": words.join(" "), "done": false, "at": now.as_millis() as u64}),
            )
            .await?;
            println!("added {key}");
        }
        // Only `done` changes: another device's edit of the text survives the merge.
        ["done", key] => {
            let mut note = doc.to_json()[key].clone();
            note["done"] = json!(true);
            doc.put(key, note).await?;
        }
        ["list"] => show(&doc),
        _ => return Err("usage: notes add TEXT | list | done NOTE".into()),
    }
    if let Err(err) = client.wait_until_synced().await {
        println!("saved on this device; it syncs when the server is reachable ({err})");
    }
    client.shutdown().await;
    Ok(())
}
