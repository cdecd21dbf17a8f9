//! ReadIndex: linearizable reads without a log entry (Raft thesis §6.4).
//!
//! 1. The leader must have committed an entry of its own term (the rsm's term-start entry),
//!    so that its commit index is at least that of every earlier leader; until then it
//!    answers [`ReadIndexError::NotReady`] and the service goes through the log.
//! 2. It records its commit index as the read index and opens a new *read round*.
//! 3. It confirms it still leads: every AppendEntries carries the round current when it was
//!    sent, and once a majority (itself included) has answered a call of that round or a
//!    later one in the same term, no other leader can have been elected before the read
//!    began, so no entry it does not know can have committed before then.
//! 4. The caller waits until its state machine has applied through the read index, then
//!    answers from it.
//!
//! A leader that steps down, is killed or never hears from a majority answers no read: its
//! waiters are dropped, or time out.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::state::{Core, Role, State};
use crate::oneshot::{self, Receiver, RecvTimeoutError, Sender};

/// A read waiting for its round to be confirmed by a majority.
pub(crate) struct PendingRead {
    round: u64,
    index: u64,
    /// One slot: answered once, never blocking.
    reply: Sender<u64>,
}

/// Why [`Raft::read_index`](super::Raft::read_index) gave no read index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadIndexError {
    /// This peer does not lead, or stopped leading (or never heard from a majority) before
    /// the read was confirmed.
    NotLeader,
    /// This peer leads but has not yet committed an entry of its term: its commit index may
    /// be behind an earlier leader's. Go through the log instead.
    NotReady,
    /// The peer has been killed.
    Stopped,
}

impl fmt::Display for ReadIndexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadIndexError::NotLeader => f.write_str("not the leader"),
            ReadIndexError::NotReady => {
                f.write_str("leader has not committed an entry of its term yet")
            }
            ReadIndexError::Stopped => f.write_str("peer stopped"),
        }
    }
}

impl std::error::Error for ReadIndexError {}

impl Core {
    /// Steps 1–3: registers a read and sends a round of AppendEntries; the receiver gets the
    /// read index once a majority has confirmed the round.
    fn start_read(self: &Arc<Core>) -> Result<(u64, Receiver<u64>), ReadIndexError> {
        let mut st = self.lock_state();
        if self.is_dead() {
            return Err(ReadIndexError::Stopped);
        }
        if st.role != Role::Leader {
            return Err(ReadIndexError::NotLeader);
        }
        if st.log.term_at(st.commit_index) != Some(st.term) {
            return Err(ReadIndexError::NotReady);
        }
        st.read_round += 1;
        let round = st.read_round;
        let (tx, rx) = oneshot::channel();
        let index = st.commit_index;
        st.reads.push(PendingRead {
            round,
            index,
            reply: tx,
        });
        log::trace!(target: "raft::read", "raft-{} t{}: read round {round} at commit {index}", self.me, st.term);
        // Calls already in flight were sent before this round: the peers that have one get
        // the next as soon as it is answered (`dirty`).
        self.broadcast_append(&mut st);
        self.confirm_reads(&mut st); // a one-peer cluster confirms on its own
        Ok((round, rx))
    }

    /// Answers every read whose round a majority has confirmed. Called under the lock by a
    /// leader after an answer in its term.
    pub(super) fn confirm_reads(&self, st: &mut State) {
        if st.reads.is_empty() || st.role != Role::Leader {
            return;
        }
        // Only the voters of the current configuration confirm (a leader being removed does
        // not count itself).
        let Some(confirmed) = self.majority_value(st, st.read_round, |p| p.acked_round) else {
            return;
        };
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut st.reads)
            .into_iter()
            .partition(|r| r.round <= confirmed);
        st.reads = waiting;
        for r in ready {
            // The receiver may have timed out and gone: nothing to tell it then.
            r.reply.send(r.index);
        }
    }

    /// ReadIndex (see the module documentation): the index through which the service must
    /// have applied before it answers a read begun now, once this peer has confirmed, within
    /// `timeout`, that it still leads.
    pub(crate) fn read_index(self: &Arc<Core>, timeout: Duration) -> Result<u64, ReadIndexError> {
        let (round, rx) = self.start_read()?;
        match rx.recv_timeout(timeout) {
            Ok(index) => Ok(index),
            Err(RecvTimeoutError::Disconnected) if self.is_dead() => Err(ReadIndexError::Stopped),
            Err(RecvTimeoutError::Disconnected) => Err(ReadIndexError::NotLeader),
            Err(RecvTimeoutError::Timeout) => {
                // No majority answered: perhaps cut off from it. Forget the read.
                self.state.lock().reads.retain(|r| r.round != round);
                log::debug!(target: "raft::read", "raft-{}: read round {round} not confirmed within {timeout:?}", self.me);
                Err(ReadIndexError::NotLeader)
            }
        }
    }
}
