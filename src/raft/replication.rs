//! Log replication and commitment. Raft §5.3 and §5.4.2.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::check::{self, MAX_TERM};
use super::log::Entry;
use super::rpc::{
    AppendEntriesArgs, AppendEntriesReply, InstallSnapshotChunkReply, InstallSnapshotReply,
};
use super::state::{Core, MAX_OUTSTANDING, Role, State};

/// The most entries one AppendEntries carries, so a far-behind follower catches up in
/// bounded messages.
const MAX_ENTRIES_PER_APPEND: usize = 512;
/// An AppendEntries carries entries of at most about this many command bytes (at least one
/// entry), so its message stays far below a transport's frame limit however large the
/// entries are.
const MAX_APPEND_BYTES: usize = 8 << 20;
/// How long a follower at its log limit holds an AppendEntries waiting for room. Well under
/// the leader's [`INFLIGHT_STALE`](super::state::INFLIGHT_STALE), so the call is not given up.
const ROOM_WAIT: Duration = Duration::from_millis(30);
/// Per-entry bytes a persisted entry takes beyond its command (term, length), roughly.
const ENTRY_OVERHEAD: usize = 16;

/// The term a reply to a leader's call carries.
pub(super) trait ReplyTerm {
    fn term(&self) -> u64;
}

impl ReplyTerm for AppendEntriesReply {
    fn term(&self) -> u64 {
        self.term
    }
}

impl ReplyTerm for InstallSnapshotReply {
    fn term(&self) -> u64 {
        self.term
    }
}

impl ReplyTerm for InstallSnapshotChunkReply {
    fn term(&self) -> u64 {
        self.term
    }
}

impl Core {
    pub(crate) fn start(self: &Arc<Core>, command: Vec<u8>) -> (u64, u64, bool) {
        let mut st = self.lock_state();
        if self.is_dead() || st.role != Role::Leader {
            return (0, st.term, false);
        }
        if st.configs.is_some() && super::membership::is_config_entry(&command) {
            // The first byte marks configuration entries (see `membership.rs`).
            log::error!(target: "raft::membership", "raft-{} t{}: a command starting with the configuration tag refused", self.me, st.term);
            return (0, st.term, false);
        }
        let term = st.term;
        let entry = Entry { term, command };
        let index = st.log.append(entry.clone());
        self.persist_own_append(&mut st, index, std::slice::from_ref(&entry));
        if self.is_dead() {
            return (0, term, false); // could not be saved
        }
        log::debug!(target: "raft::append", "raft-{} t{term}: start at {index}", self.me);
        // Replicate now rather than at the next heartbeat.
        self.broadcast_append(&mut st);
        (index, term, true)
    }

    /// What the term of `peer`'s reply to one of this peer's calls means: `true` when the
    /// reply must go no further, because its term is out of range (ignored and logged, as no
    /// peer could have answered so) or newer than ours (it deposes this peer, which steps
    /// down and persists the term).
    pub(super) fn reply_term_ends_it(
        &self,
        st: &mut State,
        peer: usize,
        reply_term: u64,
        what: &str,
    ) -> bool {
        if reply_term > MAX_TERM || check::term_jump(reply_term, st.term).is_err() {
            log::warn!(target: "raft::check", "raft-{} t{}: ignored a {what} reply from peer {peer}: term {reply_term} out of range", self.me, st.term);
            return true;
        }
        if reply_term > st.term {
            if self.step_down(st, reply_term) {
                self.persist(st);
            }
            return true;
        }
        false
    }

    /// A leader's reply from `peer` to its call numbered `seq`, sent as leader of `term`, if
    /// it still counts: not lost (the next heartbeat retries), not sent to a former
    /// incarnation of the peer or to a removed one, its term not ending the call's purpose
    /// ([`reply_term_ends_it`](Self::reply_term_ends_it)), and this peer still leader of
    /// `term` (the stale-role guard).
    pub(super) fn leader_reply<R: ReplyTerm>(
        &self,
        st: &mut State,
        peer: usize,
        term: u64,
        seq: u64,
        r: Option<R>,
        what: &str,
    ) -> Option<R> {
        let reply = st.peers[peer].call_returned(seq, r)?;
        if seq <= st.peers[peer].reset_seq || !self.knows(st, peer) {
            return None; // sent to a former incarnation of this peer, or to a removed one
        }
        if self.reply_term_ends_it(st, peer, reply.term(), what) {
            return None;
        }
        if st.role != Role::Leader || st.term != term {
            return None;
        }
        Some(reply)
    }

