//! Snapshots: the service's (log compaction) and the leader's (InstallSnapshot). Raft §7.

use std::sync::Arc;
use std::time::Instant;

use super::rpc::{InstallSnapshotArgs, InstallSnapshotReply};
use super::state::{Core, Role, State};

impl Core {
    /// The service holds a snapshot through `index`: discard the log up to it.
    pub(crate) fn snapshot(&self, index: u64, data: Vec<u8>) {
        self.compact(index, data);
        // Durable now: a follower at its log limit may take entries again.
        self.notify_room();
    }

    fn compact(&self, index: u64, data: Vec<u8>) {
        let mut st = self.lock_state();
        if self.is_dead() {
            return;
        }
        // Only a prefix the service has been given can be replaced by its snapshot.
        if index <= st.log.base_index() || index > st.last_applied {
            log::debug!(target: "raft::snapshot", "raft-{} t{}: snapshot at {index} ignored (log base {}, applied {})", self.me, st.term, st.log.base_index(), st.last_applied);
            return;
        }
        st.log.compact_to(index);
        st.snapshot = data;
        self.persist_snapshot(&mut st);
        log::debug!(target: "raft::snapshot", "raft-{} t{}: snapshot through {index}, log ({index}..={}]", self.me, st.term, st.log.last_index());
    }

    /// Sends `peer` our snapshot: it needs entries we no longer have.
    pub(super) fn send_snapshot(self: &Arc<Core>, st: &mut State, peer: usize) {
        let args = InstallSnapshotArgs {
            term: st.term,
            leader: self.me,
            last_included_index: st.log.base_index(),
            last_included_term: st.log.base_term(),
            data: st.snapshot.clone(),
        };
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
        st.outbox.push(Box::new(move || {
            let c = core.clone();
            core.peers.install_snapshot(
                peer,
                args,
                Box::new(move |r| c.on_snapshot_reply(peer, term, seq, index, r)),
            )
        }));
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
        let Some(reply) = st.peers[peer].call_returned(seq, r) else {
            return;
        };
        if reply.term > st.term {
            if self.step_down(&mut st, reply.term) {
                self.persist(&mut st);
            }
            return;
        }
        if st.role != Role::Leader || st.term != term {
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
        let reply = self.install_snapshot_synced(args)?;
        self.notify_room();
        self.reply_if_alive(reply)
    }

    fn install_snapshot_synced(&self, args: InstallSnapshotArgs) -> Option<InstallSnapshotReply> {
        let mut st = self.lock_state();
        if self.is_dead() {
            return None;
        }
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
            return self.reply_if_alive(InstallSnapshotReply { term: st.term });
        }
        if st.log.term_at(index) == Some(args.last_included_term) {
            // Our log extends the snapshot consistently: keep what follows it.
            st.log.compact_to(index);
        } else {
            st.log.reset_to(index, args.last_included_term);
        }
        st.snapshot = args.data;
        st.commit_index = index;
        st.snapshot_pending = true;
        self.persist_snapshot(&mut st);
        log::info!(target: "raft::snapshot", "raft-{} t{}: installed snapshot through {index} from {}", self.me, st.term, args.leader);
        self.applier_cv.notify_all();
        self.reply_if_alive(InstallSnapshotReply { term: st.term })
    }
}
