//! The shard controller (Lab 5): keeps the configuration in the Lab 2 KV server of group 0
//! and moves shards between groups when the configuration changes.
//!
//! The store holds two configurations: `current`, the one clerks route by, and `next`, the
//! change under way. A change to configuration N:
//!
//! 1. stores `next` = N with a versioned Put; of several controllers proposing an N, exactly
//!    one wins this Put and the others return without acting;
//! 2. moves every shard whose group differs: FreezeShard at the source (which stops serving
//!    it and hands over its state), InstallShard at the destination, DeleteShard at the
//!    source, each tagged N, each a no-op when repeated;
//! 3. stores `current` = N with a versioned Put.
//!
//! Once `next` is stored it is carried out, by whoever finds it: [`ShardCtrler::init_controller`]
//! finishes a change that an earlier controller left half done. Configuration numbers advance
//! one at a time. A controller that finds its change finished or overtaken by another (a shard
//! group refuses its number, or `current` moved on) is deposed: it stops and never acts again,
//! so a controller cut off mid-change cannot disturb anything when it comes back.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::shardcfg::{NSHARDS, ShardConfig, Tgid, Tnum, Tshid};
use super::shardgrp;
use super::transport::ShardTransport;
use crate::kvapi::{GetArgs, GetReply, KvErr, PutArgs, Tversion};

/// Key of the configuration clerks route by.
pub const CURRENT_KEY: &str = "shardctrler/current";
/// Key of the configuration being moved to (equal to current when no change is under way).
pub const NEXT_KEY: &str = "shardctrler/next";
/// Pause between retries of a config-store call that got no reply.
const STORE_RETRY: Duration = Duration::from_millis(10);
/// Pause before retrying a shard-group call that was refused for a reason other than a
/// newer configuration (a bug, logged).
const MOVE_RETRY: Duration = Duration::from_millis(100);

/// Why a controller call did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtrlerError {
    /// The controller was killed ([`ShardCtrler::kill`]).
    Killed,
    /// A configuration in the store could not be parsed.
    Corrupt { key: &'static str, reason: String },
}

impl fmt::Display for CtrlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CtrlerError::Killed => f.write_str("controller killed"),
            CtrlerError::Corrupt { key, reason } => {
                write!(f, "configuration under {key:?} unreadable: {reason}")
            }
        }
    }
}

impl std::error::Error for CtrlerError {}

/// What became of a requested configuration change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// This controller carried it out; it is now the current configuration.
    Done,
    /// Another controller's change came first or took over this one: this controller did
    /// not (or no longer) act, and is deposed.
    Superseded,
}

/// A configuration as stored, with the version its key had.
struct Stored {
    cfg: ShardConfig,
    version: Tversion,
}

pub struct ShardCtrler {
    transport: Arc<dyn ShardTransport>,
    /// The config store: the Lab 2 server of group 0.
    store: String,
    /// For log lines.
    id: String,
    killed: AtomicBool,
    deposed: AtomicBool,
    /// Clerks of the shard groups, by gid (a group's servers never change).
    clerks: Mutex<HashMap<Tgid, Arc<shardgrp::Clerk>>>,
}

impl ShardCtrler {
    /// A controller keeping the configurations in the KV server `store` (the tests' group 0)
    /// and reaching it and the shard groups through `transport`.
    pub fn new(transport: Arc<dyn ShardTransport>, store: String) -> ShardCtrler {
        ShardCtrler {
            transport,
            store,
            id: format!("{:04x}", rand::random::<u16>()),
            killed: AtomicBool::new(false),
            deposed: AtomicBool::new(false),
            clerks: Mutex::new(HashMap::new()),
        }
    }

