//! The shardkv clerk: routes each Get and Put to the group that serves the key's shard in
//! the controller's current configuration, and looks the configuration up again when that
//! group says it does not serve the shard (`ErrWrongGroup`: moved, or frozen for a move) or
//! does not answer (down, or gone).
//!
//! Lab 2's `ErrMaybe` rule holds across groups: once any attempt of a Put may have been
//! executed without its answer reaching the clerk, a later `ErrVersion`, from whichever
//! group, becomes `ErrMaybe`, because the first attempt may have applied the Put and moved
//! with the shard.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::ShardCtrler;
use super::shardcfg::Tgid;
use super::shardcfg::{ShardConfig, key2shard};
use super::shardgrp;
use super::transport::ShardTransport;
use crate::kvapi::{KvClerk, KvErr, Tversion};

/// Pause before asking again when the configuration has not changed since the group said
/// `ErrWrongGroup` (the shard is frozen while a move is under way).
const UNCHANGED_PAUSE: Duration = Duration::from_millis(20);

pub struct Clerk {
    transport: Arc<dyn ShardTransport>,
    sck: Arc<ShardCtrler>,
    /// The configuration last read; `None` before the first request.
    cfg: Mutex<Option<ShardConfig>>,
    /// Clerks of the groups, by gid, remembering each group's leader.
    grps: Mutex<HashMap<Tgid, Arc<shardgrp::Clerk>>>,
}

/// Where a request for one shard goes now.
enum Route {
    Group(Tgid, Arc<shardgrp::Clerk>),
    /// No group serves the shard in the current configuration.
    Nobody,
    /// The controller was killed (test teardown).
    Killed,
}

impl Clerk {
    pub fn new(transport: Arc<dyn ShardTransport>, sck: Arc<ShardCtrler>) -> Clerk {
        Clerk {
            transport,
            sck,
            cfg: Mutex::new(None),
            grps: Mutex::new(HashMap::new()),
        }
    }

    /// Reads the configuration from the controller. Whether it changed since the last read.
    fn refresh(&self) -> Option<bool> {
        let cfg = self.sck.query().ok()?;
        let mut cur = self.cfg.lock();
        let changed = cur.as_ref().is_none_or(|c| c.num != cfg.num);
        *cur = Some(cfg);
        Some(changed)
    }

    fn route(&self, key: &str) -> Route {
        if self.cfg.lock().is_none() && self.refresh().is_none() {
            return Route::Killed;
        }
        let cfg = self.cfg.lock();
        let Some((gid, servers)) = cfg.as_ref().and_then(|c| c.gid_servers(key2shard(key))) else {
            return Route::Nobody;
        };
        let ck = self
            .grps
            .lock()
            .entry(gid)
            .or_insert_with(|| {
                Arc::new(shardgrp::Clerk::new(
                    self.transport.clone(),
                    servers.to_vec(),
                ))
            })
            .clone();
        Route::Group(gid, ck)
    }

    /// After the group refused or did not answer: look again, pausing if nothing changed
    /// and the group had answered. `false` if the controller was killed.
    /// The group serving `key`, waiting out configurations that assign its shard to nobody;
    /// `None` once the controller is killed.
    fn serving_group(&self, key: &str) -> Option<(Tgid, Arc<shardgrp::Clerk>)> {
        loop {
            match self.route(key) {
                Route::Group(gid, ck) => return Some((gid, ck)),
                Route::Nobody if self.reroute(true) => {}
                Route::Nobody | Route::Killed => return None,
            }
        }
    }

    fn reroute(&self, answered: bool) -> bool {
        match self.refresh() {
            None => false,
            Some(changed) => {
                if !changed && answered {
                    std::thread::sleep(UNCHANGED_PAUSE);
                }
                true
            }
        }
    }
}

impl KvClerk for Clerk {
    /// Retries until the group serving the key answers (or the controller is killed, when
    /// it returns `ErrWrongGroup`).
    fn get(&self, key: &str) -> (String, Tversion, KvErr) {
        loop {
            let Some((gid, ck)) = self.serving_group(key) else {
                break;
            };
            let answered = match ck.get(key) {
                Ok(r) if r.err != KvErr::WrongGroup => return (r.value, r.version, r.err),
                Ok(_) => true,
                Err(shardgrp::NoAnswer) => false,
            };
            log::trace!(target: "shardkv::clerk", "get {key:?}: gid {gid} {}", if answered { "wrong group" } else { "no answer" });
            if !self.reroute(answered) {
                break;
            }
        }
        (String::new(), 0, KvErr::WrongGroup)
    }

    fn put(&self, key: &str, value: &str, version: Tversion) -> KvErr {
        let mut maybe_executed = false;
        loop {
            let Some((gid, ck)) = self.serving_group(key) else {
                break;
            };
            let out = ck.put(key, value, version);
            maybe_executed |= out.maybe_executed;
            let answered = match out.reply {
                Ok(r) if r.err == KvErr::Version && maybe_executed => return KvErr::Maybe,
                Ok(r) if r.err != KvErr::WrongGroup => return r.err,
                Ok(_) => true,
                Err(shardgrp::NoAnswer) => false,
            };
            log::trace!(target: "shardkv::clerk", "put {key:?} v{version}: gid {gid} {}", if answered { "wrong group" } else { "no answer" });
            if !self.reroute(answered) {
                break;
            }
        }
        KvErr::WrongGroup
    }
}
