//! The segment files and what this process knows is on disk ([`Disk`]): carrying out queued
//! changes (appends buffered per segment, the hard state and snapshot replaced atomically),
//! sealing and rolling segments, truncation, compaction below a snapshot, and the fsyncs.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::files::{encode_hard_state, fsync_dir, replace_file};
use super::queue::{Op, SnapIn};
use super::snapfile::{self, FileSnapshot};
use super::{FileLogOptions, SEAL_BYTES, io_err, record};
use crate::raft::StorageError;

/// One segment file: entries `first..=last` (`last = first - 1` when empty).
pub(super) struct Segment {
    pub(super) first: u64,
    pub(super) path: PathBuf,
    /// Byte offset and term of each entry, in index order.
    pub(super) entries: Vec<(u64, u64)>,
    /// Bytes of entry records (a seal, if any, follows).
    pub(super) entries_end: u64,
    /// Whether the file ends with a seal.
    pub(super) sealed: bool,
}

impl Segment {
    pub(super) fn last(&self) -> u64 {
        self.first + self.entries.len() as u64 - 1
    }

    pub(super) fn term_at(&self, index: u64) -> Option<u64> {
        if index < self.first {
            return None;
        }
        self.entries.get((index - self.first) as usize).map(|e| e.1)
    }
}

pub(super) fn segment_name(first: u64) -> String {
    format!("log-{first:020}")
}

/// What is on disk, as far as this process knows.
pub(super) struct Disk {
    pub(super) dir: PathBuf,
    pub(super) opts: FileLogOptions,
    pub(super) segments: Vec<Segment>,
    /// The last segment, open for appending at its end.
    pub(super) active: File,
    pub(super) base_index: u64,
    pub(super) base_term: u64,
    pub(super) hard_state_bytes: u64,
    /// Bytes of all segment files.
    pub(super) log_bytes: u64,
    /// Files written since the last fsync (segments, by index in `segments`, or paths).
    pub(super) dirty_active: bool,
    pub(super) dirty_dir: bool,
    /// Ops carried out and made durable.
    pub(super) synced_seq: u64,
    /// `sync` calls that wrote and fsynced, and the entries they made durable (group commit:
    /// under load many entries per fsync), for the debug log.
    pub(super) fsyncs: u64,
    pub(super) entries_synced: u64,
    /// The first error; the log is unusable after it.
    pub(super) failed: Option<String>,
    /// The durable snapshot, if any.
    pub(super) snapshot: Option<Arc<FileSnapshot>>,
}

impl Disk {
    /// Bytes of Raft state this log keeps: the hard state and the records of the entries
    /// after the snapshot. The records of compacted entries that still share the first
    /// segment with live ones are not counted: they are dead, and a snapshot cannot remove
    /// them before the segment is wholly below it, so counting them would make
    /// `maxraftstate` ask for snapshots that cannot shrink the state.
    pub(super) fn state_bytes(&self) -> u64 {
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

    pub(super) fn carry_out(&mut self, ops: Vec<Op>) -> Result<(), StorageError> {
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
    pub(super) fn flush_appends(&mut self, buf: &mut Vec<u8>) -> Result<(), StorageError> {
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

    pub(super) fn fsync(&mut self) -> Result<(), StorageError> {
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
    pub(super) fn roll(&mut self) -> Result<(), StorageError> {
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

    pub(super) fn truncate(&mut self, after: u64) -> Result<(), StorageError> {
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
    pub(super) fn cut_segment(&mut self, k: usize, after: u64) -> Result<(), StorageError> {
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

    pub(super) fn term_at(&self, index: u64) -> Option<u64> {
        if index == self.base_index {
            return Some(self.base_term);
        }
        self.segments.iter().find_map(|s| s.term_at(index))
    }

    pub(super) fn snapshot(
        &mut self,
        index: u64,
        term: u64,
        data: SnapIn,
    ) -> Result<(), StorageError> {
        let keep_suffix = self.term_at(index) == Some(term);
        let snap = match data {
            SnapIn::Bytes(bytes) => {
                let tmp = self.dir.join("snapshot.tmp");
                let mut w = snapfile::Writer::create(tmp, index, term, bytes.len() as u64)?;
                w.write(&bytes)?;
                Arc::new(w.finish()?)
            }
            SnapIn::File(s) => s,
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

    pub(super) fn remove_segment(&mut self, seg: &Segment) -> Result<(), StorageError> {
        fs::remove_file(&seg.path).map_err(|e| io_err(&seg.path, "remove", e))?;
        let len = seg.entries_end + if seg.sealed { SEAL_BYTES } else { 0 };
        self.log_bytes = self.log_bytes.saturating_sub(len);
        Ok(())
    }
}

pub(super) fn create_segment(dir: &Path, first: u64) -> Result<(File, PathBuf), StorageError> {
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
pub(super) fn reset_segments(
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

pub(super) fn reopen_append(path: &Path) -> Result<File, StorageError> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| io_err(path, "open", e))
}
