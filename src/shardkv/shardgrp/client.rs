//! The clerk of one shard group: finds the group's leader and sends it one request. Unlike
//! the Lab 4 clerk it gives up after [`ROUNDS`] rounds without an answer, because the group
//! may be down or gone and its caller (the shardkv clerk, the controller) must then look
//! at the configuration again.

use std::sync::Arc;
use std::time::Duration;

use super::rpc::{
    DeleteShardArgs, DeleteShardReply, FreezeShardArgs, FreezeShardReply, InstallShardArgs,
    InstallShardReply,
};
use crate::kvapi::{
    CallError, GetArgs, GetReply, KvErr, LeaderHint, PutArgs, PutReply, Step, Tversion,
};
use crate::shardkv::shardcfg::{Tnum, Tshid};
use crate::shardkv::transport::ShardTransport;

/// Rounds over every server without an answer from a leader before a call gives up.
pub const ROUNDS: usize = 2;
/// Pause after a round without an answer: an election is probably under way.
const ROUND_PAUSE: Duration = Duration::from_millis(50);

/// No leader of the group answered within [`ROUNDS`] rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoAnswer;

/// What one call came to, and whether an attempt might have been executed without its
/// answer reaching us (sent and lost, or its leader deposed after starting it).
pub struct Outcome<R> {
    pub reply: Result<R, NoAnswer>,
    pub maybe_executed: bool,
}

pub struct Clerk {
    transport: Arc<dyn ShardTransport>,
    servers: Vec<String>,
    /// The server that last answered as leader; tried first.
    leader: LeaderHint,
}

impl Clerk {
    pub fn new(transport: Arc<dyn ShardTransport>, servers: Vec<String>) -> Clerk {
        Clerk {
            transport,
            servers,
            leader: LeaderHint::new(0),
        }
    }

    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    /// Sends `method` (named for log lines; `send` makes the call) to the leader (or whoever
    /// answers as one), rotating on no reply or a `WrongLeader` reply, for at most [`ROUNDS`]
    /// rounds.
    fn call<R>(
        &self,
        method: &str,
        send: impl Fn(&dyn ShardTransport, &str) -> Result<R, CallError>,
        err: impl Fn(&R) -> KvErr,
    ) -> Outcome<R> {
        let n = self.servers.len();
        let mut maybe_executed = false;
        let answered = self.leader.search(n, ROUND_PAUSE, Some(ROUNDS * n), |i| {
            match send(&*self.transport, &self.servers[i]) {
                Ok(r) if err(&r) != KvErr::WrongLeader => return Step::Leader(r),
                Ok(_) => {
                    // The op may have entered the log before this server lost leadership.
                    log::trace!(target: "shardkv::clerk", "{method} to {}: wrong leader", self.servers[i]);
                }
                Err(e) => {
                    log::trace!(target: "shardkv::clerk", "{method} to {}: {e}", self.servers[i]);
                }
            }
            maybe_executed = true;
            Step::Next
        });
        Outcome {
            reply: answered.ok_or(NoAnswer),
            maybe_executed,
        }
    }

    pub fn get(&self, key: &str) -> Result<GetReply, NoAnswer> {
        let args = GetArgs {
            key: key.to_string(),
        };
        self.call("KVServer.Get", |t, s| t.get(s, &args), |r: &GetReply| r.err)
            .reply
    }

    /// The reply is the server's: the `ErrMaybe` rule is the caller's, which alone knows
    /// about earlier attempts at other groups.
    pub fn put(&self, key: &str, value: &str, version: Tversion) -> Outcome<PutReply> {
        let args = PutArgs {
            key: key.to_string(),
            value: value.to_string(),
            version,
        };
        self.call("KVServer.Put", |t, s| t.put(s, &args), |r: &PutReply| r.err)
    }

    pub fn freeze_shard(&self, shard: Tshid, num: Tnum) -> Result<FreezeShardReply, NoAnswer> {
        let args = FreezeShardArgs { shard, num };
        self.call(
            "KVServer.FreezeShard",
            |t, s| t.freeze_shard(s, &args),
            |r: &FreezeShardReply| r.err,
        )
        .reply
    }

    pub fn install_shard(
        &self,
        shard: Tshid,
        state: Vec<u8>,
        num: Tnum,
    ) -> Result<InstallShardReply, NoAnswer> {
        let args = InstallShardArgs { shard, state, num };
        self.call(
            "KVServer.InstallShard",
            |t, s| t.install_shard(s, &args),
            |r: &InstallShardReply| r.err,
        )
        .reply
    }

    pub fn delete_shard(&self, shard: Tshid, num: Tnum) -> Result<DeleteShardReply, NoAnswer> {
        let args = DeleteShardArgs { shard, num };
        self.call(
            "KVServer.DeleteShard",
            |t, s| t.delete_shard(s, &args),
            |r: &DeleteShardReply| r.err,
        )
        .reply
    }
}
