//! The one place that names `bincode`: every RPC message, persisted Raft state and snapshot
//! goes through [`encode`] and [`decode`].
//!
//! The format is bincode 1.3 with variable-length integers, which keeps small numbers to one
//! byte (the lab tests bound RPC bytes and persisted-state sizes). Decoding never panics:
//! malformed, truncated or trailing bytes give a [`CodecError`], and a length prefix can never
//! make the decoder allocate more than the input could hold.

use std::fmt;

use bincode::Options;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a value could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError {
    /// What the codec was doing: `"encode"` or `"decode"`.
    pub op: &'static str,
    /// The type involved.
    pub type_name: &'static str,
    /// The underlying reason.
    pub reason: String,
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot {} {}: {}", self.op, self.type_name, self.reason)
    }
}

impl std::error::Error for CodecError {}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_varint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
}

/// Encodes `value`. Fails only for values serde cannot describe to a length-prefixed format
/// (for example an iterator-backed sequence of unknown length).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    options().serialize(value).map_err(|e| CodecError {
        op: "encode",
        type_name: std::any::type_name::<T>(),
        reason: e.to_string(),
    })
}

/// Decodes a `T` from exactly `bytes`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode_borrowed(bytes)
}

/// Decodes a `T` from exactly `bytes`, borrowing from them where `T` does (a `&[u8]` field
/// is not copied).
pub fn decode_borrowed<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, CodecError> {
    options()
        // No value can claim more bytes than the input has; this stops a corrupt length
        // prefix from asking for a huge allocation.
        .with_limit(bytes.len() as u64)
        .deserialize(bytes)
        .map_err(|e| CodecError {
            op: "decode",
            type_name: std::any::type_name::<T>(),
            reason: e.to_string(),
        })
}

/// The encoded size of `value` in bytes, without encoding it.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<u64, CodecError> {
    options().serialized_size(value).map_err(|e| CodecError {
        op: "encode",
        type_name: std::any::type_name::<T>(),
        reason: e.to_string(),
    })
}
