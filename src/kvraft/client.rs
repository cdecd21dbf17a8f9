//! The Lab 4 clerk: finds the leader among the replicas and retries until it gets an answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::kvapi::{
    CallError, GetArgs, GetReply, KvClerk, KvErr, KvTransport, PutArgs, PutReply, Tversion,
};

/// Pause after every server has been tried without success: an election is probably under
/// way, and hammering the servers would only slow it down.
const ROUND_PAUSE: Duration = Duration::from_millis(50);

pub struct Clerk {
    transport: Arc<dyn KvTransport>,
    servers: Vec<String>,
    /// The server that last answered as leader; tried first.
    leader: AtomicUsize,
}

impl Clerk {
    /// A clerk of the replicas named `servers`, reached through `transport`.
    pub fn new(transport: Arc<dyn KvTransport>, servers: Vec<String>) -> Clerk {
        Clerk {
            transport,
            servers,
            leader: AtomicUsize::new(0),
        }
    }

    /// Sends `method` to the leader (or whoever answers as one), rotating through the servers
    /// on no reply or a reply `leader_err` rejects (`WrongLeader`), until a leader answers.
    /// Also returns whether an earlier attempt might have been executed.
    fn call<R>(
        &self,
        method: &str,
        send: impl Fn(&str) -> Result<R, CallError>,
        leader_err: impl Fn(&R) -> bool,
    ) -> (R, bool) {
        let n = self.servers.len();
        let mut i = self.leader.load(Ordering::Relaxed) % n;
        let mut tried = 0;
        // Whether some earlier attempt might have been executed (sent, but no usable reply).
        let mut resent = false;
        loop {
            match send(&self.servers[i]) {
                Ok(r) if !leader_err(&r) => {
                    self.leader.store(i, Ordering::Relaxed);
                    return (r, resent);
                }
                Ok(_) => {
                    // WrongLeader: this server did not execute it... unless it started it
                    // in the log before losing leadership, and the op still commits.
                    log::trace!(target: "kvraft::clerk", "{method} to {}: wrong leader", self.servers[i]);
                    resent = true;
                }
                Err(e) => {
                    log::trace!(target: "kvraft::clerk", "{method} to {}: {e}", self.servers[i]);
                    resent = true;
                }
            }
            i = (i + 1) % n;
            tried += 1;
            if tried % n == 0 {
                std::thread::sleep(ROUND_PAUSE);
            }
        }
    }
}

impl KvClerk for Clerk {
    /// Gets retry until some leader answers.
    fn get(&self, key: &str) -> (String, Tversion, KvErr) {
        let args = GetArgs {
            key: key.to_string(),
        };
        let (r, _): (GetReply, bool) = self.call(
            "KVServer.Get",
            |s| self.transport.get(s, &args),
            |r: &GetReply| r.err == KvErr::WrongLeader,
        );
        (r.value, r.version, r.err)
    }

    /// `ErrVersion` after a retry becomes `ErrMaybe`: an earlier attempt may have been
    /// executed (its reply lost, or its leader deposed after the op entered the log).
    fn put(&self, key: &str, value: &str, version: Tversion) -> KvErr {
        let args = PutArgs {
            key: key.to_string(),
            value: value.to_string(),
            version,
        };
        let (r, resent): (PutReply, bool) = self.call(
            "KVServer.Put",
            |s| self.transport.put(s, &args),
            |r: &PutReply| r.err == KvErr::WrongLeader,
        );
        if r.err == KvErr::Version && resent {
            KvErr::Maybe
        } else {
            r.err
        }
    }
}
