//! Who waits for what: submitters for their op's reply, reads for the state machine to reach
//! an index.

use std::collections::{BTreeMap, HashMap};

use super::SubmitError;
use crate::oneshot;

/// How far the state machine has applied, and the reads waiting for it to get further.
pub(super) struct Applied {
    pub(super) index: u64,
    /// Reads by the index they wait for; answered (or dropped, when the reader exits) once
    /// the state machine reaches it.
    pub(super) reads: BTreeMap<u64, Vec<oneshot::Sender<()>>>,
}

impl Applied {
    pub(super) fn new(index: u64) -> Applied {
        Applied {
            index,
            reads: BTreeMap::new(),
        }
    }

    /// The state machine now reflects the log through `index`: the reads it satisfies.
    pub(super) fn advance(&mut self, index: u64) -> Vec<oneshot::Sender<()>> {
        self.index = index;
        if self.reads.first_key_value().is_none_or(|(&i, _)| i > index) {
            return Vec::new();
        }
        let later = self.reads.split_off(&(index + 1));
        std::mem::replace(&mut self.reads, later)
            .into_values()
            .flatten()
            .collect()
    }
}

/// A submitter waiting for its op, registered (by the op's id) before `Raft::start` is called.
pub(super) struct Waiter<R> {
    /// The index `start` gave the op, once the submitter has learned it.
    pub(super) index: Option<u64>,
    /// One slot: the reader answers once and never blocks.
    pub(super) reply: oneshot::Sender<Result<R, SubmitError>>,
}

/// The submitters waiting for their ops. Keyed by op id, so that a submitter is registered
/// before it calls `Raft::start` and the call runs outside this lock (`start` takes Raft's
/// lock, and the leader's own sync is left to its syncer thread): the reader can answer an
/// op that commits before its submitter has even learned its index.
pub(super) struct Waiters<R> {
    pub(super) by_id: HashMap<u64, Waiter<R>>,
    /// Which op each known index was started for (to tell a submitter at once that another
    /// leader's op took its index).
    pub(super) by_index: HashMap<u64, u64>,
    /// The last index the reader has handled (applied or covered by a snapshot).
    pub(super) applied: u64,
}

impl<R> Waiters<R> {
    pub(super) fn new(applied: u64) -> Waiters<R> {
        Waiters {
            by_id: HashMap::new(),
            by_index: HashMap::new(),
            applied,
        }
    }

    pub(super) fn remove(&mut self, id: u64) -> Option<Waiter<R>> {
        let w = self.by_id.remove(&id)?;
        if let Some(index) = w.index
            && self.by_index.get(&index) == Some(&id)
        {
            self.by_index.remove(&index);
        }
        Some(w)
    }

    /// The op at `index` (its id, `None` for an entry that carries none) has been applied:
    /// its own waiter, and the waiter of another op started at that index, which was
    /// overwritten by this one and is lost.
    pub(super) fn take_applied(
        &mut self,
        index: u64,
        id: Option<u64>,
    ) -> (Option<Waiter<R>>, Option<Waiter<R>>) {
        self.applied = index;
        let mine = id.and_then(|id| self.remove(id));
        let overwritten = match self.by_index.remove(&index) {
            Some(other) if Some(other) != id => self.by_id.remove(&other),
            _ => None,
        };
        (mine, overwritten)
    }

    /// A snapshot through `index` was installed: the waiters of ops it covers are dropped
    /// (their replies are unknown here). A submitter that has not yet recorded its index
    /// finds `applied` past it.
    pub(super) fn covered_by_snapshot(&mut self, index: u64) {
        self.applied = index;
        let covered: Vec<u64> = self
            .by_index
            .iter()
            .filter(|&(&i, _)| i <= index)
            .map(|(_, &id)| id)
            .collect();
        for id in covered {
            self.remove(id);
        }
    }

    /// Every waiter is dropped (its submitter then answers `WrongLeader` or `Stopped`).
    pub(super) fn clear(&mut self) {
        self.by_id.clear();
        self.by_index.clear();
    }
}
