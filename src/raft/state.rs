//! The state of one peer and the transitions every part shares (step down, become leader,
//! timers). One mutex guards all of it; [`StateGuard`] is how it is taken by every path that
//! changes what is persisted or sends a message.

use std::collections::BTreeSet;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender};
use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};
use rand::Rng;

use super::RaftError;
use super::RaftOptions;
use super::check::{self, MAX_INDEX, MAX_TERM, Refusal, Validator};
use super::log::Log;
use super::membership::{Configs, Configuration, MembershipHost};
use super::storage::{SnapshotData, Storage};
use super::transport::RaftTransport;

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
/// The most snapshot chunks to one peer whose outcome is still unknown: a chunk presumed lost
/// is sent again only within this bound, so a slow follower never has more than this many
/// chunks (and their buffers) queued towards it.
pub(super) const MAX_CHUNKS_IN_FLIGHT: usize = 2;
/// A ticker that wakes this much later than it asked was not scheduled for a while (an
/// overloaded machine, a stopped process): whatever the leader sent meanwhile has not been
/// handled yet either, so a follower gives it [`OVERSLEEP_GRACE`] before standing.
const OVERSLEEP: Duration = Duration::from_millis(50);
const OVERSLEEP_GRACE: Duration = Duration::from_millis(150);
/// A snapshot transfer to this peer with no piece for this long is abandoned: its temporary
/// file and buffers go (see [`Storage::expire_snapshot_transfer`]). A leader sends the next
/// piece as soon as one is answered and presumes a call lost after its 2 s timeout, so a
/// transfer this quiet has lost its sender (deposed, cut off, or one that stopped halfway on
/// purpose); the same snapshot sent again starts over.
pub(super) const SNAPSHOT_TRANSFER_IDLE: Duration = Duration::from_secs(10);
/// How often the ticker asks the storage to abandon idle transfers.
const TRANSFER_CHECK_EVERY: Duration = Duration::from_secs(1);
/// CheckQuorum (Raft dissertation §6.2): a leader that has not heard from a majority (itself
/// included) for this long steps down. One full election timeout: by then the followers it
/// lost may have elected another leader, and its clients are better served elsewhere.
pub(super) const CHECK_QUORUM_WINDOW: Duration = Duration::from_millis(ELECTION_TIMEOUT_MAX_MS);

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
    /// The last call sent when `match_index` was last raised: a call sent after that, whose
    /// answer shows a log ending before `match_index`, means the peer lost state (an answer
    /// to an earlier call may merely be late).
    pub match_seq: u64,
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
    /// The highest read round (see [`State::read_round`]) of a call this peer answered in
    /// the current term.
    pub acked_round: u64,
    /// When this peer last answered any call (CheckQuorum); reset when leadership begins.
    pub last_heard: Instant,
    /// A snapshot streamed in chunks: the snapshot being sent (index, term, data; kept until
    /// the transfer ends even if a newer one replaces it meanwhile, so a long transfer
    /// finishes), the offset the follower wants next, and the chunk calls out (at most
    /// [`MAX_CHUNKS_IN_FLIGHT`]).
    pub snap_send: Option<(u64, u64, super::storage::SnapshotData)>,
    pub snap_offset: u64,
    pub chunks_out: usize,
    /// When this peer last answered a call of this leader's term.
    pub last_answer: Option<Instant>,
    /// The configuration sent with the snapshot in `snap_send` (membership on).
    pub snap_config: Option<Configuration>,
    /// Answers to calls numbered at or below this are ignored: the peer was (re)added since
    /// they were sent, and a reply from its former incarnation says nothing of the new one.
    pub reset_seq: u64,
}

impl Progress {
    /// Starts the leader's view of this peer over: nothing known to match, entries from
    /// `next` on to send, nothing in flight, heard from now (CheckQuorum counts from here).
    pub(super) fn start_over(&mut self, next: u64) {
        self.next_index = next;
        self.match_index = 0;
        self.match_seq = 0;
        self.inflight = None;
        self.dirty = false;
        self.acked_round = 0;
        self.last_answer = None;
        self.last_heard = Instant::now();
    }

