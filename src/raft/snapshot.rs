//! Snapshots: the service's (log compaction) and the leader's (InstallSnapshot). Raft §7.

use std::sync::Arc;
use std::time::Instant;

use super::check::{self, Refusal};
use super::rpc::{
    InstallSnapshotArgs, InstallSnapshotChunkArgs, InstallSnapshotChunkReply, InstallSnapshotReply,
};
use super::state::{Core, MAX_CHUNKS_IN_FLIGHT, State};
use super::storage::{
    ChunkOutcome, SnapshotChunk, SnapshotData, SnapshotReader, SnapshotSource, StorageError,
};

impl Core {
    /// The service holds a snapshot through `index`: discard the log up to it.
    pub(crate) fn snapshot(&self, index: u64, data: Vec<u8>) {
        if !self.save_config_for_snapshot(index) {
            return;
        }
        let data = Arc::new(data);
        let written = self.write_snapshot_ahead(index, &data);
        let unused = self.compact(index, data, written);
        if let Some(w) = unused {
            self.storage.discard_written_snapshot(&w);
        }
        // Durable now: a follower at its log limit may take entries again.
        self.adopt_stored_snapshot();
        self.notify_room();
    }

    /// Has a storage that can (the file log) write the snapshot to a file of its own before
    /// it is queued, with no lock held: the syncs of other writes (a follower's
    /// AppendEntries, answered only once durable) then never wait for a large snapshot's
    /// write. `None`: nothing written ahead (a snapshot `compact` will ignore, or a storage
    /// that writes snapshots within its sync).
    fn write_snapshot_ahead(&self, index: u64, data: &[u8]) -> Option<Arc<dyn SnapshotSource>> {
        let term = {
            let st = self.state.lock();
            if self.is_dead() || index <= st.log.base_index() || index > st.last_applied {
                return None;
            }
            st.log.term_at(index)?
        };
        match self.storage.write_snapshot(index, term, data) {
            Ok(written) => written,
            Err(e) => {
                let mut st = self.state.lock();
                self.storage_failed(&mut st, "write snapshot", &e);
                None
            }
        }
    }

    /// Once the storage holds the snapshot durably and can read it back, Raft keeps a handle
    /// on that copy instead of the bytes: a large state is then not in memory twice (the
    /// service's, and Raft's).
    pub(super) fn adopt_stored_snapshot(&self) {
        let Some(src) = self.storage.snapshot_source() else {
            return;
        };
        let mut st = self.state.lock();
        if matches!(st.snapshot, SnapshotData::Mem(_))
            && src.index() == st.log.base_index()
            && src.term() == st.log.base_term()
        {
            st.snapshot = SnapshotData::Stored(src);
        }
    }

    /// Discards the log through `index` and queues the snapshot: the file `written` ahead if
    /// there is one for this very index and term, else the bytes. Returns a written file it
    /// did not use, for the caller to discard once the lock is released.
    fn compact(
        &self,
        index: u64,
        data: Arc<Vec<u8>>,
        written: Option<Arc<dyn SnapshotSource>>,
    ) -> Option<Arc<dyn SnapshotSource>> {
        let mut st = self.lock_state();
        if self.is_dead() {
            return written;
        }
        // Only a prefix the service has been given can be replaced by its snapshot.
        if index <= st.log.base_index() || index > st.last_applied {
            log::debug!(target: "raft::snapshot", "raft-{} t{}: snapshot at {index} ignored (log base {}, applied {})", self.me, st.term, st.log.base_index(), st.last_applied);
            return written;
        }
        let (written, unused) = match written {
            Some(w) if w.index() == index && st.log.term_at(index) == Some(w.term()) => {
                (Some(w), None)
            }
            other => (None, other),
        };
        st.log.compact_to(index);
        if let Some(cs) = st.configs.as_mut() {
            cs.compact_to(index);
        }
        st.snapshot = SnapshotData::Mem(data);
        match written {
            Some(w) => self.persist_written_snapshot(&mut st, &w),
            None => self.persist_snapshot(&mut st),
        }
        log::debug!(target: "raft::snapshot", "raft-{} t{}: snapshot through {index}, log ({index}..={}]", self.me, st.term, st.log.last_index());
        unused
    }

