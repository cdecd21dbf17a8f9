//! Raft over TCP: the sending side ([`TcpRaftTransport`], one `net::ClientEnd` per peer, each
//! message a `call_async` whose outcome becomes `Some(reply)` or `None`) and the receiving
//! side ([`raft_service`], the `Raft` service on the node's `net::Server`). A killed peer's
//! handler answers nothing; the service then sends `None`, which the caller treats as no reply.
//!
//! Snapshots go in pieces (`Raft.InstallSnapshotChunk`, [`SNAPSHOT_CHUNK_BYTES`] of data
//! each, far below the frame limit), never as one message: a snapshot may be larger than any
//! frame, and the receiver assembles it in a file rather than in memory.
//!
//! Every message carries the sender's cluster id ([`Tagged`]); the receiver answers nothing
//! to a message of another cluster, and a node that has no cluster yet adopts the id of the
//! first leader's message (AppendEntries or InstallSnapshot) before handling it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::identity::ClusterIdentity;
use super::members::Members;
use crate::net::{NetError, RemoteError, Service};
use crate::raft::membership::MAX_PEERS;
use crate::raft::{
    AppendEntriesArgs, AppendEntriesReply, InstallSnapshotArgs, InstallSnapshotChunkArgs,
    InstallSnapshotChunkReply, InstallSnapshotReply, OnReply, RaftHandler, RaftTransport,
    RequestVoteArgs, RequestVoteReply,
};
use crate::raft::{Configuration, MembershipHost};

/// A Raft message with the sender's cluster id (empty while it has none).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tagged<A> {
    pub cluster: String,
    pub msg: A,
}

/// Data bytes per snapshot piece: one snapshot chunk record of the file log, so a piece is
/// read and written as one checksummed record.
pub const SNAPSHOT_CHUNK_BYTES: usize = crate::storage::record::SNAPSHOT_CHUNK;
const _: () = assert!(SNAPSHOT_CHUNK_BYTES + (64 << 10) < crate::net::DEFAULT_MAX_FRAME_BYTES);

/// A piece of a streamed snapshot and the configuration as of the snapshot (membership on).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkWithConfig {
    pub args: InstallSnapshotChunkArgs,
    pub config: Option<Configuration>,
}

/// Reaches the members of the node's current configuration by their ids, at the addresses
/// the configuration carries (see [`Members`]); membership changes on.
pub struct TcpRaftTransport {
    members: Arc<Members>,
    identity: Arc<ClusterIdentity>,
}

impl TcpRaftTransport {
    pub fn new(members: Arc<Members>, identity: Arc<ClusterIdentity>) -> TcpRaftTransport {
        TcpRaftTransport { members, identity }
    }

    fn send<A, R>(&self, peer: usize, method: &str, args: A, on_reply: OnReply<R>)
    where
        A: serde::Serialize,
        R: serde::de::DeserializeOwned + Send + 'static,
    {
        let tagged = Tagged {
            cluster: self.identity.cluster_id().unwrap_or_default(),
            msg: args,
        };
        match self.members.end(peer) {
            Some(end) => {
                let members = self.members.clone();
                end.call_async(method, &tagged, move |r: Result<Option<R>, NetError>| {
                    if let Err(NetError::Remote {
                        error: RemoteError::NotMember { index },
                        ..
                    }) = &r
                    {
                        // This node was removed by a change it never received.
                        members.note_removed(peer, *index);
                    }
                    on_reply(r.ok().flatten())
                })
            }
            // Raft sends only to members; one removed meanwhile is a lost message.
            None => {
                log::debug!(target: "node::transport", "no end for peer {peer} ({method})");
                on_reply(None)
            }
        }
    }
}

impl RaftTransport for TcpRaftTransport {
    fn len(&self) -> usize {
        MAX_PEERS
    }

    fn membership(&self) -> Option<&dyn MembershipHost> {
        Some(self.members.as_ref())
    }

    fn install_snapshot_chunk_with_config(
        &self,
        peer: usize,
        args: InstallSnapshotChunkArgs,
        config: Option<Configuration>,
        on_reply: OnReply<InstallSnapshotChunkReply>,
    ) {
        self.send(
            peer,
            "Raft.InstallSnapshotChunkWithConfig",
            ChunkWithConfig { args, config },
            on_reply,
        );
    }

    fn request_vote(
        &self,
        peer: usize,
        args: RequestVoteArgs,
        on_reply: OnReply<RequestVoteReply>,
    ) {
        self.send(peer, "Raft.RequestVote", args, on_reply);
    }

