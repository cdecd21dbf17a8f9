//! The node's side of membership changes (Raft dissertation §4, see
//! [`raft::membership`](crate::raft::membership)): the configuration file, the connections to
//! the current members (dialled by id, at the address the configuration carries), and the
//! operator's `RAFTKV.MEMBER LIST|ADD|REMOVE` commands on the client port (what `raftkv member`
//! sends).
//!
//! `DIR/membership` holds the configuration as of the last snapshot (written atomically and
//! fsynced before the snapshot that needs it is durable); the log holds the later ones. A
//! founding node starts from its `--peers` list (every node a voter); a node started on an
//! empty directory without `--bootstrap` starts with an empty configuration and learns the
//! real one from its leader's AppendEntries or snapshot.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::net::handshake::Membership;
use crate::net::{ClientEnd, ClientOptions, DialAuth, PeerAuth};
use crate::raft::membership::MAX_PEERS;
use crate::raft::{ChangeError, ConfChange, Configuration, Member, MembershipHost, Raft};

/// The file's name inside a node's data directory.
pub const MEMBERSHIP_FILE: &str = "membership";
const FILE_MAGIC: &[u8; 8] = b"rkvmemb1";

/// How long an add or remove waits for its configuration entry to commit.
const COMMIT_WAIT: Duration = Duration::from_secs(10);
/// A learner is promoted once a round of catch-up (reaching the leader's last index as it
/// was when the round began) takes less than this: a few election timeouts, generous for a
/// loaded machine (Raft dissertation §4.2.1 says one).
const CAUGHT_UP_ROUND: Duration = Duration::from_secs(2);
/// At most this many rounds, and this long in all, before `add` gives up.
const MAX_ROUNDS: usize = 20;
const CATCH_UP_LIMIT: Duration = Duration::from_secs(300);
/// How long a change waits for a new leader to commit an entry of its term.
const READY_WAIT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

/// What the node keeps of its configuration: the current one (told by Raft) and one
/// connection per other member, made when first needed.
pub struct Members {
    me: usize,
    /// The command line's `--peers` (node `i + 1` at `local[i]`): where this node reaches a
    /// founding member, whose configuration entry names no address (the lists differ between
    /// nodes when a proxy stands for a peer).
    local: Vec<String>,
    path: PathBuf,
    initial: Configuration,
    current: Mutex<Configuration>,
    ends: Mutex<Vec<Option<(String, ClientEnd)>>>,
    /// Ends of members removed or moved: shut down with the node (a drop here could join
    /// a thread under Raft's mutex).
    retired: Mutex<Vec<ClientEnd>>,
    auth: PeerAuth,
    options: ClientOptions,
    /// The operator's change under way on this node (an add waits for its learner to catch
    /// up): another is refused meanwhile.
    busy: Mutex<Option<String>>,
    /// The index of the current configuration's entry, and a removal a member told of.
    removal: Mutex<Removal>,
    /// This node's Raft, once started: whether its configuration is committed decides
    /// whether a dialler outside it is told it was removed.
    raft: Mutex<Option<Weak<Raft>>>,
}

/// What this node knows of its own removal.
#[derive(Debug, Default)]
struct Removal {
    /// The index of the entry of the current configuration (0: the initial one).
    current_index: u64,
    /// A member that answered `NotMember`, and the index of its committed configuration
    /// without this node.
    told: Option<(usize, u64)>,
}

impl Members {
    /// Node `me` (0-based) whose data directory is `dir`. `initial`: the configuration to
    /// start from when no configuration was saved (see the module documentation).
    pub fn new(
        me: usize,
        local: Vec<String>,
        dir: &Path,
        initial: Configuration,
        auth: PeerAuth,
        options: ClientOptions,
    ) -> Members {
        Members {
            me,
            local,
            path: dir.join(MEMBERSHIP_FILE),
            current: Mutex::new(initial.clone()),
            initial,
            ends: Mutex::new((0..MAX_PEERS).map(|_| None).collect()),
            retired: Mutex::new(Vec::new()),
            auth,
            options,
            busy: Mutex::new(None),
            removal: Mutex::new(Removal::default()),
            raft: Mutex::new(None),
        }
    }

    /// The node's Raft, started after the peer port (whose handshake asks it).
    pub fn set_raft(&self, raft: &Arc<Raft>) {
        *self.raft.lock() = Some(Arc::downgrade(raft));
    }

