//! A crash-safe file log: the [`Storage`](crate::raft::Storage) of a Raft peer on a local disk.
//!
//! A data directory holds:
//!
//! | file | content | written |
//! |---|---|---|
//! | `LOCK` | nothing; held with an exclusive lock while open | at open |
//! | `log-<first index, 20 digits>` | append-only segment of framed entry records ([`record`]); a full segment ends with a seal naming the next | appended on `sync` |
//! | `format` | one framed record: the on-disk format version ([`FORMAT_VERSION`]) | once, before anything else |
//! | `hardstate` | one framed record: term, vote | replaced atomically |
//! | `snapshot` | index, term and the service's bytes as checksummed chunk records ([`snapfile`]) | replaced atomically |
//!
//! "Replaced atomically": written to `<name>.tmp`, fsynced, renamed over `<name>`, directory
//! fsynced. Segments wholly below the snapshot are deleted after the snapshot is durable. A
//! snapshot streamed from the leader is assembled in `snapshot-recv-<n>.tmp`, fsynced once
//! complete and verified, and renamed over `snapshot` the same way; so is the service's own,
//! written ahead to `snapshot-own-<n>.tmp` by the thread that took it
//! ([`Storage::write_snapshot`], outside the write queue, so other writes' syncs never wait
//! for it) and renamed by the sync that carries out its save. Leftover `*.tmp` files are
//! deleted at open.
//!
//! A directory of format [`UPGRADED_FORMAT`] (2) is upgraded in place at open: its `format`
//! record is rewritten (atomically) to [`FORMAT_VERSION`] before anything else is read, and
//! nothing else changes. A directory written in any other format (one without a `format`
//! file but with data is format 1; a newer one) is refused with [`StorageError::Format`],
//! naming both, before any file is read as data or written.
//!
//! Writes are queued in memory by the [`Storage`] write calls (cheap, under Raft's mutex) and
//! carried out by [`Storage::sync`] in order, followed by one fsync per touched file: many
//! appends queued by many threads share that fsync (group commit). Queued order is what makes
//! recovery consistent: a new term's hard state is durable before any entry of that term is
//! even written, and a snapshot is durable before the entries it replaces are deleted.
//!
//! Recovery ([`FileLog::open`]) cuts off a torn record at the very end of the log (a crash in
//! mid-append) and refuses to start, naming file and offset, on anything else: a bad record
//! followed by good ones, a bad checksum in `hardstate` or `snapshot`, a segment missing
//! between two others or after a sealed one, entries out of sequence.
//!
//! The files of this module, by job: `queue` (the write queue and group
//! commit), `segments` (the segment files and carrying out queued writes), `recovery` (reading
//! a directory back at open), `files` (`format` and `hardstate`), `receive` (a snapshot
//! streamed from the leader), [`record`] (the record framing) and [`snapfile`] (the snapshot
//! file).

mod files;
mod queue;
mod receive;
pub mod record;
mod recovery;
mod segments;
pub mod snapfile;

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::raft::log::Entry;
use crate::raft::{
    ChunkOutcome, HardState, Restored, SnapshotChunk, SnapshotSource, Storage, StorageError,
};
use files::check_format;
use queue::{Op, Pending, SnapIn, SyncGate};
use receive::Receiving;
use recovery::recover;
use segments::Disk;
use snapfile::FileSnapshot;

/// The on-disk format this build writes and reads. 1: no `format` file, the snapshot one
/// record (unreadable above 64 MiB), the hard state without a kind byte. 2: the `format`
/// file, chunked snapshots, every record with a kind byte. 3: the records of 2, and a node's
/// log may hold configuration entries (membership changes: a command starting with
/// [`CONFIG_TAG`](crate::raft::membership::CONFIG_TAG)), which a build of format 2 without
/// membership would hand its state machine as a command.
pub const FORMAT_VERSION: u32 = 3;
/// The one older format opened, and upgraded in place by rewriting the `format` record: its
/// records are read exactly as format 3's, and nothing in it changes meaning, since no build
/// of it wrote a node command starting with `CONFIG_TAG` other than a configuration entry
/// (the node's commands are `labcodec` values, which never start with that byte). Once
/// upgraded, a format 2 build refuses the directory instead of misreading it.
pub const UPGRADED_FORMAT: u32 = 2;
/// What the `format` record starts with, after its kind byte.
const FORMAT_MAGIC: &[u8] = b"raftkv-log";

/// Bytes of a seal record.
const SEAL_BYTES: u64 = (record::HEADER + 9) as u64;

/// Default segment size: a segment is sealed and a new one started once it passes this.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// Default of [`FileLogOptions::max_snapshot_bytes`]: 64 GiB, above the state any node holds
/// in memory today (the state machine keeps every key in RAM), so only a sender that is not
/// a working leader meets it.
pub const DEFAULT_MAX_SNAPSHOT_BYTES: u64 = 64 << 30;

