//! Lab 3: Raft — leader election, log replication, persistence and snapshots.
//!
//! A [`Raft`] peer runs three threads of its own, `raft-<me>-ticker` (elections and
//! heartbeats), `raft-<me>-applier` (delivers committed entries and snapshots, in index
//! order, on the apply channel) and `raft-<me>-syncer` (a leader's sync of its own new
//! entries, after their AppendEntries left, so [`Raft::start`] never waits for an fsync).
//! RPCs to peers go through a [`RaftTransport`] that never blocks the sender, so a call to a
//! dead peer that hangs for seconds never holds up anything; replies are handled on the
//! transport's threads. What must survive a crash goes to a [`Storage`]. All state sits
//! behind one mutex, which is never held across an RPC, a blocking channel send, a sleep or
//! a storage sync. Commands are opaque bytes: Raft never looks inside them.

mod apply;
pub mod check;
mod election;
pub mod log;
pub mod membership;
pub mod persist;
mod read;
mod replication;
mod rpc;
mod snapshot;
mod state;
pub mod storage;
pub mod transport;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam::channel::Sender;
use parking_lot::Mutex;

pub use check::{MAX_INDEX, MAX_TERM, MAX_TERM_JUMP, Refusal, Validator};
pub use membership::{
    ChangeError, ConfChange, Configuration, Member, MembershipHost, MembershipStatus,
};
pub use read::ReadIndexError;
pub use rpc::{
    AppendEntriesArgs, AppendEntriesReply, InstallSnapshotArgs, InstallSnapshotChunkArgs,
    InstallSnapshotChunkReply, InstallSnapshotReply, RequestVoteArgs, RequestVoteReply,
};
use state::Core;
pub use storage::{
    ChunkOutcome, HardState, Restored, SnapshotChunk, SnapshotData, SnapshotReader, SnapshotSource,
    Storage, StorageError,
};
pub use transport::{OnReply, RaftHandler, RaftTransport};

/// What Raft delivers to its service, in index order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyMsg {
    /// A committed command.
    Command {
        index: u64,
        term: u64,
        command: Vec<u8>,
    },
    /// A snapshot from the leader that replaces the service's state up to `index`.
    Snapshot {
        index: u64,
        term: u64,
        data: Vec<u8>,
    },
}

/// Why a Raft peer could not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RaftError {
    /// The persisted Raft state could not be read.
    CorruptState { peer: usize, reason: String },
    /// A thread could not be started.
    Spawn { peer: usize, reason: String },
}

impl fmt::Display for RaftError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RaftError::CorruptState { peer, reason } => {
                write!(f, "raft-{peer}: corrupt persisted state: {reason}")
            }
            RaftError::Spawn { peer, reason } => {
                write!(f, "raft-{peer}: cannot start a thread: {reason}")
            }
        }
    }
}

impl std::error::Error for RaftError {}

/// How a peer behaves beyond the labs' Raft. The default is the labs' Raft exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftOptions {
    /// Whether the peer may vote and campaign from the start. `false` for a peer that joins
    /// with an empty log (a replaced disk): it follows, and becomes a voter once it holds
    /// everything its leader had committed when it last heard from it.
    pub voter: bool,
    /// CheckQuorum (Raft dissertation §6.2): a leader that has not heard from a majority
    /// within an election timeout steps down.
    pub check_quorum: bool,
    /// Vote stickiness (Raft dissertation §4.2.3): a peer that heard from a working leader
    /// within the minimum election timeout ignores a RequestVote for a newer term (it neither
    /// adopts the term nor votes), so a disruptive or rogue peer cannot depose that leader.
    /// Pre-vote refuses such candidates in any case.
    pub vote_stickiness: bool,
    /// Pre-vote (Raft dissertation §9.6): an election timeout first asks whether a majority
    /// would vote, and bumps the term only then. On by default (the labs' Raft and the node);
    /// off, a timeout starts a real election at once, as in the paper's Figure 2 (the rule
    /// tests measure the election timer both ways).
    pub pre_vote: bool,
}

impl Default for RaftOptions {
    fn default() -> Self {
        RaftOptions {
            voter: true,
            check_quorum: false,
            vote_stickiness: false,
            pre_vote: true,
        }
    }
}

