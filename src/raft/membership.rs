//! Membership changes (Raft dissertation §4): the configuration — which peers vote, which only
//! learn, and how each is reached — lives in the log, one server added, promoted or removed
//! at a time.
//!
//! The labs' Raft keeps its fixed peer set: a transport that offers no
//! [`MembershipHost`] (every labrpc transport) gets peers `0..len()`, all voters, and none of
//! this module's rules. A transport that offers one (the node's TCP transport) turns them on:
//!
//! - A configuration entry is a log entry whose command starts with [`CONFIG_TAG`] (a byte no
//!   `labcodec` value starts with: varint lengths and enum tags never begin with `0xFF`), then
//!   the encoded [`Configuration`]. With membership on, [`Raft::start`](super::Raft::start)
//!   refuses a command starting with that byte, so the two kinds cannot be confused.
//! - A configuration takes effect on every peer as soon as it is in its log (§4.1), committed
//!   or not; a truncated entry takes its configuration with it. Elections, commitment,
//!   CheckQuorum and ReadIndex count the voters of the peer's current configuration only.
//! - At most one change is uncommitted at a time, and a leader accepts one only once it has
//!   committed an entry of its own term (the single-server rules of §4.1, with the fix of
//!   §4.1.2's footnote).
//! - The configuration as of the snapshot is saved by the host (a file beside the log)
//!   before the snapshot that covers its entry becomes durable, and is sent with the
//!   snapshot to a follower that needs one. At restart the newest of the saved one and those
//!   in the log is the configuration.
//! - A leader that is no longer a voter of a committed configuration steps down (§4.2.2); a
//!   peer that is not a voter of its configuration neither campaigns nor grants a vote, and
//!   a voter refuses (pre-)votes from peers outside its configuration without adopting their
//!   term (§4.2.3, with pre-vote and vote stickiness).
//! - The first leader of a cluster whose log holds no configuration entry (a new cluster, or
//!   one started before membership existed) appends its configuration, so a peer added later
//!   learns it from the log.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::log::Entry;
use super::state::{Core, Role, State};
use crate::labcodec;

/// The first byte of a configuration entry's command.
pub const CONFIG_TAG: u8 = 0xFF;
/// The second byte: the version of the encoding that follows.
const CONFIG_VERSION: u8 = 1;
/// The most peers a membership-enabled transport may number (peers `0..MAX_PEERS`).
pub const MAX_PEERS: usize = 64;
/// Address lengths a configuration may carry.
const MAX_ADDR_BYTES: usize = 255;

/// One member: its peer number (the node id minus one), whether it votes, and the addresses
/// the node layer needs to reach it (opaque to Raft).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub peer: usize,
    pub voter: bool,
    /// Where its peers reach it.
    pub addr: String,
    /// Where its clients reach it.
    pub client_addr: String,
}

/// A configuration: its members, ordered by peer number.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configuration {
    pub members: Vec<Member>,
}

impl Configuration {
    pub fn member(&self, peer: usize) -> Option<&Member> {
        self.members.iter().find(|m| m.peer == peer)
    }

    pub fn is_voter(&self, peer: usize) -> bool {
        self.member(peer).is_some_and(|m| m.voter)
    }

    pub fn voters(&self) -> impl Iterator<Item = usize> + '_ {
        self.members.iter().filter(|m| m.voter).map(|m| m.peer)
    }

    pub fn peers(&self) -> impl Iterator<Item = usize> + '_ {
        self.members.iter().map(|m| m.peer)
    }

    /// Members are distinct, in range, ordered, with addresses of sane length.
    pub fn check(&self) -> Result<(), String> {
        let mut last: Option<usize> = None;
        for m in &self.members {
            if m.peer >= MAX_PEERS {
                return Err(format!(
                    "member {} is beyond the largest peer number {}",
                    m.peer,
                    MAX_PEERS - 1
                ));
            }
            if last.is_some_and(|l| l >= m.peer) {
                return Err(format!("member {} out of order or repeated", m.peer));
            }
            if m.addr.len() > MAX_ADDR_BYTES || m.client_addr.len() > MAX_ADDR_BYTES {
                return Err(format!(
                    "member {}: an address longer than {MAX_ADDR_BYTES} bytes",
                    m.peer
                ));
            }
            last = Some(m.peer);
        }
        Ok(())
    }

    /// The command of a configuration entry.
    pub fn encode_entry(&self) -> Vec<u8> {
        let mut out = vec![CONFIG_TAG, CONFIG_VERSION];
        // A configuration of at most MAX_PEERS short strings always encodes.
        out.extend(labcodec::encode(self).unwrap_or_default());
        out
    }

    /// The configuration a configuration entry's command holds.
    pub fn decode_entry(command: &[u8]) -> Result<Configuration, String> {
        match command {
            [CONFIG_TAG, CONFIG_VERSION, rest @ ..] => {
                let c: Configuration = labcodec::decode(rest).map_err(|e| e.to_string())?;
                c.check()?;
                Ok(c)
            }
            [CONFIG_TAG, v, ..] => Err(format!("configuration entry of unknown version {v}")),
            _ => Err("not a configuration entry".to_string()),
        }
    }

    /// Bytes for a host's file or a snapshot message.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_entry()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Configuration, String> {
        Configuration::decode_entry(bytes)
    }
}

