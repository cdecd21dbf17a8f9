//! The one place that names `bincode`: every RPC message, persisted Raft state and snapshot
//! goes through [`encode`] and [`decode`].
//!
//! The format is bincode 1.3 with variable-length integers, which keeps small numbers to one
//! byte (the lab tests bound RPC bytes and persisted-state sizes). Decoding never panics:
//! malformed, truncated or trailing bytes give a [`CodecError`], and a length prefix can never
//! make the decoder allocate more than the input could hold.

use std::fmt;
use std::io::Read;

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

/// Decodes one `T` from the front of `reader`, reading no byte past it and at most `limit`
/// bytes in all (no length prefix can ask for more); returns it and the bytes it took. What
/// follows is the caller's: unlike [`decode`], a stream cannot refuse trailing bytes itself.
/// Lets a large encoding be checked as it is read from a file, holding one value at a time
/// when `T` discards what it has seen.
pub fn decode_prefix_from<T: DeserializeOwned>(
    reader: &mut dyn Read,
    limit: u64,
) -> Result<(T, u64), CodecError> {
    let mut bounded = reader.take(limit);
    let value = options()
        .with_limit(limit)
        .deserialize_from(&mut bounded)
        .map_err(|e| CodecError {
            op: "decode",
            type_name: std::any::type_name::<T>(),
            reason: e.to_string(),
        })?;
    Ok((value, limit - bounded.limit()))
}

/// Decodes a `T` from exactly the next `len` bytes of `reader`, as [`decode`] does from a
/// slice of that length (fewer bytes, or bytes left over, are an error).
pub fn decode_from<T: DeserializeOwned>(reader: &mut dyn Read, len: u64) -> Result<T, CodecError> {
    let (value, used) = decode_prefix_from(reader, len)?;
    if used != len {
        return Err(CodecError {
            op: "decode",
            type_name: std::any::type_name::<T>(),
            reason: format!("{} bytes left over after the value", len - used),
        });
    }
    Ok(value)
}

/// The encoded size of `value` in bytes, without encoding it.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<u64, CodecError> {
    options().serialized_size(value).map_err(|e| CodecError {
        op: "encode",
        type_name: std::any::type_name::<T>(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_from_a_stream_matches_decode_from_a_slice() {
        let value = (7u64, vec!["a".to_string(), "bc".to_string()]);
        let bytes = encode(&value).unwrap();
        let len = bytes.len() as u64;
        let got: (u64, Vec<String>) = decode_from(&mut &bytes[..], len).unwrap();
        assert_eq!(got, value);
        // Cut short, or followed by more bytes than it takes: refused, as `decode` does.
        assert!(decode_from::<(u64, Vec<String>)>(&mut &bytes[..], len - 1).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_from::<(u64, Vec<String>)>(&mut &longer[..], len + 1).is_err());
        // A prefix leaves the rest of the stream where it was.
        let mut rest = &longer[..];
        let (prefix, used): ((u64, Vec<String>), u64) =
            decode_prefix_from(&mut rest, len + 1).unwrap();
        assert_eq!((prefix, used), (value, len));
        assert_eq!(rest, &[0]);
    }

    #[test]
    fn a_stream_claiming_a_huge_length_is_refused_without_allocating_it() {
        // A string claiming u64::MAX bytes, in a stream of 20.
        let mut bytes = vec![253];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        bytes.extend_from_slice(&[b'x'; 11]);
        let err = decode_from::<String>(&mut &bytes[..], bytes.len() as u64).unwrap_err();
        assert_eq!(err.op, "decode");
    }
}
