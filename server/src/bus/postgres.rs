//! The bus's log in a PostgreSQL database: `cubby_store_postgres::bus` (every feed move logged
//! by its own transaction, events in `bus_events`, read by snapshot, `NOTIFY` as the wake-up).

use cubby_store::StoreError;
use cubby_store_postgres::PgStore;
use cubby_store_postgres::bus::{Cursor, Listener};

use super::log::{BusLog, Heard};

impl BusLog for PgStore {
    type Cursor = Cursor;
    type Listener = Listener;

    async fn cursor(&self) -> Result<Cursor, StoreError> {
        self.bus_cursor().await
    }

    async fn read(&self, cursor: &mut Cursor) -> Result<Vec<Heard>, StoreError> {
        self.bus_read(cursor).await
    }

    async fn publish(&self, events: Vec<Vec<u8>>) -> Result<(), StoreError> {
        self.bus_publish(events).await
    }

    async fn listen(&self) -> Result<Listener, StoreError> {
        self.bus_listen().await
    }

    async fn notified(listener: &mut Listener) -> bool {
        listener.notified().await
    }

    async fn prune(&self) -> Result<(), StoreError> {
        self.bus_prune().await
    }
}