    /// Sends each follower what it lacks (or a heartbeat).
    pub(super) fn broadcast_append(self: &Arc<Core>, st: &mut State) {
        for peer in self.others(st) {
            self.send_append(st, peer);
        }
        self.advance_commit(st); // a one-peer cluster commits on its own
    }

    /// Sends `peer` an AppendEntries (or the snapshot, if it needs entries we discarded),
    /// unless one is already in flight and recent: then the reply triggers the next send. A
    /// peer whose last calls failed or went unanswered gets an empty probe instead, at a
    /// backed-off rate, until it answers: nothing big is queued towards a peer that is not
    /// listening.
    pub(super) fn send_append(self: &Arc<Core>, st: &mut State, peer: usize) {
        if self.is_dead() || st.role != Role::Leader {
            return;
        }
        let now = Instant::now();
        let base = st.log.base_index();
        let p = &mut st.peers[peer];
        if let Some((_, sent)) = p.inflight {
            if now.duration_since(sent) < p.stale_after() {
                p.dirty = true;
                return;
            }
            p.unanswered = p.unanswered.saturating_add(1);
            p.inflight = None;
        }
        if p.outstanding >= MAX_OUTSTANDING {
            log::debug!(target: "raft::append", "raft-{} t{}: {} calls to {peer} still out (limit); not sending", self.me, st.term, p.outstanding);
            p.dirty = true;
            return;
        }
        let probe = p.unanswered > 0;
        if !probe && p.next_index <= base {
            self.send_snapshot(st, peer);
            return;
        }
        let p = &st.peers[peer];
        let prev_log_index = (p.next_index - 1).max(base);
        let Some(prev_log_term) = st.log.term_at(prev_log_index) else {
            debug_assert!(false, "raft-{} no term at {prev_log_index}", self.me);
            return;
        };
        let mut entries = if probe {
            &[][..]
        } else {
            st.log.entries_from(prev_log_index + 1)
        };
        if entries.len() > MAX_ENTRIES_PER_APPEND {
            entries = &entries[..MAX_ENTRIES_PER_APPEND];
        }
        let mut bytes = 0usize;
        if let Some(n) = entries.iter().position(|e| {
            bytes = bytes.saturating_add(e.command.len());
            bytes > MAX_APPEND_BYTES
        }) {
            entries = &entries[..n.max(1)];
        }
        let args = AppendEntriesArgs {
            term: st.term,
            leader: self.me,
            prev_log_index,
            prev_log_term,
            entries: entries.to_vec(),
            leader_commit: st.commit_index,
        };
        let p = &mut st.peers[peer];
        p.seq += 1;
        p.inflight = Some((p.seq, now));
        p.outstanding += 1;
        // A probe carries nothing: what was pending is still to send once the peer answers.
        p.dirty = probe;
        let seq = p.seq;
        let n = args.entries.len() as u64;
        log::trace!(target: "raft::append", "raft-{} t{}: append [{}..={}] to {peer}, commit {}", self.me, st.term, prev_log_index + 1, prev_log_index + n, st.commit_index);
        let core = self.clone();
        let term = st.term;
        // Reads registered up to now are confirmed by this call's answer (ReadIndex).
        let round = st.read_round;
        st.guard.leader_sends = true;
        st.outbox.push(Box::new(move || {
            let c = core.clone();
            core.peers.append_entries(
                peer,
                args,
                Box::new(move |r| c.on_append_reply(peer, term, seq, round, prev_log_index, n, r)),
            )
        }));
    }

