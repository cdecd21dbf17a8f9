//! The labrpc side of the transport seams: Raft's three RPCs and the KV service's two over
//! the simulated network, so Raft, the servers and the clerks never name `labrpc`. A TCP
//! transport implements the same traits (`raft::RaftTransport`, `kvapi::KvTransport`) and
//! serves the same handlers (`raft::RaftHandler`, `kvapi::KvService`).

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Clnt;
use crate::kvapi::{CallError, GetArgs, GetReply, KvService, KvTransport, PutArgs, PutReply};
use crate::labrpc::{ClientEnd, IService, RpcError, Service};
use crate::raft::{
    AppendEntriesArgs, AppendEntriesReply, InstallSnapshotArgs, InstallSnapshotReply, OnReply,
    Raft, RaftHandler, RaftTransport, RequestVoteArgs, RequestVoteReply,
};

/// The transport of a cluster of one peer, which elects itself and commits alone: there is
/// nobody to send to (for tests of a single peer on a real storage).
pub struct Solo;

impl RaftTransport for Solo {
    fn len(&self) -> usize {
        1
    }
    fn request_vote(&self, _: usize, _: RequestVoteArgs, on_reply: OnReply<RequestVoteReply>) {
        on_reply(None)
    }
    fn append_entries(
        &self,
        _: usize,
        _: AppendEntriesArgs,
        on_reply: OnReply<AppendEntriesReply>,
    ) {
        on_reply(None)
    }
    fn install_snapshot(
        &self,
        _: usize,
        _: InstallSnapshotArgs,
        on_reply: OnReply<InstallSnapshotReply>,
    ) {
        on_reply(None)
    }
}

/// Raft's sending side on labrpc: `ends[j]` reaches peer `j`; each message is one
/// `call_async`, whose outcome becomes `Some(reply)` or `None`.
pub struct LabrpcRaftTransport {
    ends: Vec<ClientEnd>,
}

impl LabrpcRaftTransport {
    pub fn new(ends: Vec<ClientEnd>) -> LabrpcRaftTransport {
        LabrpcRaftTransport { ends }
    }

    /// Sends one message to `peer`; a reply that never comes, or cannot be decoded, is `None`.
    fn call<A: Serialize, R: DeserializeOwned + 'static>(
        &self,
        peer: usize,
        method: &str,
        args: &A,
        on_reply: OnReply<R>,
    ) {
        self.ends[peer].call_async(method, args, move |r: Result<R, RpcError>| on_reply(r.ok()));
    }
}

impl From<Vec<ClientEnd>> for Box<dyn RaftTransport> {
    fn from(ends: Vec<ClientEnd>) -> Box<dyn RaftTransport> {
        Box::new(LabrpcRaftTransport::new(ends))
    }
}

impl RaftTransport for LabrpcRaftTransport {
    fn len(&self) -> usize {
        self.ends.len()
    }

    fn request_vote(
        &self,
        peer: usize,
        args: RequestVoteArgs,
        on_reply: OnReply<RequestVoteReply>,
    ) {
        self.call(peer, "Raft.RequestVote", &args, on_reply);
    }

    fn append_entries(
        &self,
        peer: usize,
        args: AppendEntriesArgs,
        on_reply: OnReply<AppendEntriesReply>,
    ) {
        self.call(peer, "Raft.AppendEntries", &args, on_reply);
    }

    fn install_snapshot(
        &self,
        peer: usize,
        args: InstallSnapshotArgs,
        on_reply: OnReply<InstallSnapshotReply>,
    ) {
        self.call(peer, "Raft.InstallSnapshot", &args, on_reply);
    }
}

/// Raft's receiving side on labrpc: the `Raft` service (`RequestVote`, `AppendEntries`,
/// `InstallSnapshot`). A killed peer answers nothing, as a crashed process would.
pub fn raft_service(h: RaftHandler) -> Service {
    let (h1, h2, h3) = (h.clone(), h.clone(), h);
    Service::new("Raft")
        .method_or_silence("RequestVote", move |a: RequestVoteArgs| h1.request_vote(a))
        .method_or_silence("AppendEntries", move |a: AppendEntriesArgs| {
            h2.append_entries(a)
        })
        .method_or_silence("InstallSnapshot", move |a: InstallSnapshotArgs| {
            h3.install_snapshot(a)
        })
}

/// `raft.rpc_service()`: the peer's labrpc service.
pub trait RaftRpcService {
    fn rpc_service(&self) -> Service;
}

impl RaftRpcService for Raft {
    fn rpc_service(&self) -> Service {
        raft_service(self.handler())
    }
}

/// A Raft peer as a tester service: killing it kills the peer, and it answers `Raft.*`.
pub struct RaftSvc(pub Arc<Raft>);

impl IService for RaftSvc {
    fn kill(&self) {
        self.0.kill();
    }

    fn rpc_service(self: Arc<Self>) -> Option<Service> {
        Some(self.0.rpc_service())
    }
}

/// A KV server's receiving side on labrpc: the `KVServer` service (`Get`, `Put`).
pub fn kv_service(svc: Arc<dyn KvService>) -> Service {
    let getter = svc.clone();
    Service::new("KVServer")
        .method("Get", move |a: GetArgs| getter.get(a))
        .method("Put", move |a: PutArgs| svc.put(a))
}

/// A KV server as a tester service: `kill` is what stopping it means (nothing for Lab 2,
/// killing the Raft peer and the rsm reader for Lab 4).
pub struct KvSvc {
    svc: Arc<dyn KvService>,
    kill: Box<dyn Fn() + Send + Sync>,
}

impl KvSvc {
    pub fn new(svc: Arc<dyn KvService>, kill: impl Fn() + Send + Sync + 'static) -> KvSvc {
        KvSvc {
            svc,
            kill: Box::new(kill),
        }
    }
}

impl IService for KvSvc {
    fn kill(&self) {
        (self.kill)();
    }

    fn rpc_service(self: Arc<Self>) -> Option<Service> {
        Some(kv_service(self.svc.clone()))
    }
}

/// A labrpc failure as the seams' [`CallError`] (for the labs' own labrpc adapters too).
pub fn call_error(server: &str, e: RpcError) -> CallError {
    match e {
        RpcError::NoReply => CallError::NoReply {
            server: server.to_string(),
        },
        other => CallError::BadReply {
            server: server.to_string(),
            reason: other.to_string(),
        },
    }
}

/// A clerk's sending side on labrpc: a test client, with the ends the tests cut off.
impl KvTransport for Clnt {
    fn get(&self, server: &str, args: &GetArgs) -> Result<GetReply, CallError> {
        self.call(server, "KVServer.Get", args)
            .map_err(|e| call_error(server, e))
    }

    fn put(&self, server: &str, args: &PutArgs) -> Result<PutReply, CallError> {
        self.call(server, "KVServer.Put", args)
            .map_err(|e| call_error(server, e))
    }
}
