//! samod as a sync server: `samod-server DATA_DIR PORT` serves the automerge-repo protocol over
//! WebSocket at `ws://127.0.0.1:PORT/`. Like
//! automerge-repo's own sync server it announces nothing: peers ask for documents by id.

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::routing::get;
use samod::storage::TokioFilesystemStorage;
use samod::{Repo, ShareConfig};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [data, port] = args.as_slice() else { panic!("usage: samod-server DATA_DIR PORT") };
    let port: u16 = port.parse().expect("PORT is a number");
    let repo = Repo::build_tokio()
        .with_peer_id("samod-sync-server".into())
        .with_storage(TokioFilesystemStorage::new(data))
        .with_share_policy(ShareConfig::read_write().with_announce(false))
        .load()
        .await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    let url = format!("ws://127.0.0.1:{port}/").parse().expect("url");
    let acceptor = repo.make_acceptor(url).expect("acceptor");
    let app = Router::new().route(
        "/",
        get(move |upgrade: WebSocketUpgrade| {
            let acceptor = acceptor.clone();
            async move {
                upgrade.on_upgrade(move |socket| async move {
                    let _ = acceptor.accept_axum(socket, None);
                })
            }
        }),
    );
    axum::serve(listener, app).await.expect("serve");
}
