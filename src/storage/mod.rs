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
//! complete and verified, and renamed over `snapshot` the same way. Leftover `*.tmp` files
//! are deleted at open.
//!
//! A directory written in another format than [`FORMAT_VERSION`] (one without a `format`
//! file but with data is format 1) is refused with [`StorageError::Format`], naming both.
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

pub mod record;
pub mod snapfile;

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::raft::log::{Entry, Log};
use crate::raft::{
    ChunkOutcome, HardState, MAX_INDEX, MAX_TERM, Restored, SnapshotChunk, SnapshotSource, Storage,
    StorageError,
};
use record::Decoded;
use snapfile::FileSnapshot;

/// The on-disk format this build writes and reads. 1: no `format` file, the snapshot one
/// record (unreadable above 64 MiB), the hard state without a kind byte. 2: the `format`
/// file, chunked snapshots, every record with a kind byte.
pub const FORMAT_VERSION: u32 = 2;
/// What the `format` record starts with, after its kind byte.
const FORMAT_MAGIC: &[u8] = b"raftkv-log";

/// Bytes of a seal record.
const SEAL_BYTES: u64 = (record::HEADER + 9) as u64;

/// Default segment size: a segment is sealed and a new one started once it passes this.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// Options of a [`FileLog`].
#[derive(Debug, Clone)]
pub struct FileLogOptions {
    /// A segment is sealed once it holds at least this many bytes.
    pub segment_bytes: u64,
}

impl Default for FileLogOptions {
    fn default() -> Self {
        FileLogOptions {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }
}

/// One segment file: entries `first..=last` (`last = first - 1` when empty).
struct Segment {
    first: u64,
    path: PathBuf,
    /// Byte offset and term of each entry, in index order.
    entries: Vec<(u64, u64)>,
    /// Bytes of entry records (a seal, if any, follows).
    entries_end: u64,
    /// Whether the file ends with a seal.
    sealed: bool,
}

impl Segment {
    fn last(&self) -> u64 {
        self.first + self.entries.len() as u64 - 1
    }

    fn term_at(&self, index: u64) -> Option<u64> {
        if index < self.first {
            return None;
        }
        self.entries.get((index - self.first) as usize).map(|e| e.1)
    }
}

fn segment_name(first: u64) -> String {
    format!("log-{first:020}")
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

/// A change queued by a write call, carried out by the next `sync`.
enum Op {
    HardState(HardState),
    Append(u64, Vec<Entry>),
    Truncate(u64),
    Snapshot(u64, u64, SnapIn),
}

/// A snapshot to install: the service's bytes, or a file received from the leader.
enum SnapIn {
    Bytes(Arc<Vec<u8>>),
    Received(Arc<FileSnapshot>),
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::HardState(_) => "hard state",
            Op::Append(..) => "append",
            Op::Truncate(_) => "truncate",
            Op::Snapshot(..) => "snapshot",
        }
    }
}

struct Pending {
    ops: Vec<Op>,
    /// Number of ops ever queued.
    seq: u64,
    /// The log's shape as the queued ops leave it, to reject a bad call at once: its base,
    /// and its last index unless a queued snapshot makes it depend on terms (then `sync`
    /// checks).
    base: u64,
    last: Option<u64>,
}

/// What is on disk, as far as this process knows.
struct Disk {
    dir: PathBuf,
    opts: FileLogOptions,
    segments: Vec<Segment>,
    /// The last segment, open for appending at its end.
    active: File,
    base_index: u64,
    base_term: u64,
    hard_state_bytes: u64,
    /// Bytes of all segment files.
    log_bytes: u64,
    /// Files written since the last fsync (segments, by index in `segments`, or paths).
    dirty_active: bool,
    dirty_dir: bool,
    /// Ops carried out and made durable.
    synced_seq: u64,
    /// `sync` calls that wrote and fsynced, and the entries they made durable (group commit:
    /// under load many entries per fsync), for the debug log.
    fsyncs: u64,
    entries_synced: u64,
    /// The first error; the log is unusable after it.
    failed: Option<String>,
    /// The durable snapshot, if any.
    snapshot: Option<Arc<FileSnapshot>>,
}

/// Who is syncing, and how far the fsyncs have got. While one thread syncs, the others wait
/// on `FileLog::gate_cv` (parked at once) rather than on the disk lock, whose spin-and-yield
/// before parking cost a follower a quarter of its CPU under load; when the gate opens, those
/// the finished fsync covered return, and one of the rest becomes the next syncer.
#[derive(Default)]
struct SyncGate {
    /// A thread is carrying out queued writes and fsyncing.
    syncing: bool,
    /// Ops carried out and made durable (mirrors `Disk::synced_seq`).
    synced_seq: u64,
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
    dir: PathBuf,
}

