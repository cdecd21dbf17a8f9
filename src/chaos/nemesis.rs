//! The faults a chaos run injects, chosen from a seeded RNG: what to break, for how long, and
//! how to bring it back.

use std::fmt;
use std::time::Duration;

use rand::Rng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;

use super::cluster::{ChaosCluster, ClusterError};
use crate::net::proxy::LinkMode;

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// `kill -9` the leader; restart it on its data when the fault ends.
    KillLeader,
    /// `kill -9` a follower; restart it when the fault ends.
    KillFollower,
    /// `SIGSTOP` the leader; `SIGCONT` when the fault ends (it wakes up believing it leads).
    PauseLeader,
    /// `SIGSTOP` a follower; `SIGCONT` when the fault ends.
    PauseFollower,
    /// Cut the leader off from every other node through the proxies (both ways).
    IsolateLeader,
    /// Split the nodes into a random minority and the majority.
    SplitMinority,
    /// A follower's disk fills (a file-size limit on the running process): it stops with
    /// the cause named, which is expected, not a crash. When the fault ends its space is
    /// freed and it is started again; it catches up.
    DiskFullFollower,
    /// Replace a follower (a lost disk): `member remove` it, wipe its directory, start it
    /// empty; when the fault ends, `member add` it again under its id and address (it
    /// catches up as a learner, then votes).
    ReplaceFollower,
}

impl FaultKind {
    pub const ALL: [FaultKind; 8] = [
        FaultKind::KillLeader,
        FaultKind::KillFollower,
        FaultKind::PauseLeader,
        FaultKind::PauseFollower,
        FaultKind::IsolateLeader,
        FaultKind::SplitMinority,
        FaultKind::DiskFullFollower,
        FaultKind::ReplaceFollower,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillLeader => "kill -9 leader",
            FaultKind::KillFollower => "kill -9 follower",
            FaultKind::PauseLeader => "pause leader",
            FaultKind::PauseFollower => "pause follower",
            FaultKind::IsolateLeader => "isolate leader",
            FaultKind::SplitMinority => "split minority/majority",
            FaultKind::DiskFullFollower => "disk full follower",
            FaultKind::ReplaceFollower => "replace follower",
        }
    }

    /// The name `raftkv chaos --faults` takes.
    pub fn option_name(self) -> &'static str {
        match self {
            FaultKind::KillLeader => "kill-leader",
            FaultKind::KillFollower => "kill-follower",
            FaultKind::PauseLeader => "pause-leader",
            FaultKind::PauseFollower => "pause-follower",
            FaultKind::IsolateLeader => "isolate-leader",
            FaultKind::SplitMinority => "split-minority",
            FaultKind::DiskFullFollower => "disk-full-follower",
            FaultKind::ReplaceFollower => "replace-follower",
        }
    }

    /// The kinds a comma-separated list of [`option_name`](Self::option_name)s names.
    pub fn parse_list(list: &str) -> Result<Vec<FaultKind>, String> {
        let mut kinds = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let kind = FaultKind::ALL
                .into_iter()
                .find(|k| k.option_name() == name)
                .ok_or_else(|| {
                    let known: Vec<&str> = FaultKind::ALL.iter().map(|k| k.option_name()).collect();
                    format!(
                        "unknown fault {name:?}; the faults are {}",
                        known.join(", ")
                    )
                })?;
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        if kinds.is_empty() {
            return Err("no fault named".to_string());
        }
        Ok(kinds)
    }

    /// Whether the node it hits stops by itself while it lasts (not a crash).
    pub fn stops_its_node(self) -> bool {
        self == FaultKind::DiskFullFollower
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A fault in force, and how to undo it.
#[derive(Debug, Clone)]
pub struct ActiveFault {
    pub kind: FaultKind,
    /// The nodes it hit (0-based).
    pub nodes: Vec<usize>,
    /// For partitions: cut (connections reset) or blackhole (bytes dropped).
    pub mode: Option<LinkMode>,
    pub hold: Duration,
}

impl fmt::Display for ActiveFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<String> = self.nodes.iter().map(|i| (i + 1).to_string()).collect();
        write!(f, "{} (node {})", self.kind, nodes.join(","))?;
        match self.mode {
            Some(LinkMode::Cut) => f.write_str(" cut"),
            Some(LinkMode::Blackhole) => f.write_str(" blackholed"),
            _ => Ok(()),
        }
    }
}

/// The order in which a run's faults come: rounds of every kind once, each round shuffled by
/// the seed. A run of `r` rounds injects every kind `r` times; kinds drawn one at a time
/// could leave a kind out of a whole run (with two kinds and ten faults, one run in five
/// hundred).
#[derive(Debug, Clone)]
pub struct FaultDeck {
    kinds: Vec<FaultKind>,
    /// What is left of the current round, drawn from the end.
    round: Vec<FaultKind>,
}

impl FaultDeck {
    /// The deck of `kinds` (every kind, [`FaultKind::ALL`], if empty).
    pub fn new(kinds: &[FaultKind]) -> FaultDeck {
        let kinds = if kinds.is_empty() {
            FaultKind::ALL.to_vec()
        } else {
            kinds.to_vec()
        };
        FaultDeck {
            kinds,
            round: Vec::new(),
        }
    }

    /// The next kind: the rest of the round, or a new round shuffled.
    pub fn draw(&mut self, rng: &mut SmallRng) -> FaultKind {
        if self.round.is_empty() {
            self.round = self.kinds.clone();
            self.round.shuffle(rng);
        }
        self.round.pop().expect("a deck holds at least one kind")
    }
}

/// Quiet time between faults.
pub fn calm(rng: &mut SmallRng) -> Duration {
    Duration::from_millis(rng.gen_range(1000..=2500))
}

