//! The reader thread, `rsm-<me>-reader`: takes committed entries off the apply channel a run
//! at a time, has the state machine apply each run's ops in one call, hands each reply to
//! its submitter, wakes the reads waiting for the state to get that far, snapshots, and
//! installs the snapshots Raft hands over.

use std::sync::atomic::Ordering;

use std::time::Duration;

use crossbeam::channel::{Receiver, RecvTimeoutError, Select, TryRecvError};

use super::machine::{self, LogOpRef, RsmSnapshot, StateMachine};
use super::{
    LEADERSHIP_POLL, LOG, LOG_LIMIT_FACTOR, MAX_APPLY_RUN, RsmError, SNAPSHOT_GROWTH_DIVISOR,
    Shared, SubmitError,
};
use crate::labcodec;
use crate::raft::ApplyMsg;

/// Per-entry bytes of the persisted log beyond the command itself (term, length), roughly.
const ENTRY_OVERHEAD: usize = 4;

/// One committed entry of a run: its index, and its op's id and op (`None` for a term start,
/// or an entry that does not decode, which every peer skips alike).
type RunEntry<O> = (u64, Option<(u64, O)>);

/// The next message, waiting at most `timeout` and parking at once. Crossbeam's
/// `recv_timeout` first spins and then yields the CPU four times (`sched_yield`) before it
/// parks; a reader waits once per commit, and on a loaded machine those yields were three
/// `sched_yield` calls per commit on every node (7,500 per node in 50,000 SETs), each a
/// chance to be switched out. A `Select` registers and parks without spinning.
fn recv_parked(rx: &Receiver<ApplyMsg>, timeout: Duration) -> Result<ApplyMsg, RecvTimeoutError> {
    match rx.try_recv() {
        Ok(msg) => return Ok(msg),
        Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
        Err(TryRecvError::Empty) => {}
    }
    let mut select = Select::new();
    select.recv(rx);
    match select.select_timeout(timeout) {
        Ok(op) => op.recv(rx).map_err(|_| RecvTimeoutError::Disconnected),
        Err(_) => Err(RecvTimeoutError::Timeout),
    }
}

impl<M: StateMachine + ?Sized> Shared<M> {
    /// Appends a term-start entry when this peer has become leader of a term it has not
    /// marked yet (`marked`: the last term it marked).
    fn mark_term_start(&self, marked: &mut u64) {
        let (term, is_leader) = self.raft.get_state();
        if !is_leader || term <= *marked {
            return;
        }
        match labcodec::encode(&LogOpRef::TermStart) {
            Ok(cmd) => {
                let (index, started_term, ok) = self.raft.start(cmd);
                if ok {
                    log::debug!(target: LOG, "rsm-{} t{started_term}: term start at {index}", self.me);
                    *marked = started_term;
                }
            }
            Err(e) => {
                log::error!(target: LOG, "rsm-{}: cannot encode a term start: {e}", self.me)
            }
        }
    }

