//! RPC over real TCP, with OS threads (no async runtime), shaped like [`labrpc`](crate::labrpc)
//! so service code ports with little change.
//!
//! * [`Server`] listens on a TCP port and dispatches `"Service.Method"` calls to the handlers
//!   of its [`Service`]s on a fixed pool of handler threads with a bounded queue; a call that
//!   finds the queue full is refused at once ([`RemoteError::Busy`], see [`NetError::is_busy`]) and the refusal is logged.
//! * [`ClientEnd`] keeps one connection to one server address open, re-dialling with capped
//!   exponential backoff when it breaks (so two nodes that call each other have two
//!   connections, one each way, each node's end to the other's server). Calls carry request ids, so any number of them are in
//!   flight (pipelined) on the one connection; each has a timeout. [`ClientEnd::call`] blocks;
//!   [`ClientEnd::call_async`] returns at once and runs a callback with the outcome on one of
//!   the end's threads, never on the caller's.
//! * [`proxy::Proxy`] sits on a link between two nodes and can cut it, heal it or delay it:
//!   partitions for tests and the chaos run.
//!
//! ## Wire format
//!
//! Each message is a frame: a 4-byte big-endian length, then a [`labcodec`](crate::labcodec)
//! encoding of a [`wire::Frame`] — a request (id, `"Service.Method"`, argument bytes) or a
//! reply (id, the reply bytes or a [`RemoteError`]). A length above the receiver's
//! `max_frame_bytes` makes it drop the connection without reading (or allocating) the frame,
//! and log the peer; so does a frame that does not decode.
//!
//! ## Delivery
//!
//! At most once: a request is written once, on one connection. If that connection breaks
//! before the reply arrives the call fails with [`NetError::ConnectionLost`] — the handler may
//! or may not have run. Calls made while no connection is up wait (boundedly) for the next one,
//! within their timeout.

pub mod acceptor;
mod client;
mod conn;
pub mod handshake;
mod partial;
pub mod proxy;
mod server;
pub mod wire;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

pub use client::{ClientEnd, ClientOptions, DialAuth};
pub use handshake::PeerAuth;
pub use server::{DEFAULT_PARTIAL_FRAME_TIMEOUT, Server, ServerOptions, Service};
pub use wire::RemoteError;

use crate::labcodec::CodecError;

/// The default largest frame either side accepts: large enough for a Raft snapshot of a lab
/// service, small enough that a corrupt length cannot exhaust memory.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 << 20;

/// Why a call got no reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetError {
    /// No reply within the call's timeout. The handler may or may not have run.
    Timeout {
        peer: SocketAddr,
        method: String,
        after: Duration,
    },
    /// The connection the request went out on broke before the reply came. The handler may
    /// or may not have run.
    ConnectionLost { peer: SocketAddr, method: String },
    /// Too many calls are waiting for a connection to the peer, or its send queue is full.
    Overloaded { peer: SocketAddr, method: String },
    /// The request would be a frame above the maximum size; it was not sent.
    FrameTooLarge {
        peer: SocketAddr,
        method: String,
        bytes: usize,
        max: usize,
    },
    /// The server answered with an error (unknown method, pool full, undecodable arguments…).
    Remote {
        peer: SocketAddr,
        method: String,
        error: RemoteError,
    },
    /// Arguments could not be encoded or the reply could not be decoded here.
    Codec(CodecError),
    /// The end was shut down before the call completed.
    Shutdown,
}

impl NetError {
    /// Whether the server refused the call because its handler queue was full.
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            NetError::Remote {
                error: RemoteError::Busy,
                ..
            }
        )
    }
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetError::Timeout {
                peer,
                method,
                after,
            } => write!(f, "{method} to {peer}: no reply within {after:?}"),
            NetError::ConnectionLost { peer, method } => {
                write!(f, "{method} to {peer}: connection lost before the reply")
            }
            NetError::Overloaded { peer, method } => {
                write!(f, "{method} to {peer}: too many calls queued for the peer")
            }
            NetError::FrameTooLarge {
                peer,
                method,
                bytes,
                max,
            } => write!(
                f,
                "{method} to {peer}: request of {bytes} bytes exceeds the {max}-byte frame limit"
            ),
            NetError::Remote {
                peer,
                method,
                error,
            } => write!(f, "{method} to {peer}: {error}"),
            NetError::Codec(e) => write!(f, "{e}"),
            NetError::Shutdown => f.write_str("the client end was shut down"),
        }
    }
}

impl std::error::Error for NetError {}

impl From<CodecError> for NetError {
    fn from(e: CodecError) -> Self {
        NetError::Codec(e)
    }
}

/// Logs a repeated event at most once per `period`, with how many times it happened since.
pub(crate) struct RateLimitedLog {
    period: Duration,
    state: parking_lot::Mutex<(Option<std::time::Instant>, u64)>,
}

impl RateLimitedLog {
    pub(crate) fn new(period: Duration) -> RateLimitedLog {
        RateLimitedLog {
            period,
            state: parking_lot::Mutex::new((None, 0)),
        }
    }

    /// Counts one event; `Some(count)` when it is time to log (count since the last log).
    pub(crate) fn tick(&self) -> Option<u64> {
        let mut state = self.state.lock();
        state.1 += 1;
        let now = std::time::Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.period => None,
            _ => {
                state.0 = Some(now);
                let count = state.1;
                state.1 = 0;
                Some(count)
            }
        }
    }
}
