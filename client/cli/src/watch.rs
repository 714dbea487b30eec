//! `cubby watch`: each change from elsewhere as one JSON line, saying what changed rather than
//! printing the whole document again.

use std::collections::HashMap;

use anyhow::bail;
use automerge::{ChangeHash, Patch, PatchAction, Prop, Value};
use cubby_client::{Client, DocEvent, DocId, SyncFailure, SyncStatus};
use serde_json::{Value as Json, json};

/// A document seen for the first time is printed whole only up to this size (as JSON); a
/// larger one is announced, and its later changes are printed as they come.
const WHOLE_UP_TO: usize = 64 << 10;

pub(crate) async fn watch(client: &Client) -> anyhow::Result<()> {
    let mut events = client.events();
    let mut status = client.status();
    client.start_sync();
    eprintln!("cubby: watching; Ctrl-C to stop");
    // Per document, the heads printed last: the next line says what changed since.
    let mut seen: HashMap<DocId, Vec<ChangeHash>> = HashMap::new();
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok((id, DocEvent::Remote)) => {
                    let doc = client.open(id).await?;
                    let after = doc.heads();
                    let line = match seen.get(&id) {
                        Some(before) => {
                            let patches = doc.read(|am| am.diff(before, &after));
                            json!({"doc": id.to_string(), "title": doc.meta().title,
                                   "changes": patches.iter().map(change).collect::<Vec<_>>()})
                        }
                        None => first_sight(id, &doc),
                    };
                    seen.insert(id, after);
                    println!("{line}");
                }
                Ok((id, DocEvent::Deleted { discarded })) => {
                    seen.remove(&id);
                    println!("{}", json!({"doc": id.to_string(), "deleted": true,
                                          "discarded_local_changes": discarded}));
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    // What was missed is in the documents: print them whole when they next change.
                    eprintln!("cubby: {n} events skipped");
                    seen.clear();
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            },
            changed = status.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let current = status.borrow_and_update().clone();
                match current {
                    SyncStatus::Offline { failure: Some(f @ SyncFailure::Unauthenticated(_)) } => {
                        bail!("sync failed: {f}; a token that expires ends `watch` unless \
                               --token-command (CUBBY_TOKEN_COMMAND) can fetch a fresh one")
                    }
                    SyncStatus::Offline {
                        failure: Some(f @ (SyncFailure::PermissionDenied(_) | SyncFailure::Misconfigured(_))),
                    } => bail!("sync failed: {f}"),
                    SyncStatus::Offline { failure: Some(f) } => eprintln!("cubby: offline ({f}); retrying"),
                    SyncStatus::UpToDate => eprintln!("cubby: up to date"),
                    SyncStatus::Refused { failure, documents } => eprintln!(
                        "cubby: changes to {} refused for now ({failure}); kept, and offered again",
                        crate::count(documents.len(), "document")
                    ),
                    SyncStatus::Wiped { reason } => {
                        bail!("the server told this device to wipe ({reason:?}); its local copy is gone")
                    }
                    _ => {}
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// The line for a document changed for the first time in this watch: its content, unless large.
fn first_sight(id: DocId, doc: &cubby_client::DocHandle) -> Json {
    let content = doc.to_json();
    let size = content.to_string().len();
    if size <= WHOLE_UP_TO {
        return json!({"doc": id.to_string(), "title": doc.meta().title, "content": content});
    }
    json!({"doc": id.to_string(), "title": doc.meta().title, "content_bytes": size,
           "note": "large: its content is left out; `cubby doc get` prints it, and its later \
                    changes are printed as they come"})
}

/// One change as JSON: where (a JSON Pointer) and what.
fn change(patch: &Patch) -> Json {
    let mut path = String::new();
    for (_, prop) in &patch.path {
        push(&mut path, prop);
    }
    let at = |prop: Prop| {
        let mut path = path.clone();
        push(&mut path, &prop);
        path
    };
    match &patch.action {
        PatchAction::PutMap { key, value, .. } => {
            json!({"path": at(Prop::Map(key.clone())), "put": value_json(&value.0)})
        }
        PatchAction::PutSeq { index, value, .. } => {
            json!({"path": at(Prop::Seq(*index)), "put": value_json(&value.0)})
        }
        PatchAction::Insert { index, values } => json!({"path": at(Prop::Seq(*index)),
            "insert": values.iter().map(|(v, _, _)| value_json(v)).collect::<Vec<_>>()}),
        PatchAction::SpliceText { index, value, .. } => {
            json!({"path": at(Prop::Seq(*index)), "splice": value.make_string()})
        }
        PatchAction::Increment { prop, value } => {
            json!({"path": at(prop.clone()), "increment": value})
        }
        PatchAction::DeleteMap { key } => json!({"path": at(Prop::Map(key.clone())), "delete": 1}),
        PatchAction::DeleteSeq { index, length } => {
            json!({"path": at(Prop::Seq(*index)), "delete": length})
        }
        PatchAction::Conflict { prop } => json!({"path": at(prop.clone()), "conflict": true}),
        PatchAction::Mark { marks } => json!({"path": path, "marks": marks.len()}),
    }
}

/// Appends `prop` to a JSON Pointer (RFC 6901: `~` and `/` escaped).
fn push(path: &mut String, prop: &Prop) {
    path.push('/');
    match prop {
        Prop::Map(key) => path.push_str(&key.replace('~', "~0").replace('/', "~1")),
        Prop::Seq(index) => path.push_str(&index.to_string()),
    }
}

/// A value a change put, as JSON: scalars as themselves, a new map, list or text empty (the
/// changes that fill it follow).
fn value_json(value: &Value<'_>) -> Json {
    match value {
        Value::Object(automerge::ObjType::Map | automerge::ObjType::Table) => json!({}),
        Value::Object(automerge::ObjType::List) => json!([]),
        Value::Object(automerge::ObjType::Text) => json!(""),
        Value::Scalar(scalar) => serde_json::to_value(scalar.as_ref()).unwrap_or(Json::Null),
    }
}