    pub(super) fn run_reader(&self, apply_rx: Receiver<ApplyMsg>, mut last_applied: u64) {
        // Roughly how many log bytes a snapshot now would discard.
        let mut applied_bytes = 0;
        let mut marked_term = 0;
        let mut closed = false;
        while !closed {
            self.mark_term_start(&mut marked_term);
            let first = match recv_parked(&apply_rx, LEADERSHIP_POLL) {
                Ok(msg) => msg,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            // The run: this entry and whatever else Raft has already handed over.
            let mut msgs = vec![first];
            while msgs.len() < MAX_APPLY_RUN {
                match apply_rx.try_recv() {
                    Ok(msg) => msgs.push(msg),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        // Apply what came before the channel closed, then exit.
                        closed = true;
                        break;
                    }
                }
            }
            let mut run: Vec<RunEntry<M::Op>> = Vec::new();
            for msg in msgs {
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
                        let op = machine::decode_entry::<M::Op>(&command).unwrap_or_else(|e| {
                            // Every peer skips it alike.
                            log::error!(target: LOG, "rsm-{}: undecodable op at {index}: {e}", self.me);
                            None
                        });
                        run.push((index, op));
                    }
                    ApplyMsg::Snapshot { index, data, .. } => {
                        if index <= last_applied {
                            continue;
                        }
                        // The entries before it first (a snapshot follows them).
                        self.apply_run(std::mem::take(&mut run), applied_bytes);
                        if !self.install_snapshot(index, &data) {
                            return;
                        }
                        last_applied = index;
                        applied_bytes = 0;
                    }
                }
            }
            if self.apply_run(run, applied_bytes) {
                applied_bytes = 0;
            }
        }
        // Raft was killed and closed the channel: every waiter gets WrongLeader.
        self.waiters.lock().clear();
        self.applied.lock().reads.clear();
        log::debug!(target: LOG, "rsm-{}: apply channel closed, reader exits", self.me);
    }

    /// Applies a run of committed entries in one call to the state machine, answers their
    /// submitters and the reads waiting for them, and snapshots if it is time. Returns
    /// whether it snapshotted.
    fn apply_run(&self, run: Vec<RunEntry<M::Op>>, applied_bytes: usize) -> bool {
        let Some(&(last, _)) = run.last() else {
            return false;
        };
        let mut ids = Vec::with_capacity(run.len());
        let mut ops = Vec::with_capacity(run.len());
        for (index, op) in run {
            match op {
                Some((id, op)) => {
                    ids.push((index, Some(id)));
                    ops.push(op);
                }
                None => ids.push((index, None)),
            }
        }
        let count = ops.len();
        let replies = if ops.is_empty() {
            Vec::new()
        } else {
            self.sm.apply(ops)
        };
        if replies.len() != count {
            // A state machine bug: the submitters left without a reply answer WrongLeader.
            log::error!(target: LOG, "rsm-{}: {} replies for {count} ops applied through {last}", self.me, replies.len());
            debug_assert_eq!(replies.len(), count, "rsm-{}: replies per op", self.me);
        }
        let mut replies = replies.into_iter();
        let mut answers = Vec::new();
        {
            let mut waiters = self.waiters.lock();
            for (index, id) in ids {
                let reply = id.and_then(|_| replies.next());
                let (mine, overwritten) = waiters.take_applied(index, id);
                if let (Some(w), Some(reply)) = (mine, reply) {
                    answers.push((w, Ok(reply)));
                }
                if let Some(w) = overwritten {
                    answers.push((w, Err(SubmitError::WrongLeader)));
                }
            }
        }
        // Outside the lock; a one-slot send never blocks.
        for (w, r) in answers {
            w.reply.send(r);
        }
        self.set_applied(last);
        self.maybe_snapshot(last, applied_bytes)
    }

    /// Restores the state machine from a snapshot Raft installed; on failure this replica
    /// stops (returns false).
    fn install_snapshot(&self, index: u64, data: &[u8]) -> bool {
        let restored = labcodec::decode_borrowed::<RsmSnapshot>(data)
            .map_err(|e| e.to_string())
            .and_then(|s| self.sm.restore(s.state).map_err(|e| e.to_string()));
        if let Err(reason) = restored {
            // Applying later entries to the old state would diverge silently: this replica
            // stops for good.
            self.fail(RsmError::CorruptSnapshot {
                peer: self.me,
                index: Some(index),
                reason,
            });
            return false;
        }
        log::debug!(target: LOG, "rsm-{}: installed snapshot through {index}", self.me);
        self.snapshot_taken(data.len());
        self.set_applied(index);
        // Ops covered by the snapshot: their replies are unknown here.
        self.waiters.lock().covered_by_snapshot(index);
        true
    }

    /// The state machine now reflects the log through `index`: wakes reads waiting for it.
    fn set_applied(&self, index: u64) {
        let ready = self.applied.lock().advance(index);
        for tx in ready {
            tx.send(());
        }
    }

    /// Stops this replica for good: kills its Raft peer (it never serves or votes again) and
    /// fails every waiting submitter. Called from the reader, which then returns.
    fn fail(&self, e: RsmError) {
        log::error!(target: LOG, "{e}; this replica stops");
        // Raft first: whoever sees the failure must find the peer already stopped.
        self.raft.kill();
        self.failure.lock().get_or_insert(e);
        self.waiters.lock().clear();
        self.applied.lock().reads.clear();
    }

    /// The persisted Raft state at which this replica snapshots: `maxraftstate`, or with
    /// [`Rsm::grow_snapshots_with_state`](super::Rsm::grow_snapshots_with_state) the larger of
    /// that and a part of the last snapshot's size. `None`: never.
    pub(super) fn snapshot_threshold(&self) -> Option<usize> {
        let max = self.maxraftstate?;
        if !self.grow_snapshots.load(Ordering::Relaxed) {
            return Some(max);
        }
        let grown = self.last_snapshot_bytes.load(Ordering::Relaxed) / SNAPSHOT_GROWTH_DIVISOR;
        Some(max.max(grown))
    }

    /// Records the size of the snapshot the state now reflects; with a threshold that grows
    /// with the state, moves the follower's log limit along.
    fn snapshot_taken(&self, bytes: usize) {
        self.last_snapshot_bytes.store(bytes, Ordering::Relaxed);
        if self.grow_snapshots.load(Ordering::Relaxed) {
            self.update_log_limit();
        }
    }

    /// Sets Raft's log limit to [`LOG_LIMIT_FACTOR`] times the snapshot threshold.
    pub(super) fn update_log_limit(&self) {
        let limit = self
            .snapshot_threshold()
            .filter(|&m| m > 0)
            .map(|m| LOG_LIMIT_FACTOR.saturating_mul(m));
        self.raft.set_log_limit(limit);
    }

    /// Snapshots through `index` when the persisted Raft state has reached the threshold
    /// ([`snapshot_threshold`](Self::snapshot_threshold)) and the snapshot would discard at
    /// least a quarter of that (`applied_bytes`). The second condition matters when the
    /// unapplied tail of the log alone exceeds the threshold: a snapshot cannot trim it, and
    /// persisting the whole state on every apply would only make this peer fall further
    /// behind. Returns whether it snapshotted.
    fn maybe_snapshot(&self, index: u64, applied_bytes: usize) -> bool {
        let Some(max) = self.snapshot_threshold() else {
            return false;
        };
        let size = self.raft.persist_bytes();
        if (size < max || applied_bytes < max / 4) && !self.sm.wants_snapshot() {
            return false;
        }
        if size > 4 * max {
            // The log outgrew the limit between two applies: this peer applies slowly.
            log::warn!(target: LOG, "rsm-{}: Raft state {size} bytes > 4 * its snapshot threshold {max} at {index}", self.me);
        }
        match machine::encode_snapshot(index, self.sm.snapshot()) {
            Ok(data) => {
                log::debug!(target: LOG, "rsm-{}: snapshot through {index} ({} bytes)", self.me, data.len());
                self.snapshot_taken(data.len());
                self.raft.snapshot(index, data);
                true
            }
            Err(e) => {
                log::error!(target: LOG, "rsm-{}: cannot encode snapshot: {e}", self.me);
                false
            }
        }
    }
}
