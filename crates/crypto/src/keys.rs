//! Keys: the master secret, key-encryption keys, data keys, and the customer-id hash.
//!
//! ```text
//! master secret (file, 0600) --HKDF--> KEK n --wraps--> data key of each customer --seals--> records
//!                            \--HKDF--> id key --HMAC(tenant, subject)--> customer store key
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::{hkdf, hmac};
use zeroize::Zeroizing;

use crate::envelope::{self, OpenError};

pub use crate::envelope::DataKey;

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The file does not exist.
    #[error(
        "master key file {0} does not exist; create one with `cubby-server keys create --out {0}` \
         (and back it up: without it the data is unreadable)"
    )]
    Missing(PathBuf),
    /// The file could not be read or written.
    #[error("master key file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but does not hold a Cubby master key.
    #[error("master key file {0} is not a Cubby master key")]
    Malformed(PathBuf),
}

const MASTER_PREFIX: &str = "cubby-master-key-v1:";
const KEK_PREFIX: &str = "cubby-kek-v1:";
const RETIRED_PREFIX: &str = "cubby-kek-retired-v1:";

/// The server's (or a device's) root secret, plus any key-encryption keys added by rotation.
///
/// The file holds one line per secret: the root (`cubby-master-key-v1:<base64>`, which derives
/// customer ids and KEK 1), then one `cubby-kek-v1:<generation>:<base64>` line per rotation and
/// one `cubby-kek-retired-v1:<generation>` line per retired generation.
pub struct MasterSecret {
    root: Zeroizing<[u8; 32]>,
    added: BTreeMap<u32, Zeroizing<[u8; 32]>>,
    retired: std::collections::BTreeSet<u32>,
}

impl fmt::Debug for MasterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterSecret(..)")
    }
}

/// Why a key could not be rotated or retired.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotateError {
    /// The key file could not be used.
    #[error(transparent)]
    File(#[from] KeyFileError),
    /// The generation does not exist.
    #[error("there is no key-encryption key {0}")]
    Unknown(u32),
    /// The generation is the one new keys are wrapped with.
    #[error("key-encryption key {0} is the current one; rotate first")]
    Current(u32),
    /// Data keys are still wrapped with the generation.
    #[error("{count} data keys are still wrapped with key-encryption key {generation}")]
    InUse {
        /// The generation.
        generation: u32,
        /// How many wrapped keys use it.
        count: usize,
    },
}

fn decode_secret(text: &str, path: &Path) -> Result<Zeroizing<[u8; 32]>, KeyFileError> {
    let bytes = Zeroizing::new(
        STANDARD.decode(text).map_err(|_| KeyFileError::Malformed(path.to_owned()))?,
    );
    let array: [u8; 32] =
        bytes.as_slice().try_into().map_err(|_| KeyFileError::Malformed(path.to_owned()))?;
    Ok(Zeroizing::new(array))
}

