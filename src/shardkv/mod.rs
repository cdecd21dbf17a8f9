//! Lab 5: a key/value service sharded over Raft groups.
//!
//! - [`shardcfg`]: the configuration (which group serves each of the 12 shards) and its
//!   deterministic rebalance;
//! - [`shardctrler`]: the controller, which keeps the configuration in a Lab 2 server and
//!   moves shards between groups (freeze, install, delete) when it changes;
//! - [`shardgrp`]: a Raft-replicated group serving its shards, through [`crate::kvraft::rsm`];
//! - [`Clerk`]: routes Gets and Puts by the configuration;
//! - [`harness`]: the tester's side (the Go labs' `shardkv1/test.go`).

mod client;
pub mod harness;
pub mod shardcfg;
pub mod shardctrler;
pub mod shardgrp;

pub use client::Clerk;
pub use shardctrler::{Change, CtrlerError, ShardCtrler};
