//! Leader election. Raft §5.2 and §5.4.1.

use std::sync::Arc;
use std::time::Instant;

use super::rpc::{RequestVoteArgs, RequestVoteReply};
use super::state::{Core, Role, State};

impl Core {
    /// Becomes candidate for the next term and asks every peer for its vote.
    pub(super) fn start_election(self: &Arc<Core>, st: &mut State) {
        st.term += 1;
        st.role = Role::Candidate;
        st.voted_for = Some(self.me);
        st.votes.clear();
        st.votes.insert(self.me);
        self.reset_election_timer(st);
        self.persist(st);
        if self.is_dead() {
            return; // the vote for itself could not be saved
        }
        log::debug!(target: "raft::election", "raft-{} t{}: candidate, log ..={} (t{})", self.me, st.term, st.log.last_index(), st.log.last_term());
        if st.votes.len() >= self.majority() {
            self.become_leader(st);
            return;
        }
        let args = RequestVoteArgs {
            term: st.term,
            candidate: self.me,
            last_log_index: st.log.last_index(),
            last_log_term: st.log.last_term(),
        };
        for peer in (0..self.peers.len()).filter(|&p| p != self.me) {
            let core = self.clone();
            let term = st.term;
            let args = args.clone();
            st.outbox.push(Box::new(move || {
                let c = core.clone();
                core.peers.request_vote(
                    peer,
                    args,
                    Box::new(move |r| c.on_vote_reply(peer, term, r)),
                )
            }));
        }
    }

    fn on_vote_reply(self: &Arc<Core>, peer: usize, term: u64, r: Option<RequestVoteReply>) {
        let Some(reply) = r else { return };
        let mut st = self.lock_state();
        if self.is_dead() {
            return;
        }
        if reply.term > st.term {
            if self.step_down(&mut st, reply.term) {
                self.persist(&mut st);
            }
            return;
        }
        // Stale-role guard: the world may have moved on while the call was out.
        if st.role != Role::Candidate || st.term != term || !reply.vote_granted {
            return;
        }
        if !st.votes.insert(peer) {
            return; // a duplicated reply
        }
        log::debug!(target: "raft::election", "raft-{} t{}: vote from {peer}, {} of {}", self.me, st.term, st.votes.len(), self.majority());
        if st.votes.len() >= self.majority() {
            self.become_leader(&mut st);
        }
    }

    fn become_leader(self: &Arc<Core>, st: &mut State) {
        st.role = Role::Leader;
        let next = st.log.last_index() + 1;
        for p in st.peers.iter_mut() {
            p.next_index = next;
            p.match_index = 0;
            p.inflight = None;
            p.dirty = false;
        }
        log::info!(target: "raft::election", "raft-{} t{}: leader, log ..={}", self.me, st.term, st.log.last_index());
        // Assert authority at once rather than at the next tick.
        st.heartbeat_due = Instant::now() + super::state::HEARTBEAT_INTERVAL;
        self.broadcast_append(st);
        self.ticker_cv.notify_all();
    }

    /// Handles a RequestVote: grant at most one vote per term, and only to a candidate whose
    /// log is at least as up-to-date as ours (Raft §5.4.1). A dead peer answers nothing and
    /// changes nothing; the reply leaves only once the vote is durable.
    pub(crate) fn request_vote(&self, args: RequestVoteArgs) -> Option<RequestVoteReply> {
        let reply = self.request_vote_synced(args)?;
        // Stopped meanwhile, perhaps because the vote could not be saved: no answer.
        self.reply_if_alive(reply)
    }

    /// Decides on the vote; the decision is durable when this returns.
    fn request_vote_synced(&self, args: RequestVoteArgs) -> Option<RequestVoteReply> {
        let mut st = self.lock_state();
        if self.is_dead() {
            return None;
        }
        let mut changed = false;
        if args.term > st.term {
            changed = self.step_down(&mut st, args.term);
        }
        let up_to_date =
            (args.last_log_term, args.last_log_index) >= (st.log.last_term(), st.log.last_index());
        let granted =
            args.term == st.term && st.voted_for.is_none_or(|v| v == args.candidate) && up_to_date;
        if granted {
            if st.voted_for.is_none() {
                changed = true;
            }
            st.voted_for = Some(args.candidate);
            self.reset_election_timer(&mut st);
        }
        if changed {
            self.persist(&mut st);
            if self.is_dead() {
                return None; // not saved: a vote that is not durable must not be given
            }
        }
        log::debug!(target: "raft::election", "raft-{} t{}: vote for {} (t{} log ..={} t{}): {}", self.me, st.term, args.candidate, args.term, args.last_log_index, args.last_log_term, if granted { "granted" } else { "refused" });
        Some(RequestVoteReply {
            term: st.term,
            vote_granted: granted,
        })
    }
}
