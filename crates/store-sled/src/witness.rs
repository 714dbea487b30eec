//! The embedded deployment's [`Witness`]: two small files in a directory beside the store (by
//! default `<data>/witness`, never inside `db/`), which a restore of the store's files does not
//! touch.
//!
//! - `anchor`: two slots of 512 bytes, written in turn, each `digest ‖ counter ‖ length ‖ bytes`
//!   (the digest is the first 8 bytes of SHA-256 over the rest). A write goes to the slot not
//!   holding the newest, in place, then `fdatasync`; a torn write spoils at most that slot, and
//!   the other still holds the anchor before it (the store is then one flush ahead, which is
//!   fine). The newest slot whose digest matches is the anchor.
//! - `ledger`: append-only records `length ‖ bytes ‖ digest`, each followed by `fdatasync`. A
//!   record cut short at the end (a crash while appending, never acknowledged) is ignored, and
//!   cut off before the next append; a damaged one before others is refused.
//!
//! What the slots and records hold is sealed by the store ([`cubby_store::witness`]); the
//! digests only tell a torn write from a whole one.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cubby_store::witness::Witness;
use cubby_store::{Result, StoreError};

const SLOT: usize = 512;
/// digest (8), counter (8), length (2).
const SLOT_HEADER: usize = 18;

/// A witness in a directory of its own.
#[derive(Debug)]
pub struct WitnessDir {
    dir: PathBuf,
    anchor: Mutex<AnchorFile>,
    ledger: Mutex<File>,
}

#[derive(Debug)]
struct AnchorFile {
    file: File,
    /// The counter of the newest slot, and which slot holds it.
    newest: Option<(u64, usize)>,
}

/// A whole slot: its counter and bytes.
type Slot = (u64, Vec<u8>);

fn io_error(err: io::Error) -> StoreError {
    if err.raw_os_error() == Some(28) || err.kind() == io::ErrorKind::StorageFull {
        return StoreError::Full;
    }
    StoreError::Backend(Box::new(err))
}

fn digest(parts: &[&[u8]]) -> [u8; 8] {
    let whole = parts.concat();
    cubby_crypto::sha256(&whole)[..8].try_into().expect("SHA-256 has 32 bytes")
}