/// The snapshot a leader is streaming to this log (one at a time).
#[derive(Default)]
struct Receiving {
    /// The transfer under way: index, term, total, and its file.
    current: Option<(u64, u64, u64, snapfile::Writer)>,
    /// When the transfer under way last took a piece, and from which peer.
    last_piece: Option<(Instant, usize)>,
    /// Names the temporary files.
    count: u64,
    /// Completed and durable under its temporary name, not yet installed.
    complete: Option<Arc<FileSnapshot>>,
}

/// Whether `a` is the very snapshot `b` (one completed transfer, not another of the same
/// index and term completed meanwhile).
fn same_snapshot(a: &Arc<FileSnapshot>, b: &Arc<dyn SnapshotSource>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

fn fsync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, "fsync directory", e))
}

/// Writes `bytes` to `dir/name` atomically: temp file, fsync, rename, directory fsync.
fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, "create", e))?;
    f.write_all(bytes).map_err(|e| io_err(&tmp, "write", e))?;
    f.sync_all().map_err(|e| io_err(&tmp, "fsync", e))?;
    fs::rename(&tmp, &path).map_err(|e| io_err(&path, "rename", e))?;
    fsync_dir(dir)
}

/// Reads a small file written by [`replace_file`] holding one framed record; `None` if
/// absent.
fn read_framed(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    let len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "stat", e)),
    };
    if len > 4096 {
        return Err(corrupt(
            path,
            0,
            format!("{len} bytes, far more than its one small record"),
        ));
    }
    let buf = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "read", e)),
    };
    match record::read_at(&buf, 0) {
        record::Read::Record(payload, end) if end == buf.len() => Ok(Some(payload.to_vec())),
        record::Read::Record(_, end) => Err(corrupt(path, end as u64, "bytes after the record")),
        record::Read::Short => Err(corrupt(path, 0, "cut short")),
        record::Read::Bad => Err(corrupt(path, 0, "bad checksum")),
    }
}

fn encode_hard_state(hs: HardState) -> Vec<u8> {
    record::small(
        record::KIND_HARD_STATE,
        &[
            &hs.term.to_le_bytes(),
            &hs.voted_for.map_or(u64::MAX, |v| v as u64).to_le_bytes(),
        ],
    )
}

fn encode_format() -> Vec<u8> {
    record::small(
        record::KIND_FORMAT,
        &[FORMAT_MAGIC, &FORMAT_VERSION.to_le_bytes()],
    )
}

/// Checks the directory's format, or records it in a directory with no data yet. Runs before
/// anything else reads or writes the directory.
fn check_format(dir: &Path) -> Result<(), StorageError> {
    let path = dir.join("format");
    match read_framed(&path)? {
        Some(p) => {
            let n = 1 + FORMAT_MAGIC.len();
            if p.len() != n + 4 || p[0] != record::KIND_FORMAT || &p[1..n] != FORMAT_MAGIC {
                return Err(corrupt(&path, 0, "not a raftkv format record"));
            }
            let found = u32::from_le_bytes(p[n..n + 4].try_into().expect("4 bytes"));
            if found != FORMAT_VERSION {
                return Err(StorageError::Format {
                    path: dir.display().to_string(),
                    found,
                    supported: FORMAT_VERSION,
                });
            }
            Ok(())
        }
        None => {
            let mut has_data = false;
            for de in fs::read_dir(dir).map_err(|e| io_err(dir, "read directory", e))? {
                let de = de.map_err(|e| io_err(dir, "read directory", e))?;
                let name = de.file_name().to_string_lossy().into_owned();
                has_data |= name == "hardstate" || name == "snapshot" || name.starts_with("log-");
            }
            if has_data {
                // Written before the format was recorded.
                return Err(StorageError::Format {
                    path: dir.display().to_string(),
                    found: 1,
                    supported: FORMAT_VERSION,
                });
            }
            replace_file(dir, "format", &encode_format())
        }
    }
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

impl FileLog {
    /// Opens (creating if needed) the log in `dir`, recovering what it holds. Fails with
    /// `Locked` if another process has it open, `Corrupt` if it is damaged beyond a torn tail.
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
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StorageError::Locked {
                    path: dir.display().to_string(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&lock_path, "lock", e)),
        }
        check_format(&dir)?;
        let (disk, restored) = recover(&dir, opts)?;
        let state_bytes = disk.state_bytes();
        let current = disk.snapshot.clone();
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

    /// The bytes of the durable snapshot (empty if none).
    fn read_current(&self) -> Result<Vec<u8>, StorageError> {
        let current = self.current.lock().clone();
        match current {
            None => Ok(Vec::new()),
            Some(s) => s.read(0, usize::try_from(s.len()).unwrap_or(usize::MAX)),
        }
    }

    fn queue(&self, op: Op) -> Result<(), StorageError> {
        let mut p = self.pending.lock();
        // Nothing out of range reaches the disk, so recovery's arithmetic cannot wrap.
        let out_of_range = match &op {
            Op::HardState(hs) => hs.term > MAX_TERM,
            Op::Append(first, entries) => {
                *first == 0
                    || first
                        .checked_add(entries.len() as u64)
                        .is_none_or(|end| end - 1 > MAX_INDEX)
                    || entries.iter().any(|e| e.term > MAX_TERM)
            }
            Op::Truncate(after) => *after > MAX_INDEX,
            Op::Snapshot(index, term, _) => *index > MAX_INDEX || *term > MAX_TERM,
        };
        if out_of_range {
            return Err(StorageError::Invalid {
                reason: format!("{}: index or term out of range", op.name()),
            });
        }
        match &op {
            Op::HardState(_) => {}
            Op::Append(first, entries) => {
                if let Some(last) = p.last
                    && *first != last + 1
                {
                    return Err(StorageError::Invalid {
                        reason: format!("append at {first} after last {last}"),
                    });
                }
                if let Some(e) = entries
                    .iter()
                    .find(|e| e.command.len() > record::MAX_COMMAND)
                {
                    return Err(StorageError::Invalid {
                        reason: format!(
                            "command of {} bytes (at most {} fit a log record)",
                            e.command.len(),
                            record::MAX_COMMAND
                        ),
                    });
                }
                p.last = p.last.map(|l| l + entries.len() as u64);
            }
            Op::Truncate(after) => {
                if *after < p.base {
                    return Err(StorageError::Invalid {
                        reason: format!("truncate after {after} below base {}", p.base),
                    });
                }
                p.last = p.last.map(|l| l.min(*after));
            }
            Op::Snapshot(index, _, _) => {
                // Whether the entries after it survive depends on the terms (Raft's rule,
                // which `sync` applies): the next append is checked there.
                p.base = *index;
                p.last = None;
            }
        }
        p.ops.push(op);
        p.seq += 1;
        Ok(())
    }
}