    fn append_entries(
        &self,
        peer: usize,
        args: AppendEntriesArgs,
        on_reply: OnReply<AppendEntriesReply>,
    ) {
        self.send(peer, "Raft.AppendEntries", args, on_reply);
    }

    fn install_snapshot(
        &self,
        peer: usize,
        args: InstallSnapshotArgs,
        on_reply: OnReply<InstallSnapshotReply>,
    ) {
        self.send(peer, "Raft.InstallSnapshot", args, on_reply);
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
        self.send(peer, "Raft.InstallSnapshotChunk", args, on_reply);
    }
}

/// How often a refused message is logged (a peer of another cluster retries every heartbeat).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Admits or refuses each incoming message by its cluster id.
struct Admission {
    identity: Arc<ClusterIdentity>,
    last_logged: Mutex<Option<Instant>>,
}

impl Admission {
    fn admit(&self, method: &str, cluster: &str, from_leader: bool) -> Option<()> {
        match self.identity.admit(cluster, from_leader) {
            Ok(()) => Some(()),
            Err(refusal) => {
                let mut last = self.last_logged.lock();
                if last.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_EVERY) {
                    *last = Some(Instant::now());
                    log::warn!(target: "node::transport", "node {}: {method} refused: {refusal}", self.identity.node());
                }
                None
            }
        }
    }
}

/// The methods of [`raft_service`] the peer server runs on the connection's reader thread
/// (see [`net::ServerOptions::inline_methods`](crate::net::ServerOptions::inline_methods)):
/// AppendEntries and RequestVote, which at most sync the storage. The snapshot calls stay
/// on the handler pool: a last piece has the whole snapshot read back and checked, which
/// must not hold back the heartbeats behind it on the connection.
pub const INLINE_RAFT_METHODS: [&str; 2] = ["Raft.AppendEntries", "Raft.RequestVote"];

/// The `Raft` service: each method answers `Option<reply>` (`None` from a stopped peer, or
/// to a message refused: of another cluster, or naming another sender than the node the
/// peer handshake proved — a member speaks only as itself).
pub fn raft_service(h: RaftHandler, identity: Arc<ClusterIdentity>) -> Service {
    let (h1, h2, h3, h4, h5) = (h.clone(), h.clone(), h.clone(), h.clone(), h);
    let gate = Arc::new(Admission {
        identity,
        last_logged: Mutex::new(None),
    });
    let (g1, g5) = (gate.clone(), gate.clone());
    let service = Service::new("Raft")
        .method_from("RequestVote", move |node, t: Tagged<RequestVoteArgs>| {
            g1.admit("RequestVote", &t.cluster, false)?;
            as_itself(node, t.msg.candidate, "RequestVote").then(|| h1.request_vote(t.msg))?
        })
        .method_from(
            "InstallSnapshotChunkWithConfig",
            move |node, t: Tagged<ChunkWithConfig>| {
                g5.admit("InstallSnapshotChunk", &t.cluster, true)?;
                let ChunkWithConfig { args, config } = t.msg;
                as_itself(node, args.leader, "InstallSnapshotChunk")
                    .then(|| h5.install_snapshot_chunk_with_config(args, config))?
            },
        );
    LeaderMethods { service, gate }
        .add(
            "AppendEntries",
            |a: &AppendEntriesArgs| a.leader,
            move |a| h2.append_entries(a),
        )
        .add(
            "InstallSnapshot",
            |a: &InstallSnapshotArgs| a.leader,
            move |a| h3.install_snapshot(a),
        )
        .add(
            "InstallSnapshotChunk",
            |a: &InstallSnapshotChunkArgs| a.leader,
            move |a| h4.install_snapshot_chunk(a),
        )
        .service
}

/// The methods of the `Raft` service for the messages only a leader sends.
struct LeaderMethods {
    service: Service,
    gate: Arc<Admission>,
}

impl LeaderMethods {
    /// Adds method `name`: a message admitted by its cluster id (a leader's: see
    /// [`ClusterIdentity::admit`]), refused unless `sender` of it is the node the handshake
    /// proved, then answered by `run`.
    fn add<A, R>(
        self,
        name: &'static str,
        sender: fn(&A) -> usize,
        run: impl Fn(A) -> Option<R> + Send + Sync + 'static,
    ) -> LeaderMethods
    where
        A: DeserializeOwned + 'static,
        R: Serialize + 'static,
    {
        let gate = self.gate.clone();
        let service = self.service.method_from(name, move |node, t: Tagged<A>| {
            gate.admit(name, &t.cluster, true)?;
            as_itself(node, sender(&t.msg), name).then(|| run(t.msg))?
        });
        LeaderMethods {
            service,
            gate: self.gate,
        }
    }
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