    /// Books the outcome of call `seq`: it is no longer outstanding, and a failure of the call
    /// in flight counts towards the backoff; any answer shows the peer is listening.
    pub(super) fn call_returned<R>(&mut self, seq: u64, r: Option<R>) -> Option<R> {
        self.outstanding = self.outstanding.saturating_sub(1);
        let current = self.inflight.is_some_and(|(s, _)| s == seq);
        if current {
            self.inflight = None;
        }
        match &r {
            Some(_) => {
                self.unanswered = 0;
                self.last_answer = Some(Instant::now());
                self.last_heard = Instant::now();
            }
            None if current => self.unanswered = self.unanswered.saturating_add(1),
            None => {}
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
    /// The service's snapshot covering the log through `log.base_index()`: in memory, or a
    /// handle on the storage's copy once that is durable (see `Core::adopt_stored_snapshot`).
    pub snapshot: SnapshotData,
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
    /// The leader of the current term, once heard from (or this peer, leading).
    pub leader_id: Option<usize>,
    pub peers: Vec<Progress>,
    /// Messages to send once the lock is released and the storage synced (see
    /// [`StateGuard`]).
    pub outbox: Vec<Box<dyn FnOnce() + Send>>,
    /// ReadIndex: each read request opens a new round; every AppendEntries carries the round
    /// current when it was sent, and its answer confirms the reads of that round and earlier.
    pub read_round: u64,
    /// Reads waiting for a majority to confirm their round (see `read.rs`).
    pub reads: Vec<super::read::PendingRead>,
    /// As leader: the last index of its log known durable on its own storage, which is what
    /// it counts itself for in the majority (Raft dissertation §10.2.1: it writes its log in
    /// parallel with replicating it). Set from 0 when it becomes leader, raised after each of
    /// its syncs; unused while not leading.
    pub own_durable: u64,
    /// The last index of the log, as it is now, known durable on this peer's storage: what
    /// an answer that leaves without a sync of its own may acknowledge (see
    /// [`Core::acked_limit`]). Lowered when the log is cut or replaced, raised after a sync
    /// that covered the log as it was then ([`Core::log_synced`]).
    pub durable: u64,
    /// Counts the changes that cut or replace entries of the log (a truncation, a snapshot
    /// from the leader), so a sync that began before one does not raise `durable` over
    /// entries written after it.
    pub log_epoch: u64,
    /// What the current holder of the lock did, for [`StateGuard`]'s drop (reset there).
    pub guard: GuardWork,
    /// The leader's own new entries waiting for `raft-<me>-syncer` to make them durable: the
    /// term it queued them in and the log's extent then (the latest such request; one sync
    /// begun after it covers every earlier one too).
    pub own_sync: Option<(u64, LogMark)>,
    /// The configurations (membership on, see `membership.rs`); `None`: the labs' fixed peer
    /// set, every peer a voter.
    pub configs: Option<Configs>,
}

/// What a [`StateGuard`]'s holder queued and sent, which decides the order of the sync and
/// the sends when it is dropped.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct GuardWork {
    /// A change other than a leader's own new entries was queued to the storage, or what is
    /// sent or answered vouches for something another thread queued (a vote given again, a
    /// snapshot said to be held): sync first, then send. Without it, and with the term
    /// durable, nothing waits for a sync: an answer then acknowledges only what is durable
    /// already (see [`Core::acked_limit`]).
    pub queued: bool,
    /// The leader queued its own new entries (`start`): they may leave in AppendEntries
    /// before its own sync, which `raft-<me>-syncer` runs after them, counting the leader
    /// for them once it is done; the caller of `start` does not wait for it.
    pub queued_own: bool,
    /// The leader queued AppendEntries or snapshot pieces, or handled an answer to one: they
    /// depend on nothing unsynced (its term is durable since its election, and what it sends
    /// of its log needs no durability of its own to be safe), so without anything queued
    /// they leave with no sync at all.
    pub leader_sends: bool,
}

pub(crate) struct Core {
    pub me: usize,
    pub peers: Box<dyn RaftTransport>,
    pub storage: Box<dyn Storage>,
    pub state: Mutex<State>,
    /// Wakes the ticker early (new leader, kill).
    pub ticker_cv: Condvar,
    /// Wakes the applier (commit advanced, snapshot installed, kill).
    pub applier_cv: Condvar,
    /// Wakes `raft-<me>-syncer` (the leader queued its own entries, kill).
    pub syncer_cv: Condvar,
    /// Wakes AppendEntries handlers waiting for the log to shrink below `log_limit`
    /// (a snapshot, kill). Notified with the state lock held, so no wake-up is lost.
    pub room_cv: Condvar,
    /// Persisted state size (bytes) past which a follower takes no more entries; 0: none.
    pub log_limit: AtomicUsize,
    pub dead: AtomicBool,
    /// The service's check of commands and snapshots from the leader (see `check.rs`).
    pub validator: RwLock<Option<Arc<dyn Validator>>>,
    /// Why a storage error stopped this peer (the first error), for the service to report.
    pub failure: Mutex<Option<String>>,
    /// Whether this peer may vote and campaign. A peer that starts without it (its node
    /// joined on an empty directory) only follows, until it holds everything its leader had
    /// committed when it last heard from it; then it votes like any other.
    pub voter: AtomicBool,
    /// CheckQuorum: a leader that has not heard from a majority within
    /// [`CHECK_QUORUM_WINDOW`] steps down.
    pub check_quorum: bool,
    /// See [`RaftOptions::vote_stickiness`](super::RaftOptions::vote_stickiness).
    pub vote_stickiness: bool,
    /// See [`RaftOptions::pre_vote`](super::RaftOptions::pre_vote).
    pub pre_vote: bool,
    /// The highest term known to be durable (synced), and the highest index the applier has
    /// delivered that is also durable here: what a service may record elsewhere as
    /// the least state this peer must find at its next start.
    pub synced_term: AtomicU64,
    pub delivered: AtomicU64,
    /// Dropped on kill, which wakes an applier blocked on the apply channel.
    kill_tx: Mutex<Option<Sender<()>>>,
}

pub(super) fn random_election_timeout() -> Duration {
    Duration::from_millis(
        rand::thread_rng().gen_range(ELECTION_TIMEOUT_MIN_MS..ELECTION_TIMEOUT_MAX_MS),
    )
}

impl Core {
    /// A peer restored from `storage`, and the receiver its applier watches for kill.
    pub(super) fn restore(
        peers: Box<dyn RaftTransport>,
        me: usize,
        storage: Box<dyn Storage>,
        options: RaftOptions,
    ) -> Result<(Core, Receiver<()>), RaftError> {
        let restored = storage.restore().map_err(|e| RaftError::CorruptState {
            peer: me,
            reason: e.to_string(),
        })?;
        let (term, voted_for) = (restored.hard_state.term, restored.hard_state.voted_for);
        let log = restored.log;
        // A storage that keeps the snapshot readable is read from when needed; otherwise Raft
        // holds the bytes.
        let snapshot = match storage.snapshot_source() {
            Some(src) if src.index() == log.base_index() && src.term() == log.base_term() => {
                SnapshotData::Stored(src)
            }
            _ => SnapshotData::Mem(std::sync::Arc::new(restored.snapshot)),
        };
        if log.last_term() > term {
            return Err(RaftError::CorruptState {
                peer: me,
                reason: format!(
                    "log holds term {} beyond current term {term}",
                    log.last_term()
                ),
            });
        }
        if term > MAX_TERM || log.last_index() > MAX_INDEX {
            return Err(RaftError::CorruptState {
                peer: me,
                reason: format!(
                    "term {term} or last index {} beyond the largest ({MAX_TERM})",
                    log.last_index()
                ),
            });
        }
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
            own_durable: 0,
            // Everything restored was read back from the storage.
            durable: log.last_index(),
            log_epoch: 0,
            guard: GuardWork::default(),
            own_sync: None,
            votes: BTreeSet::new(),
            leader_contact: None,
            leader_id: None,
            peers: vec![
                Progress {
                    next_index: log.last_index() + 1,
                    match_index: 0,
                    match_seq: 0,
                    inflight: None,
                    seq: 0,
                    unanswered: 0,
                    outstanding: 0,
                    dirty: false,
                    acked_round: 0,
                    last_heard: now,
                    snap_send: None,
                    snap_offset: 0,
                    chunks_out: 0,
                    last_answer: None,
                    snap_config: None,
                    reset_seq: 0,
                };
                n
            ],
            configs: None,
            log,
            outbox: Vec::new(),
            read_round: 0,
            reads: Vec::new(),
        };
        let mut state = state;
        if let Some(host) = peers.membership() {
            state.configs = Some(restore_configs(me, host, &state.log)?);
        }
        log::info!(target: "raft::persist", "raft-{me} t{term}: restored, log ({base}..={}], voted {voted_for:?}", state.log.last_index());
        if let (Some(host), Some(cs)) = (peers.membership(), state.configs.as_mut()) {
            log::info!(target: "raft::membership", "raft-{me}: configuration {} (entry {})", cs.current(), cs.current_index());
            host.changed_at(cs.current_index(), cs.current());
            cs.announced = Some((cs.current_index(), cs.current().clone()));
        }
        Ok((
            Core {
                me,
                peers,
                storage,
                state: Mutex::new(state),
                ticker_cv: Condvar::new(),
                applier_cv: Condvar::new(),
                syncer_cv: Condvar::new(),
                room_cv: Condvar::new(),
                log_limit: AtomicUsize::new(0),
                dead: AtomicBool::new(false),
                validator: RwLock::new(None),
                failure: Mutex::new(None),
                voter: AtomicBool::new(options.voter),
                check_quorum: options.check_quorum,
                vote_stickiness: options.vote_stickiness,
                pre_vote: options.pre_vote,
                synced_term: AtomicU64::new(term),
                delivered: AtomicU64::new(base),
                kill_tx: Mutex::new(Some(kill_tx)),
            },
            kill_rx,
        ))
    }