impl FileLog {
    /// Takes one piece of a snapshot the leader streams (see [`Storage::receive_snapshot_chunk`]).
    /// Pieces must come in order; anything else is answered with the offset wanted. Holding
    /// `receiving` while writing serializes concurrent handlers; it is never held with the
    /// disk lock.
    fn receive(&self, c: SnapshotChunk<'_>) -> Result<ChunkOutcome, StorageError> {
        let dir = &self.dir;
        let mut r = self.receiving.lock();
        let same = |cur: &(u64, u64, u64, snapfile::Writer)| {
            (cur.0, cur.1, cur.2) == (c.index, c.term, c.total)
        };
        if c.data.len() > record::SNAPSHOT_CHUNK {
            log::warn!(target: "storage", "{}: snapshot chunk of {} bytes refused (limit {})", dir.display(), c.data.len(), record::SNAPSHOT_CHUNK);
            return Ok(ChunkOutcome::Next(
                r.current
                    .as_ref()
                    .filter(|cur| same(cur))
                    .map_or(0, |cur| cur.3.written()),
            ));
        }
        if !r.current.as_ref().is_some_and(same) {
            if c.offset != 0 {
                // Another snapshot's piece, or one from a transfer this log forgot (a
                // restart): start over.
                return Ok(ChunkOutcome::Next(0));
            }
            if let Some(old) = r.current.take() {
                log::info!(target: "storage", "{}: snapshot transfer through {} abandoned at {} of {} bytes for one through {} from peer {}", dir.display(), old.0, old.3.written(), old.2, c.index, c.leader);
                let _ = fs::remove_file(old.3.path());
            }
            r.count += 1;
            let path = dir.join(format!("snapshot-recv-{}.tmp", r.count));
            let w = snapfile::Writer::create(path, c.index, c.term, c.total)?;
            r.current = Some((c.index, c.term, c.total, w));
            r.last_piece = Some((Instant::now(), c.leader));
        }
        let cur = r.current.as_mut().expect("a transfer under way");
        let w = &mut cur.3;
        if c.offset != w.written() {
            return Ok(ChunkOutcome::Next(w.written()));
        }
        let end = c.offset.checked_add(c.data.len() as u64);
        if end.is_none_or(|e| e > c.total) {
            log::warn!(target: "storage", "{}: snapshot chunk at {} of {} bytes runs past its {}-byte snapshot; transfer restarted", dir.display(), c.offset, c.data.len(), c.total);
            let old = r.current.take().expect("a transfer under way");
            let _ = fs::remove_file(old.3.path());
            return Ok(ChunkOutcome::Next(0));
        }
        w.write(c.data)?;
        // Only a piece that moves the transfer on keeps it alive: one repeated forever
        // does not.
        r.last_piece = Some((Instant::now(), c.leader));
        let w = &mut r.current.as_mut().expect("a transfer under way").3;
        if !c.done {
            return Ok(ChunkOutcome::Next(w.written()));
        }
        let (written, crc) = (w.written(), w.crc());
        let cur = r.current.take().expect("a transfer under way");
        if written != c.total || crc != c.crc {
            log::warn!(target: "storage", "{}: received snapshot through {} does not check out ({written} of {} bytes, crc {crc:#x} vs {:#x}); transfer restarted", dir.display(), c.index, c.total, c.crc);
            let _ = fs::remove_file(cur.3.path());
            return Ok(ChunkOutcome::Next(0));
        }
        let snap = Arc::new(cur.3.finish()?);
        if let Some(old) = r.complete.replace(snap.clone()) {
            let _ = fs::remove_file(old.path());
        }
        log::info!(target: "storage", "{}: snapshot through {} (t{}, {} bytes) received", dir.display(), c.index, c.term, c.total);
        Ok(ChunkOutcome::Complete(snap))
    }

