//! Shard configurations (the Go labs' `shardcfg`, which the handout provides and asks not to
//! change): which group serves each of the [`NSHARDS`] shards, and the servers of each group.
//!
//! [`ShardConfig::rebalance`] is deterministic and ported step by step from the lab: the tests
//! compute expected configurations with it, so every controller and test must agree on the
//! result for a given input.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A group id (the tester's `Tgid`); group 0 holds the controller's config store.
pub type Tgid = usize;
/// A shard id, `0..NSHARDS`.
pub type Tshid = usize;
/// A configuration number; each change of configuration adds one.
pub type Tnum = u64;

/// The number of shards.
pub const NSHARDS: usize = 12;
/// The number of the first configuration (the one [`ShardCtrler::init_config`] stores).
///
/// [`ShardCtrler::init_config`]: super::ShardCtrler::init_config
pub const NUM_FIRST: Tnum = 1;
/// The first group; it starts out owning every shard.
pub const GID1: Tgid = 1;

/// The shard of `key`: FNV-1a (32 bit) of its bytes, modulo [`NSHARDS`].
pub fn key2shard(key: &str) -> Tshid {
    const OFFSET_BASIS: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    let mut h = OFFSET_BASIS;
    for &b in key.as_bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h as usize % NSHARDS
}

/// Why a configuration change or check was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CfgError {
    /// `join` of a group that is already in the configuration (the lab's "re-Join").
    ReJoin(Tgid),
    /// `join` would put `server` in group `gid` while it is already in group `other`.
    ServerInTwoGroups {
        server: String,
        gid: Tgid,
        other: Tgid,
    },
    /// `join` or `leave` with nothing to change.
    NoChange,
    /// `leave` of a group that is not in the configuration.
    NotPresent(Tgid),
    /// [`ShardConfig::from_string`] could not parse its input.
    Parse(String),
    /// [`ShardConfig::check_config`] found the configuration wrong.
    Check(String),
}

impl fmt::Display for CfgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CfgError::ReJoin(gid) => write!(f, "re-Join of group {gid}"),
            CfgError::ServerInTwoGroups { server, gid, other } => {
                write!(
                    f,
                    "join of group {gid} puts server {server} also in group {other}"
                )
            }
            CfgError::NoChange => f.write_str("join or leave with no change"),
            CfgError::NotPresent(gid) => {
                write!(f, "leave of group {gid}, which is not in the configuration")
            }
            CfgError::Parse(e) => write!(f, "bad configuration string: {e}"),
            CfgError::Check(e) => write!(f, "bad configuration: {e}"),
        }
    }
}

impl std::error::Error for CfgError {}

/// An assignment of shards to groups. Shard `s` is served by `shards[s]` (0: by nobody);
/// `groups` maps each group to its servers' names. The JSON form uses the lab's field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardConfig {
    #[serde(rename = "Num")]
    pub num: Tnum,
    #[serde(rename = "Shards")]
    pub shards: [Tgid; NSHARDS],
    #[serde(rename = "Groups")]
    pub groups: BTreeMap<Tgid, Vec<String>>,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig::new()
    }
}

impl fmt::Display for ShardConfig {
    /// The JSON form, e.g. `{"Num":1,"Shards":[1,1,...],"Groups":{"1":["a","b"]}}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Integers, strings and maps with integer keys always serialize.
        f.write_str(&serde_json::to_string(self).map_err(|_| fmt::Error)?)
    }
}

impl ShardConfig {
    /// Configuration 0: no groups, every shard unassigned.
    pub fn new() -> ShardConfig {
        ShardConfig {
            num: 0,
            shards: [0; NSHARDS],
            groups: BTreeMap::new(),
        }
    }

    /// Parses the JSON form written by `to_string()`.
    pub fn from_string(s: &str) -> Result<ShardConfig, CfgError> {
        serde_json::from_str(s).map_err(|e| CfgError::Parse(e.to_string()))
    }

    /// Shard counts per group present in `groups`, and the most and least loaded groups as
    /// the lab's `analyze` finds them: groups in ascending order, the first with a strictly
    /// larger (smaller) count wins, so ties go to the lowest gid.
    /// Returns (most-loaded gid, its count, least-loaded gid, its count).
    fn analyze(&self) -> (Tgid, i64, Tgid, i64) {
        let mut counts: BTreeMap<Tgid, i64> = BTreeMap::new();
        for &g in &self.shards {
            *counts.entry(g).or_default() += 1;
        }
        let (mut mg, mut mn) = (0, -1);
        let (mut lg, mut ln) = (0, 257);
        for &g in self.groups.keys() {
            let c = counts.get(&g).copied().unwrap_or(0);
            if c < ln {
                ln = c;
                lg = g;
            }
            if c > mn {
                mn = c;
                mg = g;
            }
        }
        (mg, mn, lg, ln)
    }