impl MasterSecret {
    /// A master secret from 32 secret bytes (for example an app-supplied device key).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self { root: Zeroizing::new(bytes), added: BTreeMap::new(), retired: Default::default() }
    }

    /// Reads a master key file.
    pub fn read(path: &Path) -> Result<Self, KeyFileError> {
        let io = |source| KeyFileError::Io { path: path.to_owned(), source };
        let malformed = || KeyFileError::Malformed(path.to_owned());
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                KeyFileError::Missing(path.to_owned())
            } else {
                io(e)
            }
        })?);
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let root =
            lines.next().and_then(|l| l.strip_prefix(MASTER_PREFIX)).ok_or_else(malformed)?;
        let mut secret = Self::from_bytes(*decode_secret(root, path)?);
        for line in lines {
            if let Some(rest) = line.strip_prefix(KEK_PREFIX) {
                let (generation, key) = rest.split_once(':').ok_or_else(malformed)?;
                let generation: u32 = generation.parse().map_err(|_| malformed())?;
                if generation < 2
                    || secret.added.insert(generation, decode_secret(key, path)?).is_some()
                {
                    return Err(malformed());
                }
            } else if let Some(generation) = line.strip_prefix(RETIRED_PREFIX) {
                secret.retired.insert(generation.parse().map_err(|_| malformed())?);
            } else {
                return Err(malformed());
            }
        }
        Ok(secret)
    }

    /// Creates a new random master key file readable only by its owner. Refuses to overwrite.
    pub fn create(path: &Path) -> Result<Self, KeyFileError> {
        let secret = Self::from_bytes(crate::random_array());
        write_private_file(path, secret.encode().as_bytes())
            .map_err(|source| KeyFileError::Io { path: path.to_owned(), source })?;
        Ok(secret)
    }

    fn encode(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(format!("{MASTER_PREFIX}{}\n", STANDARD.encode(*self.root)));
        for (generation, key) in &self.added {
            text.push_str(&format!("{KEK_PREFIX}{generation}:{}\n", STANDARD.encode(**key)));
        }
        for generation in &self.retired {
            text.push_str(&format!("{RETIRED_PREFIX}{generation}\n"));
        }
        text
    }

    /// Every key-encryption key generation, retired or not.
    pub fn generations(&self) -> Vec<u32> {
        std::iter::once(1).chain(self.added.keys().copied()).collect()
    }

    /// The generation new data keys are wrapped with: the newest one not retired.
    pub fn current_generation(&self) -> Option<u32> {
        self.generations().into_iter().rev().find(|g| !self.retired.contains(g))
    }

    /// Adds a new random key-encryption key to the file at `path` and returns its generation.
    /// A running server picks it up and re-wraps every data key with it in the background.
    pub fn rotate(path: &Path) -> Result<u32, KeyFileError> {
        let mut secret = Self::read(path)?;
        let generation = secret.generations().last().copied().unwrap_or(1) + 1;
        secret.added.insert(generation, Zeroizing::new(crate::random_array()));
        replace_private_file(path, secret.encode().as_bytes())
            .map_err(|source| KeyFileError::Io { path: path.to_owned(), source })?;
        Ok(generation)
    }

    /// Retires `generation` in the file at `path`: its material is deleted (generation 1 is
    /// derived from the root, which stays, so it is only marked) and no keyring built from the
    /// file will unwrap with it. `in_use` counts the data keys still wrapped with a generation;
    /// a generation still in use, or the current one, is refused.
    pub fn retire(
        path: &Path,
        generation: u32,
        in_use: impl FnOnce(u32) -> Result<usize, KeyFileError>,
    ) -> Result<(), RotateError> {
        let mut secret = Self::read(path)?;
        if !secret.generations().contains(&generation) {
            return Err(RotateError::Unknown(generation));
        }
        if secret.current_generation() == Some(generation) {
            return Err(RotateError::Current(generation));
        }
        let count = in_use(generation)?;
        if count > 0 {
            return Err(RotateError::InUse { generation, count });
        }
        secret.added.remove(&generation);
        secret.retired.insert(generation);
        replace_private_file(path, secret.encode().as_bytes())
            .map_err(|source| KeyFileError::Io { path: path.to_owned(), source })?;
        Ok(())
    }
}

/// Atomically replaces `path` with a new 0600 file holding `contents`.
fn replace_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    write_private_file(&tmp, contents)?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Writes a new file with mode 0600 (on Unix); fails if it exists.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Why a wrapped data key did not unwrap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnwrapError {
    /// The key was wrapped by a KEK this keyring does not hold (or one that was retired).
    #[error("data key wrapped by unknown key-encryption key {0}")]
    UnknownKek(u32),
    /// The wrapped key is damaged, belongs to another customer, or the master key is wrong.
    #[error("wrapped data key does not open: {0}")]
    Open(#[from] OpenError),
}

/// The key-encryption keys and the id key, derived from one master secret.
pub struct Keyring {
    current: u32,
    keks: BTreeMap<u32, DataKey>,
    ids: hmac::Key,
    witness: DataKey,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring").field("current_kek", &self.current).finish_non_exhaustive()
    }
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn derive(master: &MasterSecret, info: &[u8]) -> [u8; 32] {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"cubby v1").extract(master.root.as_slice());
    let mut out = [0u8; 32];
    prk.expand(&[info], Len(32))
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 can expand 32 bytes");
    out
}

