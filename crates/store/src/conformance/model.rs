//! The model-based property test: random operations and reopens against a `BTreeMap`.

use std::collections::{BTreeMap, HashMap};

use cubby_core::{ChunkId, Seq};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::*;

#[derive(Clone, Debug)]
enum Op {
    Write { c: u8, d: u8, meta: u8, chunk: Option<Vec<u8>> },
    Compact { c: u8, d: u8 },
    Delete { c: u8, d: u8 },
    PutRecord { c: u8, space: u8, key: u8, value: u8 },
    RemoveRecord { c: u8, space: u8, key: u8 },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..2u8, 0..3u8, any::<u8>(), proptest::option::of(proptest::collection::vec(any::<u8>(), 1..8)))
            .prop_map(|(c, d, meta, chunk)| Op::Write { c, d, meta, chunk }),
        2 => (0..2u8, 0..3u8).prop_map(|(c, d)| Op::Compact { c, d }),
        1 => (0..2u8, 0..3u8).prop_map(|(c, d)| Op::Delete { c, d }),
        2 => (0..2u8, 1..3u8, 0..3u8, any::<u8>()).prop_map(|(c, space, key, value)| Op::PutRecord { c, space, key, value }),
        1 => (0..2u8, 1..3u8, 0..3u8).prop_map(|(c, space, key)| Op::RemoveRecord { c, space, key }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    docs: BTreeMap<(u8, u8), DocRecords>,
    /// Per customer, documents in feed order (oldest first).
    feed: HashMap<u8, Vec<u8>>,
    records: BTreeMap<(u8, u8, u8), u8>,
}

impl Model {
    fn touch(&mut self, c: u8, d: u8) {
        let feed = self.feed.entry(c).or_default();
        feed.retain(|x| *x != d);
        feed.push(d);
    }
}

/// Random writes, compactions, deletions, record updates and reopens agree with a `BTreeMap`.
pub fn random_operations_match_the_model<S: Store, B: FnMut() -> S>(new_backend: impl Fn() -> B) {
    let mut runner = TestRunner::new(Config { cases: 24, ..Config::default() });
    let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        let mut backend = new_backend();
        let mut store = Some(backend());
        let mut model = Model::default();
        for op in ops {
            let s = store.as_ref().expect("a store is open between operations");
            match op {
                Op::Write { c, d, meta, chunk } => {
                    let records = model.docs.entry((c, d)).or_insert_with(|| DocRecords {
                        meta: vec![],
                        snapshot: None,
                        chunks: vec![],
                        seq: Seq(0),
                    });
                    records.meta = vec![meta];
                    if let Some(bytes) = &chunk {
                        records.chunks.push((ChunkId::of(bytes), bytes.clone()));
                        records.chunks.sort();
                        records.chunks.dedup();
                    }
                    let written =
                        chunk.as_deref().map(|bytes| Chunk { id: ChunkId::of(bytes), bytes });
                    s.write_doc(&customer(c), &doc(d), &[meta], written).expect("write");
                    model.touch(c, d);
                }
                Op::Compact { c, d } => {
                    if let Some(records) = model.docs.get_mut(&(c, d))
                        && !records.chunks.is_empty()
                    {
                        let old = records.snapshot.take();
                        let mut replaces: Vec<ChunkId> = old.iter().map(|s| s.id).collect();
                        let mut bytes = old.map(|s| s.bytes).unwrap_or_default();
                        replaces.extend(records.chunks.iter().map(|(id, _)| *id));
                        bytes.extend(records.chunks.drain(..).flat_map(|(_, b)| b));
                        let snapshot = Snapshot { id: ChunkId::of(&bytes), bytes };
                        s.compact(&customer(c), &doc(d), &snapshot, &replaces).expect("compact");
                        records.snapshot = Some(snapshot);
                    }
                }
                Op::Delete { c, d } => {
                    s.delete_doc(&customer(c), &doc(d)).expect("delete");
                    model.docs.remove(&(c, d));
                    model.touch(c, d);
                }
                Op::PutRecord { c, space, key, value } => {
                    s.put_record(&customer(c), Space(space), &[key], &[value]).expect("put");
                    model.records.insert((c, space, key), value);
                }
                Op::RemoveRecord { c, space, key } => {
                    s.remove_record(&customer(c), Space(space), &[key]).expect("remove");
                    model.records.remove(&(c, space, key));
                }
                Op::Reopen => {
                    s.flush().expect("flush");
                    drop(store.take());
                    store = Some(backend());
                }
            }
            let s = store.as_ref().expect("open");
            for c in 0..2u8 {
                let feed = s.feed_since(&customer(c), Seq(0)).expect("feed");
                for d in 0..3u8 {
                    // The model cannot know positions (backends may leave gaps): the document's
                    // must be the one the feed reports for it.
                    let seq = feed.iter().find(|(_, fd)| *fd == doc(d)).map_or(Seq(0), |(s, _)| *s);
                    let want = model.docs.get(&(c, d)).map(|r| DocRecords { seq, ..r.clone() });
                    let meta = want.as_ref().map(|r| (seq, r.meta.clone()));
                    prop_assert_eq!(load(s, &customer(c), &doc(d)), want);
                    prop_assert_eq!(s.doc_meta(&customer(c), &doc(d)).expect("meta"), meta);
                }
                let listed: Vec<_> = s
                    .list_docs(&customer(c))
                    .expect("list")
                    .into_iter()
                    .map(|(d, _, meta)| (d, meta))
                    .collect();
                let want: Vec<_> = model
                    .docs
                    .iter()
                    .filter(|((mc, _), _)| *mc == c)
                    .map(|((_, d), r)| (doc(*d), r.meta.clone()))
                    .collect();
                prop_assert_eq!(listed, want);
                let feed = s.feed_since(&customer(c), Seq(0)).expect("feed");
                prop_assert!(feed.windows(2).all(|w| w[0].0 < w[1].0), "feed positions increase");
                let order: Vec<_> = feed.iter().map(|(_, d)| *d).collect();
                let want: Vec<_> = model
                    .feed
                    .get(&c)
                    .map_or_else(Vec::new, |f| f.iter().map(|d| doc(*d)).collect());
                prop_assert_eq!(order, want);
                if let Some((first, _)) = feed.first() {
                    prop_assert_eq!(
                        s.feed_since(&customer(c), *first).expect("feed"),
                        feed[1..].to_vec()
                    );
                }
                for space in 1..3u8 {
                    let scanned = s.scan_records(&customer(c), Space(space)).expect("scan");
                    let want: Vec<_> = model
                        .records
                        .iter()
                        .filter(|((mc, ms, _), _)| *mc == c && *ms == space)
                        .map(|((_, _, k), v)| (vec![*k], vec![*v]))
                        .collect();
                    prop_assert_eq!(scanned, want);
                }
            }
        }
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}
