//! RPC types shared by every KV service (Lab 2 `kvsrv`, Lab 4 `kvraft`, Lab 5 `shardkv`).

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