    #[allow(clippy::too_many_arguments)]
    fn on_append_reply(
        self: &Arc<Core>,
        peer: usize,
        term: u64,
        seq: u64,
        round: u64,
        prev_log_index: u64,
        n: u64,
        r: Option<AppendEntriesReply>,
    ) {
        let mut st = self.lock_state();
        if self.is_dead() {
            return;
        }
        // Nothing this does needs a sync unless it queues something (a newer term).
        st.guard.leader_sends = true;
        let Some(reply) = self.leader_reply(&mut st, peer, term, seq, r, "append") else {
            return;
        };
        // Any answer in our term, success or not, shows the peer still takes us as leader.
        if reply.term == term {
            let p = &mut st.peers[peer];
            p.acked_round = p.acked_round.max(round);
            self.confirm_reads(&mut st);
        }
        let last = st.log.last_index();
        let p = &mut st.peers[peer];
        let old_next = p.next_index;
        if reply.success {
            // The follower may have taken only part of what was sent (its log limit), and may
            // hold durably less than it took (its sync had not run when it answered): it is
            // counted for what is durable, and sent what it does not hold.
            let held = reply.held_index.min(prev_log_index + n);
            let matched = reply.match_index.min(held);
            if matched > p.match_index {
                p.match_index = matched;
                p.match_seq = p.seq;
            }
            p.next_index = p.next_index.max(held + 1);
            log::trace!(target: "raft::append", "raft-{} t{term}: append to {peer} ok, match {}", self.me, p.match_index);
            self.advance_commit(&mut st);
        } else {
            // Fast backup: skip the follower's whole conflicting term, or to the end of its
            // log if it is short.
            let next = match reply.conflict_term {
                Some(t) => match st.log.last_index_of_term(t) {
                    Some(i) => i + 1,
                    None => reply.conflict_index,
                },
                None => reply.conflict_index,
            };
            let me = self.me;
            let p = &mut st.peers[peer];
            if reply.conflict_term.is_none()
                && reply.conflict_index <= p.match_index
                && seq > p.match_seq
            {
                // Its log ends before what it acknowledged holding: it lost its state (a
                // wiped or replaced disk). Start again from what it has, or it would be
                // asked forever for an index it can no longer match.
                log::error!(target: "raft::append", "raft-{me} t{term}: peer {peer} answers with a log ending at {} but had acknowledged up to {}: it lost its state (wiped or replaced disk?)", reply.conflict_index.saturating_sub(1), p.match_index);
                p.match_index = reply.conflict_index.saturating_sub(1);
            }
            // A stale rejection must not move next_index below what is known to match.
            p.next_index = next.clamp(p.match_index + 1, last + 1);
            log::debug!(target: "raft::append", "raft-{} t{term}: append to {peer} rejected at {}, next {}", self.me, prev_log_index, p.next_index);
        }
        let p = &st.peers[peer];
        // After a rejection, resend at once only if it taught us something (next_index moved
        // back); otherwise the next heartbeat retries, so a confused or stale peer cannot
        // drive a storm of calls.
        let resend = if reply.success {
            p.dirty || p.next_index <= st.log.last_index()
        } else {
            p.next_index < old_next
        };
        if resend {
            self.send_append(&mut st, peer);
        }
    }

    /// Commits the highest index stored on a majority, if it is of the current term
    /// (Raft §5.4.2: earlier terms' entries commit only indirectly). The leader counts for
    /// what it has made durable, not for what its log holds (§10.2.1: its AppendEntries may
    /// leave before its own write).
    pub(super) fn advance_commit(&self, st: &mut State) {
        if st.role != Role::Leader {
            return;
        }
        // The voters of the current configuration: a leader being removed replicates but
        // does not count itself (Raft dissertation §4.2.2).
        let Some(n) = self.majority_value(st, st.own_durable, |p| p.match_index) else {
            return;
        };
        if n > st.commit_index && st.log.term_at(n) == Some(st.term) {
            log::debug!(target: "raft::append", "raft-{} t{}: commit {} -> {n}", self.me, st.term, st.commit_index);
            st.commit_index = n;
            self.applier_cv.notify_all();
            self.step_down_if_removed(st);
        }
    }

