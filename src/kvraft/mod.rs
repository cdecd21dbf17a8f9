//! Lab 4: a replicated state machine on Raft ([`rsm`], 4A; snapshots, 4C) and a linearizable
//! key/value service on it (4B/4C).
//!
//! A request travels clerk → `KVServer.Get`/`Put` on the leader → [`rsm::Rsm::submit`] →
//! Raft log → every replica's rsm reader → the store, and the leader's reply travels back the
//! same way. A replica that is not the leader, or stops being one before the request
//! commits, answers `ErrWrongLeader`, and the clerk tries the next replica.

mod client;
pub mod rsm;
mod server;

pub use client::Clerk;
pub use server::{KvRequest, KvResponse, KvServer, KvStore};
