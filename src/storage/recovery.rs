//! Recovery: reading and checking a data directory at open. A torn record at the very end of
//! the log (a crash in mid-append) is cut off; anything else that is wrong is refused,
//! naming file and offset.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::files::{fsync_dir, read_framed, u64_at};
use super::record::{self, Decoded};
use super::segments::{Disk, Segment, create_segment, reopen_append, reset_segments, segment_name};
use super::snapfile::FileSnapshot;
use super::{FileLogOptions, SEAL_BYTES, corrupt, io_err};
use crate::raft::log::{Entry, Log};
use crate::raft::{HardState, MAX_INDEX, MAX_TERM, Restored, SnapshotSource, StorageError};

/// Reads and checks a data directory; returns the disk state and what Raft restores.
pub(super) fn recover(dir: &Path, opts: FileLogOptions) -> Result<(Disk, Restored), StorageError> {
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
