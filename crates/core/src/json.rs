//! Reading a document as JSON, writing JSON values into it, and editing it by JSON Pointer.

use automerge::transaction::Transactable;
use automerge::{AutomergeError, ObjId, ObjType, Prop, ROOT, ReadDoc, ScalarValue};
use serde_json::Value;

/// One edit at a JSON Pointer path (RFC 6901).
#[derive(Clone, Debug, PartialEq)]
pub enum Edit {
    /// Set the value at the path, creating missing parent maps.
    Set(Value),
    /// Delete the map key or list element at the path.
    Delete,
    /// Insert into a list before the index at the path (`-` appends).
    Insert(Value),
}

/// Why an edit could not be applied. The messages are safe to show the caller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EditError {
    /// The path is not a JSON Pointer Cubby can edit.
    #[error("invalid path: {0}")]
    BadPath(String),
    /// Nothing is at the path (or at one of its parents).
    #[error("nothing at {0}")]
    NotFound(String),
    /// A parent on the path is not the kind of container the edit needs.
    #[error("{0}")]
    WrongType(String),
    /// Automerge refused the operation.
    #[error("the document refused the edit: {0}")]
    Automerge(#[from] AutomergeError),
}

/// Splits a JSON Pointer into its unescaped segments. The root itself (`""`) is not editable.
fn segments(path: &str) -> Result<Vec<String>, EditError> {
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| EditError::BadPath(format!("{path:?} must start with '/'")))?;
    rest.split('/')
        .map(|s| {
            if s.replace("~0", "").replace("~1", "").contains('~') {
                return Err(EditError::BadPath(format!("{path:?} has a bad '~' escape")));
            }
            Ok(s.replace("~1", "/").replace("~0", "~"))
        })
        .collect()
}

fn list_index(segment: &str, len: usize, allow_end: bool, path: &str) -> Result<usize, EditError> {
    if allow_end && segment == "-" {
        return Ok(len);
    }
    let index: usize = segment
        .parse()
        .map_err(|_| EditError::BadPath(format!("{path:?}: {segment:?} is not a list index")))?;
    let max = if allow_end { len } else { len.saturating_sub(1) };
    if index > max || (!allow_end && len == 0) {
        return Err(EditError::NotFound(path.to_owned()));
    }
    Ok(index)
}

/// Applies one edit at `path`.
pub fn apply_edit(tx: &mut impl Transactable, path: &str, edit: &Edit) -> Result<(), EditError> {
    let segments = segments(path)?;
    let (last, parents) = segments.split_last().expect("split always yields one segment");
    let mut obj = ROOT;
    for segment in parents {
        obj = match tx.object_type(&obj)? {
            ObjType::Map | ObjType::Table => match tx.get(&obj, segment.as_str())? {
                Some((automerge::Value::Object(ObjType::Map | ObjType::List), child)) => child,
                Some(_) => {
                    return Err(EditError::WrongType(format!(
                        "{path:?}: {segment:?} is not a map or list"
                    )));
                }
                None if matches!(edit, Edit::Set(_)) => {
                    tx.put_object(&obj, segment.as_str(), ObjType::Map)?
                }
                None => return Err(EditError::NotFound(path.to_owned())),
            },
            ObjType::List => {
                let index = list_index(segment, tx.length(&obj), false, path)?;
                match tx.get(&obj, index)? {
                    Some((automerge::Value::Object(ObjType::Map | ObjType::List), child)) => child,
                    _ => {
                        return Err(EditError::WrongType(format!(
                            "{path:?}: element {index} is not a map or list"
                        )));
                    }
                }
            }
            ObjType::Text => {
                return Err(EditError::WrongType(format!("{path:?}: text has no children")));
            }
        };
    }
    let is_list = tx.object_type(&obj)? == ObjType::List;
    match (edit, is_list) {
        (Edit::Set(value), false) => put_json_at(tx, &obj, Prop::Map(last.clone()), value)?,
        (Edit::Set(value), true) => {
            let index = list_index(last, tx.length(&obj), false, path)?;
            put_json_at(tx, &obj, Prop::Seq(index), value)?;
        }
        (Edit::Delete, false) => {
            if tx.get(&obj, last.as_str())?.is_none() {
                return Err(EditError::NotFound(path.to_owned()));
            }
            tx.delete(&obj, last.as_str())?;
        }
        (Edit::Delete, true) => {
            let index = list_index(last, tx.length(&obj), false, path)?;
            tx.delete(&obj, index)?;
        }
        (Edit::Insert(value), true) => {
            let index = list_index(last, tx.length(&obj), true, path)?;
            insert_json(tx, &obj, index, value)?;
        }
        (Edit::Insert(_), false) => {
            return Err(EditError::WrongType(format!("{path:?}: insert needs a list")));
        }
    }
    Ok(())
}