/// One Raft peer.
pub struct Raft {
    core: Arc<Core>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Raft {
    /// Starts peer `me` of `peers` (peer `me` is itself), restoring what `storage` holds.
    /// Committed commands and snapshots are sent on `apply_tx`; the channel is closed when the
    /// peer is killed (or stopped by a storage error). Returns at once.
    pub fn new(
        peers: impl Into<Box<dyn RaftTransport>>,
        me: usize,
        storage: impl Into<Box<dyn Storage>>,
        apply_tx: Sender<ApplyMsg>,
    ) -> Result<Raft, RaftError> {
        Raft::with_options(peers, me, storage, apply_tx, RaftOptions::default())
    }

    /// [`Raft::new`] with the behaviour `options` chooses.
    pub fn with_options(
        peers: impl Into<Box<dyn RaftTransport>>,
        me: usize,
        storage: impl Into<Box<dyn Storage>>,
        apply_tx: Sender<ApplyMsg>,
        options: RaftOptions,
    ) -> Result<Raft, RaftError> {
        let (core, kill_rx) = Core::restore(peers.into(), me, storage.into(), options)?;
        let core = Arc::new(core);
        type Job = Box<dyn FnOnce() + Send>;
        let jobs: [(&str, Job); 3] = [
            ("ticker", {
                let core = core.clone();
                Box::new(move || core.run_ticker())
            }),
            ("applier", {
                let core = core.clone();
                Box::new(move || core.run_applier(apply_tx, kill_rx))
            }),
            ("syncer", {
                let core = core.clone();
                Box::new(move || core.run_syncer())
            }),
        ];
        let mut threads = Vec::with_capacity(jobs.len());
        for (job, f) in jobs {
            match thread::Builder::new()
                .name(format!("raft-{me}-{job}"))
                .spawn(f)
            {
                Ok(h) => threads.push(h),
                Err(e) => {
                    // Stop and join the threads already running.
                    core.kill();
                    for h in threads {
                        let _ = h.join();
                    }
                    return Err(RaftError::Spawn {
                        peer: me,
                        reason: e.to_string(),
                    });
                }
            }
        }
        Ok(Raft {
            core,
            threads: Mutex::new(threads),
        })
    }

    /// Proposes `command`. If this peer is the leader, returns `(index, term, true)` where the
    /// command will appear if it is ever committed; otherwise `(0, term, false)`. Never waits
    /// for agreement, nor for its own storage: the entry's AppendEntries leave at once, and
    /// `raft-<me>-syncer` syncs it meanwhile (the leader counts itself for it only then).
    pub fn start(&self, command: Vec<u8>) -> (u64, u64, bool) {
        self.core.start(command)
    }

    /// ReadIndex (Raft thesis §6.4): if this peer leads and has committed an entry of its
    /// term, confirms with one round of AppendEntries that a majority still takes it as
    /// leader and returns its commit index as it was when called. A read that the service
    /// answers after applying through that index is linearizable. Blocks up to `timeout`;
    /// `NotLeader` if not confirmed by then, `NotReady` if no entry of this term has
    /// committed yet (go through the log).
    pub fn read_index(&self, timeout: Duration) -> Result<u64, ReadIndexError> {
        self.core.read_index(timeout)
    }

    /// Proposes one membership change (see [`membership`]): a new member joins as a learner,
    /// a learner is promoted, a member is removed. Returns the index and term of the
    /// configuration entry, which takes effect at once; the change is done once that index
    /// is committed. Refused while another change is uncommitted, before this leader has
    /// committed an entry of its term, on a follower, and in the labs' fixed-peer Raft.
    pub fn change_membership(&self, change: &ConfChange) -> Result<(u64, u64), ChangeError> {
        self.core.change_membership(change)
    }

    /// This peer's configuration and, on a leader, its members' progress; `None` in the
    /// labs' fixed-peer Raft.
    pub fn membership(&self) -> Option<MembershipStatus> {
        self.core.membership_status()
    }

    /// The peer this one last heard from as leader of its current term (itself when it
    /// leads), if any.
    pub fn leader_hint(&self) -> Option<usize> {
        self.core.state.lock().leader_id
    }

    /// The term of the entry at `index` in this peer's log: `None` past its end or inside
    /// its snapshot (the snapshot's own last index answers its term).
    pub fn term_at(&self, index: u64) -> Option<u64> {
        self.core.state.lock().log.term_at(index)
    }

    /// The current term and whether this peer believes it is the leader.
    pub fn get_state(&self) -> (u64, bool) {
        self.core.get_state()
    }

    /// This peer's commit index and the last index it delivered to its service.
    pub fn progress(&self) -> (u64, u64) {
        let st = self.core.state.lock();
        (st.commit_index, st.last_applied)
    }

    /// The service has a snapshot of everything through `index`: Raft may discard that part
    /// of its log.
    pub fn snapshot(&self, index: u64, data: Vec<u8>) {
        self.core.snapshot(index, data)
    }

    /// Keeps this peer's persisted Raft state (as [`persist_bytes`](Raft::persist_bytes)
    /// counts it) under about `bytes` while it follows: past the limit it takes no more
    /// entries from the leader until a [`snapshot`](Raft::snapshot) makes room, so a follower
    /// whose service applies slowly cannot grow a log it cannot trim. For a service that
    /// snapshots when the state reaches some size; set it well above that size, since the
    /// state also holds entries not yet applied. A leader's own log is not limited. `None`
    /// (the default) takes everything.
    pub fn set_log_limit(&self, bytes: Option<usize>) {
        let limit = bytes.map_or(0, |b| b.max(1));
        self.core
            .log_limit
            .store(limit, std::sync::atomic::Ordering::Relaxed);
        // Waiters re-check against the new limit (also when it was just removed).
        self.core.wake_room();
    }

    /// Gives Raft the service's check of commands and snapshots from the leader: an
    /// AppendEntries holding a command it refuses, or an InstallSnapshot whose data it
    /// refuses, is refused before anything is persisted (see [`check`]); a snapshot streamed
    /// in pieces is checked once assembled, read back from its temporary file, before it
    /// replaces anything.
    pub fn set_validator(&self, validator: Arc<dyn Validator>) {
        *self.core.validator.write() = Some(validator);
    }

    /// Size in bytes of the persisted Raft state (not counting the snapshot).
    pub fn persist_bytes(&self) -> usize {
        self.core.storage.state_size()
    }

    /// The snapshot this peer holds now (empty if none): what a service restores from at
    /// start, before the first entry after it is delivered. A snapshot the storage cannot
    /// read back stops the peer (logged) and gives empty bytes; a service that must tell
    /// the two apart calls [`read_snapshot`](Raft::read_snapshot).
    pub fn snapshot_data(&self) -> Vec<u8> {
        self.read_snapshot().unwrap_or_default()
    }

    /// The snapshot this peer holds now (empty if none), read back from the storage if it
    /// keeps it; an error (a damaged snapshot file, naming file and offset) stops the peer.
    pub fn read_snapshot(&self) -> Result<Vec<u8>, StorageError> {
        let snap = self.core.state.lock().snapshot.clone();
        snap.read_all().inspect_err(|e| {
            let mut st = self.core.state.lock();
            self.core.storage_failed(&mut st, "read snapshot", e);
        })
    }

    /// Stops the peer: no more RPCs are sent, nothing more is delivered, the apply channel is
    /// closed and both threads have exited when this returns. Idempotent.
    pub fn kill(&self) {
        self.core.kill();
        let me = thread::current().id();
        for h in self.threads.lock().drain(..) {
            // A thread of this peer never joins itself (kill called from a callback).
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
    }

    /// Whether the peer is stopped: killed, or stopped by a storage error.
    pub fn killed(&self) -> bool {
        self.core.dead.load(Ordering::SeqCst)
    }

    /// Why a storage error stopped this peer (the operation, the file, the OS error), if one
    /// did.
    pub fn failure(&self) -> Option<String> {
        self.core.failure.lock().clone()
    }

    /// Whether this peer votes and campaigns (see [`RaftOptions::voter`]).
    pub fn is_voter(&self) -> bool {
        self.core.voter.load(Ordering::SeqCst)
    }

    /// What this peer's storage is known to hold durably: the highest term synced, and the
    /// highest index handed to the applier that is known synced here (entries are delivered
    /// once committed, which may be before this peer's own sync of them). A later start on
    /// the same storage that finds less lost state; see [`Raft::restored_extent`].
    pub fn durable_progress(&self) -> (u64, u64) {
        (
            self.core.synced_term.load(Ordering::SeqCst),
            self.core.delivered.load(Ordering::SeqCst),
        )
    }

    /// The current term and the last log index (the snapshot's, if the log after it is
    /// empty): right after start, what the storage held.
    pub fn restored_extent(&self) -> (u64, u64) {
        let st = self.core.state.lock();
        (st.term, st.log.last_index())
    }

    /// What a transport's server side hands this peer's incoming requests to.
    pub fn handler(&self) -> RaftHandler {
        RaftHandler {
            core: self.core.clone(),
        }
    }
}

impl Drop for Raft {
    fn drop(&mut self) {
        self.kill();
    }
}
