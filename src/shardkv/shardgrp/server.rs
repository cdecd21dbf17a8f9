//! A shard group's replica: the shards it serves, each a Lab 2 versioned store, replicated
//! with [`Rsm`]. Gets, Puts and the three shard-move operations all go through the log, so
//! every replica agrees on when a shard stopped (or started) being served.
//!
//! Each shard has a status and the highest configuration number any move has named for it.
//! A move naming an older number is refused with `ErrVersion`; one naming the same number
//! again is a repeat and changes nothing (an Install never overwrites what the shard has
//! received since), which makes every step safe to retry and to be carried out by two
//! controllers at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::rpc::{
    DeleteShardArgs, DeleteShardReply, FreezeShardArgs, FreezeShardReply, InstallShardArgs,
    InstallShardReply,
};
use crate::kvapi::{GetArgs, GetReply, KvErr, KvService, PutArgs, PutReply, VersionedStore};
use crate::labcodec;
use crate::raft::{RaftTransport, Storage};
use crate::rsm::{RestoreError, Rsm, RsmError, StateMachine};
use crate::shardkv::shardcfg::{GID1, NSHARDS, Tgid, Tnum, key2shard};
use crate::shardkv::transport::ShardGrpService;

/// A request as it travels through the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GrpRequest {
    Get(GetArgs),
    Put(PutArgs),
    Freeze(FreezeShardArgs),
    Install(InstallShardArgs),
    Delete(DeleteShardArgs),
}

/// What executing a request answers.
#[derive(Debug, Clone)]
pub enum GrpResponse {
    Get(GetReply),
    Put(PutReply),
    Freeze(FreezeShardReply),
    Install(InstallShardReply),
    Delete(DeleteShardReply),
}

/// Whether this group serves a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Status {
    /// Served: Gets and Puts are executed.
    Serving,
    /// Frozen for a move: the state is kept, Gets and Puts get `ErrWrongGroup`.
    Frozen,
    /// Not held here.
    Absent,
}

struct Shard {
    /// The highest configuration number a move has named for this shard.
    num: Tnum,
    status: Status,
    store: VersionedStore,
}

/// The replicated state of a shard group.
pub struct ShardStore {
    gid: Tgid,
    shards: Mutex<Vec<Shard>>,
    /// Set when a Delete dropped data, so the persisted snapshot stops holding it.
    snapshot_wanted: AtomicBool,
}

/// A shard as a snapshot holds it: number, status, encoded store.
type ShardImage = (Tnum, Status, Vec<u8>);

impl ShardStore {
    /// The first group starts out serving every shard; the others serve none until shards
    /// are installed.
    fn new(gid: Tgid) -> ShardStore {
        let status = if gid == GID1 {
            Status::Serving
        } else {
            Status::Absent
        };
        ShardStore {
            gid,
            shards: Mutex::new(
                (0..NSHARDS)
                    .map(|_| Shard {
                        num: 0,
                        status,
                        store: VersionedStore::new(),
                    })
                    .collect(),
            ),
            snapshot_wanted: AtomicBool::new(false),
        }
    }

