//! The state of one peer and the transitions every part shares (step down, become leader,
//! timers). One mutex guards all of it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender};
use parking_lot::{Condvar, Mutex};
use rand::Rng;

use super::RaftError;
use super::log::Log;
use crate::labrpc::{ClientEnd, RpcError};
use crate::tester::Persister;

/// A leader sends at most this many heartbeats a second per peer (the tester allows ten).
pub(super) const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// Election timeouts are drawn from this range: well above the heartbeat interval, so a
/// follower survives a few lost or late heartbeats (an overloaded machine delays them by
/// hundreds of milliseconds), and short enough to elect within the tester's five seconds even
/// after a split vote or two.
pub(super) const ELECTION_TIMEOUT_MIN_MS: u64 = 400;
pub(super) const ELECTION_TIMEOUT_MAX_MS: u64 = 700;
/// An AppendEntries unanswered for this long is presumed lost: another may be sent. Each
/// call in a row presumed lost or failed doubles it (per peer), up to [`INFLIGHT_STALE_MAX`],
/// which stays below the election timeout so a peer that comes back hears from the leader
/// before it stands.
pub(super) const INFLIGHT_STALE: Duration = Duration::from_millis(90);
pub(super) const INFLIGHT_STALE_MAX: Duration = Duration::from_millis(250);
/// The most calls to one peer whose outcome is still unknown. Calls to a cut-off peer can take
/// seconds to fail; each holds a network thread meanwhile.
pub(super) const MAX_OUTSTANDING: usize = 40;
/// A ticker that wakes this much later than it asked was not scheduled for a while (an
/// overloaded machine, a stopped process): whatever the leader sent meanwhile has not been
/// handled yet either, so a follower gives it [`OVERSLEEP_GRACE`] before standing.
const OVERSLEEP: Duration = Duration::from_millis(50);
const OVERSLEEP_GRACE: Duration = Duration::from_millis(150);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Follower,
    /// Asking for pre-votes, before it may bump the term (Raft dissertation §9.6).
    PreCandidate,
    Candidate,
    Leader,
}

/// What a leader knows about one follower.
#[derive(Debug, Clone)]
pub(super) struct Progress {
    pub next_index: u64,
    pub match_index: u64,
    /// The call in flight, if any: its sequence number and when it was sent.
    pub inflight: Option<(u64, Instant)>,
    pub seq: u64,
    /// Calls in a row that failed or were presumed lost; while non-zero the peer gets empty
    /// probes (no entries, no snapshot), spaced by [`Progress::stale_after`].
    pub unanswered: u32,
    /// Calls sent whose callback has not run yet (bounded by [`MAX_OUTSTANDING`]).
    pub outstanding: usize,
    /// Something new to send once the call in flight is answered.
    pub dirty: bool,
}

impl Progress {
    /// Books the outcome of call `seq`: it is no longer outstanding, and a failure of the call
    /// in flight counts towards the backoff; any answer shows the peer is listening.
    pub(super) fn call_returned<R>(
        &mut self,
        seq: u64,
        r: Result<R, RpcError>,
    ) -> Result<R, RpcError> {
        self.outstanding = self.outstanding.saturating_sub(1);
        let current = self.inflight.is_some_and(|(s, _)| s == seq);
        if current {
            self.inflight = None;
        }
        match &r {
            Ok(_) => self.unanswered = 0,
            Err(_) if current => self.unanswered = self.unanswered.saturating_add(1),
            Err(_) => {}
        }
        r
    }

    /// How long the call in flight may go unanswered before another is sent.
    pub(super) fn stale_after(&self) -> Duration {
        INFLIGHT_STALE
            .saturating_mul(1 << self.unanswered.min(8))
            .min(INFLIGHT_STALE_MAX)
    }
}

pub(super) struct State {
    // Persistent (Figure 2).
    pub term: u64,
    pub voted_for: Option<usize>,
    pub log: Log,
    /// The service's snapshot covering the log through `log.base_index()`.
    pub snapshot: Vec<u8>,
    // Volatile.
    pub role: Role,
    pub commit_index: u64,
    /// The last index handed to the applier (delivered or about to be).
    pub last_applied: u64,
    /// A snapshot installed from the leader that the applier has yet to deliver.
    pub snapshot_pending: bool,
    pub election_deadline: Instant,
    /// The overslept-ticker grace was given since the election timer was last reset.
    pub election_grace_used: bool,
    pub heartbeat_due: Instant,
    /// Peers that granted their (pre-)vote this campaign (a set: a duplicated reply counts
    /// once).
    pub votes: BTreeSet<usize>,
    /// When this peer last heard from a leader of its term; it refuses pre-votes for a while
    /// after, so a peer that merely missed some heartbeats cannot disrupt a working leader.
    pub leader_contact: Option<Instant>,
    pub peers: Vec<Progress>,
}

pub(crate) struct Core {
    pub me: usize,
    pub peers: Vec<ClientEnd>,
    pub persister: Persister,
    pub state: Mutex<State>,
    /// Wakes the ticker early (new leader, kill).
    pub ticker_cv: Condvar,
    /// Wakes the applier (commit advanced, snapshot installed, kill).
    pub applier_cv: Condvar,
    pub dead: AtomicBool,
    /// Dropped on kill, which wakes an applier blocked on the apply channel.
    kill_tx: Mutex<Option<Sender<()>>>,
}

