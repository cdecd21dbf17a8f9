//! The KV service's RPCs as a seam: a clerk calls a named server through a [`KvTransport`]
//! and a server answers through a [`KvService`], so the same `Clerk` and server run over the
//! simulated network (`tester`'s labrpc adapters) or a real one.
//!
//! A transport is plain and blocking: one call, one reply or a [`CallError`]. Retrying,
//! choosing another server and the `ErrMaybe` rule stay in the clerk.

use std::fmt;

use super::{GetArgs, GetReply, PutArgs, PutReply};

/// Why a call produced no reply. The clerk cannot tell whether the server executed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// The request or its reply was lost, the server is down or unreachable, or it took
    /// longer than the transport waits.
    NoReply { server: String },
    /// The reply arrived but could not be decoded (a bug or a version mismatch).
    BadReply { server: String, reason: String },
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::NoReply { server } => write!(f, "no reply from {server}"),
            CallError::BadReply { server, reason } => {
                write!(f, "bad reply from {server}: {reason}")
            }
        }
    }
}

impl std::error::Error for CallError {}

/// How a KV clerk reaches servers, named as the clerk was told (`server-0-1`, `host:port`).
/// Calls block the calling thread; concurrent calls are allowed.
pub trait KvTransport: Send + Sync {
    /// `KVServer.Get` on `server`.
    fn get(&self, server: &str, args: &GetArgs) -> Result<GetReply, CallError>;
    /// `KVServer.Put` on `server`.
    fn put(&self, server: &str, args: &PutArgs) -> Result<PutReply, CallError>;
}

/// What a KV server answers (`KVServer.Get`, `KVServer.Put`). A transport's server side calls
/// these on its own threads, concurrently.
pub trait KvService: Send + Sync {
    fn get(&self, args: GetArgs) -> GetReply;
    fn put(&self, args: PutArgs) -> PutReply;
}
