//! Lab 2: a single-server key/value store with versioned Puts, and a lock built on it.
//!
//! The server keeps, for each key, a value and a version. A Put names the version it expects;
//! it succeeds and bumps the version only if that matches. The clerk retries lost RPCs, which
//! is why a Put can come back [`KvErr::Maybe`](rpc::KvErr::Maybe).

mod client;
pub mod harness;
pub mod lock;
pub mod rpc;
mod server;
pub mod store;

pub use client::Clerk;
pub use server::{KvServer, start_kv_server};

use rpc::{KvErr, Tversion};

/// What every KV clerk offers (kvsrv, kvraft, shardkv), and what the lock and the KV tests use.
pub trait KvClerk: Send + Sync {
    /// The value and version of `key`; `KvErr::NoKey` if it does not exist. Retries until it
    /// gets an answer.
    fn get(&self, key: &str) -> (String, Tversion, KvErr);
    /// Installs `value` if `key` is at `version` (0 creates it). `KvErr::Maybe` means a retried
    /// request got `ErrVersion`: the Put may or may not have happened.
    fn put(&self, key: &str, value: &str, version: Tversion) -> KvErr;
}
