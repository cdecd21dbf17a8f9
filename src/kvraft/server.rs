//! The KV server of Lab 4: the versioned store of Lab 2, replicated with [`Rsm`]. Every Get
//! and Put goes through the log, so a server cut off in a minority never answers, and never
//! answers with stale data.
//!
//! There is no duplicate detection: a versioned Put executed twice fails the second time with
//! `ErrVersion`, which the clerk reports as `ErrMaybe` when it had to retry.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::rsm::{RaftService, Rsm, RsmError, StateMachine};
use crate::kvsrv::rpc::{GetArgs, GetReply, KvErr, PutArgs, PutReply};
use crate::kvsrv::store::VersionedStore;
use crate::labcodec;
use crate::labrpc::{ClientEnd, Service};
use crate::tester::{IService, Persister, Tgid};

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

impl StateMachine for KvStore {
    fn do_op(&self, req: &[u8]) -> Vec<u8> {
        let resp = match labcodec::decode::<KvRequest>(req) {
            Ok(KvRequest::Get(a)) => KvResponse::Get(self.store.get(&a)),
            Ok(KvRequest::Put(a)) => KvResponse::Put(self.store.put(a)),
            Err(e) => {
                // Only this server writes requests, so this is a bug; every peer skips it alike.
                log::error!(target: "kvraft::server", "undecodable request: {e}");
                return Vec::new();
            }
        };
        labcodec::encode(&resp).unwrap_or_default()
    }

    fn snapshot(&self) -> Vec<u8> {
        self.store.encode()
    }

    fn restore(&self, bytes: &[u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.store.restore(bytes)?)
    }
}

/// One replica of the KV service.
pub struct KvServer {
    me: usize,
    rsm: Rsm,
}

impl KvServer {
    pub fn rsm(&self) -> &Rsm {
        &self.rsm
    }

    /// Runs `req` through the log; `None` if this server cannot answer (not the leader).
    fn submit(&self, req: KvRequest) -> Option<KvResponse> {
        let bytes = labcodec::encode(&req).ok()?;
        match self.rsm.submit(bytes) {
            Ok(reply) => match labcodec::decode::<KvResponse>(&reply) {
                Ok(r) => Some(r),
                Err(e) => {
                    log::error!(target: "kvraft::server", "kv-{}: undecodable reply: {e}", self.me);
                    None
                }
            },
            Err(_) => None,
        }
    }

    pub fn get(&self, args: GetArgs) -> GetReply {
        match self.submit(KvRequest::Get(args)) {
            Some(KvResponse::Get(r)) => r,
            _ => GetReply {
                value: String::new(),
                version: 0,
                err: KvErr::WrongLeader,
            },
        }
    }

    pub fn put(&self, args: PutArgs) -> PutReply {
        match self.submit(KvRequest::Put(args)) {
            Some(KvResponse::Put(r)) => r,
            _ => PutReply {
                err: KvErr::WrongLeader,
            },
        }
    }
}

impl IService for KvServer {
    /// Kills the Raft peer and waits for the rsm reader; pending requests answer WrongLeader.
    fn kill(&self) {
        self.rsm.kill();
    }

    fn rpc_service(self: Arc<Self>) -> Option<Service> {
        let getter = self.clone();
        Some(
            Service::new("KVServer")
                .method("Get", move |a: GetArgs| getter.get(a))
                .method("Put", move |a: PutArgs| self.put(a)),
        )
    }
}

/// A started replica and its services for the tester, in kill order.
pub type StartedKvServer = (Arc<KvServer>, Vec<Arc<dyn IService>>);

/// Starts KV replica `me` of a group: the KV server and its Raft peer, in that kill order.
/// `maxraftstate`: snapshot when the persisted Raft state reaches it; `None` never.
pub fn start_kv_server(
    ends: Vec<ClientEnd>,
    _gid: Tgid,
    me: usize,
    persister: Persister,
    maxraftstate: Option<usize>,
) -> Result<StartedKvServer, RsmError> {
    let store: Arc<KvStore> = Arc::new(KvStore::default());
    let rsm = Rsm::new(ends, me, persister, maxraftstate, store)?;
    let raft = rsm.raft();
    let kv = Arc::new(KvServer { me, rsm });
    let services: Vec<Arc<dyn IService>> = vec![kv.clone(), Arc::new(RaftService(raft))];
    Ok((kv, services))
}
