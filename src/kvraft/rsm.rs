//! The replicated state machine (Lab 4A/4C): a service hands requests to [`Rsm::submit`], which
//! puts them in the Raft log and returns the state machine's answer once the request has been
//! committed and executed.
//!
//! One reader thread, `rsm-<me>-reader`, drains the apply channel and executes every committed
//! request on every peer, in log order. A submitter waits on a one-slot channel keyed by the
//! log index; the reader answers it only if the op executed there is the submitter's own (same
//! unique id), otherwise with [`SubmitError::WrongLeader`]. A submitter whose peer stops leading
//! keeps waiting while its entry is still in the peer's log (a later leader may commit it), for
//! at most [`DEPOSED_GRACE`]; then, or as soon as the entry is gone, it answers WrongLeader.
//! Each new leader appends a term-start entry (never shown to the state machine), so entries
//! of earlier terms still in its log commit at once rather than at the next client request:
//! a deposed leader's client mostly learns the real outcome instead of a retry that might
//! execute its request twice.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, RecvTimeoutError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::labcodec;
use crate::oneshot;
/// Why [`Rsm::read_barrier`] could not vouch for a read: Raft's ReadIndex errors.
pub use crate::raft::ReadIndexError as ReadError;
use crate::raft::{ApplyMsg, Raft, RaftError, RaftOptions, RaftTransport, Storage, Validator};

/// How often a waiting submitter checks that its peer still leads in the term it started in.
pub const LEADERSHIP_POLL: Duration = Duration::from_millis(50);
/// How long a submitter whose peer lost leadership keeps waiting while its entry is still in
/// the log (a later leader may commit it).
pub const DEPOSED_GRACE: Duration = Duration::from_millis(300);
/// Committed entries Raft may hand over before the reader takes them.
const APPLY_BUFFER: usize = 256;
/// How long [`Rsm::read_barrier`] waits for the leadership check, and then for the apply.
pub const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// A follower's Raft state is kept under this many times `maxraftstate` (see
/// [`Raft::set_log_limit`]).
const LOG_LIMIT_FACTOR: usize = 3;
/// Per-entry bytes of the persisted log beyond the command itself (term, length), roughly.
const ENTRY_OVERHEAD: usize = 4;

/// Submits that had entered this peer's log and were then answered `WrongLeader` without
/// waiting for the outcome, by reason. Such an op may still commit: a clerk that retries it
/// elsewhere then meets `ErrVersion` and reports `ErrMaybe` (see `docs/errmaybe.md`). The
/// test harness shares one instance across a group's replicas and restarts.
#[derive(Debug, Default)]
pub struct GiveUps {
    /// The peer's term moved on, or it stopped leading, while the op waited.
    pub term_change: AtomicUsize,
    /// The op waited longer than [`Rsm::set_give_up_after`] allows (the timeout variant).
    pub timeout: AtomicUsize,
    /// Another leader's op was executed at the op's index: the op itself is lost.
    pub index_taken: AtomicUsize,
}

impl GiveUps {
    /// `(term_change, timeout, index_taken)`.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.term_change.load(Ordering::Relaxed),
            self.timeout.load(Ordering::Relaxed),
            self.index_taken.load(Ordering::Relaxed),
        )
    }
}

/// Why [`Rsm::submit`] returned without the state machine's reply. In none of these cases
/// has this peer executed the request for the caller; it may still commit later (a deposed
/// leader's entry can survive), which is why clerks treat a retried Put's `ErrVersion` as
/// `ErrMaybe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// This peer does not lead, stopped leading or saw its term move on before the request
    /// committed, or another leader's entry took the request's index.
    WrongLeader,
    /// The Raft peer has been killed (or stopped on a storage error): it will never answer.
    Stopped,
    /// The request could not be encoded as a log entry.
    Encode(String),
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitError::WrongLeader => f.write_str("not the leader"),
            SubmitError::Stopped => f.write_str("peer stopped"),
            SubmitError::Encode(e) => write!(f, "cannot encode the request: {e}"),
        }
    }
}

