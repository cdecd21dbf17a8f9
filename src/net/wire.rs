//! The frames [`net`](super) sends: a 4-byte big-endian length, then a
//! [`crate::labcodec`] encoding of a [`Frame`].

use std::fmt;
use std::io::{self, Read};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::partial::PartialFrames;
use crate::labcodec::{self, CodecError};

/// What a server answers instead of a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteError {
    /// The name was not `"Service.Method"`.
    BadMethodName(String),
    UnknownService(String),
    UnknownMethod {
        service: String,
        method: String,
    },
    /// The handler could not decode the arguments.
    BadArguments(String),
    /// Every handler thread was busy and the queue was full: the call was not run.
    Busy,
    /// The handler panicked (a bug in the service; the server logged it).
    HandlerPanicked,
    /// The reply would exceed the frame limit; it was not sent.
    ReplyTooLarge {
        bytes: usize,
        max: usize,
    },
    /// The caller proved itself in the peer handshake but is not a member of the server's
    /// committed configuration (the entry at `index`): it was removed. Nothing was run.
    NotMember {
        index: u64,
    },
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemoteError::BadMethodName(name) => {
                write!(f, "bad method name {name:?} (want \"Service.Method\")")
            }
            RemoteError::UnknownService(service) => write!(f, "unknown service {service:?}"),
            RemoteError::UnknownMethod { service, method } => {
                write!(f, "unknown method {method:?} of service {service:?}")
            }
            RemoteError::BadArguments(reason) => write!(f, "bad arguments: {reason}"),
            RemoteError::Busy => f.write_str("server busy: handler queue full"),
            RemoteError::HandlerPanicked => f.write_str("the handler panicked"),
            RemoteError::ReplyTooLarge { bytes, max } => {
                write!(
                    f,
                    "reply of {bytes} bytes exceeds the {max}-byte frame limit"
                )
            }
            RemoteError::NotMember { index } => write!(
                f,
                "not a member of the server's committed configuration (entry {index}): removed"
            ),
        }
    }
}

/// One message on a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    Request {
        id: u64,
        method: String,
        body: Vec<u8>,
    },
    Reply {
        id: u64,
        result: Result<Vec<u8>, RemoteError>,
    },
}

/// [`Frame`] by reference, for encoding without copying the body. Same variants and fields
/// in the same order as [`Frame`] and [`FrameBuf`], so all three encode alike.
#[derive(Serialize)]
enum FrameRef<'a> {
    Request {
        id: u64,
        method: &'a str,
        body: Bytes<'a>,
    },
    Reply {
        id: u64,
        result: Result<Bytes<'a>, &'a RemoteError>,
    },
}

/// [`Frame`] as decoded: bodies are read as one byte buffer, not byte by byte.
#[derive(Deserialize)]
enum FrameBuf {
    Request {
        id: u64,
        method: String,
        body: ByteBuf,
    },
    Reply {
        id: u64,
        result: Result<ByteBuf, RemoteError>,
    },
}

impl From<FrameBuf> for Frame {
    fn from(frame: FrameBuf) -> Frame {
        match frame {
            FrameBuf::Request { id, method, body } => Frame::Request {
                id,
                method,
                body: body.0,
            },
            FrameBuf::Reply { id, result } => Frame::Reply {
                id,
                result: result.map(|body| body.0),
            },
        }
    }
}

/// Bytes encoded as a length and the bytes (bincode encodes a `Vec<u8>` the same way).
struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

struct ByteBuf(Vec<u8>);

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<ByteBuf, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ByteBuf;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ByteBuf, A::Error> {
                let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = seq.next_element()? {
                    bytes.push(b);
                }
                Ok(ByteBuf(bytes))
            }
        }
        deserializer.deserialize_byte_buf(Visitor)
    }
}

/// A request frame, length prefix included.
pub fn encode_request(id: u64, method: &str, body: &[u8]) -> Result<Vec<u8>, CodecError> {
    prefixed(&FrameRef::Request {
        id,
        method,
        body: Bytes(body),
    })
}

/// A reply frame, length prefix included.
pub fn encode_reply(id: u64, result: Result<&[u8], &RemoteError>) -> Result<Vec<u8>, CodecError> {
    prefixed(&FrameRef::Reply {
        id,
        result: result.map(Bytes),
    })
}