    /// Carries out everything queued so far, by any thread, and fsyncs once; returns the
    /// number of ops now durable. Only the thread holding the gate calls it.
    fn sync_queued(&self) -> Result<u64, StorageError> {
        let mut disk = self.disk.lock();
        if let Some(first) = &disk.failed {
            return Err(StorageError::Failed {
                first: first.clone(),
            });
        }
        let (ops, seq) = {
            let mut p = self.pending.lock();
            (std::mem::take(&mut p.ops), p.seq)
        };
        if seq <= disk.synced_seq {
            return Ok(disk.synced_seq);
        }
        let entries: usize = ops
            .iter()
            .map(|op| match op {
                Op::Append(_, e) => e.len(),
                _ => 0,
            })
            .sum();
        let op_count = ops.len();
        let r = disk.carry_out(ops).and_then(|()| disk.fsync());
        match r {
            Ok(()) => {
                disk.synced_seq = seq;
                disk.fsyncs += 1;
                disk.entries_synced += entries as u64;
                log::debug!(target: "storage", "{}: fsync #{} made {entries} entries durable ({op_count} ops); {} entries in {} fsyncs so far", disk.dir.display(), disk.fsyncs, disk.entries_synced, disk.fsyncs);
                let mut p = self.pending.lock();
                if p.ops.is_empty() {
                    p.last = Some(disk.segments.last().expect("an active segment").last());
                }
                drop(p);
                self.state_bytes
                    .store(disk.state_bytes(), Ordering::Relaxed);
                *self.current.lock() = disk.snapshot.clone();
                Ok(seq)
            }
            Err(e) => {
                log::error!(target: "storage", "{}: {e}; the log stops", disk.dir.display());
                disk.failed = Some(e.to_string());
                Err(e)
            }
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
            Some(s) if same_snapshot(&s, snapshot) => {
                self.queue(Op::Snapshot(s.index(), s.term(), SnapIn::Received(s)))
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
        let mut r = self.receiving.lock();
        if r.complete
            .as_ref()
            .is_some_and(|s| same_snapshot(s, snapshot))
        {
            let s = r.complete.take().expect("checked above");
            let path = s.path();
            match fs::remove_file(&path) {
                Ok(()) => {
                    log::info!(target: "storage", "{}: received snapshot through {} discarded", path.display(), s.index())
                }
                Err(e) => {
                    log::warn!(target: "storage", "{}: cannot delete a discarded snapshot: {e}", path.display())
                }
            }
        }
    }

    fn expire_snapshot_transfer(&self, idle: Duration) {
        let mut r = self.receiving.lock();
        let Some((at, from)) = r.last_piece else {
            return;
        };
        if r.current.is_none() {
            r.last_piece = None;
            return;
        }
        if at.elapsed() < idle {
            return;
        }
        r.last_piece = None;
        let (index, _, total, w) = r.current.take().expect("checked above");
        let written = w.written();
        let path = w.path().to_path_buf();
        drop(w);
        let removed = fs::remove_file(&path);
        log::warn!(target: "storage", "{}: snapshot transfer through {index} from peer {from} abandoned: no piece for {idle:?}, at {written} of {total} bytes; temporary file {}", self.dir.display(), if removed.is_ok() { "deleted" } else { "not deleted" });
    }

    fn sync(&self) -> Result<(), StorageError> {
        let target = self.pending.lock().seq;
        {
            let mut gate = self.gate.lock();
            loop {
                if gate.synced_seq >= target {
                    // Covered by a sync that ran while this one waited: group commit.
                    return Ok(());
                }
                if !gate.syncing {
                    gate.syncing = true;
                    break;
                }
                self.gate_cv.wait(&mut gate);
            }
        }
        // This thread is the syncer until it opens the gate again.
        let r = self.sync_queued();
        let mut gate = self.gate.lock();
        gate.syncing = false;
        if let Ok(seq) = r {
            gate.synced_seq = gate.synced_seq.max(seq);
        }
        self.gate_cv.notify_all();
        r.map(|_| ())
    }

    fn state_size(&self) -> usize {
        self.state_bytes.load(std::sync::atomic::Ordering::Relaxed) as usize
    }
}

impl Disk {
    /// Bytes of Raft state this log keeps: the hard state and the records of the entries
    /// after the snapshot. The records of compacted entries that still share the first
    /// segment with live ones are not counted: they are dead, and a snapshot cannot remove
    /// them before the segment is wholly below it, so counting them would make
    /// `maxraftstate` ask for snapshots that cannot shrink the state.
    fn state_bytes(&self) -> u64 {
        let dead = self.segments.first().map_or(0, |seg| {
            if self.base_index < seg.first {
                return 0;
            }
            let n = (self.base_index + 1 - seg.first) as usize;
            seg.entries.get(n).map_or(
                seg.entries_end + if seg.sealed { SEAL_BYTES } else { 0 },
                |e| e.0,
            )
        });
        self.hard_state_bytes + self.log_bytes.saturating_sub(dead)
    }

    fn carry_out(&mut self, ops: Vec<Op>) -> Result<(), StorageError> {
        let mut buf = Vec::new();
        for op in ops {
            match op {
                Op::HardState(hs) => {
                    self.flush_appends(&mut buf)?;
                    let bytes = encode_hard_state(hs);
                    replace_file(&self.dir, "hardstate", &bytes)?;
                    self.hard_state_bytes = bytes.len() as u64;
                }
                Op::Append(first, entries) => {
                    let seg = self.segments.last_mut().expect("an active segment");
                    if first != seg.last() + 1 {
                        return Err(StorageError::Invalid {
                            reason: format!("append at {first} after last {}", seg.last()),
                        });
                    }
                    let mut offset = seg.entries_end + buf.len() as u64;
                    for (i, e) in entries.iter().enumerate() {
                        let before = buf.len();
                        record::entry_into(&mut buf, first + i as u64, e.term, &e.command)
                            .map_err(|e| StorageError::Invalid {
                                reason: e.to_string(),
                            })?;
                        seg.entries.push((offset, e.term));
                        offset += (buf.len() - before) as u64;
                    }
                    if seg.entries_end + buf.len() as u64 >= self.opts.segment_bytes {
                        self.flush_appends(&mut buf)?;
                        self.roll()?;
                    }
                }
                Op::Truncate(after) => {
                    self.flush_appends(&mut buf)?;
                    self.truncate(after)?;
                }
                Op::Snapshot(index, term, data) => {
                    self.flush_appends(&mut buf)?;
                    self.snapshot(index, term, data)?;
                }
            }
        }
        self.flush_appends(&mut buf)
    }

    /// Writes the records buffered for the active segment.
    fn flush_appends(&mut self, buf: &mut Vec<u8>) -> Result<(), StorageError> {
        if buf.is_empty() {
            return Ok(());
        }
        let seg = self.segments.last_mut().expect("an active segment");
        self.active
            .write_all(buf)
            .map_err(|e| io_err(&seg.path, "write", e))?;
        seg.entries_end += buf.len() as u64;
        self.log_bytes += buf.len() as u64;
        self.dirty_active = true;
        buf.clear();
        Ok(())
    }

    fn fsync(&mut self) -> Result<(), StorageError> {
        if self.dirty_active {
            let path = &self.segments.last().expect("an active segment").path;
            self.active
                .sync_data()
                .map_err(|e| io_err(path, "fsync", e))?;
            self.dirty_active = false;
        }
        if self.dirty_dir {
            fsync_dir(&self.dir)?;
            self.dirty_dir = false;
        }
        Ok(())
    }

    /// Seals the active segment and starts the next: the new file exists (directory synced)
    /// before the seal that names it, and the old segment is durable before the new one
    /// receives anything.
    fn roll(&mut self) -> Result<(), StorageError> {
        let next = self.segments.last().expect("an active segment").last() + 1;
        let (file, path) = create_segment(&self.dir, next)?;
        fsync_dir(&self.dir)?;
        let seal = record::seal(next);
        let old = self.segments.last_mut().expect("an active segment");
        self.active
            .write_all(&seal)
            .and_then(|()| self.active.sync_data())
            .map_err(|e| io_err(&old.path, "seal", e))?;
        old.sealed = true;
        self.log_bytes += SEAL_BYTES;
        self.dirty_active = false;
        log::debug!(target: "storage", "sealed {}, next {}", old.path.display(), path.display());
        self.active = file;
        self.segments.push(Segment {
            first: next,
            path,
            entries: Vec::new(),
            entries_end: 0,
            sealed: false,
        });
        Ok(())
    }

    fn truncate(&mut self, after: u64) -> Result<(), StorageError> {
        let last = self.segments.last().expect("an active segment").last();
        if after >= last {
            return Ok(());
        }
        // The segment that will hold entry `after` (or the first, if none does).
        let k = self
            .segments
            .iter()
            .rposition(|s| s.first <= after + 1)
            .unwrap_or(0);
        self.cut_segment(k, after)?;
        // Oldest first: a crash leaves the cut (unsealed) segment followed by leftovers
        // that do not continue it, which recovery recognises and deletes.
        for seg in self.segments.split_off(k + 1) {
            self.remove_segment(&seg)?;
            self.dirty_dir = true;
        }
        self.active = reopen_append(&self.segments[k].path)?;
        Ok(())
    }

    /// Cuts segment `k` after entry `after` (and its seal), durably when it is not the last.
    fn cut_segment(&mut self, k: usize, after: u64) -> Result<(), StorageError> {
        let is_last = k + 1 == self.segments.len();
        let seg = &mut self.segments[k];
        let keep = (after + 1).saturating_sub(seg.first) as usize;
        let cut = seg.entries.get(keep).map_or(seg.entries_end, |e| e.0);
        let old_len = seg.entries_end + if seg.sealed { SEAL_BYTES } else { 0 };
        let file = OpenOptions::new()
            .write(true)
            .open(&seg.path)
            .map_err(|e| io_err(&seg.path, "open", e))?;
        file.set_len(cut)
            .map_err(|e| io_err(&seg.path, "truncate", e))?;
        if is_last {
            self.dirty_active = true;
        } else {
            file.sync_all().map_err(|e| io_err(&seg.path, "fsync", e))?;
        }
        seg.entries.truncate(keep);
        seg.entries_end = cut;
        seg.sealed = false;
        self.log_bytes = self.log_bytes.saturating_sub(old_len - cut);
        Ok(())
    }

    fn term_at(&self, index: u64) -> Option<u64> {
        if index == self.base_index {
            return Some(self.base_term);
        }
        self.segments.iter().find_map(|s| s.term_at(index))
    }

    fn snapshot(&mut self, index: u64, term: u64, data: SnapIn) -> Result<(), StorageError> {
        let keep_suffix = self.term_at(index) == Some(term);
        let snap = match data {
            SnapIn::Bytes(bytes) => {
                let tmp = self.dir.join("snapshot.tmp");
                let mut w = snapfile::Writer::create(tmp, index, term, bytes.len() as u64)?;
                w.write(&bytes)?;
                Arc::new(w.finish()?)
            }
            SnapIn::Received(s) => s,
        };
        let path = self.dir.join("snapshot");
        fs::rename(snap.path(), &path).map_err(|e| io_err(&path, "rename", e))?;
        fsync_dir(&self.dir)?;
        snap.set_path(path);
        self.snapshot = Some(snap);
        self.base_index = index;
        self.base_term = term;
        if keep_suffix && self.segments.last().expect("segments").last() > index {
            // Oldest first, so a crash leaves a contiguous suffix that still reaches
            // index + 1.
            while self.segments[0].last() <= index {
                let seg = self.segments.remove(0);
                self.remove_segment(&seg)?;
            }
            self.dirty_dir = true;
            return Ok(());
        }
        // Nothing after the snapshot survives.
        self.active = reset_segments(&self.dir, &mut self.segments, index + 1)?;
        self.log_bytes = 0;
        self.dirty_active = false;
        self.dirty_dir = true;
        Ok(())
    }

    fn remove_segment(&mut self, seg: &Segment) -> Result<(), StorageError> {
        fs::remove_file(&seg.path).map_err(|e| io_err(&seg.path, "remove", e))?;
        let len = seg.entries_end + if seg.sealed { SEAL_BYTES } else { 0 };
        self.log_bytes = self.log_bytes.saturating_sub(len);
        Ok(())
    }
}

fn create_segment(dir: &Path, first: u64) -> Result<(File, PathBuf), StorageError> {
    let path = dir.join(segment_name(first));
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(|e| io_err(&path, "create", e))?;
    Ok((file, path))
}

/// Empties the log, leaving one empty segment that starts at `first`, and returns it open
/// for appending. There is never a moment without a segment (recovery takes a directory
/// with a hard state or a snapshot but no segment for a deleted log): the first segment is
/// emptied durably first, so a crash leaves an empty, unsealed segment followed by leftovers
/// that recovery deletes; the new segment exists, the directory synced, before the emptied
/// one goes.
fn reset_segments(
    dir: &Path,
    segments: &mut Vec<Segment>,
    first: u64,
) -> Result<File, StorageError> {
    let head = &mut segments[0];
    OpenOptions::new()
        .write(true)
        .open(&head.path)
        .and_then(|f| f.set_len(0).and_then(|()| f.sync_all()))
        .map_err(|e| io_err(&head.path, "empty", e))?;
    head.entries.clear();
    head.entries_end = 0;
    head.sealed = false;
    for seg in segments.split_off(1) {
        fs::remove_file(&seg.path).map_err(|e| io_err(&seg.path, "remove", e))?;
    }
    if segments[0].first == first {
        return reopen_append(&segments[0].path);
    }
    let (file, path) = create_segment(dir, first)?;
    fsync_dir(dir)?;
    let old = segments.pop().expect("the emptied segment");
    fs::remove_file(&old.path).map_err(|e| io_err(&old.path, "remove", e))?;
    segments.push(Segment {
        first,
        path,
        entries: Vec::new(),
        entries_end: 0,
        sealed: false,
    });
    Ok(file)
}

fn reopen_append(path: &Path) -> Result<File, StorageError> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| io_err(path, "open", e))
}

