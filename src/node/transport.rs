//! Raft over TCP: the sending side ([`TcpRaftTransport`], one `net::ClientEnd` per peer, each
//! message a `call_async` whose outcome becomes `Some(reply)` or `None`) and the receiving
//! side ([`raft_service`], the `Raft` service on the node's `net::Server`). A killed peer's
//! handler answers nothing; the service then sends `None`, which the caller treats as no reply.
//!
//! Snapshots go in pieces (`Raft.InstallSnapshotChunk`, [`SNAPSHOT_CHUNK_BYTES`] of data
//! each, far below the frame limit), never as one message: a snapshot may be larger than any
//! frame, and the receiver assembles it in a file rather than in memory.

use crate::net::{ClientEnd, NetError, Service};
use crate::raft::{
    AppendEntriesArgs, AppendEntriesReply, InstallSnapshotArgs, InstallSnapshotChunkArgs,
    InstallSnapshotChunkReply, InstallSnapshotReply, OnReply, RaftHandler, RaftTransport,
    RequestVoteArgs, RequestVoteReply,
};

/// Data bytes per snapshot piece: one snapshot chunk record of the file log, so a piece is
/// read and written as one checksummed record.
pub const SNAPSHOT_CHUNK_BYTES: usize = crate::storage::record::SNAPSHOT_CHUNK;
const _: () = assert!(SNAPSHOT_CHUNK_BYTES + (64 << 10) < crate::net::DEFAULT_MAX_FRAME_BYTES);

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

    fn snapshot_chunk_bytes(&self) -> Option<usize> {
        Some(SNAPSHOT_CHUNK_BYTES)
    }

    fn install_snapshot_chunk(
        &self,
        peer: usize,
        args: InstallSnapshotChunkArgs,
        on_reply: OnReply<InstallSnapshotChunkReply>,
    ) {
        self.send(peer, "Raft.InstallSnapshotChunk", &args, on_reply);
    }
}

/// The `Raft` service: each method answers `Option<reply>` (`None` from a stopped peer).
pub fn raft_service(h: RaftHandler) -> Service {
    let (h1, h2, h3, h4) = (h.clone(), h.clone(), h.clone(), h);
    Service::new("Raft")
        .method("RequestVote", move |a: RequestVoteArgs| h1.request_vote(a))
        .method("AppendEntries", move |a: AppendEntriesArgs| {
            h2.append_entries(a)
        })
        .method("InstallSnapshot", move |a: InstallSnapshotArgs| {
            h3.install_snapshot(a)
        })
        .method(
            "InstallSnapshotChunk",
            move |a: InstallSnapshotChunkArgs| h4.install_snapshot_chunk(a),
        )
}
