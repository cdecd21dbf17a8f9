//! The replicated state machine (Lab 4A/4C), the layer between Raft and every replicated
//! service (`kvraft`, `shardkv`'s groups, the node): a service hands an op to
//! [`Rsm::submit`], which puts it in the Raft log and returns the state machine's reply once
//! the op has been committed and executed.
//!
//! One reader thread, `rsm-<me>-reader`, drains the apply channel and executes every committed
//! op on every peer, in log order, a run of entries at a time ([`StateMachine::apply`]). A
//! submitter waits on a one-slot channel keyed by its op's id; the reader answers it, with
//! the reply as the state machine returned it (never encoded), only if the op executed at its
//! index is the submitter's own (same unique id), otherwise with [`SubmitError::WrongLeader`].
//! A submitter whose peer stops leading keeps waiting while its entry is still in the peer's
//! log (a later leader may commit it), for at most [`DEPOSED_GRACE`]; then, or as soon as the
//! entry is gone, it answers WrongLeader. Each new leader appends a term-start entry (never
//! shown to the state machine), so entries of earlier terms still in its log commit at once
//! rather than at the next client request: a deposed leader's client mostly learns the real
//! outcome instead of a retry that might execute its request twice.
//!
//! Files: `machine` (the [`StateMachine`] trait, the log and snapshot envelopes, the validator
//! it installs on Raft), `waiters` (submitters and reads waiting), `reader` (the reader
//! thread: apply, answer, snapshot).

mod machine;
mod reader;
mod waiters;

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam::channel;
use parking_lot::Mutex;

pub use machine::{RestoreError, StateMachine};
use machine::{RsmSnapshot, RsmValidator};
use waiters::{Applied, Waiter, Waiters};

use crate::labcodec;
use crate::oneshot;
/// Why [`Rsm::read_barrier`] could not vouch for a read: Raft's ReadIndex errors.
pub use crate::raft::ReadIndexError as ReadError;
use crate::raft::{ApplyMsg, Raft, RaftError, RaftOptions, RaftTransport, Storage};

/// The `log` target of this module.
const LOG: &str = "rsm";

/// How often a waiting submitter checks that its peer still leads in the term it started in.
pub const LEADERSHIP_POLL: Duration = Duration::from_millis(50);
/// How long a submitter whose peer lost leadership keeps waiting while its entry is still in
/// the log (a later leader may commit it).
pub const DEPOSED_GRACE: Duration = Duration::from_millis(300);
/// Committed entries Raft may hand over before the reader takes them.
const APPLY_BUFFER: usize = 256;
/// The most committed entries the reader applies as one run.
const MAX_APPLY_RUN: usize = 64;
/// How long [`Rsm::read_barrier`] waits for the leadership check, and then for the apply.
pub const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// A follower's Raft state is kept under this many times `maxraftstate` (see
/// [`Raft::set_log_limit`]).
const LOG_LIMIT_FACTOR: usize = 3;

/// With [`Rsm::grow_snapshots_with_state`], the log may grow to the last snapshot's size
/// divided by this before the next snapshot.
const SNAPSHOT_GROWTH_DIVISOR: usize = 2;

/// Submits that had entered this peer's log and were then answered `WrongLeader` without
/// waiting for the outcome, by reason. Such an op may still commit: a clerk that retries it
/// elsewhere then meets `ErrVersion` and reports `ErrMaybe` (see `docs/errmaybe.md`). The
/// test harness shares one instance across a group's replicas and restarts.
#[derive(Debug, Default)]
pub struct GiveUps {
    /// The peer's term moved on, or it stopped leading, while the op waited.
    pub term_change: AtomicUsize,
    /// The op waited longer than the test-only `Rsm::set_give_up_after` allows.
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
    /// The encoded entry is larger than the log takes in one entry
    /// ([`Rsm::set_max_entry_bytes`]); nothing was submitted.
    TooLarge { bytes: usize, max: usize },
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitError::WrongLeader => f.write_str("not the leader"),
            SubmitError::Stopped => f.write_str("peer stopped"),
            SubmitError::Encode(e) => write!(f, "cannot encode the request: {e}"),
            SubmitError::TooLarge { bytes, max } => write!(
                f,
                "request too large: {bytes} bytes, the log takes at most {max} in one entry"
            ),
        }
    }
}

impl std::error::Error for SubmitError {}

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

