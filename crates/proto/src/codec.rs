//! The gRPC codec of Cubby's services: prost, with small starting buffers.

use std::marker::PhantomData;

use tonic::codec::BufferSettings;
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Bytes each call's encode and decode buffer starts with. tonic allocates both when a call
/// starts (8 KiB each by default) and keeps them for the call's life. A device's sync stream
/// lasts as long as it is connected, mostly idle, and most of its frames are a few hundred
/// bytes; a larger message grows the buffer to what it needs.
const START_BYTES: usize = 1024;

/// How much tonic batches ready messages into one write (its default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `tonic_prost::ProstCodec` with [`START_BYTES`] buffers; named in `build.rs` as the codec of
/// every generated client and server.
#[derive(Debug)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(START_BYTES, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(START_BYTES, YIELD_THRESHOLD))
    }
}
