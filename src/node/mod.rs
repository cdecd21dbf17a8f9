//! One raftkv node (issue 10): the Lab 4 replicated state machine on real TCP and a real disk,
//! speaking Redis's protocol to clients.
//!
//! ```text
//!  redis client ──RESP──► RespServer (client port) ──► Front::submit ─► proposers
//!                                                        │ leader here?  rsm.submit ─► Raft log
//!                                                        └ else Kv.Exec ─TCP─► leader's peer port
//!  peer port: net::Server with the `Raft` service (RequestVote, AppendEntries, InstallSnapshot)
//!             and the `Kv` service (Exec: a forwarded request, run on that node only)
//! ```
//!
//! Storage is chosen by the caller ([`Node::start`] takes a `Box<dyn raft::Storage>`); the
//! `raftkv` binary gives it the file log in `--data DIR`.

pub mod files;
pub mod front;
pub mod identity;
pub mod machine;
pub mod members;
pub mod secret;
pub mod transport;

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use crate::net::{ClientOptions, PeerAuth, Server, ServerOptions};
use crate::raft::{RaftOptions, Storage};
use crate::resp::server::{RespOptions, RespServer};
use crate::rsm::{Rsm, RsmError};
pub use front::Front;
pub use identity::ClusterIdentity;
pub use machine::KvMachine;
pub use members::Members;
pub use transport::TcpRaftTransport;

/// Snapshot once the Raft state passes this many bytes.
pub const DEFAULT_MAX_RAFT_STATE: usize = 8 << 20;

/// What a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's number, 1-based as on the command line.
    pub id: usize,
    /// Every node's peer address, node `i + 1` at `peers[i]` (this node's included: it
    /// listens there).
    pub peers: Vec<String>,
    /// Where Redis clients connect.
    pub client_addr: String,
    /// The client port's limits, timeouts and password.
    pub clients: RespOptions,
    pub max_raft_state: Option<usize>,
    /// A deliberate bug, for proving that the chaos run's checker can fail; `None` in service.
    pub fault: Option<NodeFault>,
    /// The cluster's peer secret: every peer link proves both ends hold it (see
    /// [`net::handshake`](crate::net::handshake)).
    pub peer_secret: Vec<u8>,
    /// The cluster's id, carried in every peer handshake: a node of another cluster is
    /// refused even if it holds the same secret.
    pub cluster_id: String,
    /// The data directory's identity: the cluster id on every peer message, whether this
    /// node votes yet, and the least Raft state it must find at start.
    pub identity: Arc<ClusterIdentity>,
}

/// The environment variable through which `raftkv serve` takes a [`NodeFault`] (hidden: not
/// in `--help`; `raftkv chaos` sets it on its nodes when asked to prove the checker).
pub const FAULT_ENV: &str = "RAFTKV_NODE_FAULT";

/// A deliberate bug a node can be started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeFault {
    /// Answer read-only commands (GET, VGET, MGET, EXISTS) from this node's own state without
    /// going through the log: a follower behind the leader, or a leader cut off from the
    /// majority, serves stale values. Named `local-reads` in [`FAULT_ENV`].
    LocalReads,
}

impl NodeFault {
    /// The fault [`FAULT_ENV`] names, if any; an unknown name is an error.
    pub fn from_env() -> Result<Option<NodeFault>, String> {
        match std::env::var(FAULT_ENV) {
            Err(_) => Ok(None),
            Ok(v) if v.is_empty() => Ok(None),
            Ok(v) if v == "local-reads" => Ok(Some(NodeFault::LocalReads)),
            Ok(v) => Err(format!(
                "{FAULT_ENV}={v}: unknown fault (known: local-reads)"
            )),
        }
    }
}

