//! The client-facing side of a node: a [`resp::server::CommandHandler`] that runs Redis
//! commands through the replicated log, on this node if it leads, else forwarded to the node
//! that does (`Kv.Exec` on its peer port).
//!
//! Batching: the RESP event loop hands over the batches of every connection it served in one
//! turn in one [`CommandHandler::submit`] call, which only queues them (one request per
//! connection) and wakes a proposer; it never blocks. [`PROPOSERS`] threads
//! (`node<N>-propose<i>`) each take whatever is queued (requests of one kind, reads or writes,
//! up to [`MAX_BATCH_REQUESTS`] / [`MAX_BATCH_BYTES`]) and run it as **one** log entry — or,
//! for reads on the leader, one ReadIndex — here or forwarded in **one** `Kv.Exec`, then hand
//! each request's replies to its connection's [`Completion`] (the loop's completion queue,
//! woken once per burst). Under load, what arrives while a batch is on its way rides in the
//! next one, so a log entry, an fsync, an AppendEntries and a forward serve many clients.
//! A caller that wants to wait (a worker running `INFO`'s `DBSIZE`) uses
//! [`CommandHandler::handle_batch`], the same queue with a one-shot answer.
//!
//! Exactly-once: every batch that writes is tagged with a client slot `(client id, seq)` taken
//! from a pool for the batch's whole life, every retry (here or on another node) keeps the
//! same tag, and the state machine's session table applies a tag at most once. A slot goes
//! back to the pool with `seq + 1` once the batch has an answer or has been given up on, so
//! each id has at most one request outstanding, as the session table requires.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use super::machine::{KvCmd, KvMachine, KvOut, Outcome, Request};
use super::members::{AdminReply, Members};
use crate::kvapi::{LeaderHint, Limit, Step};
use crate::net::Service;
use crate::oneshot;
use crate::resp::Reply;
use crate::resp::server::{Batch, CommandHandler, Completion};
use crate::rsm::{ReadError, Rsm, SubmitError};

const LOG: &str = "node::front";

/// How long a command may look for a leader before the client gets an error.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(5);
/// One forwarded call's timeout (the leader answers once the entry commits).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// The pause after every node said "not leader" (an election is under way).
const NO_LEADER_PAUSE: Duration = Duration::from_millis(20);
/// Client slots kept for reuse; more may be live at once, the surplus is dropped on return.
const MAX_IDLE_SLOTS: usize = 4096;
/// Threads that take queued requests and run them as batches: up to this many batches are
/// on their way at once. Two let reads go while writes commit, and a batch form while the
/// previous one commits; more only make the batches smaller. Measured with 50 clients when
/// each client's request went through a worker thread, under load 30-60 (CPU time of the
/// three nodes per SET): 1 → 47-51 µs, 2 → 51-55 µs, 4 → 69-80 µs, 8 → 100-106 µs; SET/s
/// was best with 2. Since the event loop submits each turn's requests itself (batches form
/// in the queue while a batch commits), two runs of SET only, load 80-140: 1 → 43-45 µs
/// and 19,058-22,172 SET/s, 2 → 50-53 µs and 12,272-19,531 SET/s (GET alike); two stay
/// for workloads that mix reads and writes, which one thread would serialize. So at most
/// one batch of writes runs at a time (the other proposer takes reads meanwhile): the
/// writes of every client queue up behind it and go as one entry, as with one proposer.
/// SET -c 50 alone, three nodes' CPU per SET, runs alternating with two proposers taking
/// writes alike (load 6-7): 42-43 µs and 20,479-22,256 SET/s against 54-57 µs and
/// 17,064-17,825 SET/s. `scripts/bench-cluster.sh --only raftkv,redis -n 100000`, three
/// runs alternating with the code before (load 9-19): 45.8, 42.3, 44.7 µs per SET against
/// 49.1, 50.7, 45.9 µs.
pub const PROPOSERS: usize = 2;
/// The most requests in one batch (one log entry, one forward).
pub const MAX_BATCH_REQUESTS: usize = 1024;
/// Roughly the most bytes of keys and values in one batch (a single larger request still
/// goes, alone).
pub const MAX_BATCH_BYTES: usize = 1 << 20;