    /// Stops this controller: calls under way return [`CtrlerError::Killed`] at their next
    /// retry, later calls at once; so do the shardkv clerks routing through it.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
    }

    pub fn killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    fn check_killed(&self) -> Result<(), CtrlerError> {
        if self.killed() {
            Err(CtrlerError::Killed)
        } else {
            Ok(())
        }
    }

    // ------------------------------------------------------------ config store

    fn store_get(&self, key: &str) -> Result<GetReply, CtrlerError> {
        let args = GetArgs {
            key: key.to_string(),
        };
        loop {
            self.check_killed()?;
            match self.transport.get(&self.store, &args) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    log::trace!(target: "shardkv::ctrler", "ctrler {}: get {key} from store: {e}", self.id);
                    std::thread::sleep(STORE_RETRY);
                }
            }
        }
    }

    /// A versioned Put, with Lab 2's rule: `ErrVersion` on a retry becomes `ErrMaybe`.
    fn store_put(&self, key: &str, value: String, version: Tversion) -> Result<KvErr, CtrlerError> {
        let args = PutArgs {
            key: key.to_string(),
            value,
            version,
        };
        let mut first = true;
        loop {
            self.check_killed()?;
            match self.transport.put(&self.store, &args) {
                Ok(r) if r.err == KvErr::Version && !first => return Ok(KvErr::Maybe),
                Ok(r) => return Ok(r.err),
                Err(e) => {
                    log::trace!(target: "shardkv::ctrler", "ctrler {}: put {key} v{version} to store: {e}", self.id);
                    first = false;
                    std::thread::sleep(STORE_RETRY);
                }
            }
        }
    }

    /// The configuration under `key`, or configuration 0 if there is none yet.
    fn read(&self, key: &'static str) -> Result<Stored, CtrlerError> {
        let r = self.store_get(key)?;
        match r.err {
            KvErr::Ok => match ShardConfig::from_string(&r.value) {
                Ok(cfg) => Ok(Stored {
                    cfg,
                    version: r.version,
                }),
                Err(e) => Err(CtrlerError::Corrupt {
                    key,
                    reason: e.to_string(),
                }),
            },
            _ => Ok(Stored {
                cfg: ShardConfig::new(),
                version: 0,
            }),
        }
    }

    /// Stores `cfg` under `key` if the key is still at `version`. Whether it is there now
    /// (an `ErrMaybe` is settled by reading the key back).
    fn write(
        &self,
        key: &'static str,
        cfg: &ShardConfig,
        version: Tversion,
    ) -> Result<bool, CtrlerError> {
        match self.store_put(key, cfg.to_string(), version)? {
            KvErr::Ok => Ok(true),
            KvErr::Maybe => Ok(self.read(key)?.cfg == *cfg),
            _ => Ok(false),
        }
    }

    // ------------------------------------------------------------ API

    /// Stores the first configuration (as current and as next) if the store has none.
    pub fn init_config(&self, cfg: &ShardConfig) -> Result<(), CtrlerError> {
        for key in [CURRENT_KEY, NEXT_KEY] {
            if !self.write(key, cfg, 0)? {
                log::warn!(target: "shardkv::ctrler", "ctrler {}: init_config: {key} already set", self.id);
            }
        }
        log::info!(target: "shardkv::ctrler", "ctrler {}: initial configuration {cfg}", self.id);
        Ok(())
    }

    /// The current configuration.
    pub fn query(&self) -> Result<ShardConfig, CtrlerError> {
        Ok(self.read(CURRENT_KEY)?.cfg)
    }

    /// Finishes a change an earlier controller left half done: if a stored next
    /// configuration is above the current one, carries it out and makes it current.
    pub fn init_controller(&self) -> Result<(), CtrlerError> {
        let cur = self.read(CURRENT_KEY)?;
        let next = self.read(NEXT_KEY)?;
        if next.cfg.num > cur.cfg.num {
            log::info!(target: "shardkv::ctrler", "ctrler {}: finishing change {} -> {}", self.id, cur.cfg.num, next.cfg.num);
            if self.carry_out(&cur.cfg, &next.cfg)? == Change::Done {
                self.post(&next.cfg, cur.version)?;
            }
        }
        Ok(())
    }

    /// Moves the shards from the current configuration to `new` and makes it current.
    /// `new.num` must be the current number plus one; otherwise, or if another controller's
    /// change is under way or wins, nothing is done and the result is `Superseded`.
    pub fn change_config_to(&self, new: &ShardConfig) -> Result<Change, CtrlerError> {
        if self.deposed.load(Ordering::SeqCst) {
            return Ok(Change::Superseded);
        }
        let cur = self.read(CURRENT_KEY)?;
        let next = self.read(NEXT_KEY)?;
        if new.num != cur.cfg.num + 1 || next.cfg.num > cur.cfg.num {
            log::info!(target: "shardkv::ctrler", "ctrler {}: change to {} refused: current {}, next {}", self.id, new.num, cur.cfg.num, next.cfg.num);
            return Ok(self.depose());
        }
        if !self.write(NEXT_KEY, new, next.version)? {
            log::info!(target: "shardkv::ctrler", "ctrler {}: another controller stored next {}", self.id, new.num);
            return Ok(self.depose());
        }
        log::info!(target: "shardkv::ctrler", "ctrler {}: changing {} -> {new}", self.id, cur.cfg.num);
        if self.carry_out(&cur.cfg, new)? == Change::Superseded {
            return Ok(self.depose());
        }
        let c = self.post(new, cur.version)?;
        if c == Change::Superseded {
            self.depose();
        }
        Ok(c)
    }

    fn depose(&self) -> Change {
        self.deposed.store(true, Ordering::SeqCst);
        Change::Superseded
    }

    /// Makes `new` current if current is still at `version`.
    fn post(&self, new: &ShardConfig, version: Tversion) -> Result<Change, CtrlerError> {
        if self.write(CURRENT_KEY, new, version)? {
            log::info!(target: "shardkv::ctrler", "ctrler {}: configuration {} is current", self.id, new.num);
            Ok(Change::Done)
        } else {
            log::info!(target: "shardkv::ctrler", "ctrler {}: configuration {} was made current by another controller", self.id, new.num);
            Ok(Change::Superseded)
        }
    }

    // ------------------------------------------------------------ shard moves

    fn clerk(&self, gid: Tgid, servers: &[String]) -> Arc<shardgrp::Clerk> {
        let mut clerks = self.clerks.lock();
        clerks
            .entry(gid)
            .or_insert_with(|| {
                Arc::new(shardgrp::Clerk::new(
                    self.transport.clone(),
                    servers.to_vec(),
                ))
            })
            .clone()
    }

    /// Whether configuration `num` (or a later one) is already current: someone else
    /// finished the change this controller is working on.
    fn overtaken(&self, num: Tnum) -> Result<bool, CtrlerError> {
        Ok(self.query()?.num >= num)
    }

    /// Moves every shard whose group differs between `from` and `to`.
    fn carry_out(&self, from: &ShardConfig, to: &ShardConfig) -> Result<Change, CtrlerError> {
        for s in 0..NSHARDS {
            if from.shards[s] == to.shards[s] {
                continue;
            }
            if self.move_shard(s, from, to)? == Change::Superseded {
                log::info!(target: "shardkv::ctrler", "ctrler {}: move of shard {s} for {} overtaken", self.id, to.num);
                return Ok(Change::Superseded);
            }
        }
        Ok(Change::Done)
    }

    /// Freeze at the source, install at the destination, delete at the source. A shard
    /// with no source (nobody served it) is installed empty; one with no destination (every
    /// group left) is frozen and deleted.
    fn move_shard(
        &self,
        s: Tshid,
        from: &ShardConfig,
        to: &ShardConfig,
    ) -> Result<Change, CtrlerError> {
        let num = to.num;
        let src = from.gid_servers(s).map(|(g, srv)| (g, self.clerk(g, srv)));
        let dst = to.gid_servers(s).map(|(g, srv)| (g, self.clerk(g, srv)));
        let mut state = Vec::new();
        if let Some((g, ck)) = &src {
            match self.until_answered(num, *g, "freeze", || {
                ck.freeze_shard(s, num).map(|r| (r.err, r.state))
            })? {
                Some(st) => state = st,
                None => return Ok(Change::Superseded),
            }
        }
        if let Some((g, ck)) = &dst {
            let st = state;
            if self
                .until_answered(num, *g, "install", || {
                    ck.install_shard(s, st.clone(), num).map(|r| (r.err, ()))
                })?
                .is_none()
            {
                return Ok(Change::Superseded);
            }
        }
        if let Some((g, ck)) = &src
            && self
                .until_answered(num, *g, "delete", || {
                    ck.delete_shard(s, num).map(|r| (r.err, ()))
                })?
                .is_none()
        {
            return Ok(Change::Superseded);
        }
        log::debug!(target: "shardkv::ctrler", "ctrler {}: moved shard {s} {:?} -> {:?} for {num}", self.id, src.map(|x| x.0), dst.map(|x| x.0));
        Ok(Change::Done)
    }

    /// Repeats `call` until group `gid` answers `OK`. `None` if the group refuses `num`
    /// as older than what it has seen, or configuration `num` has meanwhile become current
    /// (checked whenever the group does not answer).
    fn until_answered<T>(
        &self,
        num: Tnum,
        gid: Tgid,
        what: &str,
        call: impl Fn() -> Result<(KvErr, T), shardgrp::NoAnswer>,
    ) -> Result<Option<T>, CtrlerError> {
        loop {
            self.check_killed()?;
            match call() {
                Ok((KvErr::Ok, t)) => return Ok(Some(t)),
                Ok((KvErr::Version, _)) => {
                    log::info!(target: "shardkv::ctrler", "ctrler {}: {what} for {num} refused by gid {gid}: it has seen a newer configuration", self.id);
                    return Ok(None);
                }
                Ok((err, _)) => {
                    log::error!(target: "shardkv::ctrler", "ctrler {}: {what} for {num} at gid {gid}: {err}", self.id);
                    std::thread::sleep(MOVE_RETRY);
                }
                Err(shardgrp::NoAnswer) => {
                    log::debug!(target: "shardkv::ctrler", "ctrler {}: {what} for {num}: gid {gid} does not answer", self.id);
                    if self.overtaken(num)? {
                        return Ok(None);
                    }
                }
            }
        }
    }
}