    fn execute(&self, req: GrpRequest) -> GrpResponse {
        let mut shards = self.shards.lock();
        match req {
            GrpRequest::Get(a) => {
                let sh = &shards[key2shard(&a.key)];
                GrpResponse::Get(if sh.status == Status::Serving {
                    sh.store.get(&a)
                } else {
                    GetReply {
                        value: String::new(),
                        version: 0,
                        err: KvErr::WrongGroup,
                    }
                })
            }
            GrpRequest::Put(a) => {
                let sh = &shards[key2shard(&a.key)];
                GrpResponse::Put(if sh.status == Status::Serving {
                    sh.store.put(a)
                } else {
                    PutReply {
                        err: KvErr::WrongGroup,
                    }
                })
            }
            GrpRequest::Freeze(a) => {
                let Some(sh) = shards.get_mut(a.shard) else {
                    return GrpResponse::Freeze(FreezeShardReply {
                        state: Vec::new(),
                        num: 0,
                        err: KvErr::WrongGroup,
                    });
                };
                if a.num < sh.num {
                    return GrpResponse::Freeze(FreezeShardReply {
                        state: Vec::new(),
                        num: sh.num,
                        err: KvErr::Version,
                    });
                }
                if sh.status == Status::Absent && a.num > sh.num {
                    // Only a configuration that disagrees with what this group was given
                    // can name it as the source of a shard it never held.
                    log::warn!(target: "shardkv::grp", "gid {}: freeze of shard {} (cfg {}) that was never installed here (last cfg {})", self.gid, a.shard, a.num, sh.num);
                }
                sh.num = a.num;
                if sh.status == Status::Serving {
                    sh.status = Status::Frozen;
                    log::debug!(target: "shardkv::grp", "gid {}: froze shard {} for cfg {}", self.gid, a.shard, a.num);
                }
                let state = if sh.status == Status::Absent {
                    Vec::new()
                } else {
                    sh.store.encode()
                };
                GrpResponse::Freeze(FreezeShardReply {
                    state,
                    num: sh.num,
                    err: KvErr::Ok,
                })
            }
            GrpRequest::Install(a) => {
                let Some(sh) = shards.get_mut(a.shard) else {
                    return GrpResponse::Install(InstallShardReply {
                        err: KvErr::WrongGroup,
                    });
                };
                let err = if a.num < sh.num {
                    KvErr::Version
                } else if a.num == sh.num {
                    // A repeat: the shard may have taken Puts since the first Install.
                    KvErr::Ok
                } else {
                    let store = VersionedStore::new();
                    match store.restore(&a.state) {
                        Ok(()) => {
                            sh.store = store;
                            sh.num = a.num;
                            sh.status = Status::Serving;
                            log::debug!(target: "shardkv::grp", "gid {}: installed shard {} for cfg {} ({} bytes)", self.gid, a.shard, a.num, a.state.len());
                            KvErr::Ok
                        }
                        Err(e) => {
                            log::error!(target: "shardkv::grp", "gid {}: install of shard {} for cfg {}: unreadable state: {e}", self.gid, a.shard, a.num);
                            KvErr::WrongGroup
                        }
                    }
                };
                GrpResponse::Install(InstallShardReply { err })
            }
            GrpRequest::Delete(a) => {
                let Some(sh) = shards.get_mut(a.shard) else {
                    return GrpResponse::Delete(DeleteShardReply {
                        err: KvErr::WrongGroup,
                    });
                };
                let err = if a.num < sh.num {
                    KvErr::Version
                } else {
                    sh.num = a.num;
                    if sh.status != Status::Absent {
                        sh.status = Status::Absent;
                        sh.store = VersionedStore::new();
                        self.snapshot_wanted.store(true, Ordering::Relaxed);
                        log::debug!(target: "shardkv::grp", "gid {}: deleted shard {} for cfg {}", self.gid, a.shard, a.num);
                    }
                    KvErr::Ok
                };
                GrpResponse::Delete(DeleteShardReply { err })
            }
        }
    }
}

impl StateMachine for ShardStore {
    type Op = GrpRequest;
    type Reply = GrpResponse;

    fn apply(&self, ops: Vec<GrpRequest>) -> Vec<GrpResponse> {
        ops.into_iter().map(|op| self.execute(op)).collect()
    }

    fn snapshot(&self) -> Vec<u8> {
        let shards = self.shards.lock();
        let image: Vec<ShardImage> = shards
            .iter()
            .map(|s| (s.num, s.status, s.store.encode()))
            .collect();
        labcodec::encode(&image).unwrap_or_default()
    }