impl Keyring {
    /// The keyring of `master`: KEK 1 derived from the root, the KEKs added by rotation, minus
    /// the retired ones. New keys are wrapped with the newest.
    pub fn from_master(master: &MasterSecret) -> Self {
        let mut keks = BTreeMap::new();
        if !master.retired.contains(&1) {
            keks.insert(1, DataKey::from_bytes(derive(master, b"kek 1")));
        }
        for (generation, key) in &master.added {
            if !master.retired.contains(generation) {
                keks.insert(*generation, DataKey::from_bytes(**key));
            }
        }
        let id_key = Zeroizing::new(derive(master, b"customer ids"));
        Self {
            current: master.current_generation().unwrap_or(1),
            keks,
            ids: hmac::Key::new(hmac::HMAC_SHA256, id_key.as_slice()),
            witness: DataKey::from_bytes(derive(master, b"witness")),
        }
    }

    /// The key that seals what a server keeps about its store outside it (its anchor and
    /// ledger): derived from the root secret, which never leaves the master key file, so it
    /// stays the same across key rotations and opens even when the store is gone.
    pub fn witness_key(&self) -> &DataKey {
        &self.witness
    }

    /// The generation new data keys are wrapped with.
    pub fn current_generation(&self) -> u32 {
        self.current
    }

    /// The KEK generation a wrapped key names, if it is long enough to name one.
    pub fn generation_of(wrapped: &[u8]) -> Option<u32> {
        Some(u32::from_be_bytes(wrapped.get(..4)?.try_into().ok()?))
    }

    /// The store key of a customer: a keyed hash, so storage never holds the subject.
    pub fn customer_id(&self, tenant: &str, subject: &str) -> [u8; 16] {
        let mut ctx = hmac::Context::with_key(&self.ids);
        ctx.update(&(tenant.len() as u64).to_be_bytes());
        ctx.update(tenant.as_bytes());
        ctx.update(subject.as_bytes());
        ctx.sign().as_ref()[..16].try_into().expect("HMAC-SHA256 tags have 32 bytes")
    }

    fn wrap_aad(owner: &[u8], kek: u32) -> Vec<u8> {
        [b"cubby data key\0".as_slice(), owner, &kek.to_be_bytes()].concat()
    }

    /// Wraps `key` for `owner` (a customer id) under the current KEK.
    pub fn wrap(&self, owner: &[u8], key: &DataKey) -> Vec<u8> {
        let kek = self.keks.get(&self.current).expect("the current generation is never retired");
        let mut out = self.current.to_be_bytes().to_vec();
        out.extend(envelope::seal(kek, &Self::wrap_aad(owner, self.current), key.expose()));
        out
    }

