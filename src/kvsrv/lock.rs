//! A lock built on a versioned KV store: the key holds the owner's id, or `""` when free.
//! Versioned Puts make taking the lock a compare-and-swap; an `ErrMaybe` is resolved by
//! reading the key back.

use std::sync::Arc;
use std::time::Duration;

use super::KvClerk;
use super::rpc::KvErr;
use crate::tester::randstring;

/// How long to wait before looking at a held lock again, or trying again after a failed
/// Get or a lost race (the clerk already retries lost RPCs itself: a tight loop here would
/// only flood the server).
const POLL_INTERVAL: Duration = Duration::from_millis(5);

pub struct Lock {
    ck: Arc<dyn KvClerk>,
    key: String,
    /// This lock object's owner id, stored in the key while it holds the lock.
    id: String,
}

impl Lock {
    /// A lock whose state lives under `key`.
    pub fn new(ck: Arc<dyn KvClerk>, key: &str) -> Lock {
        Lock {
            ck,
            key: key.to_string(),
            id: randstring(8),
        }
    }

    /// Blocks until this client holds the lock.
    pub fn acquire(&self) {
        loop {
            let (holder, version, err) = self.ck.get(&self.key);
            match err {
                KvErr::Ok if holder == self.id => return, // an earlier ErrMaybe put did land
                KvErr::Ok if !holder.is_empty() => {
                    std::thread::sleep(POLL_INTERVAL);
                    continue;
                }
                KvErr::Ok | KvErr::NoKey => {}
                other => {
                    log::warn!(target: "kvsrv::lock", "acquire {:?}: get returned {other}", self.key);
                    std::thread::sleep(POLL_INTERVAL);
                    continue;
                }
            }
            match self.ck.put(&self.key, &self.id, version) {
                KvErr::Ok => return,
                // Maybe: the next get tells whether it is ours.
                KvErr::Maybe => continue,
                // Version: someone was faster; look again in a moment.
                _ => std::thread::sleep(POLL_INTERVAL),
            }
        }
    }

    /// Releases the lock. Does nothing if this client does not hold it.
    pub fn release(&self) {
        loop {
            let (holder, version, err) = self.ck.get(&self.key);
            if err != KvErr::Ok || holder != self.id {
                return;
            }
            match self.ck.put(&self.key, "", version) {
                KvErr::Ok => return,
                KvErr::Maybe => continue, // the next get tells
                _ => std::thread::sleep(POLL_INTERVAL),
            }
        }
    }
}