/// The largest log entry the node submits: the file log's command limit (a larger append
/// would stop the peer).
pub const MAX_ENTRY_BYTES: usize = crate::storage::record::MAX_COMMAND;

/// What `Kv.Exec` answers: one outcome per request of the batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ExecReply {
    Done(Vec<Outcome>),
    NotLeader,
    Stopped,
}

/// Why a command got no result.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Unavailable {
    /// No leader answered within the deadline; a write may or may not have applied.
    NoLeader {
        writes: bool,
    },
    /// This node has stopped.
    Stopped,
    /// The session table could not vouch for the request (evicted or stale).
    Session,
    Bad(String),
}

impl Unavailable {
    fn reply(&self) -> Reply {
        match self {
            Unavailable::NoLeader { writes: true } => Reply::Error(format!(
                "TRYAGAIN no leader answered within {}s; the write may or may not have been applied",
                COMMAND_DEADLINE.as_secs()
            )),
            Unavailable::NoLeader { writes: false } => Reply::Error(format!(
                "TRYAGAIN no leader answered within {}s",
                COMMAND_DEADLINE.as_secs()
            )),
            Unavailable::Stopped => Reply::Error("ERR node stopped".into()),
            Unavailable::Session => Reply::Error(
                "ERR session expired; the write may or may not have been applied".into(),
            ),
            Unavailable::Bad(e) => Reply::Error(format!("ERR internal: {e}")),
        }
    }
}

/// Runs a batch on this node: the handler of `Kv.Exec`, and the local path. A batch of reads
/// only is answered from the state machine after a ReadIndex (Raft thesis §6.4: leadership
/// confirmed by a heartbeat round, the state applied through the commit index seen then),
/// without a log entry; until this leader has committed an entry of its term, reads go
/// through the log like writes.
// The rsm's op is the batch itself (`Vec<Request>`), submitted by reference.
#[allow(clippy::ptr_arg)]
fn exec_local(rsm: &Rsm<KvMachine>, machine: &KvMachine, batch: &Vec<Request>) -> ExecReply {
    if !batch.is_empty() && batch.iter().all(Request::read_only) {
        match rsm.read_barrier() {
            Ok(()) => {
                return ExecReply::Done(batch.iter().map(|r| machine.read(&r.cmds)).collect());
            }
            Err(ReadError::NotReady) => {}
            Err(ReadError::NotLeader) => return ExecReply::NotLeader,
            Err(ReadError::Stopped) => return ExecReply::Stopped,
        }
    }
    let bad = |e: String| ExecReply::Done(vec![Outcome::Bad(e); batch.len()]);
    match rsm.submit(batch) {
        Ok(outcomes) if outcomes.len() == batch.len() => ExecReply::Done(outcomes),
        Ok(outcomes) => bad(format!(
            "{} outcomes for a batch of {}",
            outcomes.len(),
            batch.len()
        )),
        Err(SubmitError::WrongLeader) => ExecReply::NotLeader,
        Err(SubmitError::Stopped) => ExecReply::Stopped,
        // Refused before it reached the log (the rsm says why, in the log too).
        Err(e @ (SubmitError::Encode(_) | SubmitError::TooLarge { .. })) => bad(e.to_string()),
    }
}

/// The `Kv` service on the peer port: `Exec` runs a forwarded batch on this node only (it
/// never forwards again, so a request cannot loop).
pub fn kv_service(rsm: Arc<Rsm<KvMachine>>, machine: Arc<KvMachine>) -> Service {
    Service::new("Kv").method("Exec", move |batch: Vec<Request>| {
        exec_local(&rsm, &machine, &batch)
    })
}

type Answer = Result<Vec<KvOut>, Unavailable>;