impl std::error::Error for SubmitError {}

/// What the replicated service executes. Requests and replies are the service's own encoded
/// values: the rsm never looks inside them.
pub trait StateMachine: Send + Sync {
    /// Executes one committed request and returns its reply. Called on every peer, in log order.
    fn do_op(&self, req: &[u8]) -> Vec<u8>;
    /// The whole state, for a snapshot.
    fn snapshot(&self) -> Vec<u8>;
    /// Replaces the whole state by a snapshot's. An error (a snapshot the service cannot
    /// read) stops the replica: going on would apply later entries to the wrong state.
    fn restore(&self, data: &[u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
    /// Whether the service wants a snapshot now although the log is not yet long enough
    /// (e.g. it just dropped much of its state, which the persisted snapshot still holds).
    /// Asked after each executed op; only honoured when snapshots are on.
    fn wants_snapshot(&self) -> bool {
        false
    }
    /// Whether `req` is a request this machine can execute. Raft asks (through the rsm's
    /// validator) before a follower persists an entry from its leader: an entry that fails is
    /// refused, so garbage never reaches the log. The default takes every request.
    fn check_op(&self, _req: &[u8]) -> Result<(), String> {
        Ok(())
    }
    /// Whether `data` is a state [`restore`](Self::restore) would take; asked before an
    /// InstallSnapshot is persisted. The default takes every state.
    fn check_snapshot(&self, _data: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

/// What the rsm gives Raft to check the leader's entries and snapshots: the log format's
/// envelope (a [`LogOp`], an [`RsmSnapshot`]) and, inside it, the state machine's own check.
struct RsmValidator {
    sm: Arc<dyn StateMachine>,
}

impl Validator for RsmValidator {
    fn check_entry(&self, command: &[u8]) -> Result<(), String> {
        match labcodec::decode::<LogOp>(command).map_err(|e| e.to_string())? {
            LogOp::Request { req, .. } => self.sm.check_op(&req),
            LogOp::TermStart => Ok(()),
        }
    }

    fn check_snapshot(&self, data: &[u8]) -> Result<(), String> {
        let snap = labcodec::decode_borrowed::<RsmSnapshot>(data).map_err(|e| e.to_string())?;
        self.sm.check_snapshot(snap.state)
    }
}

/// Why a replica could not start, or stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RsmError {
    /// A snapshot (persisted, or installed from the leader) could not be read or restored.
    /// `index` is the snapshot's last index, when known.
    CorruptSnapshot {
        peer: usize,
        index: Option<u64>,
        reason: String,
    },
    /// The Raft peer could not start.
    Raft(RaftError),
    /// The reader thread could not start.
    Spawn { peer: usize, reason: String },
}

impl fmt::Display for RsmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RsmError::CorruptSnapshot {
                peer,
                index: Some(i),
                reason,
            } => write!(f, "rsm-{peer}: corrupt snapshot through {i}: {reason}"),
            RsmError::CorruptSnapshot {
                peer,
                index: None,
                reason,
            } => write!(f, "rsm-{peer}: corrupt persisted snapshot: {reason}"),
            RsmError::Raft(e) => write!(f, "{e}"),
            RsmError::Spawn { peer, reason } => {
                write!(f, "rsm-{peer}: cannot start the reader thread: {reason}")
            }
        }
    }
}

impl std::error::Error for RsmError {}

/// What goes into the Raft log.
#[derive(Serialize, Deserialize)]
enum LogOp {
    /// A service request and an id unique to this submission, so the submitter can tell its
    /// op from another leader's op at the same index.
    Request { id: u64, req: Vec<u8> },
    /// Appended by each new leader of a term (Raft §8): once it commits, every entry of
    /// earlier terms still in the log has committed too, so a request whose leader was
    /// deposed learns its fate at once instead of waiting for the next client.
    TermStart,
}

