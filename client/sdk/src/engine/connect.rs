//! Opening a connection: the hello, the device's proof of its key, and what a new server
//! epoch means for what the device holds.

use cubby_proto::pb;
use cubby_store::Space;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{ACCOUNT, CURSOR, EPOCH, Kept, MAX_MESSAGE, Remote, Session, SyncFailure};
use crate::LOCAL;

impl Session<'_> {
    /// Connects: a fresh stream, the hello with the device's cursor and epoch, the device's
    /// proof of its key, and the server's epoch taken. The stream is the server's frames.
    pub(super) async fn open(
        &mut self,
        remote: &Remote,
        refresh: bool,
    ) -> Result<tonic::Streaming<pb::ServerFrame>, SyncFailure> {
        let token =
            remote.token.token(refresh).await.map_err(|e| SyncFailure::Unauthenticated(e.0))?;
        let channel = remote.connect().await.map_err(|e| super::transport::connect_failure(&e))?;
        let mut client = pb::sync_client::SyncClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);

        let (cursor, kept) = self
            .blocking(|store| {
                let cursor = store
                    .get_record(&LOCAL, Space::LOCAL, CURSOR)?
                    .and_then(|v| v.try_into().ok().map(u64::from_be_bytes))
                    .unwrap_or(0);
                let epoch = store.get_record(&LOCAL, Space::LOCAL, EPOCH)?;
                let account = store.get_record(&LOCAL, Space::LOCAL, ACCOUNT)?;
                Ok((cursor, Kept { epoch, account }))
            })
            .await?;
        self.cursor = cursor;
        self.announced = cursor;
        let (out, frames) = mpsc::channel(256);
        let hello = pb::Hello {
            device_id: self.inner.device_id.as_bytes().to_vec(),
            cursor,
            client_version: concat!("cubby-client/", env!("CARGO_PKG_VERSION")).into(),
            device_name: self.inner.device_name.clone(),
            platform: self.inner.platform.clone(),
            public_key: self.inner.device_key.public_key().to_vec(),
            epoch: kept.epoch.clone().unwrap_or_default(),
        };
        out.send(pb::ClientFrame { frame: Some(pb::client_frame::Frame::Hello(hello)) })
            .await
            .map_err(|_| SyncFailure::Other("stream closed".into()))?;
        self.out = Some(out);
        // A queued frame is one sync message; on the wire it may take several parts.
        let frames = ReceiverStream::new(frames).flat_map(|frame| {
            futures_util::stream::iter(cubby_proto::parts::split_client_frame(frame))
        });
        let mut request = tonic::Request::new(frames);
        crate::wire::bearer(&mut request, &token).map_err(SyncFailure::Unauthenticated)?;
        let mut inbound =
            client.connect(request).await.map_err(|s| remote.failure(&s))?.into_inner();
        // The server's first frame is a challenge: prove this device's key before anything else.
        match inbound.message().await.map_err(|s| remote.failure(&s))? {
            Some(pb::ServerFrame {
                frame: Some(pb::server_frame::Frame::Challenge(challenge)),
            }) => {
                // Another account's token on this device's data: say nothing, sync nothing.
                if kept.account.as_ref().is_some_and(|kept| *kept != challenge.account) {
                    return Err(SyncFailure::WrongAccount);
                }
                self.take_epoch(&kept, cursor, &challenge).await?;
                let signature =
                    self.inner.device_key.prove(self.inner.device_id.as_bytes(), &challenge.nonce);
                self.send(pb::client_frame::Frame::Proof(pb::Proof { signature })).await?;
            }
            Some(_) => {
                return Err(SyncFailure::Other("the server did not send a challenge".into()));
            }
            None => return Err(SyncFailure::Other("the server closed the stream".into())),
        }
        // Sessions of documents still loaded from the last connection may wait for answers that
        // will never come: start them over, as if loaded from disk.
        self.inner.reconnect_sessions();
        Ok(inbound)
    }
}

impl<'a> Session<'a> {
    /// Takes the server's epoch and account from its challenge. A new epoch (the server's
    /// store was restored, or found behind what a device had seen) voids everything the device
    /// knew of the server: its cursor goes back to 0, its sync states are forgotten, and every
    /// document it holds is marked to be offered back, with what the server needs to make it
    /// (`Space::HEAL`), after `CaughtUp`. The marks and the new epoch are stored together and
    /// flushed, so a crash meanwhile loses none of it. A device that never synced just keeps the
    /// epoch.
    pub(super) async fn take_epoch(
        &mut self,
        kept: &Kept,
        cursor: u64,
        challenge: &pb::Challenge,
    ) -> Result<(), SyncFailure> {
        if kept.epoch.as_deref() == Some(challenge.epoch.as_slice()) && kept.account.is_some() {
            return Ok(());
        }
        let heal = kept.epoch.as_deref().is_some_and(|e| e != challenge.epoch.as_slice())
            || (kept.epoch.is_none() && cursor > 0);
        let (epoch, account) = (challenge.epoch.clone(), challenge.account.clone());
        let offered = self
            .blocking(move |store| {
                let mut offered = 0;
                if heal {
                    for (id, _, _) in store.list_docs(&LOCAL)? {
                        let key = id.as_bytes();
                        store.put_record(&LOCAL, Space::HEAL, key, &[])?;
                        store.remove_record(&LOCAL, Space::SYNC_STATES, key)?;
                        offered += 1;
                    }
                    store.put_record(&LOCAL, Space::LOCAL, CURSOR, &0u64.to_be_bytes())?;
                }
                store.put_record(&LOCAL, Space::LOCAL, EPOCH, &epoch)?;
                store.put_record(&LOCAL, Space::LOCAL, ACCOUNT, &account)?;
                store.flush()?;
                Ok(offered)
            })
            .await?;
        if heal {
            tracing::warn!(device = %self.inner.device_id.short(), documents = offered,
                "the server started a new epoch (its store was restored or found behind): \
                 offering back everything this device holds");
            self.inner.heal_sessions();
            self.cursor = 0;
            self.announced = 0;
        }
        Ok(())
    }
}
