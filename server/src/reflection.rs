//! gRPC server reflection (`grpc.reflection.v1`, and `grpc.reflection.v1alpha` for older tools),
//! answering with a file and every file it imports, transitively, as gRPC's own servers do.
//! The two versions' messages are the same on the wire; v1alpha is answered by re-reading each
//! message as v1's.
//!
//! tonic-reflection answers a request for a symbol with the one file that defines it, so a
//! descriptor loader that does not then ask for each import by name (several do not) cannot
//! build `cubby.v1.Sync`, whose messages live in `common.proto`. Each file is sent once per
//! stream: a client that asks again gets only what it has not seen.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use prost::Message;
use prost_types::{DescriptorProto, FileDescriptorProto, FileDescriptorSet};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::server_reflection_server::{
    ServerReflection, ServerReflectionServer,
};
use tonic_reflection::pb::v1::{
    ErrorResponse, ExtensionNumberResponse, FileDescriptorResponse, ListServiceResponse,
    ServerReflectionRequest, ServerReflectionResponse, ServiceResponse,
};
use tonic_reflection::pb::v1alpha as alpha;
use tonic_reflection::pb::v1alpha::server_reflection_server::{
    ServerReflection as AlphaReflection, ServerReflectionServer as AlphaServer,
};

/// The files the server can describe, indexed by name and by every symbol they define.
#[derive(Debug, Default)]
struct Files {
    /// Each file, encoded, with the names of the files it imports.
    by_name: HashMap<String, (Vec<u8>, Vec<String>)>,
    /// The file defining each fully qualified symbol (message, field, enum, service, method).
    by_symbol: HashMap<String, String>,
    services: Vec<String>,
}

impl Files {
    fn add(&mut self, file: FileDescriptorProto) {
        let name = file.name().to_owned();
        if self.by_name.contains_key(&name) {
            return;
        }
        let package = file.package().to_owned();
        let qualify = |prefix: &str, name: &str| {
            if prefix.is_empty() { name.to_owned() } else { format!("{prefix}.{name}") }
        };
        for message in &file.message_type {
            self.add_message(&name, &package, message);
        }
        for en in &file.enum_type {
            self.add_symbol(&name, qualify(&package, en.name()));
        }
        for service in &file.service {
            let service_name = qualify(&package, service.name());
            self.services.push(service_name.clone());
            for method in &service.method {
                self.add_symbol(&name, qualify(&service_name, method.name()));
            }
            self.add_symbol(&name, service_name);
        }
        let imports = file.dependency.clone();
        self.by_name.insert(name, (file.encode_to_vec(), imports));
    }

    fn add_message(&mut self, file: &str, prefix: &str, message: &DescriptorProto) {
        let name = format!("{prefix}.{}", message.name()).trim_start_matches('.').to_owned();
        for field in &message.field {
            self.add_symbol(file, format!("{name}.{}", field.name()));
        }
        for nested in &message.nested_type {
            self.add_message(file, &name, nested);
        }
        for en in &message.enum_type {
            self.add_symbol(file, format!("{name}.{}", en.name()));
        }
        self.add_symbol(file, name);
    }

    fn add_symbol(&mut self, file: &str, symbol: String) {
        self.by_symbol.insert(symbol, file.to_owned());
    }

    /// `name` and every file it imports, transitively, leaving out those in `sent` (and adding
    /// what it returns to it): the file first, then its imports.
    fn with_imports(&self, name: &str, sent: &mut HashSet<String>) -> Option<Vec<Vec<u8>>> {
        self.by_name.get(name)?;
        let mut out = Vec::new();
        let mut queue = vec![name.to_owned()];
        while let Some(next) = queue.pop() {
            let Some((encoded, imports)) = self.by_name.get(&next) else { continue };
            if !sent.insert(next) {
                continue;
            }
            out.push(encoded.clone());
            queue.extend(imports.iter().rev().cloned());
        }
        Some(out)
    }
}