/// Default of [`FileLogOptions::min_free_bytes`].
pub const DEFAULT_MIN_FREE_BYTES: u64 = 256 << 20;

/// The most snapshots written ahead and not yet saved or discarded that a log keeps: Raft
/// hands each back right after writing it, so more means one never will be.
const MAX_WRITTEN_AHEAD: usize = 4;

/// Options of a [`FileLog`].
#[derive(Debug, Clone)]
pub struct FileLogOptions {
    /// A segment is sealed once it holds at least this many bytes.
    pub segment_bytes: u64,
    /// The largest snapshot this log writes (the service's own) or receives (streamed from
    /// a leader): one limit for both, so a node never writes a snapshot its peers, given the
    /// same limit, would refuse. A received snapshot that claims more is refused at its first
    /// piece, before anything is written; the service's snapshot above it stops the peer
    /// (`StorageError::SnapshotTooLarge`) rather than being written.
    pub max_snapshot_bytes: u64,
    /// A streamed snapshot is refused, or its transfer abandoned and its file deleted, when
    /// receiving the rest of it would leave less than this free on the filesystem of the
    /// log's directory (`statvfs`, the space an unprivileged writer may use).
    pub min_free_bytes: u64,
}

impl Default for FileLogOptions {
    fn default() -> Self {
        FileLogOptions {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            max_snapshot_bytes: DEFAULT_MAX_SNAPSHOT_BYTES,
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
        }
    }
}

/// How long [`FileLog::open`] waits for a held directory lock before reporting
/// [`StorageError::Locked`]. The lock (`flock`) belongs to the open file, and a child process
/// this process spawns holds a copy of every descriptor from its fork until its exec: a log
/// just closed here can stay locked for that moment, and a reopen must not read it as
/// another process's. A real second process holds it for as long as it runs.
pub const LOCK_WAIT: Duration = Duration::from_secs(1);

