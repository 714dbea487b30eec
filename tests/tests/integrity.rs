//! Damage to the files of a data directory is detected, never served as if nothing happened.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cubby_proto::pb;
use cubby_proto::pb::account_client::AccountClient;
use cubby_server::{ServerConfig, auth};
use cubby_tests::{Rng, TestServer, authed, copy_tree, files_under};
use serde_json::json;

/// What one damaged copy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// The server refused to start.
    Refused,
    /// Clients could not connect (the certificate or its key is damaged).
    Unreachable,
    /// Tokens no longer verify (the development tenant's key is damaged).
    Unauthenticated,
    /// Served; some answers said the data is damaged (`DATA_LOSS`).
    DataLoss,
    /// Served, and every acknowledged document reads back exactly.
    Intact,
}

/// A data directory with two customers' acknowledged documents (several compacted), and the
/// JSON of each document by customer and id.
async fn pristine() -> (tempfile::TempDir, BTreeMap<(String, Vec<u8>), String>) {
    let mut server = TestServer::start_with(|c| c.limits.compact_after_chunks = 3).await;
    let mut expected = BTreeMap::new();
    for customer in ["alice", "bob"] {
        let device = server.device(customer).await;
        for n in 0..6 {
            let doc = device.client.create(&format!("{customer} {n}")).await.expect("create");
            for edit in 0..(n % 4) + 1 {
                doc.put(&format!("k{edit}"), json!(format!("{customer}/{n}/{edit}")))
                    .await
                    .expect("put");
            }
            device.client.wait_until_synced().await.expect("synced");
        }
        for (id, _) in device.client.list().await.expect("list") {
            let json = server
                .document_json(&server.token(customer), id.as_bytes())
                .await
                .expect("the server holds it");
            expected.insert((customer.to_owned(), id.as_bytes().to_vec()), json);
        }
        device.close().await;
    }
    server.stop().await;
    let kept = tempfile::tempdir().expect("temp dir");
    copy_tree(server.data_dir(), kept.path());
    (kept, expected)
}

/// Starts a server on `data`, asks for every acknowledged document and the listings, and says
/// how it went; panics on an answer that hides damage (a wrong value, NOT_FOUND, a short list).
async fn judge(data: &Path, expected: &BTreeMap<(String, Vec<u8>), String>, case: &str) -> Outcome {
    let config = ServerConfig::dev(data, SocketAddr::from(([127, 0, 0, 1], 0)));
    let Ok(running) = cubby_server::start(config).await else { return Outcome::Refused };
    let outcome = async {
        let Ok(ca) = std::fs::read(data.join("tls/cert.pem")) else { return Outcome::Unreachable };
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca));
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("https://{}", running.local_addr()))
                .expect("url")
                .tls_config(tls)
                .expect("tls")
                .connect_timeout(Duration::from_secs(5));
        let Ok(channel) = endpoint.connect().await else { return Outcome::Unreachable };
        let mut account = AccountClient::new(channel);
        let mut outcome = Outcome::Intact;
        for customer in ["alice", "bob"] {
            let Ok(signer) = auth::dev_signer(data, false) else { return Outcome::Unauthenticated };
            let token = auth::dev_token(&signer, customer, Duration::from_secs(600));
            match account.list_documents(authed(pb::ListDocumentsRequest {}, &token)).await {
                Ok(listed) => {
                    let ids: Vec<Vec<u8>> =
                        listed.into_inner().documents.into_iter().map(|d| d.doc_id).collect();
                    for ((c, id), _) in expected.iter().filter(|((c, _), _)| c == customer) {
                        assert!(
                            ids.contains(id),
                            "{case}: {c}'s document is missing from the list"
                        );
                    }
                }
                Err(status) if status.code() == tonic::Code::Unauthenticated => {
                    return Outcome::Unauthenticated;
                }
                Err(status)
                    if status.code() == tonic::Code::Unavailable
                        && status.message().contains("transport") =>
                {
                    return Outcome::Unreachable;
                }
                Err(status) => {
                    assert_ne!(status.code(), tonic::Code::NotFound, "{case}: listing {status:?}");
                    outcome = Outcome::DataLoss;
                }
            }
            for ((_, id), json) in expected.iter().filter(|((c, _), _)| c == customer) {
                let request = pb::GetDocumentRequest { doc_id: id.clone() };
                match account.get_document(authed(request, &token)).await {
                    Ok(read) => assert_eq!(&read.into_inner().json, json, "{case}: a wrong value"),
                    Err(status) => {
                        assert_ne!(
                            status.code(),
                            tonic::Code::NotFound,
                            "{case}: an acknowledged document answered NOT_FOUND"
                        );
                        outcome = outcome.min(Outcome::DataLoss);
                    }
                }
            }
        }
        outcome
    }
    .await;
    running.shutdown().await;
    outcome
}

/// Issue 24: a byte changed anywhere in the data directory (every file, at seeded random places)
/// is caught: the server refuses to start, or clients cannot connect or authenticate, or what
/// is damaged answers `DATA_LOSS`; otherwise everything acknowledged reads back exactly. An
/// acknowledged document never answers NOT_FOUND, never reads differently, and never drops out
/// of a listing. `CUBBY_CORRUPTION_SEEDS` sets how many places per file (default 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_byte_in_any_file_of_the_data_directory_is_detected() {
    let seeds: u64 =
        std::env::var("CUBBY_CORRUPTION_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let (pristine, expected) = pristine().await;
    let mut files: Vec<PathBuf> = files_under(pristine.path())
        .into_iter()
        .filter_map(|f| f.strip_prefix(pristine.path()).ok().map(Path::to_path_buf))
        .collect();
    files.sort();
    let mut tally: BTreeMap<String, Vec<Outcome>> = BTreeMap::new();
    for file in &files {
        for seed in 0..seeds {
            let copy = tempfile::tempdir().expect("temp dir");
            copy_tree(pristine.path(), copy.path());
            let path = copy.path().join(file);
            let mut bytes = std::fs::read(&path).expect("readable");
            if bytes.is_empty() {
                continue; // Nothing to change (the ledger, before any erasure or revocation).
            }
            let mut rng = Rng(seed * 7919 + bytes.len() as u64);
            let at = rng.below(bytes.len());
            bytes[at] ^= 1 + rng.below(255) as u8;
            std::fs::write(&path, &bytes).expect("writable");
            let case = format!("{} byte {at} of {} (seed {seed})", file.display(), bytes.len());
            let outcome = judge(copy.path(), &expected, &case).await;
            tally.entry(file.display().to_string()).or_default().push(outcome);
        }
    }
    for (file, outcomes) in &tally {
        eprintln!("{file}: {outcomes:?}");
    }
    // The store's log is where acknowledged changes live: a change there must not pass unseen
    // every time.
    let log = tally.get("db/sled/db").expect("the sled log is among the files");
    assert!(log.iter().any(|o| *o != Outcome::Intact), "changes to the log were all harmless?");
}