    /// The founding configuration of `--peers` (nodes `1..=peers`), every node a voter,
    /// with no peer address (each node reaches a founding member at its own `--peers`
    /// entry); this node's client address filled in.
    pub fn founding(peers: usize, me: usize, client_addr: &str) -> Configuration {
        Configuration {
            members: (0..peers)
                .map(|peer| Member {
                    peer,
                    voter: true,
                    addr: String::new(),
                    client_addr: if peer == me {
                        client_addr.to_string()
                    } else {
                        String::new()
                    },
                })
                .collect(),
        }
    }

    /// The current configuration.
    pub fn current(&self) -> Configuration {
        self.current.lock().clone()
    }

    /// What node `id` (1-based) is to this node, for the peer handshake: a member of the
    /// current configuration, or anyone while this node has none (it waits to be added and
    /// learns the configuration from the leader that contacts it), may connect; a node
    /// outside a committed configuration was removed, and is told so (Raft dissertation
    /// §4.2.3: it then stops campaigning); outside one not yet committed, it is refused.
    pub fn membership_of(&self, id: u64) -> Membership {
        {
            let c = self.current.lock();
            if c.members.is_empty() || c.members.iter().any(|m| m.peer as u64 + 1 == id) {
                return Membership::Member;
            }
        }
        // Not under this lock: Raft's mutex is taken before it (`changed_at`).
        let raft = self.raft.lock().as_ref().and_then(Weak::upgrade);
        let peer = id.saturating_sub(1) as usize;
        match raft.and_then(|r| r.membership()) {
            Some(s) if s.committed && s.config.member(peer).is_none() => {
                Membership::Removed { index: s.index }
            }
            _ => Membership::NotMember,
        }
    }

    /// Member `by` answered that its committed configuration at `index` leaves this node
    /// out. Believed only for a configuration newer than this node's own: a member that
    /// lags behind a change adding this node back says nothing new. Logged once.
    pub fn note_removed(&self, by: usize, index: u64) {
        let mut r = self.removal.lock();
        if index <= r.current_index || r.told.is_some_and(|(_, i)| i >= index) {
            return;
        }
        r.told = Some((by, index));
        drop(r);
        log::warn!(target: "node::members", "node {}: removed from the cluster: node {} holds a committed configuration (entry {index}) without it; it no longer campaigns (stop it, or add it again)", self.me + 1, by + 1);
    }

    /// Where this node reaches member `peer`: the address its configuration entry names,
    /// or this node's own `--peers` entry for a member whose entry names none (a founding
    /// member, or one added with `-`). `None` for a node that is not a member.
    pub fn peer_addr(&self, peer: usize) -> Option<String> {
        let addr = self.current.lock().member(peer)?.addr.clone();
        if addr.is_empty() {
            self.local.get(peer).cloned()
        } else {
            Some(addr)
        }
    }

    /// The connection to member `peer` (0-based), made now if needed; `None` for a peer
    /// that is not a member (or whose address does not resolve).
    pub fn end(&self, peer: usize) -> Option<ClientEnd> {
        if peer == self.me || peer >= MAX_PEERS {
            return None;
        }
        let addr = self.peer_addr(peer)?;
        {
            let ends = self.ends.lock();
            if let Some((a, end)) = &ends[peer]
                && *a == addr
            {
                return Some(end.clone());
            }
        }
        let sock = resolve(&addr)?;
        let options = ClientOptions {
            auth: Some(DialAuth {
                local: self.auth.clone(),
                remote_node: peer as u64 + 1,
            }),
            ..self.options.clone()
        };
        let mut ends = self.ends.lock();
        if let Some((a, end)) = &ends[peer]
            && *a == addr
        {
            return Some(end.clone());
        }
        let end = ClientEnd::connect(
            &format!("node{}-to{}", self.me + 1, peer + 1),
            sock,
            options,
        );
        if let Some((_, old)) = ends[peer].replace((addr, end.clone())) {
            self.retired.lock().push(old);
        }
        Some(end)
    }

    /// Every member's peer number, this node's included if it is one.
    pub fn peers(&self) -> Vec<usize> {
        self.current.lock().peers().collect()
    }