/// Takes `lock` (the directory's `LOCK` file) exclusively, waiting up to [`LOCK_WAIT`].
fn take_lock(lock: &File, dir: &Path, lock_path: &Path) -> Result<(), StorageError> {
    let t0 = Instant::now();
    loop {
        match lock.try_lock() {
            Ok(()) => {
                if t0.elapsed() >= Duration::from_millis(10) {
                    log::debug!(target: "storage", "{}: the directory lock was free after {:?}", dir.display(), t0.elapsed());
                }
                return Ok(());
            }
            Err(fs::TryLockError::WouldBlock) if t0.elapsed() < LOCK_WAIT => {
                thread::sleep(Duration::from_millis(2));
            }
            Err(fs::TryLockError::WouldBlock) => {
                log::warn!(target: "storage", "{}: the directory lock is still held after {LOCK_WAIT:?}", dir.display());
                return Err(StorageError::Locked {
                    path: dir.display().to_string(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err(lock_path, "lock", e)),
        }
    }
}

/// Deletes the file of a snapshot written ahead that will not be installed.
fn remove_written(s: &FileSnapshot) {
    let path = s.path();
    if let Err(e) = fs::remove_file(&path) {
        log::warn!(target: "storage", "{}: cannot delete an unused snapshot file: {e}", path.display());
    }
}

pub(crate) fn io_err(path: &Path, op: &'static str, e: std::io::Error) -> StorageError {
    StorageError::Io {
        path: path.display().to_string(),
        op,
        reason: e.to_string(),
    }
}

pub(crate) fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        path: path.display().to_string(),
        offset,
        reason: reason.into(),
    }
}

/// A Raft log in a directory. See the module documentation.
pub struct FileLog {
    pending: Mutex<Pending>,
    gate: Mutex<SyncGate>,
    gate_cv: Condvar,
    disk: Mutex<Disk>,
    /// Kept open: the exclusive lock on `LOCK` lasts as long as this handle.
    _lock: File,
    /// What `open` recovered, handed out by `restore`.
    recovered: Mutex<Option<Restored>>,
    state_bytes: AtomicU64,
    /// The durable snapshot (mirrors `Disk::snapshot`, readable while a sync holds the disk).
    current: Mutex<Option<Arc<FileSnapshot>>>,
    /// `restore` leaves the snapshot's bytes on disk (see [`FileLog::keep_snapshot_on_disk`]).
    keep_on_disk: AtomicBool,
    /// A snapshot being received from the leader, and the last one completed.
    receiving: Mutex<Receiving>,
    /// The service's snapshots written ahead ([`Storage::write_snapshot`]), each until Raft
    /// saves or discards it (at most [`MAX_WRITTEN_AHEAD`]); and how many were written (each
    /// file's name is its own).
    written: Mutex<Vec<Arc<FileSnapshot>>>,
    written_count: AtomicU64,
    /// [`FileLogOptions::max_snapshot_bytes`] and [`FileLogOptions::min_free_bytes`].
    max_snapshot_bytes: u64,
    min_free_bytes: u64,
    dir: PathBuf,
}

impl FileLog {
    /// Opens (creating if needed) the log in `dir`, recovering what it holds. Fails with
    /// `Locked` if another process (or another open log here) still holds it after
    /// [`LOCK_WAIT`], `Corrupt` if it is damaged beyond a torn tail.
    pub fn open(dir: impl AsRef<Path>, opts: FileLogOptions) -> Result<FileLog, StorageError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, "create directory", e))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err(&lock_path, "open", e))?;
        take_lock(&lock, &dir, &lock_path)?;
        check_format(&dir)?;
        let (max_snapshot_bytes, min_free_bytes) = (opts.max_snapshot_bytes, opts.min_free_bytes);
        let (disk, restored) = recover(&dir, opts)?;
        let state_bytes = disk.state_bytes();
        let current = disk.snapshot.clone();
        if let Some(s) = current.as_ref().filter(|s| s.len() > max_snapshot_bytes) {
            // Readable, but peers given this limit would refuse it from this node.
            log::warn!(target: "storage", "{}: the snapshot through {} is {} bytes, above the snapshot limit of {max_snapshot_bytes}", dir.display(), s.index(), s.len());
        }
        Ok(FileLog {
            pending: Mutex::new(Pending {
                ops: Vec::new(),
                seq: 0,
                base: restored.log.base_index(),
                last: Some(restored.log.last_index()),
            }),
            gate: Mutex::new(SyncGate::default()),
            gate_cv: Condvar::new(),
            disk: Mutex::new(disk),
            _lock: lock,
            recovered: Mutex::new(Some(restored)),
            state_bytes: AtomicU64::new(state_bytes),
            current: Mutex::new(current),
            keep_on_disk: AtomicBool::new(false),
            receiving: Mutex::new(Receiving::default()),
            written: Mutex::new(Vec::new()),
            written_count: AtomicU64::new(0),
            max_snapshot_bytes,
            min_free_bytes,
            dir,
        })
    }

    /// From now on `restore` leaves the snapshot's bytes out of [`Restored`]: the caller (Raft)
    /// reads them through [`Storage::snapshot_source`] when it needs them, so a large snapshot
    /// is not held in memory for the life of the process.
    pub fn keep_snapshot_on_disk(&self) {
        self.keep_on_disk.store(true, Ordering::Relaxed);
    }

    /// The snapshot `open` found (empty if none), for a service that restores its state
    /// before starting Raft; empty once Raft has taken the recovered state.
    pub fn recovered_snapshot(&self) -> Vec<u8> {
        if self.recovered.lock().is_none() {
            return Vec::new();
        }
        self.read_current().unwrap_or_default()
    }

    /// The snapshot written ahead that `snapshot` is, taken from those waiting.
    fn take_written(&self, snapshot: &Arc<dyn SnapshotSource>) -> Option<Arc<FileSnapshot>> {
        let mut written = self.written.lock();
        let k = written
            .iter()
            .position(|s| receive::same_snapshot(s, snapshot))?;
        Some(written.remove(k))
    }

    /// The bytes of the durable snapshot (empty if none).
    fn read_current(&self) -> Result<Vec<u8>, StorageError> {
        let current = self.current.lock().clone();
        match current {
            None => Ok(Vec::new()),
            Some(s) => s.read(0, usize::try_from(s.len()).unwrap_or(usize::MAX)),
        }
    }
}

impl Storage for FileLog {
    fn restore(&self) -> Result<Restored, StorageError> {
        let mut r = self
            .recovered
            .lock()
            .take()
            .ok_or_else(|| StorageError::Invalid {
                reason: "restore called twice".to_string(),
            })?;
        if !self.keep_on_disk.load(Ordering::Relaxed) {
            r.snapshot = self.read_current()?;
        }
        Ok(r)
    }

    fn set_hard_state(&self, hs: HardState) -> Result<(), StorageError> {
        self.queue(Op::HardState(hs))
    }

    fn append(&self, first: u64, entries: &[Entry]) -> Result<(), StorageError> {
        self.queue(Op::Append(first, entries.to_vec()))
    }

    fn truncate_after(&self, index: u64) -> Result<(), StorageError> {
        self.queue(Op::Truncate(index))
    }

    fn save_snapshot(&self, index: u64, term: u64, data: &[u8]) -> Result<(), StorageError> {
        self.queue(Op::Snapshot(
            index,
            term,
            SnapIn::Bytes(Arc::new(data.to_vec())),
        ))
    }

