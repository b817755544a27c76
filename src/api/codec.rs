//! The protobuf codec of the `keyward.v1` services: tonic-prost's, except
//! that a message's buffer is sized once from its encoded length.
//!
//! tonic starts every message in an 8 KiB buffer and prost writes into it
//! field by field, so a 1.2 MB BatchEncrypt response grew by doubling: about
//! twice its size copied again and fresh pages zeroed by the kernel for each
//! step. Reserving `encoded_len()` first makes it one allocation and one
//! write. The price is one more walk over the message: `Message::encode`
//! computes the length again for its capacity check, and the only way
//! around that is prost's `#[doc(hidden)]` `encode_raw`, which this codec
//! does not rely on.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    codec::{BufferSettings, Codec, EncodeBuf, Encoder},
    Status,
};
use tonic_prost::ProstDecoder;

/// Generated code names this codec (`build.rs`, `codec_path`).
#[derive(Debug, Clone, Copy)]
pub struct SizedProstCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SizedProstCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SizedProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SizedEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SizedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::default())
    }
}

/// Encodes a message into a buffer reserved to its exact length.
#[derive(Debug, Clone, Copy)]
pub struct SizedEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for SizedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|err| Status::internal(format!("encoding a response: {err}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