/// What the rsm hands Raft as a snapshot: the service's state and the index it reflects, so
/// a restarted peer knows where it is. Read borrowing the state from the snapshot's bytes, and
/// written by [`encode_snapshot`], so a large state is never copied.
#[derive(Deserialize)]
struct RsmSnapshot<'a> {
    index: u64,
    #[serde(borrow)]
    state: &'a [u8],
}

/// The encoding of `RsmSnapshot { index, state }`: that of `(index, state.len())` followed
/// by the state's bytes, built in the state's own buffer.
fn encode_snapshot(index: u64, mut state: Vec<u8>) -> Result<Vec<u8>, labcodec::CodecError> {
    let head = labcodec::encode(&(index, state.len() as u64))?;
    state.splice(0..0, head);
    Ok(state)
}

/// How far the state machine has applied, and the reads waiting for it to get further.
struct Applied {
    index: u64,
    /// Reads by the index they wait for; answered (or dropped, when the reader exits) once
    /// the state machine reaches it.
    reads: BTreeMap<u64, Vec<oneshot::Sender<()>>>,
}

/// A submitter waiting for its op, registered (by the op's id) before `Raft::start` is called.
struct Waiter {
    /// The index `start` gave the op, once the submitter has learned it.
    index: Option<u64>,
    /// One slot: the reader answers once and never blocks.
    reply: oneshot::Sender<Result<Vec<u8>, SubmitError>>,
}

/// The submitters waiting for their ops. Keyed by op id, so that a submitter is registered
/// before it calls `Raft::start` and the call runs outside this lock (`start` syncs the
/// storage: an fsync with the file log): the reader can answer an op that commits before its
/// submitter has even learned its index.
#[derive(Default)]
struct Waiters {
    by_id: HashMap<u64, Waiter>,
    /// Which op each known index was started for (to tell a submitter at once that another
    /// leader's op took its index).
    by_index: HashMap<u64, u64>,
    /// The last index the reader has handled (applied or covered by a snapshot).
    applied: u64,
}

impl Waiters {
    fn remove(&mut self, id: u64) -> Option<Waiter> {
        let w = self.by_id.remove(&id)?;
        if let Some(index) = w.index
            && self.by_index.get(&index) == Some(&id)
        {
            self.by_index.remove(&index);
        }
        Some(w)
    }

    /// Every waiter is dropped (its submitter then answers `WrongLeader` or `Stopped`).
    fn clear(&mut self) {
        self.by_id.clear();
        self.by_index.clear();
    }
}

struct Shared {
    me: usize,
    raft: Arc<Raft>,
    sm: Arc<dyn StateMachine>,
    maxraftstate: Option<usize>,
    /// Submitters by op id (and the index each was started at).
    waiters: Mutex<Waiters>,
    /// The last log index the state machine reflects, for reads waiting on it.
    applied: Mutex<Applied>,
    /// Why this replica stopped, if it did (it then never serves again).
    failure: Mutex<Option<RsmError>>,
    /// Test-only: give up on a pending submit after this long (see [`Rsm::set_give_up_after`]).
    give_up_after: Mutex<Option<Duration>>,
    give_ups: Mutex<Arc<GiveUps>>,
}