    /// Closes every connection and joins its threads.
    pub fn shutdown(&self) {
        let ends: Vec<ClientEnd> = self
            .ends
            .lock()
            .iter_mut()
            .filter_map(|e| e.take().map(|(_, end)| end))
            .collect();
        let retired: Vec<ClientEnd> = std::mem::take(&mut *self.retired.lock());
        for end in ends.iter().chain(retired.iter()) {
            end.shutdown();
        }
    }

    /// What this node is in its configuration, for the status file.
    pub fn role(&self) -> &'static str {
        if self.removed().is_some() {
            return "removed";
        }
        let c = self.current.lock();
        match c.member(self.me) {
            Some(m) if m.voter => "voter",
            Some(_) => "learner",
            None if c.members.is_empty() => "waiting to be added",
            None => "removed",
        }
    }
}

fn resolve(addr: &str) -> Option<SocketAddr> {
    if let Ok(a) = addr.parse() {
        return Some(a);
    }
    match addr.to_socket_addrs() {
        Ok(mut it) => it.next(),
        Err(e) => {
            log::warn!(target: "node::members", "a member's address {addr}: {e}");
            None
        }
    }
}

impl MembershipHost for Members {
    fn load(&self) -> Result<(u64, Configuration), String> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, self.initial.clone())),
            Err(e) => return Err(format!("read {}: {e}", self.path.display())),
        };
        let bad = |why: &str| format!("{}: {why}", self.path.display());
        if bytes.len() < 20 || &bytes[..8] != FILE_MAGIC {
            return Err(bad("not a membership file"));
        }
        let index = u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let crc = u32::from_be_bytes(bytes[16..20].try_into().expect("4 bytes"));
        let body = &bytes[20..];
        if crc32c::crc32c(body) != crc {
            return Err(bad("bad checksum"));
        }
        let c = Configuration::from_bytes(body).map_err(|e| bad(&e))?;
        Ok((index, c))
    }

    fn save(&self, index: u64, config: &Configuration) -> Result<(), String> {
        let body = config.to_bytes();
        let mut bytes = Vec::with_capacity(20 + body.len());
        bytes.extend_from_slice(FILE_MAGIC);
        bytes.extend_from_slice(&index.to_be_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
        bytes.extend_from_slice(&body);
        super::identity::write_durably(&self.path, &bytes).map_err(|e| e.to_string())?;
        log::info!(target: "node::members", "node {}: saved configuration {config} (entry {index})", self.me + 1);
        Ok(())
    }

    fn changed(&self, config: &Configuration) {
        log::info!(target: "node::members", "node {}: configuration now {config}", self.me + 1);
        *self.current.lock() = config.clone();
    }

    fn changed_at(&self, index: u64, config: &Configuration) {
        self.changed(config);
        let mut r = self.removal.lock();
        r.current_index = index;
        if let Some((by, told)) = r.told
            && index > told
        {
            r.told = None;
            log::info!(target: "node::members", "node {}: its configuration (entry {index}) is newer than the one node {} said removed it (entry {told})", self.me + 1, by + 1);
        }
    }

    fn removed(&self) -> Option<(usize, u64)> {
        let r = self.removal.lock();
        r.told.filter(|&(_, index)| index > r.current_index)
    }
}

/// The answer to an operator's membership command.
pub enum AdminReply {
    Ok(String),
    /// This node does not lead; where clients reach the leader, if known.
    NotLeader(Option<String>),
    Err(String),
}

