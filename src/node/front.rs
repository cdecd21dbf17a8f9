//! The client-facing side of a node: a [`resp::server::CommandHandler`] that runs Redis
//! commands through the replicated log, on this node if it leads, else forwarded to the node
//! that does (`Kv.Exec` on its peer port).
//!
//! Exactly-once: every batch that writes is tagged with a client slot `(client id, seq)` taken
//! from a pool for the batch's whole life, every retry (here or on another node) keeps the
//! same tag, and the state machine's session table applies a tag at most once. A slot goes
//! back to the pool with `seq + 1` once the batch has an answer or has been given up on, so
//! each id has at most one request outstanding, as the session table requires.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::machine::{KvCmd, KvMachine, KvOut, Outcome, Request};
use crate::kvraft::rsm::{Rsm, SubmitError};
use crate::labcodec;
use crate::net::{ClientEnd, Service};
use crate::resp::Reply;
use crate::resp::command::Command;
use crate::resp::server::CommandHandler;

const LOG: &str = "node::front";

/// How long a command may look for a leader before the client gets an error.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(5);
/// One forwarded call's timeout (the leader answers once the entry commits).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// The pause after every node said "not leader" (an election is under way).
const NO_LEADER_PAUSE: Duration = Duration::from_millis(20);
/// Client slots kept for reuse; more may be live at once, the surplus is dropped on return.
const MAX_IDLE_SLOTS: usize = 4096;

/// What `Kv.Exec` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ExecReply {
    Done(Outcome),
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

/// Runs one request through this node's log: the handler of `Kv.Exec`, and the local path.
fn exec_local(rsm: &Rsm, req: &Request) -> ExecReply {
    let bytes = match labcodec::encode(req) {
        Ok(b) => b,
        Err(e) => return ExecReply::Done(Outcome::Bad(e.to_string())),
    };
    match rsm.submit(bytes) {
        Ok(reply) => match labcodec::decode::<Outcome>(&reply) {
            Ok(outcome) => ExecReply::Done(outcome),
            Err(e) => ExecReply::Done(Outcome::Bad(e.to_string())),
        },
        Err(SubmitError::WrongLeader) => ExecReply::NotLeader,
        Err(SubmitError::Stopped) => ExecReply::Stopped,
        Err(SubmitError::Encode(e)) => ExecReply::Done(Outcome::Bad(e)),
    }
}

/// The `Kv` service on the peer port: `Exec` runs a forwarded request on this node only (it
/// never forwards again, so a request cannot loop).
pub fn kv_service(rsm: Arc<Rsm>) -> Service {
    Service::new("Kv").method("Exec", move |req: Request| exec_local(&rsm, &req))
}

/// The RESP command handler of one node.
pub struct Front {
    me: usize,
    rsm: Arc<Rsm>,
    /// `peers[j]` reaches node `j`'s peer port; `None` at `me`.
    peers: Vec<Option<ClientEnd>>,
    /// The node that last answered as leader.
    leader_hint: AtomicUsize,
    /// Idle client slots `(id, next seq)`.
    slots: Mutex<Vec<(u64, u64)>>,
    /// Commands answered (for the status line).
    commands: AtomicU64,
    /// Set only by the deliberate fault [`super::NodeFault::LocalReads`]: read-only batches
    /// are answered from this machine without the log.
    local_reads: Option<Arc<KvMachine>>,
}

impl Front {
    pub fn new(me: usize, rsm: Arc<Rsm>, peers: Vec<Option<ClientEnd>>) -> Front {
        Front {
            me,
            rsm,
            peers,
            leader_hint: AtomicUsize::new(me),
            slots: Mutex::new(Vec::new()),
            commands: AtomicU64::new(0),
            local_reads: None,
        }
    }

    /// Breaks this front end on purpose: read-only batches are answered from `machine` as it
    /// is, without the log (see [`super::NodeFault::LocalReads`]).
    pub fn with_local_reads(mut self, machine: Arc<KvMachine>) -> Front {
        self.local_reads = Some(machine);
        self
    }

    pub fn commands(&self) -> u64 {
        self.commands.load(Ordering::Relaxed)
    }

    fn take_slot(&self) -> (u64, u64) {
        if let Some(slot) = self.slots.lock().pop() {
            return slot;
        }
        // A fresh random id per slot: never 0 (the read-only mark), never reused across
        // restarts of the node.
        (rand::random::<u64>() | 1, 1)
    }

    fn return_slot(&self, slot: (u64, u64)) {
        let mut slots = self.slots.lock();
        if slots.len() < MAX_IDLE_SLOTS {
            slots.push(slot);
        }
    }

    /// Runs `cmds` (in order, as one log entry) on whichever node leads.
    fn submit(&self, cmds: Vec<KvCmd>) -> Result<Vec<KvOut>, Unavailable> {
        let writes = cmds.iter().any(KvCmd::is_write);
        if let Some(machine) = self.local_reads.as_ref().filter(|_| !writes) {
            return Ok(machine.read_local(&cmds));
        }
        let slot = writes.then(|| self.take_slot());
        let (client, seq) = slot.unwrap_or((0, 0));
        let req = Request { client, seq, cmds };
        let result = self.submit_anywhere(&req, writes);
        if let Some((id, seq)) = slot {
            self.return_slot((id, seq + 1));
        }
        result
    }

