//! Several server nodes over one shared store, hearing each other through a simulated bus log
//! (the real [`LogBus`] over [`SimLog`] instead of PostgreSQL): each node's store logs its feed
//! moves as it makes them ([`Logged`]); each entry reaches each reader after its own random
//! delay, so readers see entries late and out of order; wake-ups are lost one time in three
//! and delayed at random; readers poll besides. Node crashes are the driver's.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cubby_core::{ChunkId, CustomerId, DocId, Seq};
use cubby_server::bus::log::{BusLog, Heard};
use cubby_store::{
    Chunk, DocRecords, Docs, Forward, ForwardKeys, ForwardRecords, MetaAt, Result, Snapshot, Store,
};
use cubby_tests::Rng;
use cubby_tests::sim_disk::SimDisk;
use tokio::sync::mpsc;

use crate::lock;

/// The longest an entry takes to reach a reader.
const MAX_DELAY_MS: u64 = 2_000;

/// The log the nodes share.
#[derive(Default)]
pub(crate) struct SimLog {
    state: Mutex<LogState>,
}

#[derive(Default)]
struct LogState {
    /// Every entry, in the order it was written, with the simulated time it was.
    entries: Vec<(Duration, Heard)>,
    /// Each subscription to wake-ups, with the node it is on.
    listeners: Vec<(i64, mpsc::Sender<()>)>,
    /// Decides wake-ups lost and delayed.
    rng: Option<Rng>,
}

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

fn writer_of(heard: &Heard) -> i64 {
    match heard {
        Heard::Changed { writer, .. } | Heard::Event { writer, .. } => *writer,
    }
}

impl SimLog {
    pub(crate) fn new(seed: u64) -> Arc<Self> {
        let state = LogState { rng: Some(Rng(seed ^ 0xB05)), ..LogState::default() };
        Arc::new(Self { state: Mutex::new(state) })
    }

    /// Node `writer`'s view of the log.
    pub(crate) fn node(self: &Arc<Self>, writer: i64) -> NodeLog {
        NodeLog { log: self.clone(), writer }
    }

    fn append(&self, heard: Heard) {
        lock(&self.state).entries.push((now(), heard));
    }

    /// Wakes every node but `from`'s listeners, each after a random delay, one in three never.
    fn wake(&self, from: i64) {
        let mut state = lock(&self.state);
        state.listeners.retain(|(_, tx)| !tx.is_closed());
        let listeners: Vec<_> = state
            .listeners
            .iter()
            .filter(|(node, _)| *node != from)
            .map(|(_, tx)| tx.clone())
            .collect();
        let rng = state.rng.as_mut().expect("seeded");
        for tx in listeners {
            if rng.below(3) == 0 {
                continue;
            }
            let delay = rng.millis(0, 500);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tx.try_send(());
            });
        }
    }
}

/// When entry `index` becomes visible to node `reader`: a delay of its own for each pair.
fn visible_at(written: Duration, index: usize, reader: i64) -> Duration {
    let mut mix = Rng((index as u64) << 8 ^ reader as u64 ^ 0x5EED);
    written + Duration::from_millis(mix.next_u64() % MAX_DELAY_MS)
}

/// One node's view of the log.
pub(crate) struct NodeLog {
    log: Arc<SimLog>,
    writer: i64,
}

/// The entries a reader has read: all below `next`, and those of `seen` above it.
pub(crate) struct SimCursor {
    next: usize,
    seen: BTreeSet<usize>,
}

impl BusLog for NodeLog {
    type Cursor = SimCursor;
    type Listener = mpsc::Receiver<()>;

    async fn cursor(&self) -> Result<SimCursor> {
        Ok(SimCursor { next: lock(&self.log.state).entries.len(), seen: BTreeSet::new() })
    }

