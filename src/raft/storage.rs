//! The storage seam: what a Raft peer must make durable, and how it gets it back at restart.
//!
//! Raft calls the write methods ([`set_hard_state`](Storage::set_hard_state),
//! [`append`](Storage::append), [`truncate_after`](Storage::truncate_after),
//! [`save_snapshot`](Storage::save_snapshot)) while it holds its mutex, in the order the
//! changes happen; they must be cheap (queue the change, no fsync). It calls
//! [`sync`](Storage::sync) after releasing the mutex and before any reply, message or applied
//! entry that depends on the changes leaves the peer. One `sync` covers every write queued
//! before it, including other threads' writes, so concurrent callers can share one fsync
//! (group commit). A storage that returns an error is never used again: the peer stops.

use std::fmt;
use std::sync::Arc;

use super::log::{Entry, Log};

/// Term and vote: what Raft must never forget (Raft Figure 2, "persistent state").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: u64,
    pub voted_for: Option<usize>,
}

/// What a storage held at restart.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    pub hard_state: HardState,
    /// The log after the snapshot (its base is the snapshot's index and term).
    pub log: Log,
    /// The service's snapshot through `log.base_index()`; empty if none.
    pub snapshot: Vec<u8>,
}

/// Why a storage failed. Carries the file (or store) and offset a person needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageError {
    /// An I/O operation failed.
    Io {
        path: String,
        op: &'static str,
        reason: String,
    },
    /// What is stored is damaged: refuse to start rather than run on part of it.
    Corrupt {
        path: String,
        offset: u64,
        reason: String,
    },
    /// The data directory is in use by another process.
    Locked { path: String },
    /// A call the storage cannot honour (e.g. an append that leaves a gap).
    Invalid { reason: String },
    /// An earlier error stopped this storage; nothing more is written.
    Failed { first: String },
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::Io { path, op, reason } => write!(f, "{op} {path}: {reason}"),
            StorageError::Corrupt {
                path,
                offset,
                reason,
            } => write!(f, "corrupt {path} at offset {offset}: {reason}"),
            StorageError::Locked { path } => {
                write!(f, "{path} is locked by another process")
            }
            StorageError::Invalid { reason } => write!(f, "invalid storage call: {reason}"),
            StorageError::Failed { first } => write!(f, "storage stopped after: {first}"),
        }
    }
}

impl std::error::Error for StorageError {}

/// Where a Raft peer keeps term, vote, log and snapshot. See the module documentation for
/// when each method is called and what it must promise.
pub trait Storage: Send + Sync {
    /// What was made durable before; a fresh storage gives `Restored::default()`.
    fn restore(&self) -> Result<Restored, StorageError>;

    /// The term or vote changed.
    fn set_hard_state(&self, hs: HardState) -> Result<(), StorageError>;

    /// Appends `entries`, the first at index `first`, which is one past the last entry held.
    fn append(&self, first: u64, entries: &[Entry]) -> Result<(), StorageError>;

    /// Discards every entry after `index` (a conflicting suffix; Raft §5.3).
    fn truncate_after(&self, index: u64) -> Result<(), StorageError>;

    /// The service's snapshot through (`index`, `term`): entries through `index` are
    /// discarded, and if the log does not hold `index` at `term`, every entry is (Raft §7).
    /// The snapshot and the discarding become durable together, at the next `sync`: a crash
    /// in between leaves the old snapshot and the old log.
    fn save_snapshot(&self, index: u64, term: u64, data: &[u8]) -> Result<(), StorageError>;

    /// Makes every write queued before this call durable. Called without the Raft mutex;
    /// cheap when nothing is pending.
    fn sync(&self) -> Result<(), StorageError>;

    /// Bytes of Raft state (hard state and log, not the snapshot) this storage keeps: what
    /// `maxraftstate` is compared with.
    fn state_size(&self) -> usize;
}

/// A shared storage (e.g. one a test closes on a crash) is a storage.
impl<S: Storage + ?Sized> Storage for Arc<S> {
    fn restore(&self) -> Result<Restored, StorageError> {
        (**self).restore()
    }
    fn set_hard_state(&self, hs: HardState) -> Result<(), StorageError> {
        (**self).set_hard_state(hs)
    }
    fn append(&self, first: u64, entries: &[Entry]) -> Result<(), StorageError> {
        (**self).append(first, entries)
    }
    fn truncate_after(&self, index: u64) -> Result<(), StorageError> {
        (**self).truncate_after(index)
    }
    fn save_snapshot(&self, index: u64, term: u64, data: &[u8]) -> Result<(), StorageError> {
        (**self).save_snapshot(index, term, data)
    }
    fn sync(&self) -> Result<(), StorageError> {
        (**self).sync()
    }
    fn state_size(&self) -> usize {
        (**self).state_size()
    }
}
