//! The storage seam: what a Raft peer must make durable, and how it gets it back at restart.
//!
//! Raft calls the write methods ([`set_hard_state`](Storage::set_hard_state),
//! [`append`](Storage::append), [`truncate_after`](Storage::truncate_after),
//! [`save_snapshot`](Storage::save_snapshot)) while it holds its mutex, in the order the
//! changes happen; they must be cheap (queue the change, no fsync). It calls
//! [`sync`](Storage::sync) after releasing the mutex and before any reply, message or applied
//! entry that depends on the changes leaves the peer. One `sync` covers every write queued
//! before it, including other threads' writes, so concurrent callers can share one fsync
//! (group commit). The one write made without the mutex, and slow: a storage that can writes
//! the service's snapshot to a file of its own first ([`write_snapshot`](Storage::write_snapshot)),
//! so no `sync` waits for it, and Raft then queues it under the mutex
//! ([`save_written_snapshot`](Storage::save_written_snapshot)). A storage that returns an
//! error is never used again: the peer stops.

use std::fmt;
use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

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
    /// The data directory is in use by another process (or another open log in this one).
    Locked { path: String },
    /// A call the storage cannot honour (e.g. an append that leaves a gap).
    Invalid { reason: String },
    /// An earlier error stopped this storage; nothing more is written.
    Failed { first: String },
    /// The data was written in another on-disk format than this build reads.
    Format {
        path: String,
        found: u32,
        supported: u32,
    },
    /// A snapshot above the storage's limit on snapshots, which its peers (given the same
    /// limit) would refuse to receive: not written.
    SnapshotTooLarge { index: u64, len: u64, limit: u64 },
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
                write!(f, "{path} is locked by another process or another open log")
            }
            StorageError::Invalid { reason } => write!(f, "invalid storage call: {reason}"),
            StorageError::Failed { first } => write!(f, "storage stopped after: {first}"),
            StorageError::Format {
                path,
                found,
                supported,
            } => {
                let found_how = if *found == 1 {
                    " (written before the format was recorded)"
                } else {
                    ""
                };
                write!(
                    f,
                    "{path}: on-disk format {found}{found_how}, but this raftkv reads format {supported} only; \
                     start the release that wrote it, or move the directory away and let the node catch up from its peers"
                )
            }
            StorageError::SnapshotTooLarge { index, len, limit } => write!(
                f,
                "the snapshot through index {index} is {len} bytes, above the {limit}-byte limit on snapshots \
                 (serve's --max-snapshot-bytes), which peers set alike would refuse; raise the limit on every node"
            ),
        }
    }
}

impl std::error::Error for StorageError {}

/// A snapshot a storage keeps readable by itself (a file), so Raft need not hold its bytes in
/// memory: it reads them back in pieces to send them, or whole to hand them to the service.
pub trait SnapshotSource: Send + Sync {
    /// The last log index and term the snapshot covers.
    fn index(&self) -> u64;
    fn term(&self) -> u64;
    /// Bytes of the service's data.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// CRC32C of all the data: what a receiver checks the assembled snapshot against.
    fn crc(&self) -> u32;
    /// Up to `max` bytes of data from `offset` (fewer only at the end), checked against their
    /// checksums; damage is an error naming the file and offset.
    fn read(&self, offset: u64, max: usize) -> Result<Vec<u8>, StorageError>;
}

/// The snapshot Raft holds: its bytes in memory (a storage that keeps none readable, like the
/// labs' persister), or a handle on the storage's copy.
#[derive(Clone)]
pub enum SnapshotData {
    Mem(Arc<Vec<u8>>),
    Stored(Arc<dyn SnapshotSource>),
}

impl Default for SnapshotData {
    fn default() -> Self {
        SnapshotData::Mem(Arc::default())
    }
}

impl fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotData::Mem(b) => write!(f, "Mem({} bytes)", b.len()),
            SnapshotData::Stored(s) => write!(f, "Stored({} bytes through {})", s.len(), s.index()),
        }
    }
}

