//! The write queue and group commit: the [`Storage`](crate::raft::Storage) write calls queue
//! their change in memory (cheap, under Raft's mutex), checked at once against the log's
//! shape as the queue leaves it; `sync` carries out everything queued by every thread, in
//! order, with one fsync per touched file. While one thread syncs, the others wait at the
//! gate, and those its fsync covered return without touching the disk.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::FileLog;
use super::record;
use super::snapfile::FileSnapshot;
use crate::raft::log::Entry;
use crate::raft::{HardState, MAX_INDEX, MAX_TERM, StorageError};

/// A change queued by a write call, carried out by the next `sync`.
pub(super) enum Op {
    HardState(HardState),
    Append(u64, Vec<Entry>),
    Truncate(u64),
    Snapshot(u64, u64, SnapIn),
}

/// A snapshot to install: the service's bytes (written by the sync that carries it out), or
/// a file already written and fsynced (received from the leader, or the service's own, written
/// ahead by [`Storage::write_snapshot`](crate::raft::Storage::write_snapshot)).
pub(super) enum SnapIn {
    Bytes(Arc<Vec<u8>>),
    File(Arc<FileSnapshot>),
}

impl Op {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Op::HardState(_) => "hard state",
            Op::Append(..) => "append",
            Op::Truncate(_) => "truncate",
            Op::Snapshot(..) => "snapshot",
        }
    }
}

pub(super) struct Pending {
    pub(super) ops: Vec<Op>,
    /// Number of ops ever queued.
    pub(super) seq: u64,
    /// The log's shape as the queued ops leave it, to reject a bad call at once: its base,
    /// and its last index unless a queued snapshot makes it depend on terms (then `sync`
    /// checks).
    pub(super) base: u64,
    pub(super) last: Option<u64>,
}

/// Who is syncing, and how far the fsyncs have got. While one thread syncs, the others wait
/// on `FileLog::gate_cv` (parked at once) rather than on the disk lock, whose spin-and-yield
/// before parking cost a follower a quarter of its CPU under load; when the gate opens, those
/// the finished fsync covered return, and one of the rest becomes the next syncer.
#[derive(Default)]
pub(super) struct SyncGate {
    /// A thread is carrying out queued writes and fsyncing.
    pub(super) syncing: bool,
    /// Ops carried out and made durable (mirrors `Disk::synced_seq`).
    pub(super) synced_seq: u64,
}

impl FileLog {
    pub(super) fn queue(&self, op: Op) -> Result<(), StorageError> {
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
        if let Op::Snapshot(index, _, SnapIn::Bytes(data)) = &op {
            // What the writer writes, the peers read: the one limit of both sides.
            self.check_snapshot_len(*index, data.len() as u64)?;
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

    /// Carries out everything queued so far, by any thread, and fsyncs once; returns the
    /// number of ops now durable. Only the thread holding the gate calls it.
    pub(super) fn sync_queued(&self) -> Result<u64, StorageError> {
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

    /// Makes every write queued before the call durable: carries them out and fsyncs, or
    /// waits for the thread doing so (group commit).
    pub(super) fn sync_queued_writes(&self) -> Result<(), StorageError> {
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
}