pub(super) fn random_election_timeout() -> Duration {
    Duration::from_millis(
        rand::thread_rng().gen_range(ELECTION_TIMEOUT_MIN_MS..ELECTION_TIMEOUT_MAX_MS),
    )
}

impl Core {
    /// A peer restored from `persister`, and the receiver its applier watches for kill.
    pub(super) fn restore(
        peers: Vec<ClientEnd>,
        me: usize,
        persister: Persister,
    ) -> Result<(Core, Receiver<()>), RaftError> {
        let (term, voted_for, log) =
            super::persist::decode_state(me, &persister.read_raft_state())?;
        let snapshot = persister.read_snapshot();
        let n = peers.len();
        let now = Instant::now();
        let base = log.base_index();
        let (kill_tx, kill_rx) = channel::bounded(0);
        let state = State {
            term,
            voted_for,
            snapshot,
            role: Role::Follower,
            // The service restores the snapshot itself; delivery resumes just after it.
            commit_index: base,
            last_applied: base,
            snapshot_pending: false,
            election_deadline: now + random_election_timeout(),
            election_grace_used: false,
            heartbeat_due: now,
            votes: BTreeSet::new(),
            leader_contact: None,
            peers: vec![
                Progress {
                    next_index: log.last_index() + 1,
                    match_index: 0,
                    inflight: None,
                    seq: 0,
                    unanswered: 0,
                    outstanding: 0,
                    dirty: false,
                };
                n
            ],
            log,
        };
        log::info!(target: "raft::persist", "raft-{me} t{term}: restored, log ({base}..={}], voted {voted_for:?}", state.log.last_index());
        Ok((
            Core {
                me,
                peers,
                persister,
                state: Mutex::new(state),
                ticker_cv: Condvar::new(),
                applier_cv: Condvar::new(),
                dead: AtomicBool::new(false),
                kill_tx: Mutex::new(Some(kill_tx)),
            },
            kill_rx,
        ))
    }

    pub(super) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    pub(super) fn majority(&self) -> usize {
        self.peers.len() / 2 + 1
    }

    pub(crate) fn get_state(&self) -> (u64, bool) {
        let st = self.state.lock();
        (st.term, st.role == Role::Leader)
    }

    pub(crate) fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        // Take the lock so no thread is between checking `dead` and waiting.
        drop(self.state.lock());
        self.wake_all_for_kill();
    }

    /// Stops the peer from a thread that holds the state lock (`st`): it can no longer run
    /// correctly (its state could not be saved). The owner's `kill()` joins the threads.
    pub(super) fn fail_stop(&self, st: &State, reason: &str) {
        log::error!(target: "raft::persist", "raft-{} t{}: stopping: {reason}", self.me, st.term);
        self.dead.store(true, Ordering::SeqCst);
        self.wake_all_for_kill();
    }

    fn wake_all_for_kill(&self) {
        self.kill_tx.lock().take();
        self.ticker_cv.notify_all();
        self.applier_cv.notify_all();
    }

    /// Adopts a newer `term` seen in a message: forget the vote, become follower.
    /// Returns true if the persistent state changed. Raft §5.1.
    pub(super) fn step_down(&self, st: &mut State, term: u64) -> bool {
        debug_assert!(
            term >= st.term,
            "raft-{} term going back {} -> {term}",
            self.me,
            st.term
        );
        let changed = term > st.term;
        if changed {
            log::debug!(target: "raft::election", "raft-{} t{}: sees term {term}, follower", self.me, st.term);
            st.term = term;
            st.voted_for = None;
        }
        if st.role != Role::Follower {
            st.role = Role::Follower;
            // A deposed leader's election deadline is long past: without a fresh timeout it
            // would stand for election at once and disrupt the leader that replaced it.
            self.reset_election_timer(st);
            self.ticker_cv.notify_all();
        }
        changed
    }

    pub(super) fn reset_election_timer(&self, st: &mut State) {
        st.election_deadline = Instant::now() + random_election_timeout();
        st.election_grace_used = false;
    }

    /// Elections and heartbeats: sleeps until the next deadline (or a wake-up) and acts on it.
    pub(super) fn run_ticker(self: &std::sync::Arc<Core>) {
        let mut st = self.state.lock();
        while !self.is_dead() {
            let now = Instant::now();
            let next = if st.role == Role::Leader {
                if now >= st.heartbeat_due {
                    st.heartbeat_due = now + HEARTBEAT_INTERVAL;
                    self.broadcast_append(&mut st);
                }
                st.heartbeat_due
            } else {
                if now >= st.election_deadline {
                    self.start_pre_vote(&mut st);
                }
                st.election_deadline
            };
            if self.is_dead() {
                break;
            }
            // Waiting releases the lock.
            self.ticker_cv.wait_until(&mut st, next);
            let now = Instant::now();
            // Once per timeout: under sustained scheduling delay a follower must still stand.
            if st.role != Role::Leader
                && !st.election_grace_used
                && now.saturating_duration_since(next) > OVERSLEEP
            {
                let grace = now + OVERSLEEP_GRACE;
                if st.election_deadline < grace {
                    log::debug!(target: "raft::election", "raft-{} t{}: ticker woke {:?} late; election deferred", self.me, st.term, now - next);
                    st.election_deadline = grace;
                    st.election_grace_used = true;
                }
            }
        }
    }
}