impl WitnessDir {
    /// Opens (creating if needed) the witness in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io_error)?;
        let open = |name: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(name))
        };
        let anchor = open("anchor").map_err(io_error)?;
        let ledger = open("ledger").map_err(io_error)?;
        // The files' entries are durable before anything is written into them.
        crate::keys::sync_dir(dir).map_err(io_error)?;
        let newest = Self::slots(&anchor)?
            .into_iter()
            .enumerate()
            .filter_map(|(slot, found)| found.map(|(counter, _)| (counter, slot)))
            .max();
        Ok(Self {
            dir: dir.to_owned(),
            anchor: Mutex::new(AnchorFile { file: anchor, newest }),
            ledger: Mutex::new(ledger),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Each slot's counter and bytes, where its digest matches.
    fn slots(mut file: &File) -> Result<[Option<Slot>; 2]> {
        let mut whole = Vec::with_capacity(2 * SLOT);
        file.seek(SeekFrom::Start(0)).map_err(io_error)?;
        file.read_to_end(&mut whole).map_err(io_error)?;
        let mut slots = [None, None];
        for (i, slot) in slots.iter_mut().enumerate() {
            let Some(buf) = whole.get(i * SLOT..) else { continue };
            let buf = &buf[..buf.len().min(SLOT)];
            if buf.len() < SLOT_HEADER {
                continue;
            }
            let counter = u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes"));
            let len = usize::from(u16::from_be_bytes(buf[16..18].try_into().expect("2 bytes")));
            let Some(bytes) = buf.get(SLOT_HEADER..SLOT_HEADER + len) else { continue };
            if buf[..8] == digest(&[&buf[8..18], bytes]) {
                *slot = Some((counter, bytes.to_vec()));
            }
        }
        Ok(slots)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Witness for WitnessDir {
    fn anchor(&self) -> Result<Option<Vec<u8>>> {
        let anchor = lock(&self.anchor);
        let Some((_, slot)) = anchor.newest else { return Ok(None) };
        let [first, second] = Self::slots(&anchor.file)?;
        Ok([first, second][slot].take().map(|(_, bytes)| bytes))
    }

    fn set_anchor(&self, sealed: &[u8]) -> Result<()> {
        if sealed.len() > SLOT - SLOT_HEADER {
            return Err(StoreError::Backend("an anchor is larger than its slot".into()));
        }
        let mut anchor = lock(&self.anchor);
        let (counter, slot) = match anchor.newest {
            Some((counter, slot)) => (counter + 1, 1 - slot),
            None => (1, 0),
        };
        let len = u16::try_from(sealed.len()).expect("smaller than a slot").to_be_bytes();
        let counter_bytes = counter.to_be_bytes();
        let header = [counter_bytes.as_slice(), &len].concat();
        let record = [digest(&[&header, sealed]).as_slice(), &header, sealed].concat();
        let file = &mut anchor.file;
        file.seek(SeekFrom::Start((slot * SLOT) as u64)).map_err(io_error)?;
        file.write_all(&record).map_err(io_error)?;
        file.sync_data().map_err(io_error)?;
        anchor.newest = Some((counter, slot));
        Ok(())
    }

    fn ledger(&self) -> Result<Vec<Vec<u8>>> {
        Ok(Self::read_ledger(&lock(&self.ledger))?.0)
    }

    fn append(&self, sealed: &[u8]) -> Result<()> {
        let mut file = lock(&self.ledger);
        let len = u32::try_from(sealed.len())
            .map_err(|_| StoreError::Backend("a ledger entry over 4 GiB".into()))?;
        let record = [len.to_be_bytes().as_slice(), sealed, &digest(&[sealed])].concat();
        // A record torn by a crash goes first: appended after it, this one would be read as
        // damage in the middle of the ledger.
        let (_, whole) = Self::read_ledger(&file)?;
        if file.metadata().map_err(io_error)?.len() > whole {
            file.set_len(whole).map_err(io_error)?;
        }
        file.seek(SeekFrom::Start(whole)).map_err(io_error)?;
        file.write_all(&record).map_err(io_error)?;
        file.sync_data().map_err(io_error)
    }
}

impl WitnessDir {
    /// The ledger's whole records, and how many bytes they take.
    fn read_ledger(mut file: &File) -> Result<(Vec<Vec<u8>>, u64)> {
        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(0)).map_err(io_error)?;
        file.read_to_end(&mut bytes).map_err(io_error)?;
        let mut entries = Vec::new();
        let mut rest = bytes.as_slice();
        while !rest.is_empty() {
            let whole = rest.get(..4).and_then(|len| {
                let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
                let entry = rest.get(4..4 + len)?;
                let check = rest.get(4 + len..12 + len)?;
                (check == digest(&[entry])).then_some((entry, 12 + len))
            });
            match whole {
                Some((entry, used)) => {
                    entries.push(entry.to_vec());
                    rest = &rest[used..];
                }
                // An append cut short by a crash: it never returned, so nothing relied on it.
                None if Self::is_torn_tail(rest) => break,
                None => return Err(StoreError::Corrupt("ledger")),
            }
        }
        Ok((entries, (bytes.len() - rest.len()) as u64))
    }

    /// Whether `rest` is a record cut short at the end of the file: its length runs past it.
    fn is_torn_tail(rest: &[u8]) -> bool {
        match rest.get(..4) {
            None => true,
            Some(len) => {
                let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
                rest.len() < 12 + len
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_whole_anchor_and_every_whole_ledger_entry_come_back_after_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let witness = WitnessDir::open(dir.path()).expect("opens");
        assert_eq!(witness.anchor().expect("anchor"), None);
        for n in 0..5u8 {
            witness.set_anchor(&[n; 40]).expect("anchor");
        }
        witness.append(b"first").expect("append");
        witness.append(b"second").expect("append");
        drop(witness);
        let witness = WitnessDir::open(dir.path()).expect("reopens");
        assert_eq!(witness.anchor().expect("anchor"), Some(vec![4; 40]));
        assert_eq!(witness.ledger().expect("ledger"), vec![b"first".to_vec(), b"second".to_vec()]);
    }

    #[test]
    fn a_torn_anchor_write_leaves_the_one_before_and_a_torn_append_is_ignored() {
        let dir = tempfile::tempdir().expect("temp dir");
        let witness = WitnessDir::open(dir.path()).expect("opens");
        witness.set_anchor(&[1; 40]).expect("anchor");
        witness.set_anchor(&[2; 40]).expect("anchor");
        witness.append(b"whole").expect("append");
        drop(witness);
        // The newest slot (the second) half overwritten, and half a record appended.
        let mut anchor =
            OpenOptions::new().write(true).open(dir.path().join("anchor")).expect("file");
        anchor.seek(SeekFrom::Start(SLOT as u64 + 10)).expect("seek");
        anchor.write_all(&[0xAA; 20]).expect("tear");
        let mut ledger =
            OpenOptions::new().append(true).open(dir.path().join("ledger")).expect("file");
        ledger.write_all(&[0, 0, 0, 9, b'h', b'a']).expect("half an append");
        let witness = WitnessDir::open(dir.path()).expect("reopens");
        assert_eq!(witness.anchor().expect("anchor"), Some(vec![1; 40]));
        assert_eq!(witness.ledger().expect("ledger"), vec![b"whole".to_vec()]);
        // The torn record is cut off by the next append, not left in the middle.
        witness.append(b"after").expect("append");
        drop(witness);
        let witness = WitnessDir::open(dir.path()).expect("reopens");
        assert_eq!(witness.ledger().expect("ledger"), vec![b"whole".to_vec(), b"after".to_vec()]);
        // A damaged record before others is refused.
        drop(witness);
        let mut ledger =
            OpenOptions::new().write(true).open(dir.path().join("ledger")).expect("file");
        ledger.seek(SeekFrom::Start(4)).expect("seek");
        ledger.write_all(b"W").expect("flip");
        let witness = WitnessDir::open(dir.path()).expect("reopens");
        assert!(matches!(witness.ledger(), Err(StoreError::Corrupt("ledger"))));
    }
}
