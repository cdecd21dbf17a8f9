//! Lab 5: a key/value service sharded over Raft groups.
//!
//! - [`shardcfg`]: the configuration (which group serves each of the 12 shards) and its
//!   deterministic rebalance;
//! - [`shardctrler`]: the controller, which keeps the configuration in a Lab 2 server and
//!   moves shards between groups (freeze, install, delete) when it changes;
//! - [`shardgrp`]: a Raft-replicated group serving its shards, through [`crate::rsm`];
//! - [`Clerk`]: routes Gets and Puts by the configuration;
//! - [`transport`]: the seam between the clerks and the servers ([`ShardTransport`],
//!   [`ShardGrpService`]); nothing else here knows the network;
//! - `harness` (with the `testing` feature): the labrpc adapters and the tester's side (the
//!   Go labs' `shardkv1/test.go`).

mod client;
pub mod shardcfg;
pub mod shardctrler;
pub mod shardgrp;
pub mod transport;

pub use client::Clerk;
pub use shardctrler::{Change, CtrlerError, ShardCtrler};
pub use transport::{ShardGrpService, ShardTransport};