    /// Sends `peer` our snapshot: it needs entries we no longer have.
    pub(super) fn send_snapshot(self: &Arc<Core>, st: &mut State, peer: usize) {
        if let Some(chunk) = self.peers.snapshot_chunk_bytes() {
            self.send_snapshot_chunk(st, peer, chunk.max(1));
            return;
        }
        let mut args = InstallSnapshotArgs {
            term: st.term,
            leader: self.me,
            last_included_index: st.log.base_index(),
            last_included_term: st.log.base_term(),
            data: Vec::new(),
        };
        let snapshot = st.snapshot.clone();
        let p = &mut st.peers[peer];
        p.seq += 1;
        p.inflight = Some((p.seq, Instant::now()));
        p.outstanding += 1;
        p.dirty = false;
        let seq = p.seq;
        log::debug!(target: "raft::snapshot", "raft-{} t{}: snapshot through {} to {peer}", self.me, st.term, args.last_included_index);
        let core = self.clone();
        let term = st.term;
        let index = args.last_included_index;
        st.guard.leader_sends = true;
        st.outbox.push(Box::new(move || {
            let c = core.clone();
            // The bytes are copied for the message here, outside the lock.
            match snapshot.read_all() {
                Ok(data) => args.data = data,
                Err(e) => {
                    log::error!(target: "raft::snapshot", "raft-{} cannot read its snapshot to send it: {e}", core.me);
                    return c.on_snapshot_reply(peer, term, seq, index, None);
                }
            }
            core.peers.install_snapshot(
                peer,
                args,
                Box::new(move |r| c.on_snapshot_reply(peer, term, seq, index, r)),
            )
        }));
    }

    /// Sends `peer` the next piece of our snapshot (Raft Figure 13): from the offset it last
    /// asked for, or from the start if the snapshot changed since. The piece is read from the
    /// storage outside the lock. At most [`MAX_CHUNKS_IN_FLIGHT`] pieces are out at once.
    fn send_snapshot_chunk(self: &Arc<Core>, st: &mut State, peer: usize, chunk: usize) {
        if st.peers[peer].chunks_out >= MAX_CHUNKS_IN_FLIGHT {
            st.peers[peer].dirty = true;
            return;
        }
        if st.peers[peer].snap_offset == 0 || st.peers[peer].snap_send.is_none() {
            // (Re)start with the snapshot held now, read from the storage's file if it has
            // one: a transfer never pins the bytes in memory.
            if let SnapshotData::Mem(_) = st.snapshot
                && let Some(src) = self.storage.snapshot_source()
                && src.index() == st.log.base_index()
                && src.term() == st.log.base_term()
            {
                st.snapshot = SnapshotData::Stored(src);
            }
            let snap = (st.log.base_index(), st.log.base_term(), st.snapshot.clone());
            let config = st.configs.as_ref().map(|cs| cs.base.1.clone());
            let p = &mut st.peers[peer];
            p.snap_send = Some(snap);
            p.snap_config = config;
            p.snap_offset = 0;
        }
        let p = &mut st.peers[peer];
        let (index, last_term, snapshot) = p.snap_send.clone().expect("a transfer under way");
        let config = p.snap_config.clone();
        let total = snapshot.len();
        let offset = p.snap_offset.min(total);
        p.seq += 1;
        p.inflight = Some((p.seq, Instant::now()));
        p.outstanding += 1;
        p.chunks_out += 1;
        p.dirty = false;
        let seq = p.seq;
        log::trace!(target: "raft::snapshot", "raft-{} t{}: snapshot through {index}, bytes {offset}.. of {total} to {peer}", self.me, st.term);
        let core = self.clone();
        let term = st.term;
        let me = self.me;
        st.guard.leader_sends = true;
        st.outbox.push(Box::new(move || {
            let c = core.clone();
            let data = match snapshot.read(offset, chunk) {
                Ok(d) => d,
                Err(e) => {
                    log::error!(target: "raft::snapshot", "raft-{me} cannot read its snapshot to send it: {e}");
                    return c.on_chunk_reply(peer, term, seq, index, total, None);
                }
            };
            let done = offset + data.len() as u64 >= total;
            let args = InstallSnapshotChunkArgs {
                term,
                leader: me,
                last_included_index: index,
                last_included_term: last_term,
                offset,
                total,
                crc: if done { snapshot.crc() } else { 0 },
                data,
                done,
            };
            core.peers.install_snapshot_chunk_with_config(
                peer,
                args,
                config,
                Box::new(move |r| c.on_chunk_reply(peer, term, seq, index, total, r)),
            )
        }));
    }

