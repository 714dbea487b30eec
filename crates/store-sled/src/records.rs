//! The sled store's keys (in the key directory) and records (`r` entries).

use cubby_core::CustomerId;
use cubby_store::{Keys, Records, Result, Space};

use crate::{SledStore, copy, key};

impl Keys for SledStore {
    fn get_key(&self, customer: &CustomerId) -> Result<Option<Vec<u8>>> {
        self.keys.get(customer)
    }

    fn put_key_if_absent(&self, customer: &CustomerId, wrapped: &[u8]) -> Result<Vec<u8>> {
        let _writing = copy::Entered::new(&self.gate);
        self.keys.put_if_absent(customer, wrapped)
    }

    fn replace_key(&self, customer: &CustomerId, expected: &[u8], new: &[u8]) -> Result<bool> {
        let _writing = copy::Entered::new(&self.gate);
        self.keys.replace(customer, expected, new)
    }

    fn destroy_key(&self, customer: &CustomerId) -> Result<()> {
        let _writing = copy::Entered::new(&self.gate);
        self.keys.destroy(customer)
    }

    fn list_customers(&self) -> Result<Vec<CustomerId>> {
        self.keys.list()
    }
}

impl Records for SledStore {
    fn put_record(&self, c: &CustomerId, space: Space, k: &[u8], value: &[u8]) -> Result<()> {
        self.db()?.insert(key(b'r', c, &[&[space.0], k]), value).map_err(|e| self.fail(e))?;
        Ok(())
    }

    fn get_record(&self, c: &CustomerId, space: Space, k: &[u8]) -> Result<Option<Vec<u8>>> {
        self.healthy()?;
        Ok(self
            .db
            .get(key(b'r', c, &[&[space.0], k]))
            .map_err(|e| self.fail(e))?
            .map(|v| v.to_vec()))
    }

    fn remove_record(&self, c: &CustomerId, space: Space, k: &[u8]) -> Result<()> {
        self.db()?.remove(key(b'r', c, &[&[space.0], k])).map_err(|e| self.fail(e))?;
        Ok(())
    }

    fn scan_records(&self, c: &CustomerId, space: Space) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let prefix = key(b'r', c, &[&[space.0]]);
        self.scan(prefix.clone())
            .map(|r| r.map(|(k, v)| (k[prefix.len()..].to_vec(), v.to_vec())))
            .collect()
    }
}
