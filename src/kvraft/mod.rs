//! Lab 4: a linearizable key/value service (4B/4C) on the replicated state machine of
//! [`crate::rsm`] (4A; snapshots, 4C). [`rsm`] is that layer in the Go labs' untyped shape
//! (`DoOp` on bytes), which the rsm tests drive.
//!
//! A request travels clerk → `KVServer.Get`/`Put` on the leader → [`crate::rsm::Rsm::submit`]
//! → Raft log → every replica's rsm reader → the store, and the leader's reply travels back
//! the same way. A replica that is not the leader, or stops being one before the request
//! commits, answers `ErrWrongLeader`, and the clerk tries the next replica.

mod client;
pub mod rsm;
mod server;

pub use client::Clerk;
pub use server::{KvRequest, KvResponse, KvServer, KvStore};