    fn on_chunk_reply(
        self: &Arc<Core>,
        peer: usize,
        term: u64,
        seq: u64,
        index: u64,
        total: u64,
        r: Option<InstallSnapshotChunkReply>,
    ) {
        let mut st = self.lock_state();
        if self.is_dead() {
            return;
        }
        let p = &mut st.peers[peer];
        p.chunks_out = p.chunks_out.saturating_sub(1);
        let Some(reply) = self.leader_reply(&mut st, peer, term, seq, r, "snapshot piece") else {
            return;
        };
        let p = &mut st.peers[peer];
        if reply.done {
            if index > p.match_index {
                p.match_index = index;
                p.match_seq = p.seq;
            }
            p.next_index = p.next_index.max(index + 1);
            p.snap_send = None;
            p.snap_offset = 0;
            log::debug!(target: "raft::snapshot", "raft-{} t{}: {peer} holds the snapshot through {index}", self.me, st.term);
            self.advance_commit(&mut st);
        } else if p.snap_send.as_ref().is_some_and(|s| s.0 == index) {
            p.snap_offset = reply.next_offset.min(total);
            if p.snap_offset == 0 {
                // Starting over: with the newest snapshot.
                p.snap_send = None;
            }
        }
        let p = &st.peers[peer];
        if p.dirty || p.next_index <= st.log.last_index() || p.next_index <= st.log.base_index() {
            self.send_append(&mut st, peer);
        }
    }

    /// Handles one piece of a streamed snapshot: checks the leader's term (as any RPC does,
    /// resetting the election timer, so a long transfer does not start an election), hands the
    /// piece to the storage outside the lock, and once the storage says the snapshot is
    /// complete and checked, installs it as [`install_snapshot`](Core::install_snapshot) does.
    /// The reply leaves only once the installation is durable.
    pub(crate) fn install_snapshot_chunk(
        &self,
        args: InstallSnapshotChunkArgs,
        config: Option<super::membership::Configuration>,
    ) -> Option<InstallSnapshotChunkReply> {
        let index = args.last_included_index;
        let reply = |term, next_offset, done| InstallSnapshotChunkReply {
            term,
            next_offset,
            done,
        };
        if let Err(why) = check::snapshot(&args, self.me, self.peers.len()) {
            self.refused("InstallSnapshotChunk", args.leader, &why);
            return None;
        }
        let term = {
            let mut st = self.lock_for("InstallSnapshotChunk", args.leader, args.term)?;
            if args.term < st.term {
                return Some(reply(st.term, 0, false));
            }
            if self.step_down(&mut st, args.term) {
                self.persist(&mut st);
            }
            self.reset_election_timer(&mut st);
            st.leader_contact = Some(Instant::now());
            if index <= st.commit_index {
                // "Held": the leader counts this peer through `index`.
                self.vouch_held_through(&mut st, index);
                return self.reply_if_alive(reply(st.term, args.total, true));
            }
            if index == u64::MAX {
                // No log reaches it; the next index would not exist.
                log::warn!(target: "raft::snapshot", "raft-{} t{}: snapshot chunk through index {index} from {} refused", self.me, st.term, args.leader);
                return self.reply_if_alive(reply(st.term, 0, false));
            }
            st.term
        };
        let chunk = SnapshotChunk {
            leader: args.leader,
            index,
            term: args.last_included_term,
            offset: args.offset,
            total: args.total,
            crc: args.crc,
            data: &args.data,
            done: args.done,
        };
        let src = match self.storage.receive_snapshot_chunk(chunk) {
            Ok(ChunkOutcome::Next(next)) => return self.reply_if_alive(reply(term, next, false)),
            Ok(ChunkOutcome::Complete(src)) => src,
            Ok(ChunkOutcome::Busy | ChunkOutcome::Refused) => return None,
            Err(e) => {
                let mut st = self.state.lock();
                self.storage_failed(&mut st, "snapshot chunk", &e);
                return None;
            }
        };
        // Complete, and its length and checksum are the sender's: now the service's check,
        // before it replaces anything. A refused snapshot is never installed, its file goes,
        // and the sender gets no answer (as for a refused whole InstallSnapshot).
        if let Err(why) = self.check_received(&src) {
            self.storage.discard_received_snapshot(&src);
            if let Some(why) = why {
                self.refused("InstallSnapshotChunk", args.leader, &why);
            }
            return None;
        }
        if let Some(host) = self.peers.membership() {
            // The configuration as of the snapshot is durable before the snapshot is.
            let Some(c) = config.as_ref().filter(|c| c.check().is_ok()) else {
                log::warn!(target: "raft::membership", "raft-{}: a snapshot through {index} from {} came without a valid configuration; not installed", self.me, args.leader);
                // Its file goes: a received snapshot left waiting would turn every repeat of
                // it away (`ChunkOutcome::Busy`) for good.
                self.storage.discard_received_snapshot(&src);
                return self.reply_if_alive(reply(term, 0, false));
            };
            if let Err(e) = host.save(index, c) {
                let mut st = self.state.lock();
                self.config_save_failed(&mut st, &e);
                return None;
            }
        }
        let out = self.install_received(term, args.leader, src, config);
        self.notify_room();
        out.and_then(|r| self.reply_if_alive(r))
    }

