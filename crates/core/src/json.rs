//! Reading a document as JSON and writing JSON values into it.

use automerge::transaction::Transactable;
use automerge::{AutomergeError, ObjId, ObjType, ReadDoc, ScalarValue};
use serde_json::Value;

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
    match value {
        Value::Object(map) => {
            let child = tx.put_object(obj, key, ObjType::Map)?;
            for (k, v) in map {
                put_json(tx, &child, k, v)?;
            }
        }
        Value::Array(items) => {
            let child = tx.put_object(obj, key, ObjType::List)?;
            for (i, v) in items.iter().enumerate() {
                insert_json(tx, &child, i, v)?;
            }
        }
        scalar => tx.put(obj, key, scalar_of(scalar))?,
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
        Value::Object(map) => {
            let child = tx.insert_object(list, index, ObjType::Map)?;
            for (k, v) in map {
                put_json(tx, &child, k, v)?;
            }
        }
        Value::Array(items) => {
            let child = tx.insert_object(list, index, ObjType::List)?;
            for (i, v) in items.iter().enumerate() {
                insert_json(tx, &child, i, v)?;
            }
        }
        scalar => tx.insert(list, index, scalar_of(scalar))?,
    }
    Ok(())
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
}
