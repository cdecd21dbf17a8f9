//! What Raft persists (term, vote, log, snapshot) and when: every change goes to the
//! [`Storage`](super::Storage) as it happens, under the mutex, and is made durable by
//! [`sync`](super::Storage::sync) once the mutex is released, before anything that depends on
//! it leaves this peer (see [`StateGuard`](super::state::StateGuard)). A storage error stops
//! the peer: it never goes on with state it could not save. Raft §5, Figure 2.
//!
//! Also the labs' persister format (term, vote and the whole log as one `labcodec` value),
//! which the tester's `Persister` adapter writes, so the byte sizes the 3D/4C tests check stay
//! what they were.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::log::{Entry, Log};
use super::state::{Core, State};
use super::storage::{HardState, SnapshotData, SnapshotSource, Storage, StorageError};
use crate::labcodec::{self, CodecError};

#[derive(Serialize, Deserialize)]
struct PersistentState {
    term: u64,
    voted_for: Option<usize>,
    log: Log,
}

/// Decodes the labs' persister format; empty bytes are a fresh peer.
pub fn decode_lab_state(bytes: &[u8]) -> Result<(HardState, Log), CodecError> {
    if bytes.is_empty() {
        return Ok((HardState::default(), Log::default()));
    }
    let ps: PersistentState = labcodec::decode(bytes)?;
    Ok((
        HardState {
            term: ps.term,
            voted_for: ps.voted_for,
        },
        ps.log,
    ))
}

/// Encodes the labs' persister format.
pub fn encode_lab_state(hs: HardState, log: &Log) -> Result<Vec<u8>, CodecError> {
    #[derive(Serialize)]
    struct View<'a> {
        term: u64,
        voted_for: Option<usize>,
        log: &'a Log,
    }
    labcodec::encode(&View {
        term: hs.term,
        voted_for: hs.voted_for,
        log,
    })
}

impl Core {
    fn hard_state(st: &State) -> HardState {
        HardState {
            term: st.term,
            voted_for: st.voted_for,
        }
    }

    /// Queues the current term and vote.
    pub(super) fn persist(&self, st: &mut State) {
        let hs = Self::hard_state(st);
        log::trace!(target: "raft::persist", "raft-{} t{}: hard state, voted {:?}", self.me, hs.term, hs.voted_for);
        self.queue(st, "hard state", |s| s.set_hard_state(hs));
    }

    /// Queues `entries`, which were just appended to the log starting at `first`.
    pub(super) fn persist_append(&self, st: &mut State, first: u64, entries: &[Entry]) {
        if first - 1 < st.durable {
            // (Never: entries are appended at the end, after any truncation.)
            self.log_rewritten(st, first - 1);
        }
        log::trace!(target: "raft::persist", "raft-{} t{}: append [{first}..={}]", self.me, st.term, first + entries.len() as u64 - 1);
        self.queue(st, "append", |s| s.append(first, entries));
    }

    /// Queues the leader's own new `entries` (appended at `first`): the AppendEntries carrying
    /// them may leave before they are durable here; the leader counts itself for them only
    /// after its sync (see [`StateGuard`](super::state::StateGuard)).
    pub(super) fn persist_own_append(&self, st: &mut State, first: u64, entries: &[Entry]) {
        let queued = st.guard.queued;
        self.persist_append(st, first, entries);
        st.guard.queued = queued;
        st.guard.queued_own = true;
    }

    /// Queues the truncation of the log after `index`.
    pub(super) fn persist_truncate(&self, st: &mut State, index: u64) {
        self.log_rewritten(st, index);
        log::trace!(target: "raft::persist", "raft-{} t{}: truncate after {index}", self.me, st.term);
        self.queue(st, "truncate", |s| s.truncate_after(index));
    }

    /// Queues the snapshot `st` now holds, through the log's base.
    pub(super) fn persist_snapshot(&self, st: &mut State) {
        let (index, term) = (st.log.base_index(), st.log.base_term());
        log::trace!(target: "raft::persist", "raft-{} t{}: snapshot {} bytes through {index}", self.me, st.term, st.snapshot.len());
        match st.snapshot.clone() {
            SnapshotData::Mem(bytes) => self.queue(st, "snapshot", |s| {
                s.save_snapshot_shared(index, term, bytes)
            }),
            // Already the storage's own (never the case: a new snapshot arrives as bytes, a
            // streamed one is installed by `persist_received_snapshot`).
            SnapshotData::Stored(_) => {}
        }
    }

    /// Queues the snapshot the storage wrote ahead (see `write_snapshot_ahead`), through the
    /// log's base.
    pub(super) fn persist_written_snapshot(
        &self,
        st: &mut State,
        written: &Arc<dyn SnapshotSource>,
    ) {
        log::trace!(target: "raft::persist", "raft-{} t{}: snapshot written ahead through {}", self.me, st.term, written.index());
        self.queue(st, "snapshot", |s| s.save_written_snapshot(written));
    }

    /// Hands one change to the storage. Nothing is queued once the peer is dead; a change the
    /// storage refuses stops the peer (it must not go on, or answer, with state it could not
    /// save), so callers check `is_dead()` before acting on what they persisted.
    fn queue(
        &self,
        st: &mut State,
        what: &str,
        f: impl FnOnce(&dyn Storage) -> Result<(), StorageError>,
    ) {
        if self.is_dead() {
            return;
        }
        st.guard.queued = true;
        if let Err(e) = f(self.storage.as_ref()) {
            self.storage_failed(st, what, &e);
        }
    }

    /// The storage failed: stop this peer (as `kill` does; the caller holds the lock) so it
    /// never acts on state it could not save.
    pub(super) fn storage_failed(&self, st: &mut State, what: &str, e: &StorageError) {
        if !self.is_dead() {
            log::error!(target: "raft::persist", "raft-{} t{}: storage failed ({what}): {e}; stopping this peer", self.me, st.term);
            // The error that stopped the storage, even when another thread met it first.
            let cause = match e {
                StorageError::Failed { first } => first.clone(),
                e => e.to_string(),
            };
            self.failure
                .lock()
                .get_or_insert_with(|| format!("storage failed ({what}): {cause}"));
        }
        self.stop_locked(st);
    }
}