    async fn read(&self, cursor: &mut SimCursor) -> Result<Vec<Heard>> {
        let state = lock(&self.log.state);
        let now = now();
        let mut heard = Vec::new();
        for (index, (written, entry)) in state.entries.iter().enumerate().skip(cursor.next) {
            if cursor.seen.contains(&index) || visible_at(*written, index, self.writer) > now {
                continue;
            }
            cursor.seen.insert(index);
            if writer_of(entry) != self.writer {
                heard.push(entry.clone());
            }
        }
        while cursor.seen.remove(&cursor.next) {
            cursor.next += 1;
        }
        Ok(heard)
    }

    async fn publish(&self, events: Vec<Vec<u8>>) -> Result<()> {
        for bytes in events {
            self.log.append(Heard::Event { writer: self.writer, bytes });
        }
        self.log.wake(self.writer);
        Ok(())
    }

    async fn listen(&self) -> Result<mpsc::Receiver<()>> {
        let (tx, rx) = mpsc::channel(1);
        lock(&self.log.state).listeners.push((self.writer, tx));
        Ok(rx)
    }

    async fn notified(listener: &mut mpsc::Receiver<()>) -> bool {
        listener.recv().await.is_some()
    }
}

/// The shared disk as one node writes it: every feed move it makes is logged, and wakes the
/// other nodes, in the same call, as a database does in the write's transaction.
pub(crate) struct Logged {
    pub(crate) disk: SimDisk,
    pub(crate) log: Arc<SimLog>,
    pub(crate) writer: i64,
}

impl Logged {
    fn moved(&self, customer: &CustomerId, doc: &DocId, seq: Result<Seq>) -> Result<Seq> {
        let seq = seq?;
        self.log.append(Heard::Changed {
            writer: self.writer,
            customer: *customer,
            doc: *doc,
            seq,
        });
        self.log.wake(self.writer);
        Ok(seq)
    }
}

impl Forward for Logged {
    type Inner = SimDisk;
    fn inner(&self) -> &SimDisk {
        &self.disk
    }
}
impl ForwardKeys for Logged {}
impl ForwardRecords for Logged {}

impl Docs for Logged {
    fn write_doc(
        &self,
        c: &CustomerId,
        d: &DocId,
        meta: &dyn MetaAt,
        chunk: Option<Chunk<'_>>,
    ) -> Result<Seq> {
        self.moved(c, d, self.disk.write_doc(c, d, meta, chunk))
    }
    fn write_doc_off_feed(
        &self,
        c: &CustomerId,
        d: &DocId,
        meta: &dyn MetaAt,
        chunk: Option<Chunk<'_>>,
    ) -> Result<()> {
        self.disk.write_doc_off_feed(c, d, meta, chunk)
    }
    fn load(&self, c: &CustomerId, d: &DocId) -> Result<Option<DocRecords>> {
        self.disk.load(c, d)
    }
    fn doc_meta(&self, c: &CustomerId, d: &DocId) -> Result<Option<(Seq, Vec<u8>)>> {
        self.disk.doc_meta(c, d)
    }
    fn compact(&self, c: &CustomerId, d: &DocId, s: &Snapshot, r: &[ChunkId]) -> Result<()> {
        self.disk.compact(c, d, s, r)
    }
    fn delete_doc(&self, c: &CustomerId, d: &DocId) -> Result<Seq> {
        self.moved(c, d, self.disk.delete_doc(c, d))
    }
    fn list_docs(&self, c: &CustomerId) -> Result<Vec<(DocId, Seq, Vec<u8>)>> {
        self.disk.list_docs(c)
    }
    fn feed_since(&self, c: &CustomerId, cursor: Seq) -> Result<Vec<(Seq, DocId)>> {
        self.disk.feed_since(c, cursor)
    }
    fn feed_head(&self, c: &CustomerId) -> Result<Seq> {
        self.disk.feed_head(c)
    }
}

impl Store for Logged {
    fn erase_customer(&self, c: &CustomerId) -> Result<()> {
        self.disk.erase_customer(c)
    }
    fn flush(&self) -> Result<()> {
        self.disk.flush()
    }
}