    fn save_snapshot_shared(
        &self,
        index: u64,
        term: u64,
        data: Arc<Vec<u8>>,
    ) -> Result<(), StorageError> {
        self.queue(Op::Snapshot(index, term, SnapIn::Bytes(data)))
    }

    fn snapshot_source(&self) -> Option<Arc<dyn SnapshotSource>> {
        self.current
            .lock()
            .clone()
            .map(|s| s as Arc<dyn SnapshotSource>)
    }

    /// Written to `snapshot-own-<n>.tmp` (a chunked snapshot file, fsynced) by the calling
    /// thread, outside the write queue and its gate: syncs of other writes go on meanwhile.
    /// Renamed into place by the sync that carries out [`Storage::save_written_snapshot`];
    /// a file never saved is deleted by `discard_written_snapshot`, or at the next open.
    fn write_snapshot(
        &self,
        index: u64,
        term: u64,
        data: &[u8],
    ) -> Result<Option<Arc<dyn SnapshotSource>>, StorageError> {
        if index > crate::raft::MAX_INDEX || term > crate::raft::MAX_TERM {
            return Err(StorageError::Invalid {
                reason: format!("snapshot through {index} (t{term}): index or term out of range"),
            });
        }
        // What the writer writes, the peers read: the one limit of both sides.
        self.check_snapshot_len(index, data.len() as u64)?;
        let n = self.written_count.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("snapshot-own-{n}.tmp"));
        let written = snapfile::Writer::create(path.clone(), index, term, data.len() as u64)
            .and_then(|mut w| w.write(data).and_then(|()| w.finish()));
        match written {
            Ok(snap) => {
                let snap = Arc::new(snap);
                let oldest = {
                    let mut written = self.written.lock();
                    written.push(snap.clone());
                    (written.len() > MAX_WRITTEN_AHEAD).then(|| written.remove(0))
                };
                if let Some(oldest) = oldest {
                    // Raft hands each back at once: this many waiting means one never will be.
                    log::warn!(target: "storage", "{}: more than {MAX_WRITTEN_AHEAD} snapshots written ahead and not saved: the oldest, through {}, is deleted", self.dir.display(), oldest.index());
                    remove_written(&oldest);
                }
                log::debug!(target: "storage", "{}: snapshot through {index} (t{term}), {} bytes, written ahead", path.display(), data.len());
                Ok(Some(snap))
            }
            Err(e) => {
                let _ = fs::remove_file(&path);
                log::error!(target: "storage", "{}: the snapshot through {index} could not be written: {e}", path.display());
                Err(e)
            }
        }
    }

    fn save_written_snapshot(
        &self,
        snapshot: &Arc<dyn SnapshotSource>,
    ) -> Result<(), StorageError> {
        match self.take_written(snapshot) {
            Some(s) if s.index() <= self.pending.lock().base => {
                // The log has moved past it (a later snapshot queued meanwhile).
                remove_written(&s);
                Err(StorageError::Invalid {
                    reason: format!(
                        "snapshot through {} written ahead, saved after a later one",
                        s.index()
                    ),
                })
            }
            Some(s) => self.queue(Op::Snapshot(s.index(), s.term(), SnapIn::File(s))),
            None => Err(StorageError::Invalid {
                reason: format!(
                    "no snapshot through {} (t{}) written ahead to save",
                    snapshot.index(),
                    snapshot.term()
                ),
            }),
        }
    }

    fn discard_written_snapshot(&self, snapshot: &Arc<dyn SnapshotSource>) {
        if let Some(s) = self.take_written(snapshot) {
            remove_written(&s);
        }
    }

    fn receive_snapshot_chunk(&self, c: SnapshotChunk<'_>) -> Result<ChunkOutcome, StorageError> {
        self.receive(c)
    }

    fn install_received_snapshot(
        &self,
        snapshot: &Arc<dyn SnapshotSource>,
    ) -> Result<(), StorageError> {
        let complete = self.receiving.lock().complete.take();
        match complete {
            // The very snapshot Raft checked, not another one completed meanwhile.
            Some(s) if receive::same_snapshot(&s, snapshot) => {
                self.queue(Op::Snapshot(s.index(), s.term(), SnapIn::File(s)))
            }
            other => {
                self.receiving.lock().complete = other;
                Err(StorageError::Invalid {
                    reason: format!(
                        "no received snapshot through {} (t{}) to install",
                        snapshot.index(),
                        snapshot.term()
                    ),
                })
            }
        }
    }

    fn discard_received_snapshot(&self, snapshot: &Arc<dyn SnapshotSource>) {
        self.discard_received(snapshot);
    }

    fn expire_snapshot_transfer(&self, idle: std::time::Duration) {
        self.expire_transfer(idle);
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.sync_queued_writes()
    }

    fn state_size(&self) -> usize {
        self.state_bytes.load(std::sync::atomic::Ordering::Relaxed) as usize
    }
}