/// Why a node could not start.
#[derive(Debug)]
pub enum NodeError {
    /// A bad `--id` / `--peers`.
    Config(String),
    /// A peer address that does not resolve.
    Resolve {
        node: usize,
        addr: String,
        reason: String,
    },
    /// A port could not be bound.
    Bind {
        what: &'static str,
        addr: String,
        reason: String,
    },
    /// The replica could not start (corrupt state, say).
    Rsm(RsmError),
    /// A thread could not be started.
    Spawn { what: &'static str, reason: String },
    /// The Raft state is missing or older than the identity's high-water mark (or present
    /// without an identity): the node lost state and must not vote or serve.
    LostState(String),
}

impl fmt::Display for NodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeError::Config(e) => f.write_str(e),
            NodeError::Resolve { node, addr, reason } => {
                write!(f, "node {node}'s address {addr}: {reason}")
            }
            NodeError::Bind { what, addr, reason } => {
                write!(f, "cannot listen for {what} on {addr}: {reason}")
            }
            NodeError::Rsm(e) => write!(f, "{e}"),
            NodeError::Spawn { what, reason } => write!(f, "cannot start {what}: {reason}"),
            NodeError::LostState(e) => write!(f, "lost state: {e}"),
        }
    }
}

impl std::error::Error for NodeError {}

/// What the status line shows of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub term: u64,
    pub leader: bool,
    /// Requests the state machine has applied.
    pub applied: u64,
    /// What this node is in its configuration: voter, learner, removed, waiting to be added.
    pub member: &'static str,
    /// RESP commands answered.
    pub commands: u64,
    pub keys: usize,
}

/// Worker threads of the client port at most: they run only what the front cannot take
/// from the event loop without blocking (`INFO`'s sections and keyspace, `RAFTKV.MEMBER`).
pub const RESP_WORKERS: usize = 4;

/// A running node. [`shutdown`](Self::shutdown) (or drop) stops the client port, the peer
/// port, the replica and the peer connections, joining every thread.
pub struct Node {
    identity: Arc<ClusterIdentity>,
    id: usize,
    resp: Option<RespServer>,
    server: Option<Server>,
    rsm: Arc<Rsm<KvMachine>>,
    machine: Arc<KvMachine>,
    front: Arc<Front>,
    members: Arc<Members>,
}

fn resolve(node: usize, addr: &str) -> Result<SocketAddr, NodeError> {
    let err = |reason: String| NodeError::Resolve {
        node,
        addr: addr.to_string(),
        reason,
    };
    addr.to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address".into()))
}

/// Large buffers (values of a MiB, snapshot pieces, a snapshot being encoded or decoded) go to
/// their own mappings and back to the system when freed. glibc otherwise raises its mapping
/// threshold after the first such free and serves later ones from its per-thread arenas, which
/// keep what is freed: measured with 110 MiB of 1 MiB values, a node's peak resident memory
/// was 2.7 times the live data instead of 2.0.
fn return_large_frees_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only sets an allocator parameter; any value is accepted or
            // refused (returns 0) without effect on memory already allocated.
            let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10) };
            if ok == 0 {
                log::warn!(target: "node", "mallopt(M_MMAP_THRESHOLD) refused");
            }
        });
    }
}