/// A replicated state machine on one Raft peer.
pub struct Rsm {
    shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl Rsm {
    /// Starts the Raft peer `me` of `peers` on `storage`, and the reader thread. Restores `sm`
    /// from the Raft peer's snapshot, if any; one that cannot be read or restored is an error
    /// (the replica must not start from the wrong state). `maxraftstate`: snapshot when the
    /// persisted Raft state approaches this many bytes; `None` never snapshots. Returns at
    /// once.
    pub fn new(
        peers: impl Into<Box<dyn RaftTransport>>,
        me: usize,
        storage: impl Into<Box<dyn Storage>>,
        maxraftstate: Option<usize>,
        sm: Arc<dyn StateMachine>,
    ) -> Result<Rsm, RsmError> {
        Rsm::with_options(peers, me, storage, maxraftstate, sm, RaftOptions::default())
    }

    /// [`Rsm::new`] on a Raft peer started with `options`.
    pub fn with_options(
        peers: impl Into<Box<dyn RaftTransport>>,
        me: usize,
        storage: impl Into<Box<dyn Storage>>,
        maxraftstate: Option<usize>,
        sm: Arc<dyn StateMachine>,
        options: RaftOptions,
    ) -> Result<Rsm, RsmError> {
        // Buffered, unlike the lab's channel: handing entries over one at a time costs a
        // thread switch each, and on a loaded machine a follower then applies more slowly
        // than it appends, so its unapplied (untrimmable) log grows without bound.
        let (apply_tx, apply_rx) = channel::bounded::<ApplyMsg>(APPLY_BUFFER);
        let raft = Arc::new(
            Raft::with_options(peers, me, storage, apply_tx, options).map_err(RsmError::Raft)?,
        );
        // Before the service registers the peer's handler with its transport.
        raft.set_validator(Arc::new(RsmValidator { sm: sm.clone() }));
        // A follower whose reader falls behind (a starved thread) must not take entries
        // faster than it can apply and trim them: the state stays within a few
        // `maxraftstate` (the 4C tests allow eight).
        raft.set_log_limit(
            maxraftstate
                .filter(|&m| m > 0)
                .map(|m| LOG_LIMIT_FACTOR * m),
        );
        // Whatever snapshot Raft holds now (restored, or installed since it started): the
        // reader skips what it covers. Restored before the reader takes any entry.
        let mut last_applied = 0;
        let corrupt = |index, reason: String| RsmError::CorruptSnapshot {
            peer: me,
            index,
            reason,
        };
        let snap = match raft.read_snapshot() {
            Ok(snap) => snap,
            Err(e) => {
                raft.kill();
                return Err(corrupt(None, e.to_string()));
            }
        };
        if !snap.is_empty() {
            let restored = labcodec::decode_borrowed::<RsmSnapshot>(&snap)
                .map_err(|e| corrupt(None, e.to_string()))
                .and_then(|s| {
                    sm.restore(s.state)
                        .map_err(|e| corrupt(Some(s.index), e.to_string()))?;
                    Ok(s.index)
                });
            match restored {
                Ok(index) => last_applied = index,
                Err(e) => {
                    raft.kill();
                    return Err(e);
                }
            }
        }
        let shared = Arc::new(Shared {
            me,
            raft,
            sm,
            maxraftstate,
            waiters: Mutex::new(Waiters {
                applied: last_applied,
                ..Waiters::default()
            }),
            applied: Mutex::new(Applied {
                index: last_applied,
                reads: BTreeMap::new(),
            }),
            failure: Mutex::new(None),
            give_up_after: Mutex::new(None),
            give_ups: Mutex::new(Arc::new(GiveUps::default())),
        });
        let reader = {
            let shared = shared.clone();
            thread::Builder::new()
                .name(format!("rsm-{me}-reader"))
                .spawn(move || shared.run_reader(apply_rx, last_applied))
        };
        let reader = match reader {
            Ok(h) => h,
            Err(e) => {
                shared.raft.kill();
                return Err(RsmError::Spawn {
                    peer: me,
                    reason: e.to_string(),
                });
            }
        };
        Ok(Rsm {
            shared,
            reader: Mutex::new(Some(reader)),
        })
    }

    /// Why this replica stopped for good, if it did (a snapshot it could not restore). Once
    /// this says so, the replica's Raft peer is already killed.
    pub fn failure(&self) -> Option<RsmError> {
        self.shared.failure.lock().clone()
    }

    pub fn raft(&self) -> Arc<Raft> {
        self.shared.raft.clone()
    }

    /// **Test-only ablation, off by default.** With `Some(d)`, a submit that has waited `d`
    /// for its op gives up and answers `WrongLeader` even though this peer still leads in the
    /// op's term, as most Go solutions of the lab do with a fixed timeout. The op stays in
    /// the log and usually commits anyway, so the clerk's retry meets `ErrVersion` and its
    /// Put becomes `ErrMaybe`. The harness sets it from `RAFTKV_RSM_GIVE_UP_MS`; nothing
    /// else should. `docs/errmaybe.md` measures both designs.
    pub fn set_give_up_after(&self, d: Option<Duration>) {
        *self.shared.give_up_after.lock() = d;
    }

    /// Counts this replica's give-ups in `give_ups` (which the caller may share among
    /// replicas) from now on.
    pub fn count_give_ups_in(&self, give_ups: Arc<GiveUps>) {
        *self.shared.give_ups.lock() = give_ups;
    }

    /// Runs `req` through the log and returns the state machine's reply. `WrongLeader` if this
    /// peer does not lead or loses leadership before the op commits; `Stopped` once it is
    /// killed.
    pub fn submit(&self, req: Vec<u8>) -> Result<Vec<u8>, SubmitError> {
        let s = &self.shared;
        let id: u64 = rand::random();
        let cmd = match labcodec::encode(&LogOp::Request { id, req }) {
            Ok(c) => c,
            Err(e) => {
                log::error!(target: "kvraft::rsm", "rsm-{}: cannot encode op: {e}", s.me);
                return Err(SubmitError::Encode(e.to_string()));
            }
        };
        let (tx, rx) = oneshot::channel();
        // Registered before `start`, so the reader finds the waiter however soon the op
        // commits; `start` itself (which syncs the storage) runs outside every rsm lock.
        s.waiters.lock().by_id.insert(
            id,
            Waiter {
                index: None,
                reply: tx,
            },
        );
        let (index, term, is_leader) = s.raft.start(cmd);
        if !is_leader {
            s.waiters.lock().remove(id);
            return Err(if s.raft.killed() {
                SubmitError::Stopped
            } else {
                SubmitError::WrongLeader
            });
        }
        {
            let mut waiters = s.waiters.lock();
            let w = &mut *waiters;
            if let Some(waiter) = w.by_id.get_mut(&id) {
                if w.applied >= index {
                    // The reader has passed the index without finding this op there: another
                    // op took it (or a snapshot covered it, the reply unknown here).
                    w.by_id.remove(&id);
                    drop(waiters);
                    return Err(s.dropped());
                }
                waiter.index = Some(index);
                // A waiter left at this index by an earlier term is answered by dropping its
                // sender: its op was overwritten by ours.
                if let Some(old) = w.by_index.insert(index, id)
                    && old != id
                {
                    w.by_id.remove(&old);
                }
            }
            // Else the reader has answered already: the reply waits in `rx`.
        }
        log::trace!(target: "kvraft::rsm", "rsm-{} t{term}: submitted op {id:x} at {index}", s.me);
        let give_up_at = s.give_up_after.lock().map(|d| Instant::now() + d);
        let mut lost_since: Option<Instant> = None;
        loop {
            let wait = match give_up_at {
                Some(at) => LEADERSHIP_POLL.min(at.saturating_duration_since(Instant::now())),
                None => LEADERSHIP_POLL,
            };
            match rx.recv_timeout(wait) {
                Ok(r) => return s.answered(r, term, index, id),
                // The reader dropped the waiter: it exited (peer killed), or another op took
                // the index in a later term.
                Err(oneshot::RecvTimeoutError::Disconnected) => return Err(s.dropped()),
                Err(oneshot::RecvTimeoutError::Timeout) => {
                    let (now_term, is_leader) = s.raft.get_state();
                    let killed = s.raft.killed();
                    let leading = now_term == term && is_leader && !killed;
                    // Only in the test-only timeout variant (`set_give_up_after`).
                    let timed_out = give_up_at.is_some_and(|at| Instant::now() >= at);
                    if leading && !timed_out {
                        continue;
                    }
                    if !leading && !timed_out {
                        // Deposed, or the term moved on. While our entry is still in this
                        // peer's log a later leader may yet commit it (its term-start entry
                        // makes that quick): answering WrongLeader now could have the client
                        // run it twice. Once the entry is gone, or after a grace, give up.
                        let lost_at = *lost_since.get_or_insert_with(Instant::now);
                        if !killed
                            && s.raft.term_at(index) == Some(term)
                            && lost_at.elapsed() < DEPOSED_GRACE
                        {
                            continue;
                        }
                    }
                    {
                        let mut waiters = s.waiters.lock();
                        if waiters.remove(id).is_none() {
                            // The reader took the waiter meanwhile: it answers (or drops the
                            // sender) right after, without blocking.
                            drop(waiters);
                            return match rx.recv() {
                                Ok(r) => s.answered(r, term, index, id),
                                Err(_) => Err(s.dropped()),
                            };
                        }
                    }
                    if killed {
                        // A killed peer's ops die with it.
                        log::debug!(target: "kvraft::rsm", "rsm-{} t{now_term}: op {id:x} at {index} abandoned: killed", s.me);
                    } else if !leading {
                        log::info!(target: "kvraft::rsm", "rsm-{} t{now_term}: op {id:x} at {index} (t{term}) abandoned on a term change, leader {is_leader}: it may still commit", s.me);
                        s.give_ups
                            .lock()
                            .term_change
                            .fetch_add(1, Ordering::Relaxed);
                    } else {
                        log::info!(target: "kvraft::rsm", "rsm-{} t{term}: op {id:x} at {index} timed out while still leader: it may still commit", s.me);
                        s.give_ups.lock().timeout.fetch_add(1, Ordering::Relaxed);
                    }
                    return Err(s.dropped());
                }
            }
        }
    }

    /// Makes a read-only request safe to answer from the state machine without a log entry
    /// (ReadIndex, Raft thesis §6.4): returns once this peer has confirmed that it still
    /// leads and its state machine reflects every op committed before the call. The caller
    /// then reads the state machine directly. `NotReady`: this leader has not committed an
    /// entry of its term yet; submit the read through the log instead.
    pub fn read_barrier(&self) -> Result<(), ReadError> {
        let s = &self.shared;
        let index = s.raft.read_index(READ_TIMEOUT)?;
        let deadline = Instant::now() + READ_TIMEOUT;
        let rx = {
            let mut applied = s.applied.lock();
            if applied.index >= index {
                return Ok(());
            }
            // Woken by the apply that reaches `index`, not by every apply before it.
            let (tx, rx) = oneshot::channel();
            applied.reads.entry(index).or_default().push(tx);
            rx
        };
        loop {
            if s.raft.killed() {
                return Err(ReadError::Stopped);
            }
            let now = Instant::now();
            if now >= deadline {
                let at = s.applied.lock().index;
                log::info!(target: "kvraft::rsm", "rsm-{}: read at {index} not applied within {READ_TIMEOUT:?} (applied {at})", s.me);
                return Err(ReadError::NotLeader);
            }
            match rx.recv_timeout(LEADERSHIP_POLL.min(deadline - now)) {
                Ok(()) => return Ok(()),
                Err(oneshot::RecvTimeoutError::Timeout) => continue,
                // The reader exited (the peer was killed or failed).
                Err(oneshot::RecvTimeoutError::Disconnected) => {
                    return Err(if s.raft.killed() {
                        ReadError::Stopped
                    } else {
                        ReadError::NotLeader
                    });
                }
            }
        }
    }

    /// Kills the Raft peer (which closes the apply channel) and waits for the reader to exit.
    /// Idempotent; dropping the `Rsm` does it too.
    pub fn kill(&self) {
        self.shared.raft.kill();
        if let Some(h) = self.reader.lock().take()
            && h.thread().id() != thread::current().id()
            && h.join().is_err()
        {
            log::error!(target: "kvraft::rsm", "rsm-{}: the reader thread panicked", self.shared.me);
        }
    }
}

impl Drop for Rsm {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Shared {
    /// Why a submitter's waiter was dropped without an answer.
    fn dropped(&self) -> SubmitError {
        if self.raft.killed() {
            SubmitError::Stopped
        } else {
            SubmitError::WrongLeader
        }
    }

