//! The transport seam: how a Raft peer reaches the others, and how their requests reach it.
//!
//! Sending: Raft calls a [`RaftTransport`] method once per message, after releasing its
//! mutex; the call returns at once. The transport delivers the request to peer `peer` and runs
//! `on_reply` later, on one of its own threads (never the caller's), **at most once**: with
//! `Some(reply)`, or `None` once it knows no reply will come (lost, peer down, timed out).
//! A transport that shuts down may drop pending callbacks without running them; Raft treats a
//! silent peer as a lost message and retries on its own schedule.
//!
//! Receiving: the transport's server side hands each incoming request to a [`RaftHandler`]
//! (from [`Raft::handler`](super::Raft::handler)) and sends back what it returns; `None` means
//! send nothing (the peer is dead, as a crashed process would be: the caller sees no reply).
//! Handlers may run concurrently, on any thread; each returns once what it changed is durable.

use std::sync::Arc;

use super::membership::{Configuration, MembershipHost};
use super::rpc::{
    AppendEntriesArgs, AppendEntriesReply, InstallSnapshotArgs, InstallSnapshotChunkArgs,
    InstallSnapshotChunkReply, InstallSnapshotReply, RequestVoteArgs, RequestVoteReply,
};
use super::state::Core;

/// What a transport calls with the outcome of one message.
pub type OnReply<R> = Box<dyn FnOnce(Option<R>) + Send>;

/// How a Raft peer sends its three RPCs. Peers are numbered `0..len()`, the same on every
/// peer; the peer's own number is never sent to.
pub trait RaftTransport: Send + Sync {
    /// How many peers the cluster has, this one included.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn request_vote(&self, peer: usize, args: RequestVoteArgs, on_reply: OnReply<RequestVoteReply>);
    fn append_entries(
        &self,
        peer: usize,
        args: AppendEntriesArgs,
        on_reply: OnReply<AppendEntriesReply>,
    );
    fn install_snapshot(
        &self,
        peer: usize,
        args: InstallSnapshotArgs,
        on_reply: OnReply<InstallSnapshotReply>,
    );

    /// `Some(n)`: this transport cannot carry a whole snapshot in one message; Raft streams
    /// snapshots with [`install_snapshot_chunk`](RaftTransport::install_snapshot_chunk), `n`
    /// bytes at a time. `None` (the default, the labs' network): one InstallSnapshot each.
    fn snapshot_chunk_bytes(&self) -> Option<usize> {
        None
    }

    /// Sends one piece of a snapshot; only called when `snapshot_chunk_bytes` is `Some`.
    fn install_snapshot_chunk(
        &self,
        _peer: usize,
        _args: InstallSnapshotChunkArgs,
        on_reply: OnReply<InstallSnapshotChunkReply>,
    ) {
        on_reply(None)
    }

    /// Membership changes (see [`membership`](super::membership)): a transport that returns
    /// a host turns them on, and numbers its peers `0..len()` with `len()` at most
    /// [`MAX_PEERS`](super::membership::MAX_PEERS). `None` (the default, the labs' network):
    /// a fixed set of peers, all voters.
    fn membership(&self) -> Option<&dyn MembershipHost> {
        None
    }

    /// [`install_snapshot_chunk`](RaftTransport::install_snapshot_chunk) with the
    /// configuration as of the snapshot (membership on); the receiver hands both to
    /// [`RaftHandler::install_snapshot_chunk_with_config`].
    fn install_snapshot_chunk_with_config(
        &self,
        peer: usize,
        args: InstallSnapshotChunkArgs,
        _config: Option<Configuration>,
        on_reply: OnReply<InstallSnapshotChunkReply>,
    ) {
        self.install_snapshot_chunk(peer, args, on_reply)
    }
}

/// The receiving side of one Raft peer: what a transport's server calls with each request.
/// Cheap to clone; it keeps the peer's state alive, not its threads (a killed peer's handler
/// refuses everything).
#[derive(Clone)]
pub struct RaftHandler {
    pub(super) core: Arc<Core>,
}

impl RaftHandler {
    pub fn request_vote(&self, args: RequestVoteArgs) -> Option<RequestVoteReply> {
        self.core.request_vote(args)
    }

    pub fn append_entries(&self, args: AppendEntriesArgs) -> Option<AppendEntriesReply> {
        self.core.append_entries(args)
    }

    pub fn install_snapshot(&self, args: InstallSnapshotArgs) -> Option<InstallSnapshotReply> {
        self.core.install_snapshot(args)
    }

    pub fn install_snapshot_chunk(
        &self,
        args: InstallSnapshotChunkArgs,
    ) -> Option<InstallSnapshotChunkReply> {
        self.core.install_snapshot_chunk(args, None)
    }

    /// A piece of a streamed snapshot with the configuration as of the snapshot (membership
    /// on: a completed snapshot without one is not installed).
    pub fn install_snapshot_chunk_with_config(
        &self,
        args: InstallSnapshotChunkArgs,
        config: Option<Configuration>,
    ) -> Option<InstallSnapshotChunkReply> {
        self.core.install_snapshot_chunk(args, config)
    }
}