impl Node {
    /// Starts the node on `storage`. Returns once both ports listen; the node then finds or
    /// elects a leader on its own.
    pub fn start(config: NodeConfig, storage: Box<dyn Storage>) -> Result<Node, NodeError> {
        return_large_frees_to_the_system();
        let n = config.peers.len();
        if config.id == 0 || config.id > n {
            return Err(NodeError::Config(format!(
                "--id {} is not one of the {n} nodes in --peers",
                config.id
            )));
        }
        let me = config.id - 1;
        // Refuse an open client port before anything starts.
        if let Ok(client_addrs) = config.client_addr.to_socket_addrs() {
            let client_addrs: Vec<SocketAddr> = client_addrs.collect();
            crate::resp::server::check_protected_mode(&client_addrs, &config.clients).map_err(
                |e| NodeError::Bind {
                    what: "clients",
                    addr: config.client_addr.clone(),
                    reason: e.to_string(),
                },
            )?;
        }
        let addrs = config
            .peers
            .iter()
            .enumerate()
            .map(|(i, a)| resolve(i + 1, a))
            .collect::<Result<Vec<_>, _>>()?;
        let auth = PeerAuth::new(
            &config.peer_secret,
            config.cluster_id.as_bytes(),
            config.id as u64,
            crate::raft::membership::MAX_PEERS as u64,
        )
        .map_err(NodeError::Config)?;
        let options = ClientOptions {
            call_timeout: Duration::from_secs(1),
            backoff_max: Duration::from_millis(200),
            ..ClientOptions::default()
        };
        // A founding node (or one that has fully joined) starts from --peers until its log or
        // membership file says otherwise; a node on an empty directory waits to be added.
        let initial = if config.identity.record().is_some_and(|r| r.voter) {
            Members::founding(config.peers.len(), me, &config.client_addr)
        } else {
            crate::raft::Configuration::default()
        };
        let members = Arc::new(Members::new(
            me,
            config.peers.clone(),
            config.identity.dir(),
            initial,
            auth.clone(),
            options,
        ));
        let admits = {
            let members = members.clone();
            Arc::new(move |id: u64| members.membership_of(id))
        };
        // Bind the peer port first: a node that cannot listen must not start Raft.
        let server = Server::start(
            &format!("node{}-peer", config.id),
            addrs[me],
            ServerOptions {
                // Forwarded requests block a handler until they commit; Raft's RPCs share
                // the pool, so it is larger than the default.
                handler_threads: 32,
                // A follower's every append and vote: short (an fsync at most), never waiting
                // on another node, and in the leader's order anyway. On the connection's
                // reader they skip the hand-off to a handler thread and back.
                inline_methods: transport::INLINE_RAFT_METHODS
                    .iter()
                    .map(|m| m.to_string())
                    .collect(),
                auth: Some(auth.clone().with_member_check(admits)),
                ..ServerOptions::default()
            },
        )
        .map_err(|e| NodeError::Bind {
            what: "peers",
            addr: config.peers[me].clone(),
            reason: e.to_string(),
        })?;
        let machine = Arc::new(KvMachine::new());
        let identity = config.identity.clone();
        let rsm = Rsm::with_options(
            Box::new(TcpRaftTransport::new(members.clone(), identity.clone()))
                as Box<dyn crate::raft::RaftTransport>,
            me,
            storage,
            config.max_raft_state,
            machine.clone(),
            RaftOptions {
                voter: identity.is_voter(),
                check_quorum: true,
                vote_stickiness: true,
                ..RaftOptions::default()
            },
        );
        let rsm = Arc::new(rsm.map_err(NodeError::Rsm)?);
        members.set_raft(&rsm.raft());
        // A larger append would stop the peer: the rsm refuses such a batch instead.
        rsm.set_max_entry_bytes(front::MAX_ENTRY_BYTES);
        // A node may hold far more than its snapshot threshold: without this, every few
        // writes would rewrite the whole state.
        rsm.grow_snapshots_with_state();
        // A commit here takes fsyncs: the proposers waiting for it park rather than spin.
        rsm.park_submitters();
        // Before the peer port serves Raft: nothing has been sent or answered yet.
        if let Err(e) = check_restored(&identity, rsm.raft().restored_extent()) {
            rsm.kill();
            return Err(e);
        }
        server.add_service(transport::raft_service(
            rsm.raft().handler(),
            identity.clone(),
        ));
        server.add_service(front::kv_service(rsm.clone(), machine.clone()));
        let mut front =
            Front::new(me, rsm.clone(), machine.clone(), members.clone()).map_err(|e| {
                NodeError::Spawn {
                    what: "a proposer thread",
                    reason: e.to_string(),
                }
            })?;
        if config.fault == Some(NodeFault::LocalReads) {
            log::warn!(target: "node", "node {}: deliberate fault: reads bypass the log", config.id);
            front = front.with_local_reads();
        }
        let front = Arc::new(front);
        let resp = RespServer::start(
            &format!("node{}-resp", config.id),
            &config.client_addr,
            RespOptions {
                // The front submits from the event loop: the workers run only `INFO` and
                // `RAFTKV.MEMBER`.
                workers: config.clients.workers.min(RESP_WORKERS),
                ..config.clients.clone()
            },
            front.clone(),
        )
        .map_err(|e| NodeError::Bind {
            what: "clients",
            addr: config.client_addr.clone(),
            reason: e.to_string(),
        })?;
        log::info!(target: "node", "node {}: peers on {}, clients on {}", config.id, addrs[me], resp.local_addr());
        Ok(Node {
            identity,
            id: config.id,
            resp: Some(resp),
            server: Some(server),
            rsm,
            machine,
            front,
            members,
        })
    }