impl fmt::Display for Configuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}{}", m.peer, if m.voter { "" } else { "(learner)" }))
            .collect();
        write!(f, "[{}]", parts.join(" "))
    }
}

/// Whether `command` is a configuration entry's (see [`CONFIG_TAG`]). Only meaningful in a
/// Raft with membership on; a service that shares the apply channel with one skips these.
pub fn is_config_entry(command: &[u8]) -> bool {
    command.first() == Some(&CONFIG_TAG)
}

/// One single-server change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfChange {
    /// A new member that replicates but does not vote (§4.2.1).
    AddLearner {
        peer: usize,
        addr: String,
        client_addr: String,
    },
    /// A learner becomes a voter.
    Promote { peer: usize },
    /// A member (voter or learner) leaves.
    Remove { peer: usize },
}

impl ConfChange {
    /// The configuration after this change to `c`, or why it cannot apply.
    pub fn apply(&self, c: &Configuration) -> Result<Configuration, ChangeError> {
        let mut next = c.clone();
        match self {
            ConfChange::AddLearner {
                peer,
                addr,
                client_addr,
            } => {
                if c.member(*peer).is_some() {
                    return Err(ChangeError::Invalid(format!(
                        "node {} is already a member",
                        peer + 1
                    )));
                }
                if let Some(m) = c
                    .members
                    .iter()
                    .find(|m| !addr.is_empty() && &m.addr == addr)
                {
                    return Err(ChangeError::Invalid(format!(
                        "node {} already uses peer address {addr}",
                        m.peer + 1
                    )));
                }
                next.members.push(Member {
                    peer: *peer,
                    voter: false,
                    addr: addr.clone(),
                    client_addr: client_addr.clone(),
                });
                next.members.sort_by_key(|m| m.peer);
            }
            ConfChange::Promote { peer } => match next.members.iter_mut().find(|m| m.peer == *peer)
            {
                None => {
                    return Err(ChangeError::Invalid(format!(
                        "node {} is not a member",
                        peer + 1
                    )));
                }
                Some(m) if m.voter => {
                    return Err(ChangeError::Invalid(format!(
                        "node {} is already a voter",
                        peer + 1
                    )));
                }
                Some(m) => m.voter = true,
            },
            ConfChange::Remove { peer } => {
                let Some(m) = c.member(*peer) else {
                    return Err(ChangeError::Invalid(format!(
                        "node {} is not a member",
                        peer + 1
                    )));
                };
                if m.voter && c.voters().count() == 1 {
                    return Err(ChangeError::Invalid(format!(
                        "node {} is the last voter",
                        peer + 1
                    )));
                }
                next.members.retain(|m| m.peer != *peer);
            }
        }
        next.check().map_err(ChangeError::Invalid)?;
        Ok(next)
    }
}

/// Why a change was not appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeError {
    /// This Raft keeps a fixed peer set (the labs').
    Disabled,
    /// This peer does not lead; `leader` is the peer it last heard from as leader, if known.
    NotLeader,
    /// The leader has not committed an entry of its term yet; retry shortly.
    NotReady,
    /// A change is still uncommitted (at this index).
    Pending { index: u64 },
    /// The change makes no sense for the current configuration.
    Invalid(String),
}

impl fmt::Display for ChangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChangeError::Disabled => f.write_str("membership changes are off (fixed peer set)"),
            ChangeError::NotLeader => f.write_str("not the leader"),
            ChangeError::NotReady => {
                f.write_str("the leader has not committed an entry of its term yet; retry")
            }
            ChangeError::Pending { index } => write!(
                f,
                "another membership change (log index {index}) is not committed yet; one change at a time"
            ),
            ChangeError::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ChangeError {}