    /// Logs a message refused by `check.rs`, naming the peer it claims to come from.
    pub(super) fn refused(&self, what: &str, from: usize, why: &Refusal) {
        log::warn!(target: "raft::check", "raft-{}: refused {what} from peer {from}: {why}", self.me);
    }

    /// The validator, if the service gave one (cloned out: never held while checking).
    pub(super) fn validator(&self) -> Option<Arc<dyn Validator>> {
        self.validator.read().clone()
    }

    pub(super) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// The peers whose votes and acknowledgements count: every peer in the labs' Raft, the
    /// voters of the current configuration with membership on.
    pub(super) fn voters(&self, st: &State) -> Vec<usize> {
        match &st.configs {
            None => (0..self.peers.len()).collect(),
            Some(cs) => cs.current().voters().collect(),
        }
    }

    /// The peers a leader replicates to (itself excluded): the members of the current
    /// configuration and, while it is not committed, those of the one before, so a member
    /// being removed learns of its removal (its answers count for nothing).
    pub(super) fn others(&self, st: &State) -> Vec<usize> {
        match &st.configs {
            None => (0..self.peers.len()).filter(|&p| p != self.me).collect(),
            Some(cs) => {
                let mut to: Vec<usize> = cs.current().peers().filter(|&p| p != self.me).collect();
                if cs.current_index() > st.commit_index {
                    let (_, before) = cs.at(cs.current_index() - 1);
                    for p in before.peers() {
                        if p != self.me && !to.contains(&p) {
                            to.push(p);
                        }
                    }
                }
                to
            }
        }
    }