    /// Handles an AppendEntries (Raft Figure 2, receiver rules 1–5). A dead peer answers
    /// nothing and changes nothing; the reply leaves only once what it changed is durable.
    ///
    /// A follower whose persisted state has reached the service's log limit takes only what
    /// fits, and then waits up to [`ROOM_WAIT`] for a snapshot to make room before it takes
    /// the rest and answers. The leader resends as soon as the answer arrives, so a follower
    /// whose service lags paces its leader (about one call per [`ROOM_WAIT`]) instead of
    /// piling up entries it cannot trim.
    pub(crate) fn append_entries(&self, args: AppendEntriesArgs) -> Option<AppendEntriesReply> {
        // Before the lock and before anything changes: a refused message adopts no term,
        // resets no timer and persists nothing.
        let membership = self.peers.membership().is_some();
        let checked = check::append_entries(&args, self.me, self.peers.len()).and_then(|()| {
            match self.validator() {
                Some(v) => check::entries(&args, &*v, membership),
                None if membership => check::entries(&args, &check::AcceptAll, true),
                None => Ok(()),
            }
        });
        if let Err(why) = checked {
            self.refused("AppendEntries", args.leader, &why);
            return None;
        }
        let (mut reply, trimmed) = self.append_entries_synced(&args)?;
        if trimmed && self.wait_for_room(ROOM_WAIT) {
            reply = self.append_entries_synced(&args)?.0;
        }
        // Stopped meanwhile, perhaps because the entries could not be saved: no answer.
        self.reply_if_alive(reply)
    }

    /// Waits up to `timeout` for the persisted state to drop below the log limit. Returns
    /// whether it did (false also when the peer is dead).
    fn wait_for_room(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        loop {
            if self.is_dead() {
                return false;
            }
            if self.storage.state_size() < self.log_limit.load(Ordering::Relaxed) {
                return true;
            }
            if self.room_cv.wait_until(&mut st, deadline).timed_out() {
                return !self.is_dead()
                    && self.storage.state_size() < self.log_limit.load(Ordering::Relaxed);
            }
        }
    }

    /// Wakes handlers waiting for room; called once a snapshot is durable. Without a limit
    /// nobody waits, and the snapshot path takes no extra lock.
    pub(super) fn notify_room(&self) {
        if self.log_limit.load(Ordering::Relaxed) != 0 {
            self.wake_room();
        }
    }

    /// Wakes every handler waiting for room, to re-check. Under the state lock, so a handler
    /// between its check and its wait cannot miss it.
    pub(super) fn wake_room(&self) {
        let _st = self.state.lock();
        self.room_cv.notify_all();
    }