/// What a transport that supports membership changes provides (the node's): where the
/// configuration as of the snapshot is kept, and a hook told of every configuration change so
/// it can reach the members.
pub trait MembershipHost: Send + Sync {
    /// The configuration saved with [`save`](MembershipHost::save) (its entry's index), or
    /// the one to start from (index 0: a founding member's, or an empty configuration for a
    /// peer waiting to be added).
    fn load(&self) -> Result<(u64, Configuration), String>;
    /// Makes `config` (of the entry at `index`) durable before returning: it is the
    /// configuration as of a snapshot about to become durable. Called without Raft's mutex.
    fn save(&self, index: u64, config: &Configuration) -> Result<(), String>;
    /// The peer's current configuration changed (appended, truncated, restored, installed).
    /// Called under Raft's mutex: it must not block.
    fn changed(&self, config: &Configuration);
    /// [`changed`](MembershipHost::changed), with the index of the configuration's entry (0:
    /// the initial one); also called when only the index changed (the same members again).
    fn changed_at(&self, index: u64, config: &Configuration) {
        let _ = index;
        self.changed(config);
    }
    /// Whether a member has told this peer that a committed configuration newer than this
    /// peer's own leaves it out (that member, and the configuration's index): a removed peer
    /// that never received the entry removing it. Such a peer does not campaign (dissertation
    /// §4.2.3) until its own configuration is newer than the one it was told of (it was added
    /// again). Called under Raft's mutex: it must not block.
    fn removed(&self) -> Option<(usize, u64)> {
        None
    }
}

/// What a membership-enabled peer keeps: the configuration as of its snapshot and those of
/// the configuration entries in its log, oldest first.
#[derive(Debug, Clone, Default)]
pub(super) struct Configs {
    /// The configuration as of the log's base, and the index of its entry (0: the initial).
    pub base: (u64, Configuration),
    /// Configuration entries after the base, by index.
    pub log: Vec<(u64, Configuration)>,
    /// The configuration last told to the host, and its entry's index (so it is told of
    /// changes only).
    pub announced: Option<(u64, Configuration)>,
    /// The index of the configuration the host holds durably (0: none saved).
    pub saved: u64,
}

impl Configs {
    pub fn current(&self) -> &Configuration {
        self.log.last().map_or(&self.base.1, |(_, c)| c)
    }

    /// The index of the current configuration's entry (0: the initial one).
    pub fn current_index(&self) -> u64 {
        self.log.last().map_or(self.base.0, |(i, _)| *i)
    }

    /// The configuration in effect at `index` (at or after the base) and its entry's index.
    pub fn at(&self, index: u64) -> (u64, &Configuration) {
        self.log
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map_or((self.base.0, &self.base.1), |(i, c)| (*i, c))
    }

    /// Entries after `index` were dropped.
    pub fn truncate_after(&mut self, index: u64) {
        self.log.retain(|(i, _)| *i <= index);
    }

    /// The log now starts after `index`: the configuration in effect there becomes the base.
    pub fn compact_to(&mut self, index: u64) {
        let (i, c) = self.at(index);
        let base = (i, c.clone());
        self.log.retain(|(j, _)| *j > index);
        self.base = base;
    }
}

/// What [`Raft::membership`](super::Raft::membership) reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipStatus {
    /// The peer's current configuration (perhaps not committed yet).
    pub config: Configuration,
    /// The index of its entry (0: the initial configuration) and whether it is committed.
    pub index: u64,
    pub committed: bool,
    /// On a leader: each other member's match index; empty on a follower.
    pub matched: Vec<(usize, u64)>,
    /// The last index of this peer's log.
    pub last_index: u64,
}

impl Core {
    /// Records the configuration entries among `entries` (appended from index `first`).
    pub(super) fn note_config_entries(&self, st: &mut State, first: u64, entries: &[Entry]) {
        let Some(cs) = st.configs.as_mut() else {
            return;
        };
        for (e, index) in entries.iter().zip(first..) {
            if is_config_entry(&e.command) {
                match Configuration::decode_entry(&e.command) {
                    Ok(c) => {
                        log::info!(target: "raft::membership", "raft-{} t{}: configuration {c} at {index}", self.me, st.term);
                        cs.log.push((index, c));
                    }
                    // Checked before anything was appended (`check::entries`); a leader's own
                    // entries are encoded here.
                    Err(why) => {
                        log::error!(target: "raft::membership", "raft-{}: configuration entry at {index} unreadable: {why}", self.me)
                    }
                }
            }
        }
    }