    fn submit_anywhere(&self, req: &Request, writes: bool) -> Result<Vec<KvOut>, Unavailable> {
        let n = self.peers.len();
        let deadline = Instant::now() + COMMAND_DEADLINE;
        let mut target = self.leader_hint.load(Ordering::Relaxed) % n;
        let mut refused_in_a_row = 0;
        loop {
            let reply = if target == self.me {
                exec_local(&self.rsm, req)
            } else {
                let end = self.peers[target]
                    .as_ref()
                    .expect("an end for every other node");
                let timeout = deadline
                    .saturating_duration_since(Instant::now())
                    .min(FORWARD_TIMEOUT);
                match end.call_timeout::<_, ExecReply>("Kv.Exec", req, timeout) {
                    Ok(r) => r,
                    Err(e) => {
                        log::debug!(target: LOG, "node {}: forward to node {} failed: {e}", self.me + 1, target + 1);
                        ExecReply::NotLeader
                    }
                }
            };
            match reply {
                ExecReply::Done(Outcome::Done(outs)) => {
                    self.leader_hint.store(target, Ordering::Relaxed);
                    return Ok(outs);
                }
                ExecReply::Done(Outcome::Expired) | ExecReply::Done(Outcome::Stale) => {
                    return Err(Unavailable::Session);
                }
                ExecReply::Done(Outcome::Bad(e)) => return Err(Unavailable::Bad(e)),
                ExecReply::Stopped if target == self.me => return Err(Unavailable::Stopped),
                ExecReply::NotLeader | ExecReply::Stopped => {}
            }
            if Instant::now() >= deadline {
                log::info!(target: LOG, "node {}: no leader within {:?}", self.me + 1, COMMAND_DEADLINE);
                return Err(Unavailable::NoLeader { writes });
            }
            target = (target + 1) % n;
            refused_in_a_row += 1;
            if refused_in_a_row >= n {
                refused_in_a_row = 0;
                std::thread::sleep(NO_LEADER_PAUSE);
            }
        }
    }
}

/// A command as the log carries it; `None` for those answered here.
fn to_kv(cmd: &Command) -> Option<KvCmd> {
    Some(match cmd.clone() {
        Command::Get(k) => KvCmd::Get(k),
        Command::Set { key, value } => KvCmd::Set(key, value),
        Command::Del(keys) => KvCmd::Del(keys),
        Command::Exists(keys) => KvCmd::Exists(keys),
        Command::Incr(k) => KvCmd::Incr(k),
        Command::MGet(keys) => KvCmd::MGet(keys),
        Command::VGet(k) => KvCmd::VGet(k),
        Command::VSet {
            key,
            value,
            version,
        } => KvCmd::VSet {
            key,
            value,
            version,
        },
        Command::Ping(_) | Command::Quit => return None,
    })
}

fn to_reply(out: KvOut) -> Reply {
    match out {
        KvOut::Ok => Reply::ok(),
        KvOut::Null => Reply::Null,
        KvOut::Bulk(v) => Reply::Bulk(v),
        KvOut::Int(n) => Reply::Integer(n),
        KvOut::Array(items) => Reply::Array(items.into_iter().map(to_reply).collect()),
        KvOut::Versioned(v, version) => Reply::versioned(v, version),
        KvOut::ErrVersion => Reply::err_version(),
        KvOut::ErrNoKey => Reply::Error("ERRNOKEY no such key".into()),
        KvOut::Err(e) => Reply::Error(e),
    }
}

impl CommandHandler for Front {
    fn handle(&self, command: Command) -> Reply {
        self.handle_batch(vec![command])
            .pop()
            .unwrap_or_else(|| Reply::Error("ERR internal: no reply".into()))
    }

    /// The KV commands of a pipelined batch go through the log as one entry; PING and QUIT
    /// are answered here, in their place.
    fn handle_batch(&self, commands: Vec<Command>) -> Vec<Reply> {
        let count = commands.len() as u64;
        let cmds: Vec<KvCmd> = commands.iter().filter_map(to_kv).collect();
        let mut outs = if cmds.is_empty() {
            Ok(Vec::new().into_iter())
        } else {
            self.submit(cmds).map(Vec::into_iter)
        };
        let replies = commands
            .into_iter()
            .map(|c| match c {
                Command::Ping(None) => Reply::Simple("PONG".into()),
                Command::Ping(Some(msg)) => Reply::Bulk(msg),
                Command::Quit => Reply::ok(),
                _ => match &mut outs {
                    Ok(it) => it
                        .next()
                        .map(to_reply)
                        .unwrap_or_else(|| Reply::Error("ERR internal: missing result".into())),
                    Err(e) => e.reply(),
                },
            })
            .collect();
        self.commands.fetch_add(count, Ordering::Relaxed);
        replies
    }
}
