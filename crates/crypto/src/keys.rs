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

/// A 256-bit AES-GCM key. Never printed; zeroed on drop.
#[derive(Clone)]
pub struct DataKey(Zeroizing<[u8; 32]>);

impl DataKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        Self(Zeroizing::new(crate::random_array()))
    }

    /// A key from 32 secret bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The raw key, for the cipher only.
    pub(crate) fn expose(&self) -> &[u8] {
        self.0.as_slice()
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The file could not be read or written.
    #[error("master key file {path}: {source}")]
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

/// The server's (or a device's) root secret. Everything else is derived from it.
pub struct MasterSecret(Zeroizing<[u8; 32]>);

impl fmt::Debug for MasterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterSecret(..)")
    }
}

impl MasterSecret {
    /// A master secret from 32 secret bytes (for example an app-supplied device key).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Reads a master key file.
    pub fn read(path: &Path) -> Result<Self, KeyFileError> {
        let io = |source| KeyFileError::Io { path: path.to_owned(), source };
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        let encoded = text
            .trim()
            .strip_prefix(MASTER_PREFIX)
            .ok_or_else(|| KeyFileError::Malformed(path.to_owned()))?;
        let bytes = Zeroizing::new(
            STANDARD.decode(encoded).map_err(|_| KeyFileError::Malformed(path.to_owned()))?,
        );
        let array: [u8; 32] =
            bytes.as_slice().try_into().map_err(|_| KeyFileError::Malformed(path.to_owned()))?;
        Ok(Self::from_bytes(array))
    }

    /// Creates a new random master key file readable only by its owner. Refuses to overwrite.
    pub fn create(path: &Path) -> Result<Self, KeyFileError> {
        let secret = Self(Zeroizing::new(crate::random_array()));
        let text = Zeroizing::new(format!("{MASTER_PREFIX}{}\n", STANDARD.encode(*secret.0)));
        write_private_file(path, text.as_bytes())
            .map_err(|source| KeyFileError::Io { path: path.to_owned(), source })?;
        Ok(secret)
    }
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
    /// The key was wrapped by a KEK this keyring does not hold.
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
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"cubby v1").extract(master.0.as_slice());
    let mut out = [0u8; 32];
    prk.expand(&[info], Len(32))
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 can expand 32 bytes");
    out
}

impl Keyring {
    /// The keyring with KEK generation 1, derived from `master`.
    pub fn from_master(master: &MasterSecret) -> Self {
        let kek = DataKey::from_bytes(derive(master, b"kek 1"));
        let id_key = Zeroizing::new(derive(master, b"customer ids"));
        Self {
            current: 1,
            keks: BTreeMap::from([(1, kek)]),
            ids: hmac::Key::new(hmac::HMAC_SHA256, id_key.as_slice()),
        }
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
        let kek = &self.keks[&self.current];
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
        let dir =
            std::env::temp_dir().join(format!("cubby-key-{}", hex(&crate::random_array::<8>())));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("master.key");
        let created = MasterSecret::create(&path).expect("creates");
        let read = MasterSecret::read(&path).expect("reads");
        assert_eq!(created.0.as_slice(), read.0.as_slice());
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
}
