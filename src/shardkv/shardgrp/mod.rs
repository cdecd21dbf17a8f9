//! A shard group (Lab 5): a Raft-replicated set of servers serving the shards the controller
//! assigned to it, and moving shards out and in when the controller says so.

mod client;
pub mod rpc;
mod server;

pub use client::{Clerk, NoAnswer, Outcome, ROUNDS};
pub use server::{ShardGrpServer, ShardStore};