/// One reply per command: the outputs, or the same error for each.
fn replies(answer: Answer, count: usize) -> Vec<Reply> {
    match answer {
        Ok(outs) if outs.len() == count => outs.into_iter().map(Reply::from).collect(),
        Ok(outs) => {
            let e = format!("ERR internal: {} results for {count} commands", outs.len());
            vec![Reply::Error(e); count]
        }
        Err(e) => vec![e.reply(); count],
    }
}

/// Where a request's answer goes: a connection of the event loop, or a waiting thread.
enum AnswerTo {
    Loop(Completion),
    Waiter(oneshot::Sender<Answer>),
}

/// A request's way back: its client slot, returned with `seq + 1` once the request has an
/// answer, and where the answer goes. Answers once, never blocks; dropped unanswered (a
/// proposer that panicked), it answers "node stopped", so no connection waits forever.
struct Answerer {
    slot: Option<(u64, u64)>,
    to: Option<AnswerTo>,
}

impl Answerer {
    fn send(mut self, shared: &Shared, answer: Answer) {
        if let Some((id, seq)) = self.slot.take() {
            // The request has an answer or has been given up on: the next one of this id is
            // a new request.
            shared.return_slot((id, seq + 1));
        }
        if let Some(to) = self.to.take() {
            deliver(to, answer);
        }
    }
}

fn deliver(to: AnswerTo, answer: Answer) {
    match to {
        AnswerTo::Loop(done) => {
            let count = done.commands();
            done.complete(replies(answer, count));
        }
        AnswerTo::Waiter(tx) => tx.send(answer),
    }
}

impl Drop for Answerer {
    fn drop(&mut self) {
        if let Some(to) = self.to.take() {
            deliver(to, Err(Unavailable::Stopped));
        }
    }
}

/// A request waiting for a proposer, and where its answer goes.
struct Pending {
    req: Request,
    reply: Answerer,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Pending>,
    stopped: bool,
    /// A proposer is running a batch of writes: the writes queued meanwhile wait for it and
    /// go together as the next batch (see [`PROPOSERS`]).
    writing: bool,
}

struct Shared {
    me: usize,
    rsm: Arc<Rsm<KvMachine>>,
    machine: Arc<KvMachine>,
    /// The members of the current configuration and the connections to them.
    members: Arc<Members>,
    /// The node that last answered as leader.
    leader: LeaderHint,
    /// Idle client slots `(id, next seq)`.
    slots: Mutex<Vec<(u64, u64)>>,
    /// Commands taken from clients (for the status line).
    commands: AtomicU64,
    /// Requests waiting for a proposer. Bounded by the connections: each connection has at
    /// most one request queued or running.
    queue: Mutex<Queue>,
    queue_cv: Condvar,
    /// Batches run and requests in them, for the debug log.
    batches: AtomicU64,
    batched: AtomicU64,
    /// Set only by the deliberate fault [`super::NodeFault::LocalReads`]: read-only requests
    /// are answered from this node's machine without the log or a ReadIndex.
    local_reads: AtomicBool,
}

/// Held while a proposer runs a batch of writes; its drop lets the next one go. The next
/// write batch is whatever queued meanwhile: the proposer takes it as it loops. Should the
/// proposer die in the batch (a panic), another is woken, so writes never stall behind it.
struct WritingBatch<'a>(&'a Shared);

impl Drop for WritingBatch<'_> {
    fn drop(&mut self) {
        let mut q = self.0.queue.lock();
        q.writing = false;
        if thread::panicking() && !q.items.is_empty() {
            self.0.queue_cv.notify_one();
        }
    }
}

/// The RESP command handler of one node. [`shutdown`](Self::shutdown) (or drop) stops and
/// joins its proposer threads; requests still queued then are answered "node stopped".
pub struct Front {
    shared: Arc<Shared>,
    proposers: Mutex<Vec<JoinHandle<()>>>,
}