/// Runs `RAFTKV.MEMBER ...` (`args` after the command name) on this node. Blocks while a
/// change commits and a new member catches up.
pub fn admin(raft: &Raft, members: &Members, args: &[Vec<u8>]) -> AdminReply {
    let words: Vec<String> = args
        .iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let usage = || {
        AdminReply::Err(
            "usage: RAFTKV.MEMBER LIST | ADD ID PEER_ADDR CLIENT_ADDR | REMOVE ID".to_string(),
        )
    };
    let Some(sub) = words.first() else {
        return usage();
    };
    let leader_client = || {
        let c = members.current();
        raft.leader_hint()
            .and_then(|l| c.member(l).map(|m| m.client_addr.clone()))
            .filter(|a| !a.is_empty())
    };
    let (_, leading) = raft.get_state();
    if !leading {
        return AdminReply::NotLeader(leader_client());
    }
    let id = |w: &str| -> Result<usize, AdminReply> {
        w.parse::<usize>()
            .ok()
            .filter(|id| (1..=MAX_PEERS).contains(id))
            .map(|id| id - 1)
            .ok_or_else(|| AdminReply::Err(format!("'{w}' is not a node id from 1 to {MAX_PEERS}")))
    };
    let sub = sub.to_ascii_uppercase();
    if sub == "LIST" && words.len() == 1 {
        return list(raft);
    }
    // One change at a time: Raft refuses a second uncommitted configuration entry, and this
    // node refuses a second command while one runs (an add catching up its learner).
    let what = format!(
        "member {} {}",
        sub.to_ascii_lowercase(),
        words[1..].join(" ")
    );
    {
        let mut busy = members.busy.lock();
        if let Some(running) = busy.as_ref() {
            return AdminReply::Err(format!(
                "'{what}' refused: '{running}' is still under way on this leader; one change at a time"
            ));
        }
        *busy = Some(what);
    }
    let reply = match run_change(raft, &sub, &words, id) {
        // Stopped leading while the change ran: point at the new leader if known by now.
        AdminReply::NotLeader(None) => AdminReply::NotLeader(leader_client()),
        reply => reply,
    };
    *members.busy.lock() = None;
    reply
}

fn run_change(
    raft: &Raft,
    sub: &str,
    words: &[String],
    id: impl Fn(&str) -> Result<usize, AdminReply>,
) -> AdminReply {
    let usage = || {
        AdminReply::Err(
            "usage: RAFTKV.MEMBER LIST | ADD ID PEER_ADDR CLIENT_ADDR | REMOVE ID".to_string(),
        )
    };
    match (sub, words.len()) {
        ("ADD", 4) => match id(&words[1]) {
            Ok(peer) => {
                // `-`: no address in the configuration; each node reaches it at its own
                // `--peers` entry for that id (as founding members are reached).
                let addr = if words[2] == "-" {
                    ""
                } else {
                    words[2].as_str()
                };
                if words[2].is_empty() || (!addr.is_empty() && resolve(addr).is_none()) {
                    return AdminReply::Err(format!(
                        "node {}: peer address '{}' does not resolve",
                        peer + 1,
                        words[2]
                    ));
                }
                add(raft, peer, addr, &words[3])
            }
            Err(e) => e,
        },
        ("REMOVE", 2) => match id(&words[1]) {
            Ok(peer) => match change(raft, &ConfChange::Remove { peer }) {
                Ok(index) => AdminReply::Ok(format!(
                    "node {} removed (configuration entry {index})",
                    peer + 1
                )),
                Err(e) => e,
            },
            Err(e) => e,
        },
        _ => usage(),
    }
}

fn list(raft: &Raft) -> AdminReply {
    let Some(s) = raft.membership() else {
        return AdminReply::Err("membership changes are off".to_string());
    };
    let mut out = format!(
        "configuration entry {} ({}), leader's last index {}\n",
        s.index,
        if s.committed {
            "committed"
        } else {
            "not committed yet"
        },
        s.last_index
    );
    for m in &s.config.members {
        let matched = s
            .matched
            .iter()
            .find(|(p, _)| *p == m.peer)
            .map_or(s.last_index, |(_, i)| *i);
        let _ = writeln!(
            out,
            "{} {} peer={} client={} match={matched}",
            m.peer + 1,
            if m.voter { "voter" } else { "learner" },
            if m.addr.is_empty() {
                "(founding: each node's --peers)"
            } else {
                &m.addr
            },
            if m.client_addr.is_empty() {
                "-"
            } else {
                &m.client_addr
            },
        );
    }
    AdminReply::Ok(out)
}