    /// Balances shards over the groups, moving as few as it can, deterministically:
    /// 1. no groups: every shard becomes unassigned;
    /// 2. each shard (in order) whose group is gone goes to the least-loaded group;
    /// 3. while the most-loaded group has at least two more shards than the least-loaded,
    ///    its lowest-numbered shard moves to the least-loaded group.
    pub fn rebalance(&mut self) {
        if self.groups.is_empty() {
            self.shards = [0; NSHARDS];
            return;
        }
        for s in 0..NSHARDS {
            if !self.groups.contains_key(&self.shards[s]) {
                let (_, _, lg, _) = self.analyze();
                self.shards[s] = lg;
            }
        }
        loop {
            let (mg, mn, lg, ln) = self.analyze();
            if mn < ln + 2 {
                break;
            }
            if let Some(s) = self.shards.iter().position(|&g| g == mg) {
                self.shards[s] = lg;
            }
        }
    }

    /// Adds the groups in `servers` and bumps the number; shards are not moved (see
    /// [`join_balance`](Self::join_balance)). Nothing changes on an error.
    pub fn join(&mut self, servers: &BTreeMap<Tgid, Vec<String>>) -> Result<(), CfgError> {
        if servers.is_empty() {
            return Err(CfgError::NoChange);
        }
        for (&gid, names) in servers {
            if self.groups.contains_key(&gid) {
                log::info!(target: "shardkv::cfg", "re-Join {gid}");
                return Err(CfgError::ReJoin(gid));
            }
            for (&other, other_names) in self.groups.iter().chain(servers.range(..gid)) {
                if let Some(server) = names.iter().find(|n| other_names.contains(n)) {
                    return Err(CfgError::ServerInTwoGroups {
                        server: server.clone(),
                        gid,
                        other,
                    });
                }
            }
        }
        for (&gid, names) in servers {
            self.groups.insert(gid, names.clone());
        }
        self.num += 1;
        Ok(())
    }

    /// Removes the groups `gids` and bumps the number; their shards stay assigned to them
    /// until [`rebalance`](Self::rebalance). Nothing changes on an error.
    pub fn leave(&mut self, gids: &[Tgid]) -> Result<(), CfgError> {
        if gids.is_empty() {
            return Err(CfgError::NoChange);
        }
        if let Some(&gid) = gids.iter().find(|g| !self.groups.contains_key(g)) {
            log::info!(target: "shardkv::cfg", "Leave({gid}) but not in config");
            return Err(CfgError::NotPresent(gid));
        }
        for gid in gids {
            self.groups.remove(gid);
        }
        self.num += 1;
        Ok(())
    }

    /// [`join`](Self::join), then [`rebalance`](Self::rebalance).
    pub fn join_balance(&mut self, servers: &BTreeMap<Tgid, Vec<String>>) -> Result<(), CfgError> {
        self.join(servers)?;
        self.rebalance();
        Ok(())
    }

    /// [`leave`](Self::leave), then [`rebalance`](Self::rebalance).
    pub fn leave_balance(&mut self, gids: &[Tgid]) -> Result<(), CfgError> {
        self.leave(gids)?;
        self.rebalance();
        Ok(())
    }

    /// The group serving shard `sh` and its servers; `None` if the shard is unassigned.
    pub fn gid_servers(&self, sh: Tshid) -> Option<(Tgid, &[String])> {
        let gid = self.shards[sh];
        self.groups.get(&gid).map(|s| (gid, s.as_slice()))
    }

    /// Whether `gid` serves at least one shard.
    pub fn is_member(&self, gid: Tgid) -> bool {
        self.shards.contains(&gid)
    }

    /// Checks that the groups are exactly `groups`, that (if there are any) every shard is
    /// assigned to one of them, and that no group has more than one shard more than another.
    pub fn check_config(&self, groups: &[Tgid]) -> Result<(), CfgError> {
        if self.groups.len() != groups.len() {
            return Err(CfgError::Check(format!(
                "wanted {} groups, got {}",
                groups.len(),
                self.groups.len()
            )));
        }
        if let Some(g) = groups.iter().find(|g| !self.groups.contains_key(g)) {
            return Err(CfgError::Check(format!("missing group {g}")));
        }
        if !groups.is_empty()
            && let Some(s) = (0..NSHARDS).find(|&s| !self.groups.contains_key(&self.shards[s]))
        {
            return Err(CfgError::Check(format!(
                "shard {s} -> invalid group {}",
                self.shards[s]
            )));
        }
        let count = |g: Tgid| self.shards.iter().filter(|&&x| x == g).count();
        let max = self.groups.keys().map(|&g| count(g)).max().unwrap_or(0);
        let min = self.groups.keys().map(|&g| count(g)).min().unwrap_or(257);
        if max > min + 1 {
            return Err(CfgError::Check(format!(
                "max {max} too much larger than min {min}"
            )));
        }
        Ok(())
    }
}