    /// Handles the request; what it changed is durable when this returns. Also says whether
    /// entries were left out because the log is at its limit.
    fn append_entries_synced(
        &self,
        args: &AppendEntriesArgs,
    ) -> Option<(AppendEntriesReply, bool)> {
        let mut st = self.lock_for("AppendEntries", args.leader, args.term)?;
        let mut reply = AppendEntriesReply {
            term: st.term,
            success: false,
            conflict_term: None,
            conflict_index: 0,
            match_index: 0,
            held_index: 0,
        };
        if args.term < st.term {
            return Some((reply, false));
        }
        if self.step_down(&mut st, args.term) {
            self.persist(&mut st);
        }
        reply.term = st.term;
        self.reset_election_timer(&mut st);
        st.leader_contact = Some(Instant::now());
        st.leader_id = Some(args.leader);

        let base = st.log.base_index();
        let mut prev = args.prev_log_index;
        let mut entries: &[Entry] = &args.entries;
        if prev < base {
            // The start is inside our snapshot, hence committed and equal: skip that part.
            let skip = (base - prev) as usize;
            if skip >= entries.len() {
                reply.success = true;
                reply.held_index = args.prev_log_index + args.entries.len() as u64;
                reply.match_index = reply.held_index.min(self.acked_limit(&st));
                return Some((reply, false));
            }
            entries = &entries[skip..];
            prev = base;
        } else if prev > st.log.last_index() {
            reply.conflict_index = st.log.last_index() + 1;
            return Some((reply, false));
        } else if prev > base && st.log.term_at(prev) != Some(args.prev_log_term) {
            // (At `base` itself the terms agree: both sides hold it committed.)
            let t = st.log.term_at(prev).unwrap_or(0);
            reply.conflict_term = Some(t);
            reply.conflict_index = st.log.first_index_of_term(t, prev);
            return Some((reply, false));
        }
        let trimmed = self.fit_to_limit(&st, prev, &mut entries);

        // Append what is new; truncate only on a real conflict, so that a delayed, shorter
        // AppendEntries cannot erase entries a newer one added.
        for (i, e) in entries.iter().enumerate() {
            let index = prev + 1 + i as u64;
            match st.log.term_at(index) {
                Some(t) if t == e.term => continue,
                Some(_) => {
                    debug_assert!(
                        index > st.commit_index,
                        "raft-{} t{}: truncating committed index {index} (commit {})",
                        self.me,
                        st.term,
                        st.commit_index
                    );
                    st.log.truncate_after(index - 1);
                    self.persist_truncate(&mut st, index - 1);
                    if let Some(cs) = st.configs.as_mut() {
                        cs.truncate_after(index - 1);
                    }
                }
                None => {}
            }
            for e in &entries[i..] {
                st.log.append(e.clone());
            }
            self.persist_append(&mut st, index, &entries[i..]);
            self.note_config_entries(&mut st, index, &entries[i..]);
            break;
        }
        // Announced whether the log grew or was cut (a truncated configuration is undone).
        self.announce_config(&mut st);
        if self.is_dead() {
            return None; // entries not saved must not be acknowledged
        }
        let last_new = prev + entries.len() as u64;
        if args.leader_commit > st.commit_index {
            let commit = args.leader_commit.min(last_new);
            if commit > st.commit_index {
                log::debug!(target: "raft::append", "raft-{} t{}: commit {} -> {commit} (leader {})", self.me, st.term, st.commit_index, args.leader);
                st.commit_index = commit;
                self.applier_cv.notify_all();
            }
        }
        // What this answer may acknowledge: all it holds if it syncs before it leaves,
        // otherwise what is durable already (it waits for no sync it did not queue).
        let acked = self.acked_limit(&st);
        if st.commit_index.min(acked) >= args.leader_commit && !self.voter.load(Ordering::SeqCst) {
            // It now holds everything the leader had committed when it sent this.
            log::info!(target: "raft::election", "raft-{} t{}: caught up with leader {} (commit {}); voting from now on", self.me, st.term, args.leader, st.commit_index);
            self.voter.store(true, Ordering::SeqCst);
        }
        reply.success = true;
        reply.held_index = last_new;
        reply.match_index = last_new.min(acked);
        Some((reply, trimmed))
    }

    /// Cuts `entries` (which follow `prev`) so that what is new in them takes the persisted
    /// state at most one entry past the log limit; always keeps the first new entry while the
    /// state is under the limit. Cuts nothing when the service has been handed every entry
    /// this peer holds: only its snapshot could make room, and it has had its chance.
    /// Returns whether it cut anything.
    fn fit_to_limit(&self, st: &State, prev: u64, entries: &mut &[Entry]) -> bool {
        let limit = self.log_limit.load(Ordering::Relaxed);
        if limit == 0 || st.log.last_index() <= st.last_applied {
            return false;
        }
        let last = st.log.last_index();
        let mut size = self.storage.state_size();
        for (i, e) in entries.iter().enumerate() {
            if prev + 1 + i as u64 <= last {
                continue; // held already (or a conflict, replaced by as much)
            }
            if size >= limit {
                log::debug!(target: "raft::append", "raft-{} t{}: log at its limit ({size} >= {limit} bytes): took {i} of {} entries after {prev}", self.me, st.term, entries.len());
                *entries = &entries[..i];
                return true;
            }
            size += e.command.len() + ENTRY_OVERHEAD;
        }
        false
    }

    /// `reply`, unless this peer died while handling the call (its state could not be saved).
    pub(super) fn reply_if_alive<R>(&self, reply: R) -> Option<R> {
        (!self.is_dead()).then_some(reply)
    }
}