/// Proposes `change` and waits for it to commit. Retries for [`READY_WAIT`] while the
/// leader has not yet committed an entry of its term, or an earlier change.
fn change(raft: &Raft, change: &ConfChange) -> Result<u64, AdminReply> {
    let start = Instant::now();
    let (index, term) = loop {
        match raft.change_membership(change) {
            Ok(it) => break it,
            // A new leader commits an entry of its term first, and with it any change its
            // predecessor left uncommitted (an add resumed on it finds its learner so).
            Err(ChangeError::NotReady | ChangeError::Pending { .. })
                if start.elapsed() < READY_WAIT =>
            {
                std::thread::sleep(POLL);
            }
            Err(ChangeError::NotLeader) => return Err(AdminReply::NotLeader(None)),
            Err(e) => return Err(AdminReply::Err(e.to_string())),
        }
    };
    let deadline = Instant::now() + COMMIT_WAIT;
    loop {
        let (commit, _) = raft.progress();
        if commit >= index {
            return if raft.term_at(index) == Some(term) || raft.term_at(index).is_none() {
                // (`None`: already inside a snapshot, hence committed as it was.)
                Ok(index)
            } else {
                Err(AdminReply::Err(format!(
                    "the change at log index {index} was overwritten by another leader; retry"
                )))
            };
        }
        if Instant::now() >= deadline {
            return Err(AdminReply::Err(format!(
                "the change at log index {index} did not commit within {COMMIT_WAIT:?} (a majority out of reach?); it takes effect if it commits: `member list` shows where it stands"
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// Adds `peer` as a learner, waits until it has caught up (rounds, §4.2.1), then promotes it.
///
/// The same add again is safe, and it is how an add cut short is finished: when `peer` is
/// already a member at these very addresses, a voter is reported added, and a learner (an
/// add whose leader stopped leading while it caught up) resumes its catch-up here. A leader
/// that stops leading meanwhile answers as any node that does not lead, so the operator's
/// command goes on to the new leader with the same add.
fn add(raft: &Raft, peer: usize, addr: &str, client_addr: &str) -> AdminReply {
    let Some(now) = raft.membership() else {
        return AdminReply::Err("membership changes are off".to_string());
    };
    let same = now
        .config
        .member(peer)
        .filter(|m| m.addr == addr && m.client_addr == client_addr)
        .map(|m| m.voter);
    let index = match same {
        Some(true) => {
            return AdminReply::Ok(format!(
                "node {} added: already a voter at these addresses (configuration entry {})",
                peer + 1,
                now.index
            ));
        }
        Some(false) => {
            log::info!(target: "node::members", "node {} is already a learner at these addresses (configuration entry {}); resuming its catch-up", peer + 1, now.index);
            now.index
        }
        None => {
            let learner = ConfChange::AddLearner {
                peer,
                addr: addr.to_string(),
                client_addr: client_addr.to_string(),
            };
            match change(raft, &learner) {
                Ok(i) => i,
                Err(e) => return e,
            }
        }
    };
    log::info!(target: "node::members", "node {} added as a learner at {index}; catching up", peer + 1);
    let started = Instant::now();
    let mut rounds = 0;
    loop {
        rounds += 1;
        let Some(target) = raft.membership().map(|s| s.last_index) else {
            return AdminReply::NotLeader(None);
        };
        let round_start = Instant::now();
        loop {
            let Some(s) = raft.membership() else {
                return AdminReply::NotLeader(None);
            };
            if !raft.get_state().1 {
                log::warn!(target: "node::members", "node {}: this node stopped leading while it caught up; it stays a learner (configuration entry {index}) until the same add, on the new leader, finishes it", peer + 1);
                return AdminReply::NotLeader(None);
            }
            let matched = s
                .matched
                .iter()
                .find(|(p, _)| *p == peer)
                .map_or(0, |(_, m)| *m);
            if matched >= target {
                break;
            }
            if started.elapsed() >= CATCH_UP_LIMIT {
                return AdminReply::Err(format!(
                    "node {} did not catch up within {CATCH_UP_LIMIT:?} ({rounds} rounds; it holds the log through {matched}, the leader through {}); it stays a learner: `member remove {}` takes it out",
                    peer + 1,
                    s.last_index,
                    peer + 1
                ));
            }
            std::thread::sleep(POLL);
        }
        if round_start.elapsed() < CAUGHT_UP_ROUND {
            break;
        }
        if rounds >= MAX_ROUNDS {
            return AdminReply::Err(format!(
                "node {} did not catch up in {MAX_ROUNDS} rounds (each took more than {CAUGHT_UP_ROUND:?}); it stays a learner: `member remove {}` takes it out",
                peer + 1,
                peer + 1
            ));
        }
    }
    match change(raft, &ConfChange::Promote { peer }) {
        Ok(promoted) => AdminReply::Ok(format!(
            "node {} added: caught up in {rounds} round(s), {:.1}s, and a voter (configuration entry {promoted})",
            peer + 1,
            started.elapsed().as_secs_f64()
        )),
        Err(e) => e,
    }
}

/// A shared handle for the node's parts.
pub type SharedMembers = Arc<Members>;