    /// A submitter's reply from the reader, counted if it says the op was lost.
    fn answered(
        &self,
        r: Result<Vec<u8>, SubmitError>,
        term: u64,
        index: u64,
        id: u64,
    ) -> Result<Vec<u8>, SubmitError> {
        if r.is_err() {
            // The reader answers so only when another op was executed at the index.
            log::info!(target: "kvraft::rsm", "rsm-{} t{term}: op {id:x} at {index} lost: another op took the index", self.me);
            self.give_ups
                .lock()
                .index_taken
                .fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Appends a term-start entry when this peer has become leader of a term it has not
    /// marked yet (`marked`: the last term it marked).
    fn mark_term_start(&self, marked: &mut u64) {
        let (term, is_leader) = self.raft.get_state();
        if !is_leader || term <= *marked {
            return;
        }
        match labcodec::encode(&LogOp::TermStart) {
            Ok(cmd) => {
                let (index, started_term, ok) = self.raft.start(cmd);
                if ok {
                    log::debug!(target: "kvraft::rsm", "rsm-{} t{started_term}: term start at {index}", self.me);
                    *marked = started_term;
                }
            }
            Err(e) => {
                log::error!(target: "kvraft::rsm", "rsm-{}: cannot encode a term start: {e}", self.me)
            }
        }
    }

    fn run_reader(&self, apply_rx: Receiver<ApplyMsg>, mut last_applied: u64) {
        // Roughly how many log bytes a snapshot now would discard.
        let mut applied_bytes = 0;
        let mut marked_term = 0;
        loop {
            self.mark_term_start(&mut marked_term);
            let msg = match apply_rx.recv_timeout(LEADERSHIP_POLL) {
                Ok(msg) => msg,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            match msg {
                ApplyMsg::Command { index, command, .. } => {
                    if index <= last_applied {
                        // Already reflected in the state (restored from a snapshot).
                        continue;
                    }
                    debug_assert_eq!(
                        index,
                        last_applied + 1,
                        "rsm-{} applied {index} after {last_applied}",
                        self.me
                    );
                    last_applied = index;
                    applied_bytes += command.len() + ENTRY_OVERHEAD;
                    let op = if crate::raft::membership::is_config_entry(&command) {
                        // Raft's own configuration entry (membership on): never decoded
                        // here, it only moves the applied index.
                        Ok(LogOp::TermStart)
                    } else {
                        labcodec::decode(&command)
                    };
                    let (id, reply) = match op {
                        Ok(LogOp::Request { id, req }) => (Some(id), self.sm.do_op(&req)),
                        Ok(LogOp::TermStart) => (None, Vec::new()),
                        Err(e) => {
                            // Every peer skips it alike.
                            log::error!(target: "kvraft::rsm", "rsm-{}: undecodable op at {index}: {e}", self.me);
                            (None, Vec::new())
                        }
                    };
                    let (mine, overwritten) = {
                        let mut waiters = self.waiters.lock();
                        waiters.applied = index;
                        let mine = id.and_then(|id| waiters.remove(id));
                        // A submitter that started another op at this index: that op was
                        // overwritten by another leader's entry, and is lost.
                        let overwritten = match waiters.by_index.remove(&index) {
                            Some(other) if Some(other) != id => waiters.by_id.remove(&other),
                            _ => None,
                        };
                        (mine, overwritten)
                    };
                    if let Some(w) = mine {
                        w.reply.send(Ok(reply));
                    }
                    if let Some(w) = overwritten {
                        w.reply.send(Err(SubmitError::WrongLeader));
                    }
                    self.set_applied(index);
                    if self.maybe_snapshot(index, applied_bytes) {
                        applied_bytes = 0;
                    }
                }
                ApplyMsg::Snapshot { index, data, .. } => {
                    if index <= last_applied {
                        continue;
                    }
                    let restored = labcodec::decode_borrowed::<RsmSnapshot>(&data)
                        .map_err(|e| e.to_string())
                        .and_then(|s| self.sm.restore(s.state).map_err(|e| e.to_string()));
                    if let Err(reason) = restored {
                        // Applying later entries to the old state would diverge silently:
                        // this replica stops for good.
                        self.fail(RsmError::CorruptSnapshot {
                            peer: self.me,
                            index: Some(index),
                            reason,
                        });
                        return;
                    }
                    log::debug!(target: "kvraft::rsm", "rsm-{}: installed snapshot through {index}", self.me);
                    last_applied = index;
                    applied_bytes = 0;
                    self.set_applied(index);
                    // Ops covered by the snapshot: their replies are unknown here. A submitter
                    // that has not yet recorded its index finds `applied` past it.
                    let mut waiters = self.waiters.lock();
                    waiters.applied = index;
                    let covered: Vec<u64> = waiters
                        .by_index
                        .iter()
                        .filter(|&(&i, _)| i <= index)
                        .map(|(_, &id)| id)
                        .collect();
                    for id in covered {
                        waiters.remove(id);
                    }
                }
            }
        }
        // Raft was killed and closed the channel: every waiter gets WrongLeader.
        self.waiters.lock().clear();
        self.applied.lock().reads.clear();
        log::debug!(target: "kvraft::rsm", "rsm-{}: apply channel closed, reader exits", self.me);
    }

    /// The state machine now reflects the log through `index`: wakes reads waiting for it.
    fn set_applied(&self, index: u64) {
        let ready = {
            let mut applied = self.applied.lock();
            applied.index = index;
            if applied
                .reads
                .first_key_value()
                .is_none_or(|(&i, _)| i > index)
            {
                return;
            }
            let later = applied.reads.split_off(&(index + 1));
            std::mem::replace(&mut applied.reads, later)
        };
        for tx in ready.into_values().flatten() {
            tx.send(());
        }
    }

    /// Stops this replica for good: kills its Raft peer (it never serves or votes again) and
    /// fails every waiting submitter. Called from the reader, which then returns.
    fn fail(&self, e: RsmError) {
        log::error!(target: "kvraft::rsm", "{e}; this replica stops");
        // Raft first: whoever sees the failure must find the peer already stopped.
        self.raft.kill();
        self.failure.lock().get_or_insert(e);
        self.waiters.lock().clear();
        self.applied.lock().reads.clear();
    }

    /// Snapshots through `index` when the persisted Raft state has reached `maxraftstate`
    /// bytes and the snapshot would discard at least a quarter of that (`applied_bytes`).
    /// The second condition matters when the unapplied tail of the log alone exceeds the
    /// limit: a snapshot cannot trim it, and persisting the whole state on every apply would
    /// only make this peer fall further behind. Returns whether it snapshotted.
    fn maybe_snapshot(&self, index: u64, applied_bytes: usize) -> bool {
        let Some(max) = self.maxraftstate else {
            return false;
        };
        let size = self.raft.persist_bytes();
        if (size < max || applied_bytes < max / 4) && !self.sm.wants_snapshot() {
            return false;
        }
        if size > 4 * max {
            // The log outgrew the limit between two applies: this peer applies slowly.
            log::warn!(target: "kvraft::rsm", "rsm-{}: Raft state {size} bytes > 4 * maxraftstate {max} at {index}", self.me);
        }
        match encode_snapshot(index, self.sm.snapshot()) {
            Ok(data) => {
                log::debug!(target: "kvraft::rsm", "rsm-{}: snapshot through {index} ({} bytes)", self.me, data.len());
                self.raft.snapshot(index, data);
                true
            }
            Err(e) => {
                log::error!(target: "kvraft::rsm", "rsm-{}: cannot encode snapshot: {e}", self.me);
                false
            }
        }
    }
}
