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
        st.votes = 1;
        self.reset_election_timer(st);
        self.persist(st);
        log::debug!(target: "raft::election", "raft-{} t{}: candidate, log ..={} (t{})", self.me, st.term, st.log.last_index(), st.log.last_term());
        if st.votes >= self.majority() {
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
        st.votes += 1;
        log::debug!(target: "raft::election", "raft-{} t{}: vote from {peer}, {} of {}", self.me, st.term, st.votes, self.majority());
        if st.votes >= self.majority() {
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
    /// log is at least as up-to-date as ours (Raft §5.4.1).
    pub(crate) fn request_vote(&self, args: RequestVoteArgs) -> RequestVoteReply {
        let reply = self.request_vote_synced(args);
        if self.is_dead() {
            // Stopped, perhaps because the vote could not be saved: grant nothing.
            return RequestVoteReply {
                term: reply.term,
                vote_granted: false,
            };
        }
        reply
    }

    /// Decides on the vote; the decision is durable when this returns.
    fn request_vote_synced(&self, args: RequestVoteArgs) -> RequestVoteReply {
        let mut st = self.lock_state();
        let mut changed = false;
        if args.term > st.term {
            changed = self.step_down(&mut st, args.term);
        }
        let up_to_date =
            (args.last_log_term, args.last_log_index) >= (st.log.last_term(), st.log.last_index());
        let granted = args.term == st.term
            && !self.is_dead()
            && st.voted_for.is_none_or(|v| v == args.candidate)
            && up_to_date;
        if granted {
            if st.voted_for.is_none() {
                changed = true;
            }
            st.voted_for = Some(args.candidate);
            self.reset_election_timer(&mut st);
        }
        if changed {
            self.persist(&mut st);
        }
        log::debug!(target: "raft::election", "raft-{} t{}: vote for {} (t{} log ..={} t{}): {}", self.me, st.term, args.candidate, args.term, args.last_log_index, args.last_log_term, if granted { "granted" } else { "refused" });
        RequestVoteReply {
            term: st.term,
            vote_granted: granted,
        }
    }
}