struct Shared<M: StateMachine + ?Sized> {
    me: usize,
    raft: Arc<Raft>,
    sm: Arc<M>,
    maxraftstate: Option<usize>,
    /// Whether the snapshot threshold grows with the state (see
    /// [`Rsm::grow_snapshots_with_state`]).
    grow_snapshots: AtomicBool,
    /// The size of the last snapshot taken, restored or installed, in bytes.
    last_snapshot_bytes: AtomicUsize,
    /// The largest log entry `submit` hands Raft.
    max_entry_bytes: AtomicUsize,
    /// Submitters park at once rather than spin first (see [`Rsm::park_submitters`]).
    park_submitters: AtomicBool,
    /// Submitters by op id (and the index each was started at).
    waiters: Mutex<Waiters<M::Reply>>,
    /// The last log index the state machine reflects, for reads waiting on it.
    applied: Mutex<Applied>,
    /// Why this replica stopped, if it did (it then never serves again).
    failure: Mutex<Option<RsmError>>,
    /// Test-only: give up on a pending submit after this long (see [`Rsm::set_give_up_after`]).
    #[cfg(feature = "testing")]
    give_up_after: Mutex<Option<Duration>>,
    give_ups: Mutex<Arc<GiveUps>>,
}

/// A replicated state machine on one Raft peer.
pub struct Rsm<M: StateMachine + ?Sized> {
    shared: Arc<Shared<M>>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl<M: StateMachine + ?Sized> Rsm<M> {
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
        sm: Arc<M>,
    ) -> Result<Rsm<M>, RsmError> {
        Rsm::with_options(peers, me, storage, maxraftstate, sm, RaftOptions::default())
    }

