//! Who is on a stream: the device proves its key and is admitted, and a fresh token sent on
//! the stream becomes its token.

use cubby_core::DeviceId;
use cubby_crypto::signing::verify_device_proof;
use cubby_proto::{ApiError, pb};
use tonic::{Status, Streaming};

use super::{Connection, account_tag};
use crate::customers::Ejector;
use crate::devices::Arrival;
use crate::frames::ToDevice;

impl Connection {
    /// Challenges the device to prove its key, then admits it (registering it on first sight).
    /// Returns what closes the stream when the device is revoked or the account erased.
    pub(super) async fn prove_device(
        &mut self,
        inbound: &mut Streaming<pb::ClientFrame>,
        hello: &pb::Hello,
        deadline: tokio::time::Instant,
    ) -> Result<(DeviceId, Ejector), Status> {
        let device = cubby_proto::device_id(&hello.device_id)?;
        if hello.public_key.len() != 32 {
            return Err(
                ApiError::InvalidArgument("public_key must be 32 bytes (Ed25519)".into()).into()
            );
        }
        // Registered before the admission check, so a revocation racing this connect either
        // refuses it or closes it.
        let (stream, ejector) = self.shared.customers.open_stream(self.customer, device);
        self.stream = Some(stream);
        self.device = Some(device);
        let nonce: [u8; 32] = cubby_crypto::random_array();
        self.send(ToDevice::Challenge {
            nonce,
            epoch: self.shared.customers.epoch(&self.customer),
            account: account_tag(&self.customer),
        });
        let answer = tokio::time::timeout_at(deadline, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no proof of the device key"))??;
        let Some(pb::ClientFrame { frame: Some(pb::client_frame::Frame::Proof(proof)) }) = answer
        else {
            return Err(ApiError::InvalidArgument(
                "the frame after the hello must be a proof".into(),
            )
            .into());
        };
        if !verify_device_proof(&hello.public_key, device.as_bytes(), &nonce, &proof.signature) {
            return Err(
                ApiError::PermissionDenied("the device key proof does not verify".into()).into()
            );
        }
        let shared = self.shared.clone();
        let (customer, token) = (self.customer, self.token);
        let (expired_before, token_denied) = (self.shared.auth.expired_before(), self.token_denied);
        let (public_key, name, platform) =
            (hello.public_key.clone(), hello.device_name.clone(), hello.platform.clone());
        self.shared
            .blocking(move || {
                let arrival = Arrival {
                    id: device,
                    public_key: &public_key,
                    name: &name,
                    platform: &platform,
                    token,
                    expired_before,
                    token_denied,
                };
                shared.devices.admit(&*shared.store, &customer, &arrival)
            })
            .await?;
        Ok((device, ejector))
    }

    /// Makes a fresh token sent on the stream its token, once it verifies for this customer, and
    /// records it with the device, so that revoking the device refuses it too. False, and
    /// nothing changes, when it expires no later than the stream's token.
    pub(super) async fn renew(&mut self, token: &str) -> Result<bool, Status> {
        let caller = self.shared.auth.verify(token.trim()).await?;
        if caller.admin {
            let reason = "a service token cannot act as a customer; use the admin API";
            return Err(ApiError::PermissionDenied(reason.into()).into());
        }
        if caller.customer != self.customer {
            let reason = "the fresh token is for another customer";
            return Err(ApiError::PermissionDenied(reason.into()).into());
        }
        if self.shared.customers.token_denied(&caller) {
            let reason = "this token was revoked with its device";
            return Err(ApiError::Unauthenticated(reason.into()).into());
        }
        if caller.expires_at <= self.token.1 {
            return Ok(false);
        }
        let device = self.device.ok_or(ApiError::Internal)?;
        let token = (caller.token_hash, caller.expires_at);
        let expired_before = self.shared.auth.expired_before();
        let (shared, customer) = (self.shared.clone(), self.customer);
        self.shared
            .blocking(move || {
                shared.devices.renew(&*shared.store, &customer, &device, token, expired_before)
            })
            .await?;
        self.token = token;
        self.token_expires =
            tokio::time::Instant::now() + self.shared.auth.clock().until(caller.expires_at);
        tracing::debug!(peer = self.peer, device = %device.short(), "stream token renewed");
        Ok(true)
    }
}