    /// The service's check of a snapshot assembled from pieces, read back from the storage a
    /// piece at a time, outside the lock. `Err(Some(_))`: the service refuses it;
    /// `Err(None)`: it could not be read back (the peer stops, as on any storage error).
    fn check_received(&self, src: &Arc<dyn SnapshotSource>) -> Result<(), Option<Refusal>> {
        let Some(validator) = self.validator() else {
            return Ok(());
        };
        let mut reader = SnapshotReader::new(&**src);
        let verdict = validator.check_snapshot_stream(&mut reader, src.len());
        if let Some(e) = reader.take_error() {
            let mut st = self.state.lock();
            self.storage_failed(&mut st, "read back a received snapshot", &e);
            return Err(None);
        }
        verdict.map_err(|reason| {
            Some(Refusal::Snapshot {
                reason: format!(
                    "{reason} (streamed, through index {}, {} bytes)",
                    src.index(),
                    src.len()
                ),
            })
        })
    }

    /// Installs a received snapshot that passed the service's check; every path that does
    /// not install it discards it, so no temporary file outlives the call.
    fn install_received(
        &self,
        term: u64,
        leader: usize,
        src: Arc<dyn SnapshotSource>,
        config: Option<super::membership::Configuration>,
    ) -> Option<InstallSnapshotChunkReply> {
        let (index, total) = (src.index(), src.len());
        let mut st = self.lock_state();
        if self.is_dead() {
            self.storage.discard_received_snapshot(&src);
            return None;
        }
        if st.term != term {
            self.storage.discard_received_snapshot(&src);
            return Some(InstallSnapshotChunkReply {
                term: st.term,
                next_offset: 0,
                done: false,
            });
        }
        if index <= st.commit_index {
            self.storage.discard_received_snapshot(&src);
            self.vouch_held_through(&mut st, index);
            return Some(InstallSnapshotChunkReply {
                term,
                next_offset: total,
                done: true,
            });
        }
        match self.storage.install_received_snapshot(&src) {
            Ok(()) => {
                // Queued outside `persist`: the answer ("done") leaves only once it is
                // durable. Entries past what is committed may not survive it.
                st.guard.queued = true;
                let commit = st.commit_index;
                self.log_rewritten(&mut st, commit);
            }
            Err(StorageError::Invalid { reason }) => {
                self.storage.discard_received_snapshot(&src);
                log::warn!(target: "raft::snapshot", "raft-{} t{term}: received snapshot through {index} not installed: {reason}", self.me);
                return Some(InstallSnapshotChunkReply {
                    term,
                    next_offset: 0,
                    done: false,
                });
            }
            Err(e) => {
                self.storage_failed(&mut st, "install snapshot", &e);
                return None;
            }
        }
        let kept = st.log.term_at(index) == Some(src.term());
        if kept {
            st.log.compact_to(index);
        } else {
            st.log.reset_to(index, src.term());
        }
        if let (Some(cs), Some(c)) = (st.configs.as_mut(), config) {
            if !kept {
                cs.log.clear();
            }
            cs.log.retain(|(i, _)| *i > index);
            cs.base = (index, c);
            cs.saved = index;
        }
        self.announce_config(&mut st);
        st.snapshot = SnapshotData::Stored(src);
        st.commit_index = index;
        st.snapshot_pending = true;
        log::info!(target: "raft::snapshot", "raft-{} t{term}: installed snapshot through {index} ({total} bytes, streamed) from {leader}", self.me);
        self.applier_cv.notify_all();
        Some(InstallSnapshotChunkReply {
            term,
            next_offset: total,
            done: true,
        })
    }