    /// All or nothing: on any error the state is left as it was (and the replica stops).
    fn restore(&self, data: &[u8]) -> Result<(), RestoreError> {
        let image: Vec<ShardImage> = labcodec::decode(data)?;
        if image.len() != NSHARDS {
            return Err(format!(
                "gid {}: snapshot has {} shards, not {NSHARDS}",
                self.gid,
                image.len()
            )
            .into());
        }
        let mut restored = Vec::with_capacity(NSHARDS);
        for (num, status, bytes) in image {
            let store = VersionedStore::new();
            store.restore(&bytes)?;
            restored.push(Shard { num, status, store });
        }
        *self.shards.lock() = restored;
        Ok(())
    }

    fn wants_snapshot(&self) -> bool {
        self.snapshot_wanted.swap(false, Ordering::Relaxed)
    }
}

/// One replica of a shard group; answers `KVServer.Get`, `Put`, `FreezeShard`,
/// `InstallShard` and `DeleteShard`.
pub struct ShardGrpServer {
    gid: Tgid,
    me: usize,
    rsm: Rsm<ShardStore>,
}

impl ShardGrpServer {
    /// Starts replica `me` of shard group `gid`: its Raft peer on `peers` and `storage`, and
    /// the rsm over the group's shards. `maxraftstate`: snapshot when the persisted Raft state
    /// reaches it; `None` never. An error if the persisted snapshot cannot be restored. A
    /// transport serves the result as a [`ShardGrpService`] and the Raft peer's
    /// [`handler`](crate::raft::Raft::handler).
    pub fn new(
        peers: impl Into<Box<dyn RaftTransport>>,
        gid: Tgid,
        me: usize,
        storage: impl Into<Box<dyn Storage>>,
        maxraftstate: Option<usize>,
    ) -> Result<Arc<ShardGrpServer>, RsmError> {
        let store = Arc::new(ShardStore::new(gid));
        let rsm = Rsm::new(peers, me, storage, maxraftstate, store)?;
        Ok(Arc::new(ShardGrpServer { gid, me, rsm }))
    }

    /// Kills the Raft peer and waits for the rsm reader; pending requests answer WrongLeader.
    pub fn kill(&self) {
        self.rsm.kill();
    }

    pub fn rsm(&self) -> &Rsm<ShardStore> {
        &self.rsm
    }

    /// Runs `req` through the log; `None` if this replica cannot answer (not the leader).
    fn submit(&self, req: GrpRequest) -> Option<GrpResponse> {
        self.rsm
            .submit(req)
            .inspect_err(
                |e| log::trace!(target: "shardkv::grp", "gid {} srv {}: {e}", self.gid, self.me),
            )
            .ok()
    }
}

impl KvService for ShardGrpServer {
    fn get(&self, args: GetArgs) -> GetReply {
        match self.submit(GrpRequest::Get(args)) {
            Some(GrpResponse::Get(r)) => r,
            _ => GetReply {
                value: String::new(),
                version: 0,
                err: KvErr::WrongLeader,
            },
        }
    }

    fn put(&self, args: PutArgs) -> PutReply {
        match self.submit(GrpRequest::Put(args)) {
            Some(GrpResponse::Put(r)) => r,
            _ => PutReply {
                err: KvErr::WrongLeader,
            },
        }
    }
}

impl ShardGrpService for ShardGrpServer {
    fn freeze_shard(&self, args: FreezeShardArgs) -> FreezeShardReply {
        match self.submit(GrpRequest::Freeze(args)) {
            Some(GrpResponse::Freeze(r)) => r,
            _ => FreezeShardReply {
                state: Vec::new(),
                num: 0,
                err: KvErr::WrongLeader,
            },
        }
    }

    fn install_shard(&self, args: InstallShardArgs) -> InstallShardReply {
        match self.submit(GrpRequest::Install(args)) {
            Some(GrpResponse::Install(r)) => r,
            _ => InstallShardReply {
                err: KvErr::WrongLeader,
            },
        }
    }

    fn delete_shard(&self, args: DeleteShardArgs) -> DeleteShardReply {
        match self.submit(GrpRequest::Delete(args)) {
            Some(GrpResponse::Delete(r)) => r,
            _ => DeleteShardReply {
                err: KvErr::WrongLeader,
            },
        }
    }
}