/// The reflection services (v1 and v1alpha) over the encoded descriptor sets `sets`.
pub(crate) fn service(
    sets: &[&[u8]],
) -> Result<(ServerReflectionServer<Reflection>, AlphaServer<ReflectionV1Alpha>), String> {
    let mut files = Files::default();
    let reflection = [
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    for set in sets.iter().chain(reflection.iter()) {
        let set = FileDescriptorSet::decode(*set).map_err(|e| e.to_string())?;
        set.file.into_iter().for_each(|file| files.add(file));
    }
    files.services.sort();
    let files = Arc::new(files);
    Ok((
        ServerReflectionServer::new(Reflection { files: files.clone() }),
        AlphaServer::new(ReflectionV1Alpha { files }),
    ))
}

/// Answers `grpc.reflection.v1.ServerReflection`.
#[derive(Debug)]
pub(crate) struct Reflection {
    files: Arc<Files>,
}

fn error(code: tonic::Code, message: String) -> MessageResponse {
    MessageResponse::ErrorResponse(ErrorResponse {
        error_code: code as i32,
        error_message: message,
    })
}

impl Files {
    fn answer(&self, request: MessageRequest, sent: &mut HashSet<String>) -> MessageResponse {
        let described = |files: Option<Vec<Vec<u8>>>, what: String| match files {
            Some(file_descriptor_proto) => {
                MessageResponse::FileDescriptorResponse(FileDescriptorResponse {
                    file_descriptor_proto,
                })
            }
            None => error(tonic::Code::NotFound, format!("{what} not found")),
        };
        match request {
            MessageRequest::FileByFilename(name) => {
                described(self.with_imports(&name, sent), format!("file {name:?}"))
            }
            MessageRequest::FileContainingSymbol(symbol) => {
                let file = self.by_symbol.get(symbol.trim_start_matches('.'));
                let files = file.and_then(|file| self.with_imports(file, sent));
                described(files, format!("symbol {symbol:?}"))
            }
            MessageRequest::FileContainingExtension(_) => {
                error(tonic::Code::NotFound, "this server defines no extensions".into())
            }
            // grpcurl asks this of every message and gives up on an error.
            MessageRequest::AllExtensionNumbersOfType(base_type_name) => {
                MessageResponse::AllExtensionNumbersResponse(ExtensionNumberResponse {
                    base_type_name,
                    extension_number: Vec::new(),
                })
            }
            MessageRequest::ListServices(_) => {
                MessageResponse::ListServicesResponse(ListServiceResponse {
                    service: self
                        .services
                        .iter()
                        .map(|name| ServiceResponse { name: name.clone() })
                        .collect(),
                })
            }
        }
    }
}

impl Files {
    /// The response to one request on a stream.
    fn respond(
        &self,
        request: ServerReflectionRequest,
        sent: &mut HashSet<String>,
    ) -> ServerReflectionResponse {
        let answer = match request.message_request.clone() {
            Some(message) => self.answer(message, sent),
            None => error(tonic::Code::InvalidArgument, "empty request".into()),
        };
        ServerReflectionResponse {
            valid_host: request.host.clone(),
            original_request: Some(request),
            message_response: Some(answer),
        }
    }
}

/// Answers `grpc.reflection.v1alpha.ServerReflection`, which older tools ask.
#[derive(Debug)]
pub(crate) struct ReflectionV1Alpha {
    files: Arc<Files>,
}

/// A message re-read as the other version's (they are the same on the wire).
fn reread<T: Message + Default>(message: &impl Message) -> Result<T, Status> {
    T::decode(message.encode_to_vec().as_slice())
        .map_err(|_| Status::internal("reflection messages differ between versions"))
}

/// Answers a reflection stream of either version, each message read as v1's: every file once
/// per stream.
fn answer_stream<Q, A>(
    files: Arc<Files>,
    mut requests: Streaming<Q>,
) -> ReceiverStream<Result<A, Status>>
where
    Q: Message + Default + Send + 'static,
    A: Message + Default + Send + 'static,
{
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut sent = HashSet::new();
        while let Ok(Some(request)) = requests.message().await {
            let response = reread::<ServerReflectionRequest>(&request)
                .map(|request| files.respond(request, &mut sent))
                .and_then(|response| reread::<A>(&response));
            if tx.send(response).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl AlphaReflection for ReflectionV1Alpha {
    type ServerReflectionInfoStream =
        ReceiverStream<Result<alpha::ServerReflectionResponse, Status>>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<alpha::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        Ok(Response::new(answer_stream(self.files.clone(), request.into_inner())))
    }
}

#[tonic::async_trait]
impl ServerReflection for Reflection {
    type ServerReflectionInfoStream = ReceiverStream<Result<ServerReflectionResponse, Status>>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        Ok(Response::new(answer_stream(self.files.clone(), request.into_inner())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(encoded: &[Vec<u8>]) -> Vec<String> {
        encoded
            .iter()
            .map(|bytes| FileDescriptorProto::decode(bytes.as_slice()).expect("decodes"))
            .map(|file| file.name().to_owned())
            .collect()
    }

    #[test]
    fn a_symbol_comes_with_every_file_it_imports_once_per_stream() {
        let mut files = Files::default();
        for file in
            FileDescriptorSet::decode(cubby_proto::FILE_DESCRIPTOR_SET).expect("decodes").file
        {
            files.add(file);
        }
        let mut sent = HashSet::new();
        let request = MessageRequest::FileContainingSymbol("cubby.v1.Sync".into());
        let MessageResponse::FileDescriptorResponse(first) = files.answer(request, &mut sent)
        else {
            panic!("the symbol is found");
        };
        assert_eq!(
            names(&first.file_descriptor_proto),
            ["cubby/v1/sync.proto", "cubby/v1/common.proto"]
        );
        // The admin file imports account and common; common was sent already.
        let request = MessageRequest::FileContainingSymbol("cubby.v1.Admin.ReadDocument".into());
        let MessageResponse::FileDescriptorResponse(second) = files.answer(request, &mut sent)
        else {
            panic!("the method is found");
        };
        assert_eq!(
            names(&second.file_descriptor_proto),
            ["cubby/v1/admin.proto", "cubby/v1/account.proto"]
        );
        for symbol in ["cubby.v1.DocSync.more", "cubby.v1.Edit", "cubby.v1.ClientFrame"] {
            assert!(files.by_symbol.contains_key(symbol), "{symbol}");
        }
        let missing = files.answer(MessageRequest::FileByFilename("nope.proto".into()), &mut sent);
        assert!(matches!(missing, MessageResponse::ErrorResponse(e) if e.error_code == 5));
    }
}