fn prefixed(frame: &FrameRef<'_>) -> Result<Vec<u8>, CodecError> {
    let len = labcodec::encoded_len(frame)? as usize;
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len.min(u32::MAX as usize) as u32).to_be_bytes());
    out.extend_from_slice(&labcodec::encode(frame)?);
    Ok(out)
}

/// Bytes of a prefixed frame, without its prefix.
pub fn body_len(prefixed_frame: &[u8]) -> usize {
    prefixed_frame.len().saturating_sub(4)
}

/// Why no frame could be read.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the connection between frames.
    Closed,
    /// The length prefix is above the limit; the frame was not read.
    TooLarge { bytes: u64, max: usize },
    /// The frame's bytes are not a [`Frame`].
    Garbage(CodecError),
    /// A frame begun was not complete within the partial-frame timeout.
    Stalled {
        got: usize,
        len: usize,
        waited: Duration,
    },
    /// The server's budget for partly received frames is full, and this connection holds
    /// the most of it.
    OverBudget {
        held: usize,
        asked: usize,
        limit: usize,
    },
    /// The connection failed (or closed inside a frame).
    Io(io::Error),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Closed => f.write_str("closed by the peer"),
            ReadError::TooLarge { bytes, max } => {
                write!(f, "frame of {bytes} bytes exceeds the {max}-byte limit")
            }
            ReadError::Garbage(e) => write!(f, "undecodable frame: {e}"),
            ReadError::Stalled { got, len, waited } => write!(
                f,
                "stalled inside a frame: {got} of its {len} bytes in {waited:?}"
            ),
            ReadError::OverBudget { held, asked, limit } => write!(
                f,
                "holds {held} bytes of a partly received frame and needs {asked} more, the most, with the {limit}-byte budget for partial frames full"
            ),
            ReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Reads one frame (the connections' bounded reader with no bound of time or shared
/// budget). The body is read only once its length is known to be within
/// `max_bytes`, into a buffer that grows with what arrives. A read timeout of the stream is an
/// error.
pub fn read_frame(stream: &mut impl Read, max_bytes: usize) -> Result<Frame, ReadError> {
    let bounds = Bounds {
        max_bytes,
        partial_timeout: None,
        budget: None,
    };
    read_frame_bounded(stream, &bounds)
}

/// What bounds a frame being received besides its length: the time it may take once begun,
/// and the memory its buffer may take from a budget shared with other connections.
pub(crate) struct Bounds<'a> {
    pub max_bytes: usize,
    /// A frame begun must be complete within this long. The stream must have a read timeout
    /// (shorter than this) for it to be noticed.
    pub partial_timeout: Option<Duration>,
    /// The shared budget and this connection's key in it.
    pub budget: Option<(&'a PartialFrames, u64)>,
}

/// Gives back a frame's reservation, however reading it ends.
struct Reserved<'a>(Option<(&'a PartialFrames, u64)>);

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if let Some((budget, conn)) = self.0 {
            budget.release(conn);
        }
    }
}

/// Bytes read from the socket at a time inside a frame.
const READ_PIECE: usize = 64 << 10;