/// Reads and checks a data directory; returns the disk state and what Raft restores.
fn recover(dir: &Path, opts: FileLogOptions) -> Result<(Disk, Restored), StorageError> {
    let hs_path = dir.join("hardstate");
    let (hard_state, hard_state_bytes) = match read_framed(&hs_path)? {
        None => (HardState::default(), 0),
        Some(p) if p.len() == 17 && p[0] == record::KIND_HARD_STATE => {
            let vote = u64_at(&p, 9);
            (
                HardState {
                    term: u64_at(&p, 1),
                    voted_for: (vote != u64::MAX).then_some(vote as usize),
                },
                (p.len() + record::HEADER) as u64,
            )
        }
        Some(p) => {
            return Err(corrupt(
                &hs_path,
                0,
                format!("{} bytes, not a hard state record", p.len()),
            ));
        }
    };
    if hard_state.term > MAX_TERM {
        return Err(corrupt(
            &hs_path,
            0,
            format!("term {} above the largest {MAX_TERM}", hard_state.term),
        ));
    }
    let snap_path = dir.join("snapshot");
    let snap = FileSnapshot::open(&snap_path)?.map(Arc::new);
    let snapshot_found = snap.is_some();
    let (base_index, base_term) = snap.as_ref().map_or((0, 0), |s| (s.index(), s.term()));
    if base_index > MAX_INDEX || base_term > MAX_TERM {
        return Err(corrupt(
            &snap_path,
            0,
            format!(
                "snapshot through {base_index} (t{base_term}): above the largest index or term"
            ),
        ));
    }

    // Segments, by first index.
    let mut names: Vec<(u64, PathBuf)> = Vec::new();
    for de in fs::read_dir(dir).map_err(|e| io_err(dir, "read directory", e))? {
        let de = de.map_err(|e| io_err(dir, "read directory", e))?;
        let name = de.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("log-") {
            let first = n
                .parse::<u64>()
                .map_err(|_| corrupt(&de.path(), 0, "not a segment name"))?;
            if first == 0 || first > MAX_INDEX {
                return Err(corrupt(
                    &de.path(),
                    0,
                    "a segment's first index out of range",
                ));
            }
            names.push((first, de.path()));
        } else if name.ends_with(".tmp") {
            // A replacement that never got renamed: the old file stands.
            let _ = fs::remove_file(de.path());
        }
    }
    names.sort();
    if names.is_empty() && (hard_state_bytes > 0 || snapshot_found) {
        // Every write path leaves at least one segment once the directory has state.
        return Err(corrupt(
            &dir.join(segment_name(base_index + 1)),
            0,
            "no log segment, but a hard state or snapshot: the log is missing",
        ));
    }

    let mut segments: Vec<Segment> = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    let mut entries_first = 0u64;
    let count = names.len();
    let mut names = names.into_iter().enumerate();
    while let Some((k, (first, path))) = names.next() {
        let is_last = k + 1 == count;
        if let Some(prev) = segments.last() {
            if !prev.sealed && prev.last() + 1 != first {
                // Only an interrupted truncation leaves an unsealed segment before another
                // (it cuts durably first, then deletes the rest oldest first): what follows
                // was being deleted.
                for (_, (_, p)) in std::iter::once((k, (first, path))).chain(names.by_ref()) {
                    log::warn!(target: "storage", "{}: left over from an interrupted truncation, deleted", p.display());
                    fs::remove_file(&p).map_err(|e| io_err(&p, "remove", e))?;
                }
                break;
            }
            if prev.last() + 1 != first {
                return Err(corrupt(
                    &path,
                    0,
                    format!(
                        "segment starts at {first} but the one before ends at {}: a segment is missing",
                        prev.last()
                    ),
                ));
            }
        } else {
            entries_first = first;
        }
        let buf = fs::read(&path).map_err(|e| io_err(&path, "read", e))?;
        let mut seg = Segment {
            first,
            path: path.clone(),
            entries: Vec::new(),
            entries_end: 0,
            sealed: false,
        };
        let mut offset = 0usize;
        while offset < buf.len() {
            let record::Read::Record(payload, next) = record::read_at(&buf, offset) else {
                // A torn tail, or damage? Damage unless it looks like an interrupted write,
                // at the end of the log's last segment (others were synced whole before the
                // next was written), with nothing valid after it.
                if !is_last {
                    return Err(corrupt(
                        &path,
                        offset as u64,
                        "bad record in a full segment",
                    ));
                }
                if record::any_valid_after(&buf, offset + 1).is_some() {
                    return Err(corrupt(&path, offset as u64, "bad record before good ones"));
                }
                if !record::looks_torn(&buf, offset) {
                    return Err(corrupt(
                        &path,
                        offset as u64,
                        "bad checksum in the last record",
                    ));
                }
                log::warn!(target: "storage", "{}: torn record at offset {offset} ({} bytes) cut off", path.display(), buf.len() - offset);
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| io_err(&path, "open", e))?;
                f.set_len(offset as u64)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| io_err(&path, "truncate", e))?;
                break;
            };
            if seg.sealed {
                return Err(corrupt(&path, offset as u64, "record after the seal"));
            }
            match record::decode(payload) {
                Some(Decoded::Entry {
                    index,
                    term,
                    command,
                }) => {
                    if term > MAX_TERM || index > MAX_INDEX {
                        return Err(corrupt(
                            &path,
                            offset as u64,
                            format!("entry {index} (t{term}): above the largest index or term"),
                        ));
                    }
                    let want = seg.first + seg.entries.len() as u64;
                    if index != want {
                        return Err(corrupt(
                            &path,
                            offset as u64,
                            format!("entry {index} where {want} belongs"),
                        ));
                    }
                    seg.entries.push((offset as u64, term));
                    entries.push(Entry {
                        term,
                        command: command.to_vec(),
                    });
                    seg.entries_end = next as u64;
                }
                Some(Decoded::Seal { next_first }) => {
                    if next_first != seg.last() + 1 {
                        return Err(corrupt(&path, offset as u64, "seal names a gap"));
                    }
                    seg.sealed = true;
                }
                None => return Err(corrupt(&path, offset as u64, "unknown record")),
            }
            offset = next;
        }
        if is_last && seg.sealed {
            // (A sealed segment's successor is created, and the directory synced, before
            // the seal is written.)
            return Err(corrupt(
                &path,
                seg.entries_end,
                format!(
                    "sealed, but the next segment {} is missing",
                    segment_name(seg.last() + 1)
                ),
            ));
        }
        segments.push(seg);
    }

    // The snapshot's rule (Raft §7): keep the entries after it only if the log holds its last
    // entry; entries it covers go.
    let log_last = if segments.is_empty() {
        0
    } else {
        entries_first + entries.len() as u64 - 1
    };
    let term_at = |i: u64| -> Option<u64> {
        (i >= entries_first && i <= log_last && !segments.is_empty())
            .then(|| entries[(i - entries_first) as usize].term)
    };
    // (A log that starts right after the snapshot was written after it.)
    let holds_base = base_index == 0
        || entries_first == base_index + 1
        || term_at(base_index) == Some(base_term);
    if !segments.is_empty() && entries_first > base_index + 1 {
        return Err(corrupt(
            &segments[0].path,
            0,
            format!(
                "log starts at {entries_first} but the snapshot ends at {base_index}: a segment is missing"
            ),
        ));
    }
    let mut log_bytes: u64 = 0;
    let (log, active) = if holds_base && log_last > base_index {
        let keep = entries.split_off((base_index + 1 - entries_first) as usize);
        // Segments wholly inside the snapshot (a crash came before their deletion).
        while segments[0].last() <= base_index {
            let seg = segments.remove(0);
            fs::remove_file(&seg.path).map_err(|e| io_err(&seg.path, "remove", e))?;
        }
        for s in &segments {
            log_bytes += s.entries_end + if s.sealed { SEAL_BYTES } else { 0 };
        }
        let active = reopen_append(&segments.last().expect("segments").path)?;
        (Log::from_parts(base_index, base_term, keep), active)
    } else {
        // Nothing after the snapshot (or no log yet): start clean after it.
        if log_last > base_index {
            log::warn!(target: "storage", "{}: log does not hold the snapshot's last entry {base_index} (t{base_term}): discarded", dir.display());
        }
        let file = if segments.is_empty() {
            let (file, path) = create_segment(dir, base_index + 1)?;
            segments.push(Segment {
                first: base_index + 1,
                path,
                entries: Vec::new(),
                entries_end: 0,
                sealed: false,
            });
            file
        } else {
            reset_segments(dir, &mut segments, base_index + 1)?
        };
        fsync_dir(dir)?;
        (Log::from_parts(base_index, base_term, Vec::new()), file)
    };
    log::info!(target: "storage", "{}: recovered t{} vote {:?}, snapshot through {base_index}, log ({base_index}..={}] in {} segments", dir.display(), hard_state.term, hard_state.voted_for, log.last_index(), segments.len());
    let disk = Disk {
        dir: dir.to_path_buf(),
        opts,
        segments,
        active,
        base_index,
        base_term,
        hard_state_bytes,
        log_bytes,
        dirty_active: false,
        dirty_dir: false,
        synced_seq: 0,
        fsyncs: 0,
        entries_synced: 0,
        failed: None,
        snapshot: snap,
    };
    Ok((
        disk,
        Restored {
            hard_state,
            log,
            snapshot: Vec::new(),
        },
    ))
}
