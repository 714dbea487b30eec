//! Identifiers. Every id is 16 bytes printed in base58, random but for a [`ChunkId`] (a content
//! hash); none carries meaning.

use std::fmt;
use std::str::FromStr;

/// Why a string or byte slice is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The text is not base58.
    #[error("not a base58 id")]
    NotBase58,
    /// The id does not have 16 bytes.
    #[error("an id has 16 bytes, this one has {0}")]
    WrongLength(usize),
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 16]);

        impl $name {
            /// The id's 16 bytes.
            pub const fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(bytes)
            }

            /// The id as bytes.
            pub const fn as_bytes(&self) -> &[u8; 16] {
                &self.0
            }

            /// Reads an id from exactly 16 bytes.
            pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
                let array: [u8; 16] =
                    bytes.try_into().map_err(|_| IdError::WrongLength(bytes.len()))?;
                Ok(Self(array))
            }

            /// The first characters of the printed id, for logs.
            pub fn short(&self) -> String {
                self.to_string().chars().take(8).collect()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&bs58::encode(self.0).into_string())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                let bytes = bs58::decode(s).into_vec().map_err(|_| IdError::NotBase58)?;
                Self::from_slice(&bytes)
            }
        }
    };
}

id_type!(
    /// A document in one customer's store.
    DocId
);
id_type!(
    /// One installation of an app on one device.
    DeviceId
);
id_type!(
    /// A customer's store key: a keyed hash of `(tenant, subject)`, so that storage never holds
    /// the subject itself. The server derives it; clients never see it.
    CustomerId
);

id_type!(
    /// A stored part of a document's history (a change chunk or a snapshot), named by its
    /// content ([`ChunkId::of`]): two processes that write the same document never give two
    /// parts one id, and a part written twice is the same part.
    ChunkId
);

impl ChunkId {
    /// The id of the part with these bytes: the first 16 bytes of their SHA-256.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(bytes);
        Self(digest[..16].try_into().expect("SHA-256 has 32 bytes"))
    }
}

/// A position in a customer store's change feed. Every document write takes the next one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Seq(pub u64);

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn doc_id_round_trips_through_text(bytes in any::<[u8; 16]>()) {
            let id = DocId::from_bytes(bytes);
            prop_assert_eq!(id.to_string().parse::<DocId>(), Ok(id));
        }
    }

    #[test]
    fn bad_ids_are_refused() {
        assert_eq!("0OIl".parse::<DocId>(), Err(IdError::NotBase58));
        assert_eq!("2g".parse::<DocId>(), Err(IdError::WrongLength(1)));
        assert_eq!(DocId::from_slice(&[0; 17]), Err(IdError::WrongLength(17)));
    }

    #[test]
    fn debug_shows_a_short_id() {
        let id = DocId::from_bytes([7; 16]);
        assert_eq!(format!("{id:?}"), format!("DocId({})", &id.to_string()[..8]));
    }
}