impl Front {
    pub fn new(
        me: usize,
        rsm: Arc<Rsm<KvMachine>>,
        machine: Arc<KvMachine>,
        members: Arc<Members>,
    ) -> std::io::Result<Front> {
        let shared = Arc::new(Shared {
            me,
            rsm,
            machine,
            members,
            leader: LeaderHint::new(me),
            slots: Mutex::new(Vec::new()),
            commands: AtomicU64::new(0),
            queue: Mutex::new(Queue::default()),
            queue_cv: Condvar::new(),
            batches: AtomicU64::new(0),
            batched: AtomicU64::new(0),
            local_reads: AtomicBool::new(false),
        });
        let front = Front {
            shared: shared.clone(),
            proposers: Mutex::new(Vec::new()),
        };
        for i in 0..PROPOSERS {
            let s = shared.clone();
            let h = thread::Builder::new()
                .name(format!("node{}-propose{i}", me + 1))
                .spawn(move || s.run_proposer())?;
            front.proposers.lock().push(h);
        }
        Ok(front)
    }

    /// Breaks this front end on purpose: read-only requests are answered from this node's
    /// machine as it is, without the log or a ReadIndex (see
    /// [`super::NodeFault::LocalReads`]).
    pub fn with_local_reads(self) -> Front {
        self.shared.local_reads.store(true, Ordering::SeqCst);
        self
    }

    pub fn commands(&self) -> u64 {
        self.shared.commands.load(Ordering::Relaxed)
    }

