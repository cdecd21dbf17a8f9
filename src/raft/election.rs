//! Leader election. Raft §5.2 and §5.4.1, with pre-vote (Raft dissertation §9.6).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::check::{self, MAX_TERM};
use super::rpc::{RequestVoteArgs, RequestVoteReply};
use super::state::{Core, ELECTION_TIMEOUT_MIN_MS, Role, State};

/// A peer that heard from a leader this recently refuses pre-votes (leader stickiness).
const LEADER_STICKINESS: Duration = Duration::from_millis(ELECTION_TIMEOUT_MIN_MS);

impl Core {
    /// The election timer fired: ask every peer whether it would vote for us in the next term,
    /// without changing our own term (Raft dissertation §9.6). Only a majority of yeses starts
    /// a real election, so a peer that was cut off, or merely starved of CPU long enough to
    /// miss heartbeats, cannot depose a working leader by bumping the term.
    pub(super) fn start_pre_vote(self: &Arc<Core>, st: &mut State) {
        let Some(next_term) = next_term(st.term) else {
            log::error!(target: "raft::election", "raft-{} t{}: at the largest term, cannot stand", self.me, st.term);
            self.reset_election_timer(st);
            return;
        };
        st.role = Role::PreCandidate;
        st.votes.clear();
        st.votes.insert(self.me);
        self.reset_election_timer(st);
        log::debug!(target: "raft::election", "raft-{} t{}: pre-candidate, log ..={} (t{})", self.me, st.term, st.log.last_index(), st.log.last_term());
        if self.won(st) {
            self.start_election(st);
            return;
        }
        self.request_votes(st, next_term, true);
    }

    /// Queues RequestVote (or a pre-vote) for `term` to every other peer; they leave once the
    /// state guard is dropped (after any storage sync).
    fn request_votes(self: &Arc<Core>, st: &mut State, term: u64, pre_vote: bool) {
        let args = RequestVoteArgs {
            term,
            candidate: self.me,
            last_log_index: st.log.last_index(),
            last_log_term: st.log.last_term(),
            pre_vote,
        };
        let sent_in = st.term;
        // Only voters' answers count: learners are not asked.
        for peer in self.voters(st).into_iter().filter(|&p| p != self.me) {
            let core = self.clone();
            let args = args.clone();
            st.outbox.push(Box::new(move || {
                let c = core.clone();
                core.peers.request_vote(
                    peer,
                    args,
                    Box::new(move |r| c.on_vote_reply(peer, sent_in, pre_vote, r)),
                )
            }));
        }
    }

    /// Becomes candidate for the next term and asks every peer for its vote.
    pub(super) fn start_election(self: &Arc<Core>, st: &mut State) {
        let Some(next_term) = next_term(st.term) else {
            log::error!(target: "raft::election", "raft-{} t{}: at the largest term, cannot stand", self.me, st.term);
            self.reset_election_timer(st);
            return;
        };
        st.term = next_term;
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
        if self.won(st) {
            self.become_leader(st);
            return;
        }
        self.request_votes(st, st.term, false);
    }

    /// A (pre-)vote reply for the campaign started in our term `term`.
    fn on_vote_reply(
        self: &Arc<Core>,
        peer: usize,
        term: u64,
        pre_vote: bool,
        r: Option<RequestVoteReply>,
    ) {
        let Some(reply) = r else { return };
        let mut st = self.lock_state();
        if self.is_dead() {
            return;
        }
        if self.reply_term_ends_it(&mut st, peer, reply.term, "vote") {
            return;
        }
        // Stale-role guard: the world may have moved on while the call was out.
        let campaigning = if pre_vote {
            Role::PreCandidate
        } else {
            Role::Candidate
        };
        if st.role != campaigning || st.term != term || !reply.vote_granted {
            return;
        }
        if !st.votes.insert(peer) {
            return; // a duplicated reply
        }
        log::debug!(target: "raft::election", "raft-{} t{}: {} from {peer}, {} in all", self.me, st.term, if pre_vote { "pre-vote" } else { "vote" }, st.votes.len());
        if self.won(&st) {
            if pre_vote {
                self.start_election(&mut st);
            } else {
                self.become_leader(&mut st);
            }
        }
    }

    /// Whether the (pre-)votes gathered are a majority of this peer's voters (only voters'
    /// votes count; a duplicated reply counts once).
    fn won(&self, st: &State) -> bool {
        let voters = self.voters(st);
        let got = voters.iter().filter(|p| st.votes.contains(p)).count();
        got >= Self::quorum(&voters)
    }

    fn become_leader(self: &Arc<Core>, st: &mut State) {
        st.role = Role::Leader;
        st.leader_id = Some(self.me);
        // It counts itself for its log once a sync has shown it durable: this guard's own
        // (everything it holds was queued before it).
        st.own_durable = 0;
        st.guard.queued = true;
        let next = st.log.last_index() + 1;
        for p in st.peers.iter_mut() {
            // CheckQuorum counts from the start of this leadership.
            p.start_over(next);
        }
        log::info!(target: "raft::election", "raft-{} t{}: leader, log ..={}", self.me, st.term, st.log.last_index());
        // Membership on and no configuration entry yet (a new cluster, or one older than
        // membership changes): record the configuration in the log, so a peer added later
        // learns it from there.
        self.record_initial_configuration(st);
        // Assert authority at once rather than at the next tick.
        st.heartbeat_due = Instant::now() + super::state::HEARTBEAT_INTERVAL;
        self.broadcast_append(st);
        self.ticker_cv.notify_all();
    }

