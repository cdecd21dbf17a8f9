//! A snapshot streamed from the leader, taken a piece at a time into
//! `snapshot-recv-<n>.tmp`, checked whole (length and CRC32C) on its last piece, and handed
//! to `sync` to install.
//!
//! The disk it may take is bounded: a transfer claiming more than the snapshot limit
//! ([`FileLogOptions::max_snapshot_bytes`](super::FileLogOptions), the limit the log's own
//! snapshot writer obeys) is refused at its first piece, before anything is written, and so
//! is one whose rest would leave less than the reserve free on the directory's filesystem
//! ([`FileLogOptions::min_free_bytes`](super::FileLogOptions), checked at every piece: a
//! transfer under way is abandoned and its file deleted once it would). A member gone rogue
//! can therefore hold at most one limit's worth of disk in a transfer (plus one complete
//! snapshot waiting to be checked), never the disk.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::snapfile::{self, FileSnapshot};
use super::{FileLog, record};
use crate::raft::{ChunkOutcome, SnapshotChunk, SnapshotSource, StorageError};

/// The snapshot a leader is streaming to this log (one at a time).
#[derive(Default)]
pub(super) struct Receiving {
    /// The transfer under way: index, term, total, and its file.
    pub(super) current: Option<(u64, u64, u64, snapfile::Writer)>,
    /// When the transfer under way last took a piece, and from which peer.
    pub(super) last_piece: Option<(Instant, usize)>,
    /// Names the temporary files.
    pub(super) count: u64,
    /// Completed and durable under its temporary name, not yet installed.
    pub(super) complete: Option<Arc<FileSnapshot>>,
    /// Transfers refused for their size since the last report, and when that was (a sender
    /// that retries is not logged at every piece).
    refused: u64,
    refusal_logged: Option<Instant>,
}

/// How often refused transfers are reported.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Bytes an unprivileged writer may still use on the filesystem holding `dir`.
#[allow(clippy::unnecessary_cast)] // the field types differ between platforms
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: `path` is a NUL-terminated string and `st` a plain struct statvfs fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Why a transfer is refused: what it needs against what the log allows.
enum TooBig {
    /// The whole snapshot is above the limit.
    Limit { total: u64, limit: u64 },
    /// Writing `remaining` more bytes would leave less than `reserve` of `free`.
    Disk {
        remaining: u64,
        free: u64,
        reserve: u64,
    },
}

impl FileLog {
    /// Refuses a snapshot of `len` bytes above the snapshot limit: the one check of the
    /// service's snapshots (written) and streamed ones (received).
    pub(super) fn check_snapshot_len(&self, index: u64, len: u64) -> Result<(), StorageError> {
        if len > self.max_snapshot_bytes {
            return Err(StorageError::SnapshotTooLarge {
                index,
                len,
                limit: self.max_snapshot_bytes,
            });
        }
        Ok(())
    }

    /// Whether `remaining` more bytes of a transfer of `total` may be written.
    fn room_for(&self, total: u64, remaining: u64) -> Result<(), TooBig> {
        if total > self.max_snapshot_bytes {
            return Err(TooBig::Limit {
                total,
                limit: self.max_snapshot_bytes,
            });
        }
        match free_bytes(&self.dir) {
            Ok(free) if free < remaining.saturating_add(self.min_free_bytes) => Err(TooBig::Disk {
                remaining,
                free,
                reserve: self.min_free_bytes,
            }),
            Ok(_) => Ok(()),
            Err(e) => {
                // Without a figure, only the limit bounds the transfer.
                log::debug!(target: "storage", "{}: statvfs: {e}", self.dir.display());
                Ok(())
            }
        }
    }

    /// Logs a refused transfer (at most every [`REFUSAL_LOG_EVERY`], with the count since).
    fn log_refusal(&self, r: &mut Receiving, c: &SnapshotChunk<'_>, why: &TooBig, what: &str) {
        r.refused += 1;
        if r.refusal_logged
            .is_some_and(|at| at.elapsed() < REFUSAL_LOG_EVERY)
        {
            return;
        }
        let why = match why {
            TooBig::Limit { total, limit } => {
                format!("{total} bytes, above the snapshot limit of {limit} bytes")
            }
            TooBig::Disk {
                remaining,
                free,
                reserve,
            } => format!(
                "{remaining} more bytes of {} would leave less than the {reserve}-byte reserve of the {free} bytes free",
                c.total
            ),
        };
        log::warn!(target: "storage", "{}: snapshot transfer through {} from peer {} {what}: {why} ({} refused since the last report)", self.dir.display(), c.index, c.leader, r.refused);
        r.refused = 0;
        r.refusal_logged = Some(Instant::now());
    }
}

impl FileLog {
    /// Takes one piece of a snapshot the leader streams (see [`Storage::receive_snapshot_chunk`]).
    /// Pieces must come in order; anything else is answered with the offset wanted. Holding
    /// `receiving` while writing serializes concurrent handlers; it is never held with the
    /// disk lock.
    pub(super) fn receive(&self, c: SnapshotChunk<'_>) -> Result<ChunkOutcome, StorageError> {
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
        let received = r
            .complete
            .as_ref()
            .is_some_and(|s| (s.index(), s.term(), s.len()) == (c.index, c.term, c.total));
        if received && !r.current.as_ref().is_some_and(same) {
            // The leader repeats a snapshot this log has whole and is checking or installing.
            log::debug!(target: "storage", "{}: a piece at {} of the snapshot through {} already received (being installed): not answered", dir.display(), c.offset, c.index);
            return Ok(ChunkOutcome::Busy);
        }
        if !r.current.as_ref().is_some_and(same) {
            if c.offset != 0 {
                // Another snapshot's piece, or one from a transfer this log forgot (a
                // restart): start over.
                return Ok(ChunkOutcome::Next(0));
            }
            // Nothing is written (nor the transfer under way dropped) for a snapshot this
            // log would not keep.
            if let Err(why) = self.room_for(c.total, c.total) {
                self.log_refusal(&mut r, &c, &why, "refused");
                return Ok(ChunkOutcome::Refused);
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
        if let Err(why) = self.room_for(c.total, c.total - c.offset) {
            // The disk filled meanwhile (with other writes): the transfer goes, and its file.
            let old = r.current.take().expect("a transfer under way");
            let _ = fs::remove_file(old.3.path());
            r.last_piece = None;
            self.log_refusal(&mut r, &c, &why, "abandoned, temporary file deleted");
            return Ok(ChunkOutcome::Refused);
        }
        let w = &mut r.current.as_mut().expect("a transfer under way").3;
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
}

/// Whether `a` is the very snapshot `b` (one completed transfer, not another of the same
/// index and term completed meanwhile).
pub(super) fn same_snapshot(a: &Arc<FileSnapshot>, b: &Arc<dyn SnapshotSource>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

impl FileLog {
    /// Deletes the received snapshot `snapshot` if it is the one waiting to be installed
    /// (Raft refused it).
    pub(super) fn discard_received(&self, snapshot: &Arc<dyn SnapshotSource>) {
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

    /// Abandons the transfer under way if no piece moved it on for `idle`, deleting its file.
    pub(super) fn expire_transfer(&self, idle: Duration) {
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
}