    fn on_snapshot_reply(
        self: &Arc<Core>,
        peer: usize,
        term: u64,
        seq: u64,
        index: u64,
        r: Option<InstallSnapshotReply>,
    ) {
        let mut st = self.lock_state();
        if self.is_dead() {
            return;
        }
        if self
            .leader_reply(&mut st, peer, term, seq, r, "snapshot")
            .is_none()
        {
            return;
        }
        let p = &mut st.peers[peer];
        if index > p.match_index {
            p.match_index = index;
            p.match_seq = p.seq;
        }
        p.next_index = p.next_index.max(index + 1);
        self.advance_commit(&mut st);
        let p = &st.peers[peer];
        if p.dirty || p.next_index <= st.log.last_index() {
            self.send_append(&mut st, peer);
        }
    }

    /// Handles an InstallSnapshot: adopt the leader's snapshot unless we already have
    /// everything it covers committed.
    /// A dead peer answers nothing; the reply leaves only once the snapshot is durable.
    pub(crate) fn install_snapshot(
        &self,
        args: InstallSnapshotArgs,
    ) -> Option<InstallSnapshotReply> {
        // Before the lock and before anything changes (see `append_entries`).
        let checked = check::snapshot(&args, self.me, self.peers.len()).and_then(|()| {
            match self.validator() {
                Some(v) => v
                    .check_snapshot(&args.data)
                    .map_err(|reason| Refusal::Snapshot { reason }),
                None => Ok(()),
            }
        });
        if let Err(why) = checked {
            self.refused("InstallSnapshot", args.leader, &why);
            return None;
        }
        let reply = self.install_snapshot_synced(args)?;
        self.adopt_stored_snapshot();
        self.notify_room();
        self.reply_if_alive(reply)
    }

    fn install_snapshot_synced(&self, args: InstallSnapshotArgs) -> Option<InstallSnapshotReply> {
        let mut st = self.lock_for("InstallSnapshot", args.leader, args.term)?;
        if args.term < st.term {
            return Some(InstallSnapshotReply { term: st.term });
        }
        if self.step_down(&mut st, args.term) {
            self.persist(&mut st);
        }
        self.reset_election_timer(&mut st);
        st.leader_contact = Some(Instant::now());
        let index = args.last_included_index;
        if index <= st.commit_index {
            self.vouch_held_through(&mut st, index);
            return self.reply_if_alive(InstallSnapshotReply { term: st.term });
        }
        if st.configs.is_some() {
            // A whole snapshot carries no configuration: with membership on, snapshots come
            // in pieces with it (`install_snapshot_chunk`).
            log::warn!(target: "raft::membership", "raft-{} t{}: a whole snapshot through {index} from {} refused: membership needs the streamed form", self.me, st.term, args.leader);
            return None;
        }
        // Entries past what is committed may not survive the installation.
        let commit = st.commit_index;
        self.log_rewritten(&mut st, commit);
        if st.log.term_at(index) == Some(args.last_included_term) {
            // Our log extends the snapshot consistently: keep what follows it.
            st.log.compact_to(index);
        } else {
            st.log.reset_to(index, args.last_included_term);
        }
        st.snapshot = SnapshotData::Mem(Arc::new(args.data));
        st.commit_index = index;
        st.snapshot_pending = true;
        self.persist_snapshot(&mut st);
        log::info!(target: "raft::snapshot", "raft-{} t{}: installed snapshot through {index} from {}", self.me, st.term, args.leader);
        self.applier_cv.notify_all();
        self.reply_if_alive(InstallSnapshotReply { term: st.term })
    }
}