    /// Handles a RequestVote: grant at most one vote per term, and only to a candidate whose
    /// log is at least as up-to-date as ours (Raft §5.4.1). A dead peer answers nothing and
    /// changes nothing; the reply leaves only once the vote is durable.
    pub(crate) fn request_vote(&self, args: RequestVoteArgs) -> Option<RequestVoteReply> {
        if let Err(why) = check::request_vote(&args, self.me, self.peers.len()) {
            self.refused("RequestVote", args.candidate, &why);
            return None;
        }
        let reply = self.request_vote_synced(args)?;
        // Stopped meanwhile, perhaps because the vote could not be saved: no answer.
        self.reply_if_alive(reply)
    }

    /// Decides on the vote; the decision is durable when this returns.
    fn request_vote_synced(&self, args: RequestVoteArgs) -> Option<RequestVoteReply> {
        let mut st = self.lock_for("RequestVote", args.candidate, args.term)?;
        if !self.voter.load(std::sync::atomic::Ordering::SeqCst) {
            // A peer that joined on an empty directory votes only once it holds what its
            // leader had committed: with less, its vote could elect a leader missing
            // committed entries. It changes nothing, not even its term.
            log::debug!(target: "raft::election", "raft-{} t{}: {}vote for {} refused: not a voter yet", self.me, st.term, if args.pre_vote { "pre-" } else { "" }, args.candidate);
            return Some(RequestVoteReply {
                term: st.term,
                vote_granted: false,
            });
        }
        if !self.in_voters(&st) || !self.knows(&st, args.candidate) {
            // Raft dissertation §4.2.3: a peer that is not a voter of this peer's
            // configuration (removed, or not yet added) cannot disrupt it, and a peer that is
            // not a voter itself has no vote to give. Nothing changes, not even the term.
            log::debug!(target: "raft::election", "raft-{} t{}: {}vote for {} refused: {}", self.me, st.term, if args.pre_vote { "pre-" } else { "" }, args.candidate, if self.in_voters(&st) { "not a member" } else { "not a voter here" });
            return Some(RequestVoteReply {
                term: st.term,
                vote_granted: false,
            });
        }
        if args.pre_vote {
            return Some(self.pre_vote(&st, &args));
        }
        if self.vote_stickiness && args.term > st.term && self.leader_alive(&st) {
            // Raft dissertation §4.2.3: a server that heard from a leader within the minimum
            // election timeout neither adopts the term nor votes. A candidate that passed
            // pre-vote found a majority not hearing from the leader, so this stops only a
            // disruptive (or rogue) peer from deposing a working leader.
            log::debug!(target: "raft::election", "raft-{} t{}: vote for {} at t{}: ignored, leader alive", self.me, st.term, args.candidate, args.term);
            return Some(RequestVoteReply {
                term: st.term,
                vote_granted: false,
            });
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
        if granted {
            // A vote given again (a repeated request) vouches for a vote another thread may
            // still be syncing: it too leaves only once that is durable. A refusal vouches
            // for nothing and waits for no sync (its term is durable, see `StateGuard`).
            st.guard.queued = true;
        }
        log::debug!(target: "raft::election", "raft-{} t{}: vote for {} (t{} log ..={} t{}): {}", self.me, st.term, args.candidate, args.term, args.last_log_index, args.last_log_term, if granted { "granted" } else { "refused" });
        Some(RequestVoteReply {
            term: st.term,
            vote_granted: granted,
        })
    }

    /// Whether a leader is known to be working: this peer leads and a majority (itself
    /// included) answered it within the minimum election timeout, or it heard from a leader
    /// of its term that recently. It then refuses (pre-)votes for a newer term.
    fn leader_alive(&self, st: &State) -> bool {
        if st.role == Role::Leader {
            let voters = self.voters(st);
            let answered = voters
                .iter()
                .filter(|&&p| {
                    p == self.me
                        || st.peers[p]
                            .last_answer
                            .is_some_and(|t| t.elapsed() < LEADER_STICKINESS)
                })
                .count();
            return answered >= Self::quorum(&voters);
        }
        st.leader_contact
            .is_some_and(|t| t.elapsed() < LEADER_STICKINESS)
    }

    /// Answers a pre-vote: yes if a vote at `args.term` could be granted now — the term is
    /// ahead of ours, the candidate's log is at least as up-to-date, and we have not heard
    /// from a leader lately (and are not one). Changes nothing.
    fn pre_vote(&self, st: &State, args: &RequestVoteArgs) -> RequestVoteReply {
        let up_to_date =
            (args.last_log_term, args.last_log_index) >= (st.log.last_term(), st.log.last_index());
        let leader_alive = self.leader_alive(st);
        let granted = args.term > st.term && up_to_date && !leader_alive;
        log::debug!(target: "raft::election", "raft-{} t{}: pre-vote for {} (t{} log ..={} t{}): {}", self.me, st.term, args.candidate, args.term, args.last_log_index, args.last_log_term, if granted { "granted" } else if leader_alive { "refused, leader alive" } else { "refused" });
        RequestVoteReply {
            term: st.term,
            vote_granted: granted,
        }
    }
}

/// The term after `term`, unless that is beyond [`MAX_TERM`].
fn next_term(term: u64) -> Option<u64> {
    term.checked_add(1).filter(|&t| t <= MAX_TERM)
}