/// Sets `prop` of `obj` (a map key or a list index) to `value`, changing only what differs, so
/// that what another device changed concurrently survives the merge: a JSON object set over a
/// map updates it field by field (and deletes the fields the object lacks), a string set over
/// text splices the difference into it, and a scalar equal to the one there is left alone.
/// Arrays replace the list whole.
fn put_json_at(
    tx: &mut impl Transactable,
    obj: &ObjId,
    prop: Prop,
    value: &Value,
) -> Result<(), AutomergeError> {
    let current = tx.get(obj, prop.clone())?;
    match (value, current) {
        (Value::Object(fields), Some((automerge::Value::Object(ObjType::Map), map))) => {
            let gone: Vec<String> = tx.keys(&map).filter(|key| !fields.contains_key(key)).collect();
            for key in gone {
                tx.delete(&map, key.as_str())?;
            }
            for (key, field) in fields {
                put_json_at(tx, &map, Prop::Map(key.clone()), field)?;
            }
            Ok(())
        }
        (Value::String(new), Some((automerge::Value::Object(ObjType::Text), text))) => {
            tx.update_text(&text, new)
        }
        (Value::Object(_), _) => {
            let child = tx.put_object(obj, prop, ObjType::Map)?;
            fill_json(tx, &child, value)
        }
        (Value::Array(_), _) => {
            let child = tx.put_object(obj, prop, ObjType::List)?;
            fill_json(tx, &child, value)
        }
        (scalar, Some((automerge::Value::Scalar(there), _)))
            if there.as_ref() == &scalar_of(scalar) =>
        {
            Ok(())
        }
        (scalar, _) => tx.put(obj, prop, scalar_of(scalar)),
    }
}

/// The document's root map rendered as JSON (text as strings, counters as numbers).
pub fn to_json(doc: &impl ReadDoc) -> Value {
    serde_json::to_value(automerge::AutoSerde::from(doc))
        .expect("an Automerge document always renders as JSON")
}

/// Sets `key` of the map `obj` to `value`, creating nested maps and lists for JSON objects and
/// arrays.
pub fn put_json(
    tx: &mut impl Transactable,
    obj: &ObjId,
    key: &str,
    value: &Value,
) -> Result<(), AutomergeError> {
    put_json_at(tx, obj, Prop::Map(key.to_owned()), value)
}

/// Sets `key` of the map `obj` to collaborative text (Automerge text) holding `text`. Text already
/// there takes only the difference, spliced in, so that concurrent edits elsewhere in it
/// survive; anything else there is replaced by new text.
pub fn put_text(
    tx: &mut impl Transactable,
    obj: &ObjId,
    key: &str,
    text: &str,
) -> Result<(), AutomergeError> {
    match tx.get(obj, key)? {
        Some((automerge::Value::Object(ObjType::Text), existing)) => {
            tx.update_text(&existing, text)
        }
        _ => {
            let new = tx.put_object(obj, key, ObjType::Text)?;
            tx.splice_text(&new, 0, 0, text)
        }
    }
}

/// Splices the text at `key` of the map `obj`: deletes `delete` characters at `pos` and inserts
/// `insert` there. Positions count Unicode code points. Refused unless the key holds text.
pub fn splice_text(
    tx: &mut impl Transactable,
    obj: &ObjId,
    key: &str,
    pos: usize,
    delete: usize,
    insert: &str,
) -> Result<(), AutomergeError> {
    let text = match tx.get(obj, key)? {
        Some((automerge::Value::Object(ObjType::Text), text)) => text,
        other => {
            let unexpected = match other {
                Some((value, _)) => format!("{value:?}"),
                None => "nothing".to_owned(),
            };
            return Err(AutomergeError::InvalidValueType { expected: "text".into(), unexpected });
        }
    };
    let len = tx.length(&text);
    if pos.saturating_add(delete) > len {
        return Err(AutomergeError::InvalidIndex(pos.saturating_add(delete)));
    }
    let delete = isize::try_from(delete).map_err(|_| AutomergeError::InvalidIndex(delete))?;
    tx.splice_text(&text, pos, delete, insert)
}

