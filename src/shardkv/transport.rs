//! The shard groups' RPCs as a seam, in the shape of [`kvapi`](crate::kvapi)'s: a clerk (the
//! shardkv clerk, the shard-group clerk, the controller) calls a named server through a
//! [`ShardTransport`], and a shard-group replica answers through a [`ShardGrpService`], so
//! none of them knows the network. The labrpc adapters are in `tester::shardkv` (the `testing`
//! feature).
//!
//! `Get`/`Put` are the KV service's ([`KvTransport`]): the controller's config store (the
//! Lab 2 server of group 0) and the shard groups answer them alike. The three shard-move calls
//! are a shard group's only. Calls block the caller; retrying and choosing another server
//! stay in the clerks.

use super::shardgrp::rpc::{
    DeleteShardArgs, DeleteShardReply, FreezeShardArgs, FreezeShardReply, InstallShardArgs,
    InstallShardReply,
};
use crate::kvapi::{CallError, KvService, KvTransport};

/// How the clerks and the controller reach the config store and the shard groups' servers,
/// named as the configuration names them.
pub trait ShardTransport: KvTransport {
    /// `KVServer.FreezeShard` on `server`.
    fn freeze_shard(
        &self,
        server: &str,
        args: &FreezeShardArgs,
    ) -> Result<FreezeShardReply, CallError>;
    /// `KVServer.InstallShard` on `server`.
    fn install_shard(
        &self,
        server: &str,
        args: &InstallShardArgs,
    ) -> Result<InstallShardReply, CallError>;
    /// `KVServer.DeleteShard` on `server`.
    fn delete_shard(
        &self,
        server: &str,
        args: &DeleteShardArgs,
    ) -> Result<DeleteShardReply, CallError>;
}

/// What a shard-group replica answers: the KV service's Get and Put, and the three
/// shard-move calls. A transport's server side calls these on its own threads, concurrently.
pub trait ShardGrpService: KvService {
    fn freeze_shard(&self, args: FreezeShardArgs) -> FreezeShardReply;
    fn install_shard(&self, args: InstallShardArgs) -> InstallShardReply;
    fn delete_shard(&self, args: DeleteShardArgs) -> DeleteShardReply;
}