    pub fn id(&self) -> usize {
        self.id
    }

    /// Where Redis clients connect.
    pub fn client_addr(&self) -> Option<SocketAddr> {
        self.resp.as_ref().map(|r| r.local_addr())
    }

    pub fn status(&self) -> NodeStatus {
        let (term, leader) = self.rsm.raft().get_state();
        NodeStatus {
            term,
            leader,
            applied: self.machine.applied(),
            member: self.members.role(),
            commands: self.front.commands(),
            keys: self.machine.keys(),
        }
    }

    /// Whether the replica has stopped, and why (a storage error names the operation, the
    /// file and the OS error; a snapshot it could not read).
    pub fn stopped(&self) -> Option<String> {
        if let Some(e) = self.rsm.failure() {
            return Some(e.to_string());
        }
        let raft = self.rsm.raft();
        if let Some(e) = raft.failure() {
            return Some(e);
        }
        raft.killed().then(|| "raft stopped".to_string())
    }

    /// The cluster id (`None` while a node that joined on an empty directory waits for a
    /// leader). A peer handshake states it.
    pub fn cluster_id(&self) -> Option<String> {
        self.identity.cluster_id()
    }

    /// Saves the identity's high-water mark (the term synced and index applied so far) and
    /// whether the node votes now; at most once a second, cheap otherwise. Call it
    /// periodically. An error (the disk) means the node must stop.
    pub fn record_progress(&self) -> Result<(), identity::IdentityError> {
        let raft = self.rsm.raft();
        let (term, applied) = raft.durable_progress();
        self.identity
            .record_progress(term, applied, raft.is_voter())
    }

    /// Stops everything and joins every thread. Idempotent.
    pub fn shutdown(&mut self) {
        if let Some(resp) = self.resp.take() {
            resp.shutdown();
        }
        self.front.shutdown();
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
        self.rsm.kill();
        self.members.shutdown();
    }
}

/// Refuses Raft state that is less than the identity says the node had: `restored` is the
/// restored (term, last log index).
fn check_restored(identity: &ClusterIdentity, restored: (u64, u64)) -> Result<(), NodeError> {
    let (term, last) = restored;
    let dir = identity.dir().display().to_string();
    let replace = format!(
        "to replace the node, remove {dir} entirely and start it again without --bootstrap: it rejoins, catches up from the leader and only then votes"
    );
    match identity.record() {
        Some(r) if term < r.term || last < r.applied => Err(NodeError::LostState(format!(
            "{dir}/identity records term {} and log index {} applied, but {dir}/raft holds term {term} and a log through {last} (missing, truncated or an older copy); it must not vote or serve with that; {replace}",
            r.term, r.applied
        ))),
        None if term > 0 || last > 0 => Err(NodeError::LostState(format!(
            "{dir}/raft holds term {term} and a log through {last} but {dir}/identity is missing, so its cluster is unknown; {replace}"
        ))),
        _ => Ok(()),
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown();
    }
}