    /// Tells the host the current configuration if it changed since it was last told.
    pub(super) fn announce_config(&self, st: &mut State) {
        let (Some(host), Some(cs)) = (self.peers.membership(), st.configs.as_mut()) else {
            return;
        };
        let now = (cs.current_index(), cs.current());
        if cs.announced.as_ref().map(|(i, c)| (*i, c)) != Some(now) {
            host.changed_at(now.0, now.1);
            cs.announced = Some((now.0, now.1.clone()));
        }
    }

    /// A leader that is not a voter of its committed configuration steps down (Raft
    /// dissertation §4.2.2): it led the change through, and takes no part from now on.
    pub(super) fn step_down_if_removed(&self, st: &mut State) {
        let Some(cs) = st.configs.as_ref() else {
            return;
        };
        if st.role == Role::Leader
            && !cs.current().is_voter(self.me)
            && st.commit_index >= cs.current_index()
        {
            log::warn!(target: "raft::membership", "raft-{} t{}: not a voter of the committed configuration {} (entry {}); stepping down", self.me, st.term, cs.current(), cs.current_index());
            st.leader_contact = None;
            let term = st.term;
            self.step_down(st, term);
        }
    }

    /// A new leader whose log and snapshot hold no configuration entry appends its
    /// configuration (see the module documentation).
    pub(super) fn record_initial_configuration(self: &Arc<Core>, st: &mut State) {
        let Some(cs) = st.configs.as_ref() else {
            return;
        };
        if cs.current_index() != 0 {
            return;
        }
        let c = cs.current().clone();
        self.append_config(st, c);
    }

    /// Appends a configuration entry as leader; it takes effect at once.
    fn append_config(self: &Arc<Core>, st: &mut State, c: Configuration) -> u64 {
        let before: Vec<usize> = st
            .configs
            .as_ref()
            .map(|cs| cs.current().peers().collect())
            .unwrap_or_default();
        let entry = Entry {
            term: st.term,
            command: c.encode_entry(),
        };
        let index = st.log.append(entry.clone());
        self.persist_append(st, index, std::slice::from_ref(&entry));
        self.note_config_entries(st, index, std::slice::from_ref(&entry));
        // A peer new to the configuration starts from nothing here, whatever an earlier
        // member of the same number had (its answers still in flight are ignored).
        let next = st.log.last_index();
        for peer in c.peers().filter(|p| !before.contains(p) && *p != self.me) {
            let p = &mut st.peers[peer];
            p.start_over(next);
            p.snap_send = None;
            p.snap_config = None;
            p.snap_offset = 0;
            p.chunks_out = 0;
            p.reset_seq = p.seq;
        }
        self.announce_config(st);
        log::info!(target: "raft::membership", "raft-{} t{}: appended configuration {c} at {index}", self.me, st.term);
        index
    }

    /// Proposes one single-server change as leader: returns the index of its entry, which
    /// takes effect at once and is committed like any entry.
    pub(crate) fn change_membership(
        self: &Arc<Core>,
        change: &ConfChange,
    ) -> Result<(u64, u64), ChangeError> {
        let mut st = self.lock_state();
        if st.configs.is_none() {
            return Err(ChangeError::Disabled);
        }
        if self.is_dead() || st.role != Role::Leader {
            return Err(ChangeError::NotLeader);
        }
        let Some(cs) = st.configs.as_ref() else {
            return Err(ChangeError::Disabled);
        };
        if cs.current_index() > st.commit_index {
            return Err(ChangeError::Pending {
                index: cs.current_index(),
            });
        }
        if st.log.term_at(st.commit_index) != Some(st.term) {
            return Err(ChangeError::NotReady);
        }
        let next = change.apply(cs.current())?;
        let index = self.append_config(&mut st, next);
        if self.is_dead() {
            return Err(ChangeError::NotLeader); // could not be saved
        }
        self.broadcast_append(&mut st);
        Ok((index, st.term))
    }