    /// How many of `voters` make a majority.
    pub(super) fn quorum(voters: &[usize]) -> usize {
        voters.len() / 2 + 1
    }

    /// The highest value a majority of the current voters has reached: this peer's is `own`,
    /// another's is `of_peer` of its progress. `None` when there are no voters. (What a
    /// leader commits, Raft §5.3, and which read round a majority confirmed, ReadIndex.)
    pub(super) fn majority_value(
        &self,
        st: &State,
        own: u64,
        of_peer: impl Fn(&Progress) -> u64,
    ) -> Option<u64> {
        let voters = self.voters(st);
        if voters.is_empty() {
            return None;
        }
        let mut values: Vec<u64> = voters
            .iter()
            .map(|&p| {
                if p == self.me {
                    own
                } else {
                    of_peer(&st.peers[p])
                }
            })
            .collect();
        values.sort_unstable_by(|a, b| b.cmp(a));
        Some(values[Self::quorum(&voters) - 1])
    }

    /// Whether this peer's own configuration counts it as a voter (always in the labs' Raft).
    pub(super) fn in_voters(&self, st: &State) -> bool {
        st.configs
            .as_ref()
            .is_none_or(|cs| cs.current().is_voter(self.me))
    }

    /// Whether a member told this peer it was removed by a committed configuration newer
    /// than its own (see [`MembershipHost::removed`](super::MembershipHost::removed)).
    pub(super) fn told_removed(&self) -> bool {
        self.peers
            .membership()
            .is_some_and(|host| host.removed().is_some())
    }