/// Fills the new, empty map or list `obj` with the entries of the JSON object or array `value`.
fn fill_json(tx: &mut impl Transactable, obj: &ObjId, value: &Value) -> Result<(), AutomergeError> {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                put_json(tx, obj, k, v)?;
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                insert_json(tx, obj, i, v)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn insert_json(
    tx: &mut impl Transactable,
    list: &ObjId,
    index: usize,
    value: &Value,
) -> Result<(), AutomergeError> {
    match value {
        Value::Object(_) => {
            let child = tx.insert_object(list, index, ObjType::Map)?;
            fill_json(tx, &child, value)
        }
        Value::Array(_) => {
            let child = tx.insert_object(list, index, ObjType::List)?;
            fill_json(tx, &child, value)
        }
        scalar => tx.insert(list, index, scalar_of(scalar)),
    }
}

fn scalar_of(value: &Value) -> ScalarValue {
    match value {
        Value::Null => ScalarValue::Null,
        Value::Bool(b) => ScalarValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => ScalarValue::Int(i),
            (None, Some(u)) => ScalarValue::Uint(u),
            _ => ScalarValue::F64(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => ScalarValue::Str(s.as_str().into()),
        Value::Array(_) | Value::Object(_) => unreachable!("objects and arrays are handled above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{Automerge, ROOT};
    use serde_json::json;

    #[test]
    fn json_values_round_trip_through_a_document() {
        let value = json!({"s": "x", "n": -3, "b": true, "z": null, "f": 1.5,
                           "list": [1, {"deep": ["a"]}], "map": {"k": "v"}});
        let mut doc = Automerge::new();
        doc.transact::<_, _, AutomergeError>(|tx| {
            for (k, v) in value.as_object().expect("an object") {
                put_json(tx, &ROOT, k, v)?;
            }
            Ok(())
        })
        .expect("puts");
        assert_eq!(to_json(&doc), value);
    }

    fn edited(start: Value, edits: &[(&str, Edit)]) -> Result<Value, EditError> {
        let mut doc = Automerge::new();
        doc.transact::<_, _, EditError>(|tx| {
            for (k, v) in start.as_object().expect("an object") {
                put_json(tx, &ROOT, k, v)?;
            }
            Ok(())
        })
        .map_err(|f| f.error)?;
        doc.transact::<_, _, EditError>(|tx| {
            for (path, edit) in edits {
                apply_edit(tx, path, edit)?;
            }
            Ok(())
        })
        .map_err(|f| f.error)?;
        Ok(to_json(&doc))
    }

    #[test]
    fn edits_by_json_pointer_set_delete_and_insert() {
        let start = json!({"settings": {"theme": "dark"}, "items": ["a", "b"], "a/b": 1});
        let got = edited(
            start,
            &[
                ("/settings/theme", Edit::Set(json!("light"))),
                ("/new/deep/key", Edit::Set(json!({"x": [1]}))),
                ("/items/0", Edit::Set(json!("A"))),
                ("/items/-", Edit::Insert(json!("c"))),
                ("/items/1", Edit::Delete),
                ("/a~1b", Edit::Delete),
            ],
        )
        .expect("applies");
        assert_eq!(
            got,
            json!({"settings": {"theme": "light"}, "new": {"deep": {"key": {"x": [1]}}},
                   "items": ["A", "c"]})
        );
    }

    #[test]
    fn bad_edits_are_refused_and_apply_nothing() {
        let start = json!({"items": ["a"], "n": 1});
        for (path, edit) in [
            ("items", Edit::Delete),
            ("", Edit::Set(json!(1))),
            ("/missing", Edit::Delete),
            ("/items/5", Edit::Delete),
            ("/items/x", Edit::Set(json!(1))),
            ("/items/9", Edit::Insert(json!(1))),
            ("/n/child", Edit::Set(json!(1))),
            ("/n", Edit::Insert(json!(1))),
            ("/bad~2escape", Edit::Set(json!(1))),
        ] {
            assert!(
                edited(start.clone(), &[("/n", Edit::Set(json!(2))), (path, edit.clone())])
                    .is_err(),
                "{path:?} {edit:?} should be refused"
            );
        }
    }

    /// A document holding `start`, and two forks of it that each `put` their value under
    /// `key`, merged.
    fn merged(start: &Value, key: &str, one: &Value, other: &Value) -> Value {
        let mut base = Automerge::new();
        base.transact::<_, _, AutomergeError>(|tx| put_json(tx, &ROOT, key, start)).expect("puts");
        let (mut a, mut b) = (base.fork(), base.fork());
        for (doc, value) in [(&mut a, one), (&mut b, other)] {
            doc.transact::<_, _, AutomergeError>(|tx| put_json(tx, &ROOT, key, value))
                .expect("puts");
        }
        a.merge(&mut b).expect("merges");
        to_json(&a)[key].clone()
    }

    #[test]
    fn concurrent_puts_of_one_object_keep_each_sides_changed_fields() {
        let start = json!({"name": "Ann", "city": "Oslo", "tags": {"a": 1}, "old": true});
        let got = merged(
            &start,
            "profile",
            &json!({"name": "Anna", "city": "Oslo", "tags": {"a": 1, "b": 2}, "old": true}),
            &json!({"name": "Ann", "city": "Bergen", "tags": {"a": 1}}),
        );
        assert_eq!(got, json!({"name": "Anna", "city": "Bergen", "tags": {"a": 1, "b": 2}}));
    }

    #[test]
    fn putting_the_value_already_there_changes_nothing() {
        let value = json!({"n": 1, "s": "x", "nested": {"list": [1, 2], "z": null}});
        let mut doc = Automerge::new();
        doc.transact::<_, _, AutomergeError>(|tx| put_json(tx, &ROOT, "v", &value)).expect("puts");
        let heads = doc.get_heads();
        let scalars = json!({"n": 1, "s": "x", "nested": {"z": null}});
        doc.transact::<_, _, AutomergeError>(|tx| put_json(tx, &ROOT, "v", &scalars))
            .expect("puts");
        let one = doc.get_changes(&heads);
        assert_eq!(one.len(), 1, "one change, for the list the object lacks");
        assert_eq!(one[0].len(), 1, "and only its deletion: {:?}", to_json(&doc));
        assert_eq!(to_json(&doc)["v"], scalars);
    }

    #[test]
    fn a_string_put_over_text_splices_so_both_sides_edits_survive() {
        let mut base = Automerge::new();
        base.transact::<_, _, AutomergeError>(|tx| {
            let text = tx.put_object(&ROOT, "note", ObjType::Text)?;
            tx.splice_text(&text, 0, 0, "buy milk")
        })
        .expect("makes text");
        let (mut a, mut b) = (base.fork(), base.fork());
        for (doc, edited) in [(&mut a, "buy oat milk"), (&mut b, "buy milk today")] {
            doc.transact::<_, _, AutomergeError>(|tx| put_json(tx, &ROOT, "note", &json!(edited)))
                .expect("puts");
        }
        a.merge(&mut b).expect("merges");
        assert_eq!(to_json(&a)["note"], json!("buy oat milk today"));
    }

    #[test]
    fn text_put_then_spliced_on_two_sides_keeps_both_edits() {
        let mut base = Automerge::new();
        base.transact::<_, _, AutomergeError>(|tx| put_text(tx, &ROOT, "note", "héllo world"))
            .expect("puts");
        let (mut a, mut b) = (base.fork(), base.fork());
        a.transact::<_, _, AutomergeError>(|tx| splice_text(tx, &ROOT, "note", 0, 1, "H"))
            .expect("splices");
        b.transact::<_, _, AutomergeError>(|tx| splice_text(tx, &ROOT, "note", 11, 0, "!"))
            .expect("splices");
        a.merge(&mut b).expect("merges");
        assert_eq!(to_json(&a)["note"], json!("Héllo world!"), "code points, both edits");
        // Putting text over text changes only the difference.
        let heads = a.get_heads();
        a.transact::<_, _, AutomergeError>(|tx| put_text(tx, &ROOT, "note", "Héllo, world!"))
            .expect("puts");
        assert_eq!(a.get_changes(&heads)[0].len(), 1, "one inserted comma");
    }

    #[test]
    fn splicing_what_is_not_text_or_past_its_end_is_refused() {
        let mut doc = Automerge::new();
        doc.transact::<_, _, AutomergeError>(|tx| {
            put_json(tx, &ROOT, "n", &json!(1))?;
            put_text(tx, &ROOT, "t", "abc")
        })
        .expect("puts");
        let mut splice = |key: &str, pos, delete| {
            doc.transact::<_, _, AutomergeError>(|tx| splice_text(tx, &ROOT, key, pos, delete, "x"))
                .map_err(|failure| failure.error)
        };
        assert!(matches!(splice("n", 0, 0), Err(AutomergeError::InvalidValueType { .. })));
        assert!(matches!(splice("missing", 0, 0), Err(AutomergeError::InvalidValueType { .. })));
        assert!(matches!(splice("t", 2, 2), Err(AutomergeError::InvalidIndex(4))));
        assert!(splice("t", 3, 0).is_ok(), "appending at the end");
    }
}
