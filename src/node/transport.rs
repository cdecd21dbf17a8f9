//! Raft over TCP: the sending side ([`TcpRaftTransport`], one `net::ClientEnd` per peer, each
//! message a `call_async` whose outcome becomes `Some(reply)` or `None`) and the receiving
//! side ([`raft_service`], the `Raft` service on the node's `net::Server`). A killed peer's
//! handler answers nothing; the service then sends `None`, which the caller treats as no reply.

use crate::net::{ClientEnd, NetError, Service};
use crate::raft::{
    AppendEntriesArgs, AppendEntriesReply, InstallSnapshotArgs, InstallSnapshotReply, OnReply,
    RaftHandler, RaftTransport, RequestVoteArgs, RequestVoteReply,
};

/// `ends[j]` reaches peer `j`; `None` at the node's own number.
pub struct TcpRaftTransport {
    ends: Vec<Option<ClientEnd>>,
}

impl TcpRaftTransport {
    pub fn new(ends: Vec<Option<ClientEnd>>) -> TcpRaftTransport {
        TcpRaftTransport { ends }
    }

    fn send<A, R>(&self, peer: usize, method: &str, args: &A, on_reply: OnReply<R>)
    where
        A: serde::Serialize,
        R: serde::de::DeserializeOwned + Send + 'static,
    {
        match self.ends.get(peer).and_then(|e| e.as_ref()) {
            Some(end) => end.call_async(method, args, move |r: Result<Option<R>, NetError>| {
                on_reply(r.ok().flatten())
            }),
            // Raft never sends to itself; an unknown peer is a lost message.
            None => log::error!(target: "node::transport", "no end for peer {peer} ({method})"),
        }
    }
}

impl RaftTransport for TcpRaftTransport {
    fn len(&self) -> usize {
        self.ends.len()
    }

    fn request_vote(
        &self,
        peer: usize,
        args: RequestVoteArgs,
        on_reply: OnReply<RequestVoteReply>,
    ) {
        self.send(peer, "Raft.RequestVote", &args, on_reply);
    }

    fn append_entries(
        &self,
        peer: usize,
        args: AppendEntriesArgs,
        on_reply: OnReply<AppendEntriesReply>,
    ) {
        self.send(peer, "Raft.AppendEntries", &args, on_reply);
    }

    fn install_snapshot(
        &self,
        peer: usize,
        args: InstallSnapshotArgs,
        on_reply: OnReply<InstallSnapshotReply>,
    ) {
        self.send(peer, "Raft.InstallSnapshot", &args, on_reply);
    }
}

/// The `Raft` service: each method answers `Option<reply>` (`None` from a stopped peer, or
/// to a message refused). A message that names another sender than the node the peer
/// handshake proved is refused and logged: a member speaks only as itself.
pub fn raft_service(h: RaftHandler) -> Service {
    let (h1, h2, h3) = (h.clone(), h.clone(), h);
    Service::new("Raft")
        .method_from("RequestVote", move |node, a: RequestVoteArgs| {
            as_itself(node, a.candidate, "RequestVote").then(|| h1.request_vote(a))?
        })
        .method_from("AppendEntries", move |node, a: AppendEntriesArgs| {
            as_itself(node, a.leader, "AppendEntries").then(|| h2.append_entries(a))?
        })
        .method_from("InstallSnapshot", move |node, a: InstallSnapshotArgs| {
            as_itself(node, a.leader, "InstallSnapshot").then(|| h3.install_snapshot(a))?
        })
}

/// Whether a message claiming peer `claimed` (0-based) came from that node (1-based), when
/// the connection is authenticated.
fn as_itself(node: Option<u64>, claimed: usize, what: &str) -> bool {
    match node {
        Some(n) if n != claimed as u64 + 1 => {
            log::warn!(target: "node::transport", "refused {what} from node {n}: it claims to come from node {}", claimed + 1);
            false
        }
        _ => true,
    }
}
