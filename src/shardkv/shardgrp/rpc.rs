//! The shard-move RPCs of a shard group (the Go labs' `shardrpc`). Every one carries the
//! number of the configuration whose change it is part of; a group ignores a number older than
//! the highest it has seen for that shard, so a superseded controller cannot undo anything.

use serde::{Deserialize, Serialize};

use crate::kvapi::KvErr;
use crate::shardkv::shardcfg::{Tnum, Tshid};

/// Stop serving `shard` (Gets and Puts get `ErrWrongGroup`) and return its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeShardArgs {
    pub shard: Tshid,
    pub num: Tnum,
}

/// `err`: `OK`; `ErrVersion` if `num` is older than the shard's; `ErrWrongLeader`.
/// `state`: the shard's key/value state (empty if the group no longer holds it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeShardReply {
    pub state: Vec<u8>,
    pub num: Tnum,
    pub err: KvErr,
}

/// Take `shard` with `state` (from [`FreezeShardReply::state`]) and serve it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallShardArgs {
    pub shard: Tshid,
    pub state: Vec<u8>,
    pub num: Tnum,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallShardReply {
    pub err: KvErr,
}

/// Forget `shard` (after it was installed elsewhere).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteShardArgs {
    pub shard: Tshid,
    pub num: Tnum,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteShardReply {
    pub err: KvErr,
}
