//! What a client written from the `.proto` files alone relies on: reflection that describes
//! every service completely.

use std::collections::HashSet;

use cubby_tests::TestServer;
use prost::Message;
use prost_types::FileDescriptorProto;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServiceResponse};

/// A descriptor loader that asks for a symbol and never fetches imports by file name gets
/// every file it needs in the answer: each service's file arrives with everything it imports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_answers_each_service_with_every_file_it_imports() {
    let server = TestServer::start().await;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let ask = |request: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut requests = vec![ask(MessageRequest::ListServices(String::new()))];
    for service in ["cubby.v1.Sync", "cubby.v1.Account", "cubby.v1.Admin"] {
        requests.push(ask(MessageRequest::FileContainingSymbol(service.into())));
    }
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection is served")
        .into_inner();

    let Some(MessageResponse::ListServicesResponse(listed)) =
        answers.message().await.expect("answer").and_then(|a| a.message_response)
    else {
        panic!("the first answer lists services");
    };
    let listed: HashSet<String> =
        listed.service.into_iter().map(|ServiceResponse { name }| name).collect();
    for service in ["cubby.v1.Sync", "cubby.v1.Account", "cubby.v1.Admin", "grpc.health.v1.Health"]
    {
        assert!(listed.contains(service), "{service} is listed: {listed:?}");
    }

    // One stream: each file is sent once, so the files of all three answers together are what
    // a loader has. Every import of every file must be among them.
    let mut files = Vec::new();
    for _ in 0..3 {
        let answer = answers.message().await.expect("answer").expect("one per request");
        let Some(MessageResponse::FileDescriptorResponse(described)) = answer.message_response
        else {
            panic!("a service is described: {answer:?}");
        };
        for bytes in described.file_descriptor_proto {
            files.push(FileDescriptorProto::decode(bytes.as_slice()).expect("a file descriptor"));
        }
    }
    let names: HashSet<&str> = files.iter().map(|f| f.name()).collect();
    assert_eq!(names.len(), files.len(), "no file is sent twice on one stream");
    for file in &files {
        for import in &file.dependency {
            assert!(names.contains(import.as_str()), "{} imports {import}: not sent", file.name());
        }
    }
    let sync = files.iter().find(|f| f.name() == "cubby/v1/sync.proto").expect("sync.proto");
    let connect = &sync.service[0].method[0];
    assert_eq!((connect.name(), connect.input_type()), ("Connect", ".cubby.v1.ClientFrame"));
}

/// Older tools ask `grpc.reflection.v1alpha`: it answers as v1 does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1alpha_is_served_for_older_tools() {
    use tonic_reflection::pb::v1alpha as alpha;
    let server = TestServer::start().await;
    let mut reflection =
        alpha::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let ask = |request| alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let requests = vec![
        ask(alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
        ask(alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
            "cubby.v1.Admin".into(),
        )),
    ];
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("v1alpha is served")
        .into_inner();
    let Some(alpha::server_reflection_response::MessageResponse::ListServicesResponse(listed)) =
        answers.message().await.expect("answer").and_then(|a| a.message_response)
    else {
        panic!("the first answer lists services");
    };
    let names: Vec<String> = listed.service.into_iter().map(|s| s.name).collect();
    for service in [
        "cubby.v1.Admin",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(names.iter().any(|n| n == service), "{service} in {names:?}");
    }
    let answer = answers.message().await.expect("answer").expect("a second answer");
    let Some(alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        answer.message_response
    else {
        panic!("the Admin service is described: {answer:?}");
    };
    let first =
        FileDescriptorProto::decode(files.file_descriptor_proto[0].as_slice()).expect("a file");
    assert_eq!(first.name(), "cubby/v1/admin.proto");
}
