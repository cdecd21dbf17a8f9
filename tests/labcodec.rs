//! The intent of the Go labs' `labgob/test_test.go`: values survive a round trip. Rust needs no
//! capital-letter or non-default-destination checks (serde sees every field, and decoding
//! builds a fresh value), so the rest tests what Go's gob never promised: corrupt input is an
//! error, never a panic or a huge allocation.

use std::collections::HashMap;

use raftkv::labcodec::{self, CodecError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct T1 {
    t1_int0: i32,
    t1_int1: i64,
    t1_string0: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct T2 {
    t2_slice: Vec<T1>,
    t2_map: HashMap<i32, Box<T1>>,
    t2_iface: Command,
}

/// Rust's stand-in for a registered Go interface value (e.g. a Raft log command).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Command {
    Nop,
    Put { key: String, value: String },
    Append(String, u64),
    Nested(Box<T1>),
}

fn t1(i: i32) -> T1 {
    T1 {
        t1_int0: i,
        t1_int1: -(i as i64) * 1_000_000_007,
        t1_string0: format!("s{i}"),
    }
}

fn sample_t2() -> T2 {
    T2 {
        t2_slice: vec![t1(1), t1(2)],
        t2_map: [(99, Box::new(t1(3))), (-7, Box::new(t1(4)))].into(),
        t2_iface: Command::Put {
            key: "k".to_string(),
            value: "v".to_string(),
        },
    }
}

fn round_trip<T>(value: &T)
where
    T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = labcodec::encode(value).expect("encode");
    assert_eq!(
        labcodec::encoded_len(value).expect("encoded_len"),
        bytes.len() as u64
    );
    let back: T = labcodec::decode(&bytes).expect("decode");
    assert_eq!(&back, value);
}

#[test]
fn gob_round_trip_ints() {
    for x in [0i64, 1, -1, 250, 251, -300, i64::MAX, i64::MIN] {
        round_trip(&x);
    }
    for x in [0u64, 1, 250, 251, 65_535, 65_536, u64::MAX] {
        round_trip(&x);
    }
    round_trip(&(1i32, 2u8, -3i16));
    // Varint: small numbers take one byte (the lab tests bound RPC and state sizes).
    assert_eq!(labcodec::encode(&7u64).unwrap().len(), 1);
}

#[test]
fn gob_round_trip_structs_vecs_maps_enums() {
    round_trip(&t1(42));
    round_trip(&vec![t1(1), t1(2), t1(3)]);
    let map: HashMap<i32, Box<T1>> = (0..10).map(|i| (i, Box::new(t1(i)))).collect();
    round_trip(&map);
    round_trip(&sample_t2());
    for c in [
        Command::Nop,
        Command::Put {
            key: "a".into(),
            value: "b".into(),
        },
        Command::Append("x".into(), 9),
        Command::Nested(Box::new(t1(5))),
    ] {
        round_trip(&c);
    }
    round_trip(&vec![Command::Nop, Command::Append(String::new(), 0)]);
}

fn assert_decode_err<T: serde::de::DeserializeOwned + std::fmt::Debug>(bytes: &[u8], what: &str) {
    match labcodec::decode::<T>(bytes) {
        Err(CodecError { op, .. }) => assert_eq!(op, "decode"),
        Ok(v) => panic!("{what}: decoded {v:?} from corrupt input {bytes:?}"),
    }
}

#[test]
fn truncated_input_is_an_error() {
    let bytes = labcodec::encode(&sample_t2()).unwrap();
    for len in 0..bytes.len() {
        assert_decode_err::<T2>(&bytes[..len], "truncated T2");
    }
    assert_decode_err::<u64>(&[], "empty u64");
    // 0xFD announces an 8-byte integer; only 3 follow.
    assert_decode_err::<u64>(&[0xFD, 1, 2, 3], "truncated varint");
}

#[test]
fn trailing_bytes_are_an_error() {
    let mut bytes = labcodec::encode(&t1(1)).unwrap();
    bytes.push(0);
    assert_decode_err::<T1>(&bytes, "T1 with a trailing byte");
    assert_decode_err::<u8>(&[1, 2], "u8 with a trailing byte");
}

#[test]
fn huge_length_prefix_is_an_error_without_allocating() {
    // A Vec<u8> claiming 2^60 elements: 0xFD then the length as 8 little-endian bytes.
    let mut bytes = vec![0xFD];
    bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
    bytes.extend_from_slice(&[1, 2, 3]);
    assert_decode_err::<Vec<u8>>(&bytes, "Vec<u8> of 2^60");
    assert_decode_err::<String>(&bytes, "String of 2^60");
    assert_decode_err::<Vec<T1>>(&bytes, "Vec<T1> of 2^60");
    assert_decode_err::<HashMap<i32, Box<T1>>>(&bytes, "map of 2^60");
    // u64::MAX elements too.
    let mut bytes = vec![0xFD];
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    assert_decode_err::<Vec<u64>>(&bytes, "Vec<u64> of 2^64-1");
}

#[test]
fn garbage_is_an_error() {
    // An enum tag past the last variant.
    assert_decode_err::<Command>(&[9], "enum tag 9");
    // A bool that is neither 0 nor 1.
    assert_decode_err::<bool>(&[2], "bool 2");
    // Invalid UTF-8 in a String.
    assert_decode_err::<String>(&[2, 0xC3, 0x28], "bad UTF-8");
    // 0xFF is not a valid varint marker.
    assert_decode_err::<u64>(&[0xFF], "varint marker 0xFF");
}

/// 10,000 random byte strings decoded as a nested struct: errors are fine, panics are not.
#[test]
fn random_bytes_never_panic() {
    let mut rng = StdRng::seed_from_u64(6_5840);
    let valid = labcodec::encode(&sample_t2()).unwrap();
    let mut decoded = 0;
    for i in 0..10_000 {
        let bytes: Vec<u8> = if i % 2 == 0 {
            let len = rng.gen_range(0..64);
            (0..len).map(|_| rng.r#gen()).collect()
        } else {
            // Mutate a valid encoding, which gets deeper into the decoder.
            let mut b = valid.clone();
            for _ in 0..rng.gen_range(1..4) {
                let at = rng.gen_range(0..b.len());
                b[at] = rng.r#gen();
            }
            b
        };
        if labcodec::decode::<T2>(&bytes).is_ok() {
            decoded += 1;
        }
        let _ = labcodec::decode::<Vec<Command>>(&bytes);
    }
    // Some mutations only change a number or a character and still decode.
    assert!(decoded < 10_000);
}
