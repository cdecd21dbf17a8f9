//! The key/value API every KV service shares (Lab 2 `kvsrv`, Lab 4 `kvraft`, Lab 5 `shardkv`),
//! one floor below them all: the request and reply types, [`KvErr`], [`Tversion`], the
//! [`KvClerk`] trait, the versioned store ([`store::VersionedStore`]), the cluster's KV commands
//! and their executor ([`kv`]: [`KvCmd`], [`KvOut`], [`KvMap`]), and the transport seam a
//! clerk calls through ([`KvTransport`]) and a server answers on ([`KvService`]). It imports
//! nothing from a lab, so `porcupine`, `tester` and every KV lab can use it.

pub mod kv;
pub mod leader;
pub mod store;
pub mod transport;

pub use kv::{KvCmd, KvMap, KvOut};
pub use leader::{LeaderHint, Limit, Step};
pub use store::VersionedStore;
pub use transport::{CallError, KvService, KvTransport};

use std::fmt;

use serde::{Deserialize, Serialize};

/// A key's version: 0 means "does not exist yet"; each successful Put increments it.
pub type Tversion = u64;

/// The outcome of a KV operation, as the labs name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KvErr {
    /// `OK`
    Ok,
    /// `ErrNoKey`: Get of a missing key, or Put with version > 0 of a missing key.
    NoKey,
    /// `ErrVersion`: Put whose version does not match the key's.
    Version,
    /// `ErrMaybe`: returned by clerks only, when a retransmitted Put got `ErrVersion`,
    /// so the Put may or may not have been applied.
    Maybe,
    /// `ErrWrongLeader`: the server is not the Raft leader (kvraft, shardkv).
    WrongLeader,
    /// `ErrWrongGroup`: the server's group does not own the key's shard (shardkv).
    WrongGroup,
}

impl KvErr {
    /// The Go labs' name for this error (`"OK"`, `"ErrNoKey"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            KvErr::Ok => "OK",
            KvErr::NoKey => "ErrNoKey",
            KvErr::Version => "ErrVersion",
            KvErr::Maybe => "ErrMaybe",
            KvErr::WrongLeader => "ErrWrongLeader",
            KvErr::WrongGroup => "ErrWrongGroup",
        }
    }
}

impl fmt::Display for KvErr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutArgs {
    pub key: String,
    pub value: String,
    pub version: Tversion,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutReply {
    pub err: KvErr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetArgs {
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetReply {
    pub value: String,
    pub version: Tversion,
    pub err: KvErr,
}

/// What every KV clerk offers (kvsrv, kvraft, shardkv), and what the lock and the KV tests use.
pub trait KvClerk: Send + Sync {
    /// The value and version of `key`; `KvErr::NoKey` if it does not exist. Retries until it
    /// gets an answer.
    fn get(&self, key: &str) -> (String, Tversion, KvErr);
    /// Installs `value` if `key` is at `version` (0 creates it). `KvErr::Maybe` means a retried
    /// request got `ErrVersion`: the Put may or may not have happened.
    fn put(&self, key: &str, value: &str, version: Tversion) -> KvErr;
}