    /// The current configuration and, on a leader, each member's progress.
    pub(crate) fn membership_status(&self) -> Option<MembershipStatus> {
        let st = self.state.lock();
        let cs = st.configs.as_ref()?;
        let matched = if st.role == Role::Leader {
            cs.current()
                .peers()
                .filter(|&p| p != self.me)
                .map(|p| (p, st.peers[p].match_index))
                .collect()
        } else {
            Vec::new()
        };
        Some(MembershipStatus {
            config: cs.current().clone(),
            index: cs.current_index(),
            committed: cs.current_index() <= st.commit_index,
            matched,
            last_index: st.log.last_index(),
        })
    }

    /// Saves the configuration as of `index` with the host before a snapshot through
    /// `index` is queued (outside the mutex: the host syncs a file). Returns false if the
    /// peer stopped because it could not.
    pub(super) fn save_config_for_snapshot(&self, index: u64) -> bool {
        let Some(host) = self.peers.membership() else {
            return true;
        };
        let (at, c) = {
            let st = self.state.lock();
            let Some(cs) = st.configs.as_ref() else {
                return true;
            };
            if index <= st.log.base_index() || index > st.last_applied {
                return true; // the snapshot will be ignored
            }
            let (at, c) = cs.at(index);
            if at == 0 || at <= cs.saved {
                return true;
            }
            (at, c.clone())
        };
        if let Err(e) = host.save(at, &c) {
            let mut st = self.state.lock();
            self.config_save_failed(&mut st, &e);
            return false;
        }
        if let Some(cs) = self.state.lock().configs.as_mut() {
            cs.saved = cs.saved.max(at);
        }
        true
    }

    /// The host could not save a configuration: this peer stops, as on a storage error.
    pub(super) fn config_save_failed(&self, st: &mut State, e: &str) {
        let err = super::StorageError::Io {
            path: "membership".to_string(),
            op: "save configuration",
            reason: e.to_string(),
        };
        self.storage_failed(st, "save configuration", &err);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Configuration {
        Configuration {
            members: (0..3)
                .map(|p| Member {
                    peer: p,
                    voter: true,
                    addr: format!("127.0.0.1:{}", 9000 + p),
                    client_addr: format!("127.0.0.1:{}", 8000 + p),
                })
                .collect(),
        }
    }

    #[test]
    fn entry_round_trips_and_is_recognised() {
        let c = three();
        let e = c.encode_entry();
        assert!(is_config_entry(&e));
        assert_eq!(Configuration::decode_entry(&e).unwrap(), c);
        assert!(Configuration::decode_entry(&[CONFIG_TAG, 9]).is_err());
        assert!(Configuration::decode_entry(&[CONFIG_TAG, CONFIG_VERSION, 0xFF]).is_err());
    }

    #[test]
    fn single_server_changes() {
        let c = three();
        let add = ConfChange::AddLearner {
            peer: 3,
            addr: "127.0.0.1:9003".into(),
            client_addr: "x".into(),
        };
        let c4 = add.apply(&c).unwrap();
        assert!(!c4.is_voter(3) && c4.member(3).is_some());
        assert!(add.apply(&c4).is_err(), "added twice");
        let c4 = ConfChange::Promote { peer: 3 }.apply(&c4).unwrap();
        assert_eq!(c4.voters().count(), 4);
        let c3 = ConfChange::Remove { peer: 0 }.apply(&c4).unwrap();
        assert_eq!(c3.voters().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(ConfChange::Remove { peer: 0 }.apply(&c3).is_err());
        let one = Configuration {
            members: vec![c.members[0].clone()],
        };
        assert!(ConfChange::Remove { peer: 0 }.apply(&one).is_err());
        let dup_addr = ConfChange::AddLearner {
            peer: 5,
            addr: "127.0.0.1:9001".into(),
            client_addr: String::new(),
        };
        assert!(dup_addr.apply(&c).is_err());
    }

    #[test]
    fn configs_follow_truncation_and_compaction() {
        let mut cs = Configs {
            base: (0, three()),
            ..Configs::default()
        };
        let c4 = ConfChange::AddLearner {
            peer: 3,
            addr: "a".into(),
            client_addr: "b".into(),
        }
        .apply(&three())
        .unwrap();
        cs.log.push((10, c4.clone()));
        assert_eq!(cs.current(), &c4);
        assert_eq!(cs.at(9).1, &three());
        cs.truncate_after(9);
        assert_eq!(cs.current(), &three());
        cs.log.push((12, c4.clone()));
        cs.compact_to(15);
        assert_eq!(cs.base, (12, c4.clone()));
        assert!(cs.log.is_empty());
    }
}