/// Reads one frame within `bounds`. With a `partial_timeout`, between frames it waits as long
/// as the peer is silent and once a frame has begun, a read timeout of the stream past
/// `partial_timeout` ends it ([`ReadError::Stalled`]); without one, a read timeout is an
/// error. Each growth of the frame's buffer is first reserved in the budget
/// ([`ReadError::OverBudget`] if refused).
pub(crate) fn read_frame_bounded(
    stream: &mut impl Read,
    bounds: &Bounds<'_>,
) -> Result<Frame, ReadError> {
    let mut began: Option<Instant> = None;
    let stalled = |began: Option<Instant>, got: usize, len: usize| -> Option<ReadError> {
        let (Some(began), Some(limit)) = (began, bounds.partial_timeout) else {
            return None;
        };
        let waited = began.elapsed();
        (waited >= limit).then_some(ReadError::Stalled { got, len, waited })
    };
    // A read timeout is how a stall is noticed, if there is a limit to notice it against.
    let timed_out = |e: &io::Error| {
        bounds.partial_timeout.is_some()
            && matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            )
    };
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match stream.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Err(ReadError::Closed),
            Ok(0) => return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => {
                got += n;
                began.get_or_insert_with(Instant::now);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
        // Also after bytes: a peer trickling them faster than the read timeout is no less
        // stalled.
        if got < 4
            && let Some(stall) = stalled(began, got, 4)
        {
            return Err(stall);
        }
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > bounds.max_bytes {
        return Err(ReadError::TooLarge {
            bytes: len as u64,
            max: bounds.max_bytes,
        });
    }
    let reserved = Reserved(bounds.budget);
    let mut body: Vec<u8> = Vec::new();
    let mut piece = vec![0u8; READ_PIECE.min(len.max(1))];
    while body.len() < len {
        let want = (len - body.len()).min(piece.len());
        let n = match stream.read(&mut piece[..want]) {
            Ok(0) => return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) if timed_out(&e) => 0,
            Err(e) => return Err(ReadError::Io(e)),
        };
        if body.len() + n < len
            && let Some(stall) = stalled(began, body.len() + n, len)
        {
            return Err(stall);
        }
        if n == 0 {
            continue;
        }
        if body.len() + n > body.capacity() {
            // Grown by doubling, never past the frame's length, each growth reserved first:
            // what the budget counts is the buffer's real size.
            let new_cap = (body.capacity() * 2).max(body.len() + n).min(len);
            if let Some((budget, conn)) = reserved.0 {
                budget.grow(conn, new_cap - body.capacity()).map_err(|o| {
                    ReadError::OverBudget {
                        held: o.held,
                        asked: o.asked,
                        limit: o.limit,
                    }
                })?;
            }
            body.reserve_exact(new_cap - body.len());
        }
        body.extend_from_slice(&piece[..n]);
    }
    drop(piece);
    let frame = labcodec::decode::<FrameBuf>(&body)
        .map(Frame::from)
        .map_err(ReadError::Garbage);
    drop(body);
    drop(reserved);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_by_reference_decode_as_owned_frames() {
        let request = encode_request(7, "Raft.AppendEntries", &[1, 2, 0xff]).unwrap();
        assert_eq!(
            read_frame(&mut request.as_slice(), 1 << 20).unwrap(),
            Frame::Request {
                id: 7,
                method: "Raft.AppendEntries".into(),
                body: vec![1, 2, 0xff]
            }
        );
        let reply = encode_reply(u64::MAX, Ok(&[9; 300])).unwrap();
        assert_eq!(
            read_frame(&mut reply.as_slice(), 1 << 20).unwrap(),
            Frame::Reply {
                id: u64::MAX,
                result: Ok(vec![9; 300])
            }
        );
        let error = encode_reply(1, Err(&RemoteError::Busy)).unwrap();
        assert_eq!(
            read_frame(&mut error.as_slice(), 1 << 20).unwrap(),
            Frame::Reply {
                id: 1,
                result: Err(RemoteError::Busy)
            }
        );
    }

    #[test]
    fn owned_frames_encode_as_borrowed_ones() {
        let frame = Frame::Request {
            id: 300,
            method: "A.B".into(),
            body: vec![0, 1, 2, 3],
        };
        let mut owned = labcodec::encode(&frame).unwrap();
        let mut prefixed = (owned.len() as u32).to_be_bytes().to_vec();
        prefixed.append(&mut owned);
        assert_eq!(prefixed, encode_request(300, "A.B", &[0, 1, 2, 3]).unwrap());
    }

    #[test]
    fn bad_frames_are_errors() {
        assert!(matches!(
            read_frame(&mut &[][..], 100),
            Err(ReadError::Closed)
        ));
        assert!(matches!(
            read_frame(&mut &[0, 0][..], 100),
            Err(ReadError::Io(_))
        ));
        assert!(matches!(
            read_frame(&mut &[0xff, 0xff, 0xff, 0xff][..], 100),
            Err(ReadError::TooLarge {
                bytes: 0xffff_ffff,
                max: 100
            })
        ));
        assert!(matches!(
            read_frame(&mut &[0, 0, 0, 3, 9, 9, 9][..], 100),
            Err(ReadError::Garbage(_))
        ));
        assert!(matches!(
            read_frame(&mut &[0, 0, 0, 9, 0][..], 100),
            Err(ReadError::Io(_))
        ));
    }
}