/// Picks a fault of one of `kinds` (every kind if empty) for the cluster as it is
/// (`leader`: the node that leads now, if known) and injects it.
pub fn inject(
    cluster: &mut ChaosCluster,
    leader: Option<usize>,
    kinds: &[FaultKind],
    rng: &mut SmallRng,
) -> Result<ActiveFault, ClusterError> {
    let n = cluster.len();
    let kinds = if kinds.is_empty() {
        &FaultKind::ALL[..]
    } else {
        kinds
    };
    let kind = kinds[rng.gen_range(0..kinds.len())];
    // Without a known leader, a "leader" fault hits a random node.
    let leader = leader.unwrap_or_else(|| rng.gen_range(0..n));
    let follower = {
        let others: Vec<usize> = (0..n).filter(|&i| i != leader).collect();
        others[rng.gen_range(0..others.len())]
    };
    let hold = Duration::from_millis(rng.gen_range(1000..=4000));
    let mode = if rng.gen_bool(0.5) {
        LinkMode::Cut
    } else {
        LinkMode::Blackhole
    };
    // The nodes the fault hit, and how their links were broken (for a partition).
    let (nodes, link_mode) = match kind {
        FaultKind::KillLeader | FaultKind::KillFollower => {
            let node = if kind == FaultKind::KillLeader {
                leader
            } else {
                follower
            };
            cluster.kill9(node);
            (vec![node], None)
        }
        FaultKind::PauseLeader | FaultKind::PauseFollower => {
            let node = if kind == FaultKind::PauseLeader {
                leader
            } else {
                follower
            };
            cluster.pause(node)?;
            (vec![node], None)
        }
        FaultKind::DiskFullFollower => {
            cluster.fill_disk(follower)?;
            (vec![follower], None)
        }
        FaultKind::IsolateLeader => {
            cluster.partition(&[leader], mode);
            (vec![leader], Some(mode))
        }
        FaultKind::ReplaceFollower => {
            // Out of the configuration first: the cluster never counts on a wiped voter.
            let nodes = match cluster.member(&["REMOVE", &(follower + 1).to_string()]) {
                Ok(_) => {
                    cluster.wipe(follower)?;
                    cluster.restart(follower)?;
                    vec![follower]
                }
                Err(e) => {
                    log::warn!(target: "chaos::nemesis", "replace follower: node {} not removed: {e}", follower + 1);
                    Vec::new()
                }
            };
            (nodes, None)
        }
        FaultKind::SplitMinority => {
            let mut nodes: Vec<usize> = (0..n).collect();
            // A partial Fisher-Yates: the first (n-1)/2 are the minority.
            let minority = (n - 1) / 2;
            for i in 0..minority {
                let j = rng.gen_range(i..n);
                nodes.swap(i, j);
            }
            nodes.truncate(minority);
            nodes.sort_unstable();
            cluster.partition(&nodes, mode);
            (nodes, Some(mode))
        }
    };
    Ok(ActiveFault {
        kind,
        nodes,
        mode: link_mode,
        hold,
    })
}

/// Undoes `fault`: restarts, resumes or heals.
pub fn recover(cluster: &mut ChaosCluster, fault: &ActiveFault) -> Result<(), ClusterError> {
    match fault.kind {
        FaultKind::KillLeader | FaultKind::KillFollower => {
            for &node in &fault.nodes {
                cluster.restart(node)?;
            }
        }
        FaultKind::PauseLeader | FaultKind::PauseFollower => {
            for &node in &fault.nodes {
                cluster.resume(node)?;
            }
        }
        FaultKind::IsolateLeader | FaultKind::SplitMinority => cluster.heal(),
        FaultKind::DiskFullFollower => {
            for &node in &fault.nodes {
                cluster.free_disk(node)?;
            }
        }
        FaultKind::ReplaceFollower => {
            for &node in &fault.nodes {
                add_back(cluster, node)?;
            }
        }
    }
    Ok(())
}

/// Adds a replaced node back under its id, reached at each node's own `--peers` address for
/// it (`-`: through the proxies). An add whose leader changes while its node catches up is
/// finished by the new leader (the same add resumes there); one that fails (its node did not
/// catch up in time) leaves a learner: it is removed and added again, three times at most.
fn add_back(cluster: &mut ChaosCluster, node: usize) -> Result<(), ClusterError> {
    let id = (node + 1).to_string();
    let client = cluster.client_addr(node).to_string();
    let mut last = String::new();
    for _ in 0..3 {
        match cluster.member(&["ADD", &id, "-", &client]) {
            Ok(_) => return Ok(()),
            Err(e) => {
                log::warn!(target: "chaos::nemesis", "replace follower: adding node {id} back: {e}");
                last = e;
                let _ = cluster.member(&["REMOVE", &id]);
            }
        }
    }
    Err(ClusterError::Setup {
        what: format!("node {id} added back"),
        reason: last,
    })
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn every_round_of_the_deck_holds_every_kind_once() {
        for seed in 0..50 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let kinds = [FaultKind::ReplaceFollower, FaultKind::DiskFullFollower];
            let mut deck = FaultDeck::new(&kinds);
            for _ in 0..5 {
                let mut round = [deck.draw(&mut rng), deck.draw(&mut rng)];
                round.sort();
                assert_eq!(
                    round,
                    [FaultKind::DiskFullFollower, FaultKind::ReplaceFollower]
                );
            }
            let mut all = FaultDeck::new(&[]);
            let mut round: Vec<FaultKind> = (0..FaultKind::ALL.len())
                .map(|_| all.draw(&mut rng))
                .collect();
            round.sort();
            assert_eq!(round, FaultKind::ALL.to_vec(), "seed {seed}");
        }
    }
}