    /// Whether `peer` is in this peer's configuration (always in the labs' Raft).
    pub(super) fn knows(&self, st: &State, peer: usize) -> bool {
        st.configs
            .as_ref()
            .is_none_or(|cs| cs.current().member(peer).is_some())
    }

    pub(crate) fn get_state(&self) -> (u64, bool) {
        let st = self.state.lock();
        (st.term, st.role == Role::Leader)
    }

    pub(crate) fn kill(&self) {
        // Taking the lock makes sure no thread is between checking `dead` and waiting.
        let mut st = self.state.lock();
        self.stop_locked(&mut st);
    }

    /// Marks the peer dead and wakes everything that waits; the caller holds the lock.
    pub(super) fn stop_locked(&self, st: &mut State) {
        self.dead.store(true, Ordering::SeqCst);
        st.outbox.clear();
        st.reads.clear();
        self.wake_all_for_kill();
    }

    fn wake_all_for_kill(&self) {
        self.kill_tx.lock().take();
        self.ticker_cv.notify_all();
        self.applier_cv.notify_all();
        self.syncer_cv.notify_all();
        self.room_cv.notify_all();
    }

    /// Takes the state lock for a path that may change persisted state or send messages.
    pub(super) fn lock_state(&self) -> StateGuard<'_> {
        StateGuard {
            core: self,
            st: Some(self.state.lock()),
        }
    }

    /// Takes the state lock to handle a `what` from peer `from` carrying `msg_term`: `None`
    /// (no answer, nothing changed) when this peer is dead, or when the term is further ahead
    /// of its own than [`check::term_jump`](super::check::term_jump) allows (refusal logged).
    pub(super) fn lock_for(
        &self,
        what: &str,
        from: usize,
        msg_term: u64,
    ) -> Option<StateGuard<'_>> {
        let st = self.lock_state();
        if self.is_dead() {
            return None;
        }
        if let Err(why) = check::term_jump(msg_term, st.term) {
            self.refused(what, from, &why);
            return None;
        }
        Some(st)
    }

    /// A sync covered the log as it was at `mark` (its epoch and last index): what it held
    /// then is durable, unless it was cut or replaced since. As leader of `term` (`leading`),
    /// it now counts itself for that much too.
    pub(super) fn log_synced(&self, term: u64, leading: bool, mark: LogMark) {
        let mut st = self.state.lock();
        if self.is_dead() {
            return;
        }
        if st.log_epoch == mark.epoch && mark.last > st.durable {
            // Only appended to since: its first `mark.last` entries are the ones synced.
            st.durable = mark.last;
            // Entries delivered before they were durable here (see the applier) now are.
            self.delivered
                .fetch_max(st.last_applied.min(st.durable), Ordering::SeqCst);
        }
        if !leading || st.role != Role::Leader || st.term != term || mark.last <= st.own_durable {
            return;
        }
        // Still leader of the same term: its log only grew meanwhile, so its first `last`
        // entries are the ones the sync made durable.
        st.own_durable = mark.last;
        self.advance_commit(&mut st);
    }

    /// `raft-<me>-syncer`: makes a leader's own new entries durable after their
    /// AppendEntries left, then counts the leader for them ([`Core::log_synced`]), so that
    /// `start` returns without waiting for an fsync (Raft dissertation §10.2.1). What is
    /// queued while one sync runs is covered by the next (group commit). Ends on kill, or
    /// when a sync fails (which stops the peer).
    pub(super) fn run_syncer(&self) {
        loop {
            let (term, mark) = {
                let mut st = self.state.lock();
                loop {
                    if self.is_dead() {
                        return;
                    }
                    if let Some(want) = st.own_sync.take() {
                        break want;
                    }
                    self.syncer_cv.wait(&mut st);
                }
            };
            if !self.sync_storage() || self.is_dead() {
                return;
            }
            self.synced_term.fetch_max(term, Ordering::SeqCst);
            self.log_synced(term, true, mark);
        }
    }

    /// The highest index an answer built now may acknowledge: anything the log holds when
    /// this guard's holder syncs before the answer leaves (it queued a change, or its term is
    /// not yet known durable), and otherwise only what is known durable, so that an answer
    /// that queued nothing leaves at once, never waiting on a sync another thread queued (a
    /// snapshot of its own being written, another call's entries), and still vouches for
    /// nothing a crash could take back.
    pub(super) fn acked_limit(&self, st: &State) -> u64 {
        if st.guard.queued || st.term > self.synced_term.load(Ordering::SeqCst) {
            u64::MAX
        } else {
            st.durable
        }
    }

    /// What the answer being built says it holds through `index` of the log (a snapshot it
    /// has, or already covers): unless that much is known durable, it syncs before it leaves.
    pub(super) fn vouch_held_through(&self, st: &mut State, index: u64) {
        if index > st.durable {
            st.guard.queued = true;
        }
    }

    /// The log is about to be cut after `index`, or replaced by a snapshot that keeps at
    /// least its first `index` entries as they are: no sync that began before may raise
    /// `durable` beyond it.
    pub(super) fn log_rewritten(&self, st: &mut State, index: u64) {
        st.durable = st.durable.min(index);
        st.log_epoch += 1;
    }

    /// Makes everything queued in the storage durable; stops the peer if it cannot. Called
    /// without the lock.
    pub(super) fn sync_storage(&self) -> bool {
        match self.storage.sync() {
            Ok(()) => true,
            Err(e) => {
                let mut st = self.state.lock();
                self.storage_failed(&mut st, "sync", &e);
                false
            }
        }
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
            st.leader_id = None;
        }
        if st.role != Role::Follower {
            st.role = Role::Follower;
            // A deposed leader answers no read: dropping the waiters tells them so.
            st.reads.clear();
            // A deposed leader's election deadline is long past: without a fresh timeout it
            // would stand for election at once and disrupt the leader that replaced it.
            self.reset_election_timer(st);
            self.ticker_cv.notify_all();
        }
        changed
    }

    /// Whether a majority (this leader included) answered some call within the last
    /// [`CHECK_QUORUM_WINDOW`].
    fn quorum_heard(&self, st: &State, now: Instant) -> bool {
        let voters = self.voters(st);
        let heard = voters
            .iter()
            .filter(|&&p| {
                p == self.me
                    || now.saturating_duration_since(st.peers[p].last_heard) < CHECK_QUORUM_WINDOW
            })
            .count();
        heard >= Self::quorum(&voters)
    }

    /// CheckQuorum (Raft dissertation §6.2): this leader lost touch with a majority; it steps
    /// down in its term, so its clients and waiting writes go elsewhere instead of waiting on
    /// entries it cannot commit.
    fn step_down_no_quorum(&self, st: &mut State) {
        let silent: Vec<usize> = self
            .voters(st)
            .into_iter()
            .filter(|&p| p != self.me)
            .filter(|&p| st.peers[p].last_heard.elapsed() >= CHECK_QUORUM_WINDOW)
            .collect();
        log::warn!(target: "raft::election", "raft-{} t{}: no answer from peers {silent:?} within {CHECK_QUORUM_WINDOW:?}: a majority is out of reach; stepping down (CheckQuorum)", self.me, st.term);
        st.leader_contact = None;
        let term = st.term;
        self.step_down(st, term);
    }

    pub(super) fn reset_election_timer(&self, st: &mut State) {
        st.election_deadline = Instant::now() + random_election_timeout();
        st.election_grace_used = false;
    }

    /// Elections and heartbeats: sleeps until the next deadline (or a wake-up) and acts on it.
    pub(super) fn run_ticker(self: &Arc<Core>) {
        let mut transfers_checked = Instant::now();
        while !self.is_dead() {
            if transfers_checked.elapsed() >= TRANSFER_CHECK_EVERY {
                // Outside the lock: it may delete a file.
                transfers_checked = Instant::now();
                self.storage
                    .expire_snapshot_transfer(SNAPSHOT_TRANSFER_IDLE);
            }
            {
                // Released (storage synced, messages sent) before waiting.
                let mut st = self.lock_state();
                let now = Instant::now();
                if st.role == Role::Leader {
                    if self.check_quorum && !self.quorum_heard(&st, now) {
                        self.step_down_no_quorum(&mut st);
                    } else if now >= st.heartbeat_due {
                        st.heartbeat_due = now + HEARTBEAT_INTERVAL;
                        self.broadcast_append(&mut st);
                    }
                } else if now >= st.election_deadline {
                    if !self.voter.load(Ordering::SeqCst)
                        || !self.in_voters(&st)
                        || self.told_removed()
                    {
                        // Not a voter (yet, or any more, or told by a member that a committed
                        // configuration left it out, dissertation §4.2.3): it waits for a
                        // leader instead of standing.
                        self.reset_election_timer(&mut st);
                    } else if self.pre_vote {
                        self.start_pre_vote(&mut st);
                    } else {
                        self.start_election(&mut st);
                    }
                }
            }
            let mut st = self.state.lock();
            if self.is_dead() {
                break;
            }
            // Read again: whatever happened while the lock was free is in the state, so no
            // wake-up is missed.
            let next = if st.role == Role::Leader {
                st.heartbeat_due
            } else {
                st.election_deadline
            };
            if Instant::now() >= next {
                continue;
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

/// The log's extent at one moment: what a sync begun after it covers.
#[derive(Debug, Clone, Copy)]
pub(super) struct LogMark {
    epoch: u64,
    last: u64,
}

/// The state lock, for paths that change persisted state or send messages. While it is held,
/// changes are queued in the storage and messages in `State::outbox`; when it is dropped, the
/// lock is released first, then, if the holder queued anything (or its term is not yet known
/// durable), the storage is synced (covering everything queued so far, by any thread) and
/// only then are the messages sent. A holder that queued nothing sends at once: what it
/// answers acknowledges only what is known durable ([`Core::acked_limit`]), so it never
/// waits on another thread's sync. A peer that is dead by then sends nothing.
pub(super) struct StateGuard<'a> {
    core: &'a Core,
    st: Option<MutexGuard<'a, State>>,
}

impl Deref for StateGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.st.as_ref().expect("state guard used after release")
    }
}

