//! One hostile customer holding sync messages in parts (`DocSync.more`) on a running server, to
//! read the server's memory meanwhile (issue 24, row 5).
//!
//! ```text
//! cargo run -p cubby-tests --example parts_attack -- URL CA_PEM TOKEN ids|parts [STREAMS] [MIB]
//! ```
//!
//! `ids`: 64 parts, each with an empty message and a 1 MiB id (refused at the first part now).
//! `parts`: STREAMS streams (default 4), each on its own connection, each sending MIB MiB of
//! parts of one document (default 60) and never the last part. Prints how each stream ended, or
//! that it is still held, then holds everything until killed (read the server's RSS meanwhile).

use cubby_crypto::signing::{DeviceKey, generate_pkcs8};
use cubby_proto::pb;
use cubby_tests::RawStream;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, ca, token, mode, rest @ ..] = args.as_slice() else {
        eprintln!("usage: parts_attack URL CA_PEM TOKEN ids|parts [STREAMS] [MIB]");
        std::process::exit(2);
    };
    let streams: usize = rest.first().map_or(4, |s| s.parse().expect("STREAMS"));
    let mib: usize = rest.get(1).map_or(60, |s| s.parse().expect("MIB"));
    let ca = std::fs::read(ca).expect("the CA file");
    let channel = || async {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca.clone()));
        tonic::transport::Endpoint::from_shared(url.clone())
            .expect("url")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .expect("connects")
    };
    let part = |doc_id: Vec<u8>, bytes: usize| pb::ClientFrame {
        frame: Some(pb::client_frame::Frame::Sync(pb::DocSync {
            doc_id,
            message: vec![0x42; bytes],
            more: true,
            ..Default::default()
        })),
    };
    let mut held = Vec::new();
    let count = if mode == "ids" { 1 } else { streams };
    for n in 0..count {
        let key = DeviceKey::from_pkcs8(&generate_pkcs8()).expect("key");
        let mut raw =
            RawStream::connect_on(channel().await, token, &key, cubby_crypto::random_array())
                .await
                .expect("connects");
        let frames: Vec<_> = if mode == "ids" {
            (0..64u8).map(|i| part(vec![i; 1 << 20], 0)).collect()
        } else {
            (0..mib).map(|_| part(vec![n as u8; 16], (1 << 20) - 64)).collect()
        };
        for frame in frames {
            if raw.tx.send(frame).await.is_err() {
                break;
            }
        }
        // A frame with a bad id shows whether the stream is still read: its refusal comes back.
        let probe = pb::DocSync { doc_id: vec![1; 3], ..Default::default() };
        let _ = raw
            .tx
            .send(pb::ClientFrame { frame: Some(pb::client_frame::Frame::Sync(probe)) })
            .await;
        let state = loop {
            match raw.inbound.message().await {
                Ok(Some(pb::ServerFrame { frame: Some(pb::server_frame::Frame::Error(_)) })) => {
                    break "held".to_owned();
                }
                Ok(Some(_)) => continue,
                Ok(None) => break "ended".to_owned(),
                Err(status) => break format!("{:?}: {}", status.code(), status.message()),
            }
        };
        println!("stream {n}: {state}");
        held.push(raw);
    }
    println!("holding; kill to stop");
    std::future::pending::<()>().await;
}