impl SnapshotData {
    pub fn len(&self) -> u64 {
        match self {
            SnapshotData::Mem(b) => b.len() as u64,
            SnapshotData::Stored(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `max` bytes from `offset`.
    pub fn read(&self, offset: u64, max: usize) -> Result<Vec<u8>, StorageError> {
        match self {
            SnapshotData::Mem(b) => {
                let from = (offset.min(b.len() as u64)) as usize;
                let to = from.saturating_add(max).min(b.len());
                Ok(b[from..to].to_vec())
            }
            SnapshotData::Stored(s) => s.read(offset, max),
        }
    }

    /// All the bytes (one copy in memory).
    pub fn read_all(&self) -> Result<Vec<u8>, StorageError> {
        match self {
            SnapshotData::Mem(b) => Ok(b.as_ref().clone()),
            SnapshotData::Stored(s) => s.read(0, usize::try_from(s.len()).unwrap_or(usize::MAX)),
        }
    }

    /// CRC32C of all the data.
    pub fn crc(&self) -> u32 {
        match self {
            SnapshotData::Mem(b) => crc32c::crc32c(b),
            SnapshotData::Stored(s) => s.crc(),
        }
    }
}

/// Bytes a [`SnapshotReader`] reads from its source at a time.
const READ_PIECE: usize = 1 << 20;

/// Reads a [`SnapshotSource`] front to back, one piece at a time: what a streaming check of a
/// received snapshot ([`Validator::check_snapshot_stream`](super::Validator)) reads, holding
/// one piece whatever the snapshot's size. A storage error ends the reading (an I/O error to
/// the reader) and is kept: the caller must tell damage on its own disk from a snapshot the
/// service refuses.
pub struct SnapshotReader<'a> {
    src: &'a dyn SnapshotSource,
    /// Where the next piece starts.
    offset: u64,
    piece: Vec<u8>,
    /// How much of `piece` has been read.
    at: usize,
    error: Option<StorageError>,
}

impl<'a> SnapshotReader<'a> {
    pub fn new(src: &'a dyn SnapshotSource) -> SnapshotReader<'a> {
        SnapshotReader {
            src,
            offset: 0,
            piece: Vec::new(),
            at: 0,
            error: None,
        }
    }

    /// The storage error that ended the reading, if one did.
    pub fn take_error(&mut self) -> Option<StorageError> {
        self.error.take()
    }
}

impl Read for SnapshotReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at == self.piece.len() {
            if self.offset >= self.src.len() || buf.is_empty() {
                return Ok(0);
            }
            let piece = self.src.read(self.offset, READ_PIECE).and_then(|p| {
                if p.is_empty() {
                    Err(StorageError::Invalid {
                        reason: format!(
                            "snapshot through {} read nothing at {} of {} bytes",
                            self.src.index(),
                            self.offset,
                            self.src.len()
                        ),
                    })
                } else {
                    Ok(p)
                }
            });
            match piece {
                Ok(p) => {
                    self.offset += p.len() as u64;
                    self.piece = p;
                    self.at = 0;
                }
                Err(e) => {
                    let why = e.to_string();
                    self.error = Some(e);
                    return Err(io::Error::other(why));
                }
            }
        }
        let n = buf.len().min(self.piece.len() - self.at);
        buf[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// One piece of a snapshot a leader streams to this peer (Raft Figure 13's offset and done).
#[derive(Debug, Clone, Copy)]
pub struct SnapshotChunk<'a> {
    /// The peer that sent it (for the storage's log lines).
    pub leader: usize,
    pub index: u64,
    pub term: u64,
    /// Where `data` starts in the snapshot, and the snapshot's whole length and CRC32C.
    pub offset: u64,
    pub total: u64,
    pub crc: u32,
    pub data: &'a [u8],
    /// The last chunk: the snapshot is complete once it is written.
    pub done: bool,
}

/// What a storage did with a [`SnapshotChunk`].
pub enum ChunkOutcome {
    /// The offset it needs next (the chunk was taken, or it was not the one expected: a
    /// repeat, a gap, another snapshot's piece).
    Next(u64),
    /// The snapshot is complete, checked and durable under a temporary name; installed by
    /// [`Storage::install_received_snapshot`].
    Complete(Arc<dyn SnapshotSource>),
    /// The piece belongs to the snapshot already received and now being checked or
    /// installed: nothing is done and nothing answered (the leader tries again later). A
    /// new transfer of it would replace the very file under the check, which could then
    /// install nothing, and with a check slower than the leader's resends, never would.
    Busy,
    /// The storage will not keep a snapshot of that size (above its limit on snapshots, or
    /// more than its disk can take and keep a reserve): nothing was written, a transfer of
    /// it under way was abandoned and its file deleted, and nothing is answered (the storage
    /// has logged it, naming the sender and the sizes).
    Refused,
}

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

    /// [`save_snapshot`](Storage::save_snapshot) of bytes the caller shares rather than
    /// copies (a large snapshot is then in memory once).
    fn save_snapshot_shared(
        &self,
        index: u64,
        term: u64,
        data: Arc<Vec<u8>>,
    ) -> Result<(), StorageError> {
        self.save_snapshot(index, term, &data)
    }

    /// The durable snapshot, if this storage keeps it readable by itself: Raft then drops its
    /// in-memory copy and reads from here.
    fn snapshot_source(&self) -> Option<Arc<dyn SnapshotSource>> {
        None
    }

    /// Writes the service's snapshot through (`index`, `term`) to a file of its own and makes
    /// that file durable, before anything is queued: Raft calls this without its mutex, and
    /// the storage must not hold up other writes' syncs meanwhile, so a follower answers
    /// AppendEntries while a large snapshot is written. The snapshot is installed only by
    /// [`save_written_snapshot`](Storage::save_written_snapshot) (then durable at the next
    /// `sync`, as with [`save_snapshot`](Storage::save_snapshot)); Raft hands every written
    /// snapshot back exactly once, to that or to
    /// [`discard_written_snapshot`](Storage::discard_written_snapshot). `None` (the default):
    /// this storage writes snapshots within `sync`; Raft calls `save_snapshot_shared`.
    fn write_snapshot(
        &self,
        _index: u64,
        _term: u64,
        _data: &[u8],
    ) -> Result<Option<Arc<dyn SnapshotSource>>, StorageError> {
        Ok(None)
    }

    /// Queues the installation of a snapshot [`write_snapshot`](Storage::write_snapshot)
    /// wrote: entries through its index are discarded, durably at the next `sync` (the log
    /// holds its index at its term: the service's snapshot covers applied entries).
    fn save_written_snapshot(
        &self,
        _snapshot: &Arc<dyn SnapshotSource>,
    ) -> Result<(), StorageError> {
        Err(StorageError::Invalid {
            reason: "this storage does not write snapshots ahead".to_string(),
        })
    }

    /// Forgets a snapshot [`write_snapshot`](Storage::write_snapshot) wrote that will not be
    /// installed (the log moved past it meanwhile, or the peer stopped): its file goes.
    fn discard_written_snapshot(&self, _snapshot: &Arc<dyn SnapshotSource>) {}

    /// Takes one piece of a snapshot streamed from the leader, written to a temporary file
    /// (see [`ChunkOutcome`]). Storages that cannot refuse.
    fn receive_snapshot_chunk(
        &self,
        _chunk: SnapshotChunk<'_>,
    ) -> Result<ChunkOutcome, StorageError> {
        Err(StorageError::Invalid {
            reason: "this storage does not take snapshots in chunks".to_string(),
        })
    }

    /// Queues the installation of the snapshot a [`ChunkOutcome::Complete`] returned (as
    /// [`save_snapshot`](Storage::save_snapshot) does with bytes: durable at the next `sync`).
    /// Raft hands back every completed snapshot exactly once: to this, or to
    /// [`discard_received_snapshot`](Storage::discard_received_snapshot).
    fn install_received_snapshot(
        &self,
        _snapshot: &Arc<dyn SnapshotSource>,
    ) -> Result<(), StorageError> {
        Err(StorageError::Invalid {
            reason: "this storage does not take snapshots in chunks".to_string(),
        })
    }

    /// Forgets a snapshot a [`ChunkOutcome::Complete`] returned that will not be installed
    /// (the service refused it, or the peer no longer needs it): its temporary file goes.
    fn discard_received_snapshot(&self, _snapshot: &Arc<dyn SnapshotSource>) {}

    /// Abandons a snapshot transfer that has had no piece for `idle` (its sender went away,
    /// or stopped halfway on purpose): its temporary file is deleted and its buffers freed;
    /// the next piece of it is answered with offset 0. Raft's ticker calls this about once a
    /// second, without the Raft mutex.
    fn expire_snapshot_transfer(&self, _idle: Duration) {}
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
    fn save_snapshot_shared(
        &self,
        index: u64,
        term: u64,
        data: Arc<Vec<u8>>,
    ) -> Result<(), StorageError> {
        (**self).save_snapshot_shared(index, term, data)
    }
    fn snapshot_source(&self) -> Option<Arc<dyn SnapshotSource>> {
        (**self).snapshot_source()
    }
    fn write_snapshot(
        &self,
        index: u64,
        term: u64,
        data: &[u8],
    ) -> Result<Option<Arc<dyn SnapshotSource>>, StorageError> {
        (**self).write_snapshot(index, term, data)
    }
    fn save_written_snapshot(
        &self,
        snapshot: &Arc<dyn SnapshotSource>,
    ) -> Result<(), StorageError> {
        (**self).save_written_snapshot(snapshot)
    }
    fn discard_written_snapshot(&self, snapshot: &Arc<dyn SnapshotSource>) {
        (**self).discard_written_snapshot(snapshot)
    }
    fn receive_snapshot_chunk(
        &self,
        chunk: SnapshotChunk<'_>,
    ) -> Result<ChunkOutcome, StorageError> {
        (**self).receive_snapshot_chunk(chunk)
    }
    fn install_received_snapshot(
        &self,
        snapshot: &Arc<dyn SnapshotSource>,
    ) -> Result<(), StorageError> {
        (**self).install_received_snapshot(snapshot)
    }
    fn discard_received_snapshot(&self, snapshot: &Arc<dyn SnapshotSource>) {
        (**self).discard_received_snapshot(snapshot)
    }
    fn expire_snapshot_transfer(&self, idle: Duration) {
        (**self).expire_snapshot_transfer(idle)
    }
}
