//! The KV server of Lab 4: the versioned store of Lab 2, replicated with [`Rsm`]. Every Put
//! goes through the log. A Get is answered by the leader without a log entry once ReadIndex
//! (Raft thesis §6.4, [`Rsm::read_barrier`]) confirms that a majority still follows it and its
//! store reflects every op committed before the Get arrived; until the leader has committed
//! an entry of its term, Gets go through the log too. Either way a server cut off in a
//! minority never answers, and never answers with stale data.
//!
//! There is no duplicate detection: a versioned Put executed twice fails the second time with
//! `ErrVersion`, which the clerk reports as `ErrMaybe` when it had to retry.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::kvapi::{GetArgs, GetReply, KvErr, KvService, PutArgs, PutReply, VersionedStore};
use crate::raft::{RaftTransport, Storage};
use crate::rsm::{ReadError, RestoreError, Rsm, RsmError, StateMachine};

/// A request as it travels through the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum KvRequest {
    Get(GetArgs),
    Put(PutArgs),
}

/// What the store answers a request executed from the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum KvResponse {
    Get(GetReply),
    Put(PutReply),
}

/// The replicated state: Lab 2's versioned store, executed from the log.
#[derive(Default)]
pub struct KvStore {
    store: VersionedStore,
}

impl KvStore {
    fn execute(&self, req: KvRequest) -> KvResponse {
        match req {
            KvRequest::Get(a) => KvResponse::Get(self.store.get(&a)),
            KvRequest::Put(a) => KvResponse::Put(self.store.put(a)),
        }
    }
}

impl StateMachine for KvStore {
    type Op = KvRequest;
    type Reply = KvResponse;

    fn apply(&self, ops: Vec<KvRequest>) -> Vec<KvResponse> {
        ops.into_iter().map(|op| self.execute(op)).collect()
    }

    fn snapshot(&self) -> Vec<u8> {
        self.store.encode()
    }

    fn restore(&self, bytes: &[u8]) -> Result<(), RestoreError> {
        Ok(self.store.restore(bytes)?)
    }
}

/// One replica of the KV service.
pub struct KvServer {
    me: usize,
    rsm: Rsm<KvStore>,
    /// The rsm's state machine, read directly by Gets that ReadIndex vouched for.
    store: Arc<KvStore>,
}

impl KvServer {
    /// Starts KV replica `me`: its Raft peer on `peers` and `storage`, and the rsm over the
    /// store. `maxraftstate`: snapshot when the persisted Raft state reaches it; `None` never.
    /// A transport serves the result as a [`KvService`] and the Raft peer's
    /// [`handler`](crate::raft::Raft::handler).
    pub fn new(
        peers: impl Into<Box<dyn RaftTransport>>,
        me: usize,
        storage: impl Into<Box<dyn Storage>>,
        maxraftstate: Option<usize>,
    ) -> Result<Arc<KvServer>, RsmError> {
        let store: Arc<KvStore> = Arc::new(KvStore::default());
        let rsm = Rsm::new(peers, me, storage, maxraftstate, store.clone())?;
        Ok(Arc::new(KvServer { me, rsm, store }))
    }

    /// Kills the Raft peer and waits for the rsm reader; pending requests answer WrongLeader.
    pub fn kill(&self) {
        self.rsm.kill();
    }

    pub fn rsm(&self) -> &Rsm<KvStore> {
        &self.rsm
    }

    /// Runs `req` through the log; `None` if this server cannot answer (not the leader).
    fn submit(&self, req: KvRequest) -> Option<KvResponse> {
        self.rsm
            .submit(req)
            .inspect_err(|e| log::trace!(target: "kvraft::server", "kv-{}: {e}", self.me))
            .ok()
    }
}

impl KvService for KvServer {
    fn get(&self, args: GetArgs) -> GetReply {
        let wrong_leader = GetReply {
            value: String::new(),
            version: 0,
            err: KvErr::WrongLeader,
        };
        match self.rsm.read_barrier() {
            Ok(()) => return self.store.store.get(&args),
            Err(ReadError::NotReady) => {} // no entry of this term committed yet: the log
            Err(e) => {
                log::trace!(target: "kvraft::server", "kv-{}: read: {e:?}", self.me);
                return wrong_leader;
            }
        }
        match self.submit(KvRequest::Get(args)) {
            Some(KvResponse::Get(r)) => r,
            _ => wrong_leader,
        }
    }

    fn put(&self, args: PutArgs) -> PutReply {
        match self.submit(KvRequest::Put(args)) {
            Some(KvResponse::Put(r)) => r,
            _ => PutReply {
                err: KvErr::WrongLeader,
            },
        }
    }
}