    /// Unwraps a key wrapped by [`Keyring::wrap`] for the same owner.
    pub fn unwrap(&self, owner: &[u8], wrapped: &[u8]) -> Result<DataKey, UnwrapError> {
        let (id, sealed) = wrapped.split_at_checked(4).ok_or(OpenError::Truncated)?;
        let id = u32::from_be_bytes(id.try_into().expect("split at 4"));
        let kek = self.keks.get(&id).ok_or(UnwrapError::UnknownKek(id))?;
        let bytes = Zeroizing::new(envelope::open(kek, &Self::wrap_aad(owner, id), sealed)?);
        let array: [u8; 32] = bytes.as_slice().try_into().map_err(|_| OpenError::Authentication)?;
        Ok(DataKey::from_bytes(array))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_key_opens_only_for_its_owner_and_master() {
        let ring = Keyring::from_master(&MasterSecret::from_bytes([1; 32]));
        let key = DataKey::generate();
        let wrapped = ring.wrap(b"alice", &key);
        assert_eq!(ring.unwrap(b"alice", &wrapped).expect("opens").expose(), key.expose());
        assert!(ring.unwrap(b"bob", &wrapped).is_err());
        let other = Keyring::from_master(&MasterSecret::from_bytes([2; 32]));
        assert!(other.unwrap(b"alice", &wrapped).is_err());
    }

    #[test]
    fn customer_ids_separate_tenant_and_subject() {
        let ring = Keyring::from_master(&MasterSecret::from_bytes([1; 32]));
        assert_ne!(ring.customer_id("ab", "c"), ring.customer_id("a", "bc"));
        assert_eq!(ring.customer_id("a", "b"), ring.customer_id("a", "b"));
    }

    #[test]
    fn master_key_file_round_trips_and_is_private() {
        let dir = tempdir_for_test();
        let path = dir.join("master.key");
        let created = MasterSecret::create(&path).expect("creates");
        let read = MasterSecret::read(&path).expect("reads");
        assert_eq!(created.root.as_slice(), read.root.as_slice());
        assert!(MasterSecret::create(&path).is_err(), "never overwrites");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "nonsense").expect("write");
        assert!(matches!(MasterSecret::read(&path), Err(KeyFileError::Malformed(_))));
        assert_eq!(format!("{read:?}"), "MasterSecret(..)");
        std::fs::remove_dir_all(&dir).ok();
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn rotation_adds_a_generation_and_retirement_removes_it() {
        let dir = tempdir_for_test();
        let path = dir.join("master.key");
        let first = Keyring::from_master(&MasterSecret::create(&path).expect("creates"));
        let key = DataKey::generate();
        let old = first.wrap(b"alice", &key);
        assert_eq!(MasterSecret::rotate(&path).expect("rotates"), 2);
        let second = Keyring::from_master(&MasterSecret::read(&path).expect("reads"));
        assert_eq!(second.current_generation(), 2);
        assert_eq!(second.customer_id("t", "s"), first.customer_id("t", "s"), "ids stay stable");
        // Both generations open; new wraps use the new one.
        assert_eq!(second.unwrap(b"alice", &old).expect("opens").expose(), key.expose());
        let new = second.wrap(b"alice", &key);
        assert_eq!(Keyring::generation_of(&new), Some(2));
        // The current generation and one still in use cannot be retired.
        assert!(matches!(MasterSecret::retire(&path, 2, |_| Ok(0)), Err(RotateError::Current(2))));
        assert!(matches!(
            MasterSecret::retire(&path, 1, |_| Ok(3)),
            Err(RotateError::InUse { generation: 1, count: 3 })
        ));
        assert!(matches!(MasterSecret::retire(&path, 9, |_| Ok(0)), Err(RotateError::Unknown(9))));
        MasterSecret::retire(&path, 1, |_| Ok(0)).expect("retires");
        let third = Keyring::from_master(&MasterSecret::read(&path).expect("reads"));
        assert!(matches!(third.unwrap(b"alice", &old), Err(UnwrapError::UnknownKek(1))));
        assert_eq!(third.unwrap(b"alice", &new).expect("opens").expose(), key.expose());
        // A second rotation, then retiring 2 deletes its material from the file.
        assert_eq!(MasterSecret::rotate(&path).expect("rotates"), 3);
        MasterSecret::retire(&path, 2, |_| Ok(0)).expect("retires");
        let text = std::fs::read_to_string(&path).expect("reads");
        assert!(!text.contains("cubby-kek-v1:2:"));
        assert_eq!(MasterSecret::read(&path).expect("reads").current_generation(), Some(3));
        std::fs::remove_dir_all(&dir).ok();
    }

    fn tempdir_for_test() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cubby-key-{}", hex(&crate::random_array::<8>())));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }
}