impl DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.st.as_mut().expect("state guard used after release")
    }
}

impl Drop for StateGuard<'_> {
    /// Releases the lock, then syncs and sends in the order what was done requires:
    /// - anything queued but a leader's own new entries (a term, a vote, a follower's entries,
    ///   a snapshot), or a term not yet known durable: sync, then send (a handler's reply
    ///   leaves after this);
    /// - a leader's own new entries (its term durable): send the AppendEntries and hand the
    ///   sync to `raft-<me>-syncer`, which counts the leader for them once it is done (Raft
    ///   dissertation §10.2.1), so its fsync and its followers' overlap and `start` never
    ///   waits for it;
    /// - nothing queued (a leader's sends, a follower's answer to a heartbeat or to entries it
    ///   holds already, a refused vote): send, no sync. Such an answer acknowledges only what
    ///   is durable already ([`Core::acked_limit`]).
    ///
    /// After a sync it raises the durable index (and, as leader, its own durable index,
    /// advancing the commit index), under the lock taken again (never held across the sync).
    fn drop(&mut self) {
        let Some(mut st) = self.st.take() else {
            return;
        };
        let outbox = std::mem::take(&mut st.outbox);
        let work = std::mem::take(&mut st.guard);
        let term = st.term;
        // Everything up to here was queued before the sync below, by this thread or another.
        let leading = st.role == Role::Leader;
        let mark = LogMark {
            epoch: st.log_epoch,
            last: st.log.last_index(),
        };
        let raise = leading || mark.last > st.durable;
        // Only a leader's own new entries queued, its term durable: they leave now, and
        // the syncer makes them durable meanwhile.
        let own_only = !work.queued
            && work.queued_own
            && leading
            && term <= self.core.synced_term.load(Ordering::SeqCst);
        if own_only {
            st.own_sync = Some((term, mark));
        }
        drop(st);
        let core = self.core;
        if core.is_dead() {
            return;
        }
        let send = |outbox: Vec<Box<dyn FnOnce() + Send>>| {
            for send in outbox {
                send();
            }
        };
        if !work.queued
            && !work.queued_own
            && (work.leader_sends || term <= core.synced_term.load(Ordering::SeqCst))
        {
            // Nothing of its own to make durable, and its term is durable (a leader's since
            // its election): no answer or message waits for a sync, however long one that
            // another thread queued (a large snapshot) takes.
            send(outbox);
            return;
        }
        if own_only {
            send(outbox);
            core.syncer_cv.notify_one();
            return;
        }
        if !core.sync_storage() || core.is_dead() {
            return;
        }
        // Everything queued before the sync is durable, this term included.
        core.synced_term.fetch_max(term, Ordering::SeqCst);
        if raise {
            core.log_synced(term, leading, mark);
        }
        send(outbox);
    }
}

/// The configurations a membership-enabled peer restarts with: the host's saved one, then
/// every configuration entry of the log after it.
fn restore_configs(me: usize, host: &dyn MembershipHost, log: &Log) -> Result<Configs, RaftError> {
    let corrupt = |reason: String| RaftError::CorruptState { peer: me, reason };
    let base = host
        .load()
        .map_err(|e| corrupt(format!("saved configuration: {e}")))?;
    let saved = base.0;
    let mut cs = Configs {
        base,
        saved,
        ..Configs::default()
    };
    let from = (cs.base.0 + 1).max(log.base_index() + 1);
    for (e, index) in log.entries_from(from).iter().zip(from..) {
        if super::membership::is_config_entry(&e.command) {
            let c = Configuration::decode_entry(&e.command)
                .map_err(|why| corrupt(format!("configuration entry at {index}: {why}")))?;
            cs.log.push((index, c));
        }
    }
    Ok(cs)
}