    /// [`Rsm::new`] on a Raft peer started with `options`.
    pub fn with_options(
        peers: impl Into<Box<dyn RaftTransport>>,
        me: usize,
        storage: impl Into<Box<dyn Storage>>,
        maxraftstate: Option<usize>,
        sm: Arc<M>,
        options: RaftOptions,
    ) -> Result<Rsm<M>, RsmError> {
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
                .map(|m| LOG_LIMIT_FACTOR.saturating_mul(m)),
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
            grow_snapshots: AtomicBool::new(false),
            park_submitters: AtomicBool::new(false),
            last_snapshot_bytes: AtomicUsize::new(snap.len()),
            max_entry_bytes: AtomicUsize::new(usize::MAX),
            waiters: Mutex::new(Waiters::new(last_applied)),
            applied: Mutex::new(Applied::new(last_applied)),
            failure: Mutex::new(None),
            #[cfg(feature = "testing")]
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

    /// Lets the snapshot threshold grow with the state: snapshot once the persisted Raft
    /// state reaches `maxraftstate` or half the last snapshot's size, whichever is larger.
    /// With a fixed threshold far below the state, every few writes would rewrite the whole
    /// state (a 1 GiB state under an 8 MiB threshold: 128 bytes written per byte of log);
    /// this bounds that to three, at the cost of a log up to half the state long (on disk
    /// and in memory). The follower's log limit follows the threshold. For a real node; the
    /// labs' `maxraftstate` stays exact without it.
    pub fn grow_snapshots_with_state(&self) {
        self.shared.grow_snapshots.store(true, Ordering::Relaxed);
        self.shared.update_log_limit();
    }

    /// Makes `submit` park at once while it waits for its op to commit, instead of spinning
    /// for the first moments as [`oneshot`] receivers may. For a node on a disk log: a commit
    /// takes two fsyncs, never the few microseconds a spin can catch, and its submitters
    /// held both of the process's spinning places, their yields a measurable share of the
    /// leader's CPU.
    pub fn park_submitters(&self) {
        self.shared.park_submitters.store(true, Ordering::Relaxed);
    }

    /// Why this replica stopped for good, if it did (a snapshot it could not restore). Once
    /// this says so, the replica's Raft peer is already killed.
    pub fn failure(&self) -> Option<RsmError> {
        self.shared.failure.lock().clone()
    }

    pub fn raft(&self) -> Arc<Raft> {
        self.shared.raft.clone()
    }

    /// The state machine this rsm runs.
    pub fn machine(&self) -> &Arc<M> {
        &self.shared.sm
    }

    /// From now on [`submit`](Self::submit) refuses an op whose log entry would be larger
    /// than `max` bytes, with [`SubmitError::TooLarge`], instead of handing it to Raft (a
    /// storage that cannot write an entry stops the peer).
    pub fn set_max_entry_bytes(&self, max: usize) {
        self.shared.max_entry_bytes.store(max, Ordering::Relaxed);
    }

    /// **Test-only ablation, off by default.** With `Some(d)`, a submit that has waited `d`
    /// for its op gives up and answers `WrongLeader` even though this peer still leads in the
    /// op's term, as most Go solutions of the lab do with a fixed timeout. The op stays in
    /// the log and usually commits anyway, so the clerk's retry meets `ErrVersion` and its
    /// Put becomes `ErrMaybe`. The harness sets it from `RAFTKV_RSM_GIVE_UP_MS`; nothing
    /// else should. `docs/errmaybe.md` measures both designs.
    #[cfg(feature = "testing")]
    pub fn set_give_up_after(&self, d: Option<Duration>) {
        *self.shared.give_up_after.lock() = d;
    }

    /// When the test-only give-up ablation makes a submit started now give up.
    fn give_up_at(&self) -> Option<Instant> {
        #[cfg(feature = "testing")]
        {
            self.shared.give_up_after.lock().map(|d| Instant::now() + d)
        }
        #[cfg(not(feature = "testing"))]
        {
            None
        }
    }

    /// Counts this replica's give-ups in `give_ups` (which the caller may share among
    /// replicas) from now on.
    pub fn count_give_ups_in(&self, give_ups: Arc<GiveUps>) {
        *self.shared.give_ups.lock() = give_ups;
    }

    /// Runs `op` through the log and returns the state machine's reply (Go's `rsm.Submit`).
    /// `WrongLeader` if this peer does not lead or loses leadership before the op commits;
    /// `Stopped` once it is killed.
    pub fn submit(&self, op: impl Borrow<M::Op>) -> Result<M::Reply, SubmitError> {
        let s = &self.shared;
        let id: u64 = rand::random();
        let cmd = match machine::encode_entry(id, op.borrow()) {
            Ok(c) => c,
            Err(e) => {
                log::error!(target: LOG, "rsm-{}: cannot encode op: {e}", s.me);
                return Err(SubmitError::Encode(e.to_string()));
            }
        };
        let max = s.max_entry_bytes.load(Ordering::Relaxed);
        if cmd.len() > max {
            log::warn!(target: LOG, "rsm-{}: an op of {} bytes refused: the log takes at most {max} bytes in one entry", s.me, cmd.len());
            return Err(SubmitError::TooLarge {
                bytes: cmd.len(),
                max,
            });
        }
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
            return Err(s.dropped());
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
        log::trace!(target: LOG, "rsm-{} t{term}: submitted op {id:x} at {index}", s.me);
        let give_up_at = self.give_up_at();
        let mut lost_since: Option<Instant> = None;
        loop {
            let wait = match give_up_at {
                Some(at) => LEADERSHIP_POLL.min(at.saturating_duration_since(Instant::now())),
                None => LEADERSHIP_POLL,
            };
            let received = if s.park_submitters.load(Ordering::Relaxed) {
                rx.recv_timeout_parked(wait)
            } else {
                rx.recv_timeout(wait)
            };
            match received {
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
                        log::debug!(target: LOG, "rsm-{} t{now_term}: op {id:x} at {index} abandoned: killed", s.me);
                    } else if !leading {
                        log::info!(target: LOG, "rsm-{} t{now_term}: op {id:x} at {index} (t{term}) abandoned on a term change, leader {is_leader}: it may still commit", s.me);
                        s.give_ups
                            .lock()
                            .term_change
                            .fetch_add(1, Ordering::Relaxed);
                    } else {
                        log::info!(target: LOG, "rsm-{} t{term}: op {id:x} at {index} timed out while still leader: it may still commit", s.me);
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
                log::info!(target: LOG, "rsm-{}: read at {index} not applied within {READ_TIMEOUT:?} (applied {at})", s.me);
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
            log::error!(target: LOG, "rsm-{}: the reader thread panicked", self.shared.me);
        }
    }
}

impl<M: StateMachine + ?Sized> Drop for Rsm<M> {
    fn drop(&mut self) {
        self.kill();
    }
}

impl<M: StateMachine + ?Sized> Shared<M> {
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
        r: Result<M::Reply, SubmitError>,
        term: u64,
        index: u64,
        id: u64,
    ) -> Result<M::Reply, SubmitError> {
        if r.is_err() {
            // The reader answers so only when another op was executed at the index.
            log::info!(target: LOG, "rsm-{} t{term}: op {id:x} at {index} lost: another op took the index", self.me);
            self.give_ups
                .lock()
                .index_taken
                .fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}