    /// Stops the proposers (after the batch each is running) and joins them. Idempotent.
    pub fn shutdown(&self) {
        {
            let mut q = self.shared.queue.lock();
            q.stopped = true;
            self.shared.queue_cv.notify_all();
        }
        for h in self.proposers.lock().drain(..) {
            if h.join().is_err() {
                log::error!(target: LOG, "node {}: a proposer thread panicked", self.shared.me + 1);
            }
        }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// An idle client slot `(id, next seq)`, or a new one: a fresh random id, never 0 (the
/// read-only mark), never reused across restarts of the node.
fn take_slot(idle: &mut Vec<(u64, u64)>) -> (u64, u64) {
    idle.pop().unwrap_or_else(|| (rand::random::<u64>() | 1, 1))
}

impl Shared {
    fn return_slot(&self, slot: (u64, u64)) {
        let mut slots = self.slots.lock();
        if slots.len() < MAX_IDLE_SLOTS {
            slots.push(slot);
        }
    }

    /// Queues each client's commands (to run in order, atomically) for a proposer, which
    /// runs them on whichever node leads, in a batch with whatever other clients sent
    /// meanwhile, and answers each through its [`AnswerTo`]. Never blocks.
    fn enqueue(&self, requests: impl Iterator<Item = (Vec<KvCmd>, AnswerTo)>) {
        let local_reads = self.local_reads.load(Ordering::Relaxed);
        let mut pending = Vec::new();
        let mut local = Vec::new();
        {
            let mut slots = self.slots.lock();
            for (cmds, to) in requests {
                self.commands
                    .fetch_add(cmds.len() as u64, Ordering::Relaxed);
                let writes = cmds.iter().any(KvCmd::is_write);
                if !writes && local_reads {
                    local.push((cmds, to));
                    continue;
                }
                let slot = writes.then(|| take_slot(&mut slots));
                let (client, seq) = slot.unwrap_or((0, 0));
                pending.push(Pending {
                    req: Request { client, seq, cmds },
                    reply: Answerer { slot, to: Some(to) },
                });
            }
        }
        // Reads answered from this node's state, outside the slot pool's lock.
        for (cmds, to) in local {
            deliver(to, Ok(self.machine.read_local(&cmds)));
        }
        if pending.is_empty() {
            return;
        }
        let refused = {
            let mut q = self.queue.lock();
            if q.stopped {
                Some(pending)
            } else {
                // Writes queued while a batch of writes runs wait for it: no proposer to wake.
                let takeable = !q.writing || pending.iter().any(|p| p.req.read_only());
                q.items.extend(pending);
                if takeable {
                    // One proposer; it wakes another if it leaves requests queued.
                    self.queue_cv.notify_one();
                }
                None
            }
        };
        for p in refused.into_iter().flatten() {
            p.reply.send(self, Err(Unavailable::Stopped));
        }
    }

    fn run_proposer(&self) {
        loop {
            let (batch, writes) = {
                let mut q = self.queue.lock();
                let batch = loop {
                    if q.stopped {
                        let left: Vec<Pending> = q.items.drain(..).collect();
                        drop(q);
                        for p in left {
                            p.reply.send(self, Err(Unavailable::Stopped));
                        }
                        return;
                    }
                    let writes_allowed = !q.writing;
                    let batch = take_batch(&mut q.items, writes_allowed);
                    if !batch.is_empty() {
                        break batch;
                    }
                    self.queue_cv.wait(&mut q);
                };
                let writes = batch.iter().any(|p| !p.req.read_only());
                q.writing |= writes;
                if q.items.iter().any(|p| p.req.read_only() || !q.writing) {
                    // Requests another proposer can take now (reads, while this one writes).
                    self.queue_cv.notify_one();
                }
                (batch, writes)
            };
            let _writing = writes.then_some(WritingBatch(self));
            self.run_batch(batch);
        }
    }

    fn run_batch(&self, batch: Vec<Pending>) {
        let writes = batch.iter().any(|p| !p.req.read_only());
        let (reqs, replies): (Vec<Request>, Vec<_>) =
            batch.into_iter().map(|p| (p.req, p.reply)).unzip();
        let batches = self.batches.fetch_add(1, Ordering::Relaxed) + 1;
        let batched =
            self.batched.fetch_add(reqs.len() as u64, Ordering::Relaxed) + reqs.len() as u64;
        log::trace!(target: LOG, "node {}: batch of {} {} ({batched} requests in {batches} batches so far)", self.me + 1, reqs.len(), if writes { "writes" } else { "reads" });
        if batches.is_power_of_two() {
            log::debug!(target: LOG, "node {}: {batched} requests in {batches} batches", self.me + 1);
        }
        match self.submit_anywhere(&reqs, writes) {
            Ok(outcomes) => {
                for (outcome, reply) in outcomes.into_iter().zip(replies) {
                    let r = match outcome {
                        Outcome::Done(outs) => Ok(outs),
                        Outcome::Expired | Outcome::Stale => Err(Unavailable::Session),
                        Outcome::Bad(e) => Err(Unavailable::Bad(e)),
                    };
                    reply.send(self, r);
                }
            }
            Err(e) => {
                for reply in replies {
                    reply.send(self, Err(e.clone()));
                }
            }
        }
    }

    /// Runs `batch` (one outcome per request) on whichever node leads, retrying elsewhere
    /// with the same tags until one does or [`COMMAND_DEADLINE`] passes.
    #[allow(clippy::ptr_arg)] // see `exec_local`
    fn submit_anywhere(
        &self,
        batch: &Vec<Request>,
        writes: bool,
    ) -> Result<Vec<Outcome>, Unavailable> {
        let deadline = Instant::now() + COMMAND_DEADLINE;
        // The members as the configuration names them now (re-read after each round: a
        // change may add or remove one meanwhile); this node too, even when it is none of them.
        let targets = || {
            let mut t = self.members.peers();
            if !t.contains(&self.me) {
                t.push(self.me);
            }
            t
        };
        let found = self.leader.search_among(
            targets,
            NO_LEADER_PAUSE,
            Limit::Deadline(deadline),
            |target| match self.exec_on(target, batch, deadline) {
                ExecReply::Done(outcomes) if outcomes.len() == batch.len() => {
                    Step::Leader(Ok(outcomes))
                }
                ExecReply::Done(outcomes) => Step::Stop(Err(Unavailable::Bad(format!(
                    "node {} answered {} outcomes for a batch of {}",
                    target + 1,
                    outcomes.len(),
                    batch.len()
                )))),
                ExecReply::Stopped if target == self.me => Step::Stop(Err(Unavailable::Stopped)),
                ExecReply::NotLeader | ExecReply::Stopped => Step::Next,
            },
        );
        found.unwrap_or_else(|| {
            log::info!(target: LOG, "node {}: no leader within {:?}", self.me + 1, COMMAND_DEADLINE);
            Err(Unavailable::NoLeader { writes })
        })
    }

    /// Runs `batch` on node `target`: here, or forwarded (a failed call counts as "not
    /// leader"), the call's timeout cut to what is left before `deadline`.
    #[allow(clippy::ptr_arg)] // see `exec_local`
    fn exec_on(&self, target: usize, batch: &Vec<Request>, deadline: Instant) -> ExecReply {
        if target == self.me {
            return exec_local(&self.rsm, &self.machine, batch);
        }
        let Some(end) = self.members.end(target) else {
            return ExecReply::NotLeader;
        };
        let timeout = deadline
            .saturating_duration_since(Instant::now())
            .min(FORWARD_TIMEOUT);
        match end.call_timeout::<_, ExecReply>("Kv.Exec", &batch, timeout) {
            Ok(r) => r,
            Err(e) => {
                log::debug!(target: LOG, "node {}: forward to node {} failed: {e}", self.me + 1, target + 1);
                ExecReply::NotLeader
            }
        }
    }
}

/// Takes the next batch off the queue: the first request it may take (a write only with
/// `writes_allowed`) and every other queued one of the same kind (reads apart from writes,
/// so reads can take the ReadIndex path), within the batch limits. The rest stays queued, in
/// order, for the next proposer. Empty when nothing may be taken.
fn take_batch(items: &mut VecDeque<Pending>, writes_allowed: bool) -> Vec<Pending> {
    let Some(start) = items
        .iter()
        .position(|p| writes_allowed || p.req.read_only())
    else {
        return Vec::new();
    };
    let Some(first) = items.remove(start) else {
        return Vec::new();
    };
    let read_only = first.req.read_only();
    let mut bytes = first.req.approx_bytes();
    let mut batch = vec![first];
    let mut rest: VecDeque<Pending> = items.drain(..start).collect();
    while let Some(p) = items.pop_front() {
        let size = p.req.approx_bytes();
        if batch.len() >= MAX_BATCH_REQUESTS || bytes + size > MAX_BATCH_BYTES {
            rest.push_back(p);
            rest.extend(items.drain(..));
            break;
        }
        if p.req.read_only() == read_only {
            bytes += size;
            batch.push(p);
        } else {
            rest.push_back(p);
        }
    }
    *items = rest;
    batch
}

impl Front {
    /// `RAFTKV.MEMBER ...`: the operator's membership commands (see [`super::members`]).
    fn member(&self, args: &[Vec<u8>]) -> Reply {
        match super::members::admin(&self.shared.rsm.raft(), &self.shared.members, args) {
            AdminReply::Ok(text) => Reply::Bulk(text.into_bytes()),
            AdminReply::NotLeader(Some(addr)) => Reply::Error(format!(
                "NOTLEADER {addr} leads; send membership commands there"
            )),
            AdminReply::NotLeader(None) => Reply::Error(
                "NOTLEADER this node does not lead; send membership commands to the leader"
                    .to_string(),
            ),
            AdminReply::Err(e) => Reply::Error(format!("ERR {e}")),
        }
    }
}

impl CommandHandler for Front {
    /// `RAFTKV.MEMBER ...` (see [`super::members`]).
    fn operator(&self, args: Vec<Vec<u8>>) -> Reply {
        self.member(&args)
    }

    fn handle(&self, command: KvCmd) -> Reply {
        self.handle_batch(vec![command])
            .pop()
            .unwrap_or_else(|| Reply::Error("ERR internal: no reply".into()))
    }

    /// `INFO raft`: this node's own view, read without a round of the log (unlike `DBSIZE`
    /// and `INFO keyspace`, which are linearizable reads): a follower's commit index may lag
    /// the leader's; `leader` is the leader Raft has heard from in its current term (empty
    /// while it knows none); `members` gives each member's peer address as this node reaches
    /// it.
    fn info(&self) -> Vec<(String, String)> {
        let raft = self.shared.rsm.raft();
        let (term, leading) = raft.get_state();
        let (commit_index, last_applied) = raft.progress();
        let me = self.shared.me;
        // The leader Raft heard from in this term (none known: empty).
        let leader = if leading {
            Some(me)
        } else {
            raft.leader_hint()
        };
        let members: Vec<String> = self
            .shared
            .members
            .current()
            .members
            .iter()
            .map(|m| {
                format!(
                    "{}={}{}",
                    m.peer + 1,
                    self.shared.members.peer_addr(m.peer).unwrap_or_default(),
                    if m.voter { "" } else { "(learner)" }
                )
            })
            .collect();
        let text = format!(
            "# Raft\r\nnode_id:{}\r\nrole:{}\r\nterm:{term}\r\ncommit_index:{commit_index}\r\n\
             last_applied:{last_applied}\r\nleader:{}\r\nmembers:{}\r\n\
             applied_requests:{}\r\n",
            me + 1,
            if leading { "leader" } else { "follower" },
            leader.map_or(String::new(), |l| (l + 1).to_string()),
            members.join(","),
            self.shared.machine.applied(),
        );
        vec![("raft".to_string(), text)]
    }

    /// Never blocks: the proposers answer.
    fn submits_without_blocking(&self) -> bool {
        true
    }

    /// Each connection's KV commands go through the log as one request; the batches of one
    /// call are queued together.
    fn submit(&self, batches: Vec<Batch>) {
        self.shared.enqueue(
            batches
                .into_iter()
                .map(|Batch { commands, done }| (commands, AnswerTo::Loop(done))),
        );
    }

    /// The same as [`submit`](Self::submit), waiting for the answer (a worker's `INFO`).
    fn handle_batch(&self, commands: Vec<KvCmd>) -> Vec<Reply> {
        let count = commands.len();
        if count == 0 {
            return Vec::new();
        }
        let (tx, rx) = oneshot::channel();
        self.shared
            .enqueue(std::iter::once((commands, AnswerTo::Waiter(tx))));
        // A proposer answers every request it takes (or its drop does).
        replies(rx.recv().unwrap_or(Err(Unavailable::Stopped)), count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queued request: a write (client slot `client`) or, with `client` 0, a read.
    fn pending(client: u64) -> Pending {
        let key = client.to_string().into_bytes();
        let cmds = if client == 0 {
            vec![KvCmd::Get(key)]
        } else {
            vec![KvCmd::Set {
                key,
                value: b"v".to_vec(),
            }]
        };
        Pending {
            req: Request {
                client,
                seq: 1,
                cmds,
            },
            reply: Answerer {
                slot: None,
                to: None,
            },
        }
    }

    fn clients(items: &[Pending]) -> Vec<u64> {
        items.iter().map(|p| p.req.client).collect()
    }

    #[test]
    fn while_writes_run_a_batch_takes_only_reads_and_leaves_the_writes_in_order() {
        let mut queue: VecDeque<Pending> = [1, 0, 2, 0, 3].into_iter().map(pending).collect();
        let reads = take_batch(&mut queue, false);
        assert_eq!(clients(&reads), [0, 0]);
        assert_eq!(clients(queue.make_contiguous()), [1, 2, 3]);
        // Nothing else may go until the running write batch ends …
        assert!(take_batch(&mut queue, false).is_empty());
        assert_eq!(queue.len(), 3);
        // … then every queued write goes as one batch.
        let writes = take_batch(&mut queue, true);
        assert_eq!(clients(&writes), [1, 2, 3]);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_batch_takes_the_first_requests_kind_and_leaves_the_other_in_order() {
        let mut queue: VecDeque<Pending> = [0, 1, 0, 2].into_iter().map(pending).collect();
        assert_eq!(clients(&take_batch(&mut queue, true)), [0, 0]);
        assert_eq!(clients(queue.make_contiguous()), [1, 2]);
        let mut queue: VecDeque<Pending> = [1, 0, 2, 0].into_iter().map(pending).collect();
        assert_eq!(clients(&take_batch(&mut queue, true)), [1, 2]);
        assert_eq!(clients(queue.make_contiguous()), [0, 0]);
    }
}
