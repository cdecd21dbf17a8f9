//! The Lab 4 clerk: finds the leader among the replicas and retries until it gets an answer.

use std::sync::Arc;
use std::time::Duration;

use crate::kvapi::{
    CallError, GetArgs, GetReply, KvClerk, KvErr, KvTransport, LeaderHint, PutArgs, PutReply, Step,
    Tversion,
};

/// Pause after every server has been tried without success: an election is probably under
/// way, and hammering the servers would only slow it down.
const ROUND_PAUSE: Duration = Duration::from_millis(50);

pub struct Clerk {
    transport: Arc<dyn KvTransport>,
    servers: Vec<String>,
    /// The server that last answered as leader; tried first.
    leader: LeaderHint,
}

impl Clerk {
    /// A clerk of the replicas named `servers`, reached through `transport`.
    pub fn new(transport: Arc<dyn KvTransport>, servers: Vec<String>) -> Clerk {
        Clerk {
            transport,
            servers,
            leader: LeaderHint::new(0),
        }
    }

    /// Sends `method` to the leader (or whoever answers as one), rotating through the servers
    /// on no reply or a reply `leader_err` rejects (`WrongLeader`), until a leader answers.
    /// Also returns what the earlier attempts came to.
    fn call<R>(
        &self,
        method: &str,
        send: impl Fn(&str) -> Result<R, CallError>,
        leader_err: impl Fn(&R) -> bool,
    ) -> (R, Attempts) {
        let mut earlier = Attempts::default();
        let answered = self.leader.search(self.servers.len(), ROUND_PAUSE, None, |i| {
            match send(&self.servers[i]) {
                Ok(r) if !leader_err(&r) => return Step::Leader(r),
                Ok(_) => {
                    // WrongLeader: this server did not execute it... unless it started it
                    // in the log before giving up on it, and the op still commits.
                    log::trace!(target: "kvraft::clerk", "{method} to {}: wrong leader", self.servers[i]);
                    earlier.wrong_leader += 1;
                }
                Err(e) => {
                    log::trace!(target: "kvraft::clerk", "{method} to {}: {e}", self.servers[i]);
                    earlier.no_reply += 1;
                }
            }
            Step::Next
        });
        (
            answered.expect("a clerk has servers and retries until one leads"),
            earlier,
        )
    }
}

/// The attempts of a call before the one that was answered.
#[derive(Debug, Default, Clone, Copy)]
struct Attempts {
    /// Sent, no reply: the server may have executed it.
    no_reply: usize,
    /// Answered `ErrWrongLeader`: not executed there, unless the server had put it in its log
    /// and gave up waiting for it (a term change, or a timeout in the ablation variant).
    wrong_leader: usize,
}

impl Attempts {
    fn any(&self) -> bool {
        self.no_reply + self.wrong_leader > 0
    }
}

impl KvClerk for Clerk {
    /// Gets retry until some leader answers.
    fn get(&self, key: &str) -> (String, Tversion, KvErr) {
        let args = GetArgs {
            key: key.to_string(),
        };
        let (r, _): (GetReply, Attempts) = self.call(
            "KVServer.Get",
            |s| self.transport.get(s, &args),
            |r: &GetReply| r.err == KvErr::WrongLeader,
        );
        (r.value, r.version, r.err)
    }

    /// `ErrVersion` after a retry becomes `ErrMaybe`: an earlier attempt may have been
    /// executed (its reply lost, or its leader gave up on it after the op entered the log).
    fn put(&self, key: &str, value: &str, version: Tversion) -> KvErr {
        let args = PutArgs {
            key: key.to_string(),
            value: value.to_string(),
            version,
        };
        let (r, earlier): (PutReply, Attempts) = self.call(
            "KVServer.Put",
            |s| self.transport.put(s, &args),
            |r: &PutReply| r.err == KvErr::WrongLeader,
        );
        if r.err == KvErr::Version && earlier.any() {
            // Why: with no reply lost, only a server that answered ErrWrongLeader for an op
            // it had logged can have executed it (its rsm logs the reason at info).
            let why = if earlier.no_reply > 0 {
                "an earlier attempt got no reply and may have been executed"
            } else {
                "no reply was lost; an ErrWrongLeader came from a server that did not lead \
                 (the attempt never entered its log: then the version was simply stale) or \
                 from a leader that gave up on the logged op, which may have committed \
                 (the rsm logs each such give-up: a term change, or a timeout)"
            };
            log::info!(target: "kvraft::clerk", "put {key:?} v{version}: ErrMaybe after {} unanswered and {} ErrWrongLeader attempt(s): {why}", earlier.no_reply, earlier.wrong_leader);
            KvErr::Maybe
        } else {
            r.err
        }
    }
}
