//! Which cluster a node's data directory belongs to, and the least state it must find there.
//!
//! `DIR/identity` (format 2, text, replaced atomically: temp file, fsync, rename, fsync of
//! the directory):
//!
//! ```text
//! raftkv identity 2
//! cluster 6f1c0e9a2b7d4c3e8a5f0b1d2c3e4f50
//! node 2
//! peers 1=127.0.0.1:8001,2=127.0.0.1:8002,3=127.0.0.1:8003
//! member voter
//! term 7
//! applied 1234
//! ```
//!
//! - `cluster`: the random id the cluster got when it was bootstrapped (`raftkv local`, or
//!   `raftkv serve --bootstrap ID` on every founding node). A node refuses to start on a
//!   directory of another cluster, and refuses Raft messages that carry another cluster's id.
//! - `member`: `voter`, or `joining` for a node that started on an empty directory without
//!   `--bootstrap`: it adopted the cluster id from a leader's first message and does not vote
//!   until it holds what that leader had committed.
//! - `term`, `applied`: a high-water mark of what the node's Raft state held durably (the
//!   term synced, the index applied), rewritten at most once a second. A start that finds
//!   less in `DIR/raft` is refused: the node lost state, and voting or serving with it could
//!   lose acknowledged writes.
//!
//! Format 1 was `DIR/cluster` (`id N` and `peers …`, no cluster id, so two clusters on the
//! same ports could not be told apart). It is upgraded in place when the node is started with
//! `--bootstrap ID`, and refused otherwise with a message naming both formats.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The identity file's name inside a data directory.
pub const IDENTITY_FILE: &str = "identity";
/// The format-1 identity file (node id and peers only).
pub const LEGACY_FILE: &str = "cluster";
/// The format this code writes.
pub const FORMAT: u32 = 2;
/// The high-water mark is rewritten at most this often.
pub const RECORD_INTERVAL: Duration = Duration::from_secs(1);

/// Why an identity could not be opened, adopted or saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityError {
    Io {
        op: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The file is not an identity this code can read.
    Malformed { path: PathBuf, reason: String },
    /// The directory belongs to another cluster.
    ForeignCluster {
        path: PathBuf,
        stored: String,
        given: String,
    },
    /// The directory belongs to another node, or a cluster with other peers.
    OtherNode {
        path: PathBuf,
        stored: String,
        given: String,
    },
    /// A format-1 directory started without `--bootstrap`.
    Legacy { path: PathBuf },
    /// A `--bootstrap` id that is not one.
    BadClusterId(String),
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityError::Io { op, path, reason } => {
                write!(f, "cannot {op} {}: {reason}", path.display())
            }
            IdentityError::Malformed { path, reason } => {
                write!(f, "{} is not a raftkv identity: {reason}", path.display())
            }
            IdentityError::ForeignCluster {
                path,
                stored,
                given,
            } => write!(
                f,
                "{} belongs to cluster {stored}, not to cluster {given}; refusing to mix two clusters' data (use this cluster's own directory)",
                path.display()
            ),
            IdentityError::OtherNode {
                path,
                stored,
                given,
            } => write!(
                f,
                "{} says this directory holds {stored}, but the command line says {given}; use the same --id and --peers, or another --data",
                path.display()
            ),
            IdentityError::Legacy { path } => write!(
                f,
                "{} is identity format 1 (node id and peers, no cluster id); this raftkv keeps format {FORMAT} in {} (with a cluster id): start every node of this cluster once with --bootstrap ID, the same ID on each, to upgrade it in place",
                path.display(),
                path.with_file_name(IDENTITY_FILE).display()
            ),
            IdentityError::BadClusterId(id) => write!(
                f,
                "cluster id '{id}' must be 8 to 64 characters from 0-9, a-z, A-Z, '-' and '_'"
            ),
        }
    }
}

impl std::error::Error for IdentityError {}

/// Checks a cluster id given on the command line.
pub fn valid_cluster_id(id: &str) -> Result<(), IdentityError> {
    let ok = (8..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadClusterId(id.to_string()))
    }
}

/// A fresh random cluster id: 32 hex digits (128 bits).
pub fn random_cluster_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// What the identity file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRecord {
    pub cluster: String,
    pub node: usize,
    pub peers: String,
    /// `false` while the node is joining (it adopted the id and does not vote yet).
    pub voter: bool,
    /// The high-water mark: the highest term synced and index applied that were recorded.
    pub term: u64,
    pub applied: u64,
}

impl IdentityRecord {
    /// A node's first record in `cluster`: a founding voter, or a joining node; no
    /// high-water mark yet.
    fn fresh(cluster: &str, node: usize, peers: &str, voter: bool) -> IdentityRecord {
        IdentityRecord {
            cluster: cluster.to_string(),
            node,
            peers: peers.to_string(),
            voter,
            term: 0,
            applied: 0,
        }
    }

    fn encode(&self) -> String {
        format!(
            "raftkv identity {FORMAT}\ncluster {}\nnode {}\npeers {}\nmember {}\nterm {}\napplied {}\n",
            self.cluster,
            self.node,
            self.peers,
            if self.voter { "voter" } else { "joining" },
            self.term,
            self.applied
        )
    }

    fn decode(path: &Path, text: &str) -> Result<IdentityRecord, IdentityError> {
        let bad = |reason: String| IdentityError::Malformed {
            path: path.to_path_buf(),
            reason,
        };
        let mut lines = text.lines();
        let header = lines.next().unwrap_or("");
        match header.strip_prefix("raftkv identity ") {
            Some(v) if v == FORMAT.to_string() => {}
            Some(v) => {
                return Err(bad(format!(
                    "format {v}, but this raftkv reads format {FORMAT}"
                )));
            }
            None => return Err(bad(format!("first line '{header}'"))),
        }
        let mut field = |name: &str| -> Result<String, IdentityError> {
            let line = lines.next().unwrap_or("");
            match line.split_once(' ') {
                Some((k, v)) if k == name => Ok(v.to_string()),
                _ => Err(bad(format!("expected '{name} …', found '{line}'"))),
            }
        };
        let number = |name: &str, v: String| -> Result<u64, IdentityError> {
            v.parse()
                .map_err(|_| bad(format!("{name} '{v}' is not a number")))
        };
        let cluster = field("cluster")?;
        valid_cluster_id(&cluster).map_err(|e| bad(e.to_string()))?;
        let node = number("node", field("node")?)? as usize;
        let peers = field("peers")?;
        let voter = match field("member")?.as_str() {
            "voter" => true,
            "joining" => false,
            other => return Err(bad(format!("member '{other}'"))),
        };
        let term = number("term", field("term")?)?;
        let applied = number("applied", field("applied")?)?;
        Ok(IdentityRecord {
            cluster,
            node,
            peers,
            voter,
            term,
            applied,
        })
    }
}

/// Writes `contents` to `path` atomically and durably: a temp file, fsynced, renamed over
/// `path`, then the directory fsynced.
pub fn write_durably(path: &Path, contents: &[u8]) -> Result<(), IdentityError> {
    let io = |op: &'static str, p: &Path, e: io::Error| IdentityError::Io {
        op,
        path: p.to_path_buf(),
        reason: e.to_string(),
    };
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp).map_err(|e| io("create", &tmp, e))?;
        f.write_all(contents).map_err(|e| io("write", &tmp, e))?;
        f.sync_all().map_err(|e| io("fsync", &tmp, e))?;
    }
    fs::rename(&tmp, path).map_err(|e| io("rename", &tmp, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("fsync", dir, e))
}

/// Why a peer's message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The message carries another cluster's id.
    ForeignCluster { ours: String, theirs: String },
    /// This node has no cluster id yet and the message is not from a leader.
    NotJoined,
    /// The adopted id could not be saved.
    Io(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::ForeignCluster { ours, theirs } => write!(
                f,
                "cluster id mismatch: this node is in cluster {ours}, the message is from cluster {theirs}"
            ),
            Refusal::NotJoined => f.write_str("not joined yet: waiting for a leader"),
            Refusal::Io(e) => write!(f, "cannot save the cluster id: {e}"),
        }
    }
}

/// A node's identity: loaded (or created) at start, adopted from a leader by a node that
/// joined on an empty directory, and carrying the high-water mark. Shared by the node's
/// transport (the id on every Raft message, checked on every one received) and its status
/// loop (the mark). No lock is held across a file write but `write_gate`, which only
/// writers take.
#[derive(Debug)]
pub struct ClusterIdentity {
    path: PathBuf,
    node: usize,
    peers: String,
    /// `None` until the node has a cluster (joining on an empty directory).
    record: Mutex<Option<IdentityRecord>>,
    /// The cluster the command line says this node belongs to, if it says.
    expected: Option<String>,
    write_gate: Mutex<Option<Instant>>,
}

impl ClusterIdentity {
    /// Opens the identity of node `node` (1-based) in `data`: checks it against the command
    /// line, upgrades format 1 when `bootstrap` gives the cluster id, and creates it when
    /// `bootstrap` founds a new cluster. Without `bootstrap` an empty directory gives an
    /// identity with no cluster yet (the node waits for a leader). `expected`: the cluster
    /// the node must belong to (a directory of another is refused; a joining node adopts
    /// only that id); `bootstrap` implies it.
    pub fn open(
        data: &Path,
        node: usize,
        peers: &[String],
        bootstrap: Option<&str>,
        expected: Option<&str>,
    ) -> Result<ClusterIdentity, IdentityError> {
        for id in bootstrap.iter().chain(expected.iter()) {
            valid_cluster_id(id)?;
        }
        if let (Some(b), Some(e)) = (bootstrap, expected)
            && b != e
        {
            return Err(IdentityError::BadClusterId(format!(
                "{b}' (--bootstrap) differs from '{e}' (--cluster)"
            )));
        }
        let expected = bootstrap.or(expected);
        let peers = peers.join(",");
        let path = data.join(IDENTITY_FILE);
        let identity = |record| ClusterIdentity {
            path: path.clone(),
            node,
            peers: peers.clone(),
            record: Mutex::new(record),
            expected: expected.map(str::to_string),
            write_gate: Mutex::new(None),
        };
        let read = |p: &Path| match fs::read_to_string(p) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(IdentityError::Io {
                op: "read",
                path: p.to_path_buf(),
                reason: e.to_string(),
            }),
        };
        let other_node = |stored_node: usize, stored_peers: &str| IdentityError::OtherNode {
            path: path.clone(),
            stored: format!("id {stored_node}, peers {stored_peers}"),
            given: format!("id {node}, peers {peers}"),
        };
        if let Some(text) = read(&path)? {
            let record = IdentityRecord::decode(&path, &text)?;
            if let Some(id) = expected
                && id != record.cluster
            {
                return Err(IdentityError::ForeignCluster {
                    path,
                    stored: record.cluster,
                    given: id.to_string(),
                });
            }
            if record.node != node || record.peers != peers {
                return Err(other_node(record.node, &record.peers));
            }
            return Ok(identity(Some(record)));
        }
        let legacy = data.join(LEGACY_FILE);
        if let Some(text) = read(&legacy)? {
            let expected = format!("id {node}\npeers {peers}\n");
            if text != expected {
                return Err(IdentityError::OtherNode {
                    path: legacy,
                    stored: text.trim().replace('\n', ", "),
                    given: expected.trim().replace('\n', ", "),
                });
            }
            let Some(id) = bootstrap else {
                return Err(IdentityError::Legacy { path: legacy });
            };
            let record = IdentityRecord::fresh(id, node, &peers, true);
            write_durably(&path, record.encode().as_bytes())?;
            fs::remove_file(&legacy).map_err(|e| IdentityError::Io {
                op: "remove",
                path: legacy.clone(),
                reason: e.to_string(),
            })?;
            log::info!(target: "node::identity", "node {node}: {} upgraded to format {FORMAT} in {}, cluster {id}", legacy.display(), path.display());
            return Ok(identity(Some(record)));
        }
        match bootstrap {
            Some(id) => {
                let record = IdentityRecord::fresh(id, node, &peers, true);
                write_durably(&path, record.encode().as_bytes())?;
                log::info!(target: "node::identity", "node {node}: bootstrapped cluster {id}");
                Ok(identity(Some(record)))
            }
            None => Ok(identity(None)),
        }
    }

    /// The cluster id, once the node has one: what the node puts on every peer message (and
    /// what a peer handshake states).
    pub fn cluster_id(&self) -> Option<String> {
        self.record.lock().as_ref().map(|r| r.cluster.clone())
    }

    pub fn node(&self) -> usize {
        self.node
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// The identity as last saved (`None`: no cluster yet).
    pub fn record(&self) -> Option<IdentityRecord> {
        self.record.lock().clone()
    }

    /// Whether the node may vote: it founded or has fully joined its cluster.
    pub fn is_voter(&self) -> bool {
        self.record.lock().as_ref().is_some_and(|r| r.voter)
    }

    /// Decides on a Raft message from a peer that says it is in cluster `theirs`. A node
    /// without a cluster adopts the id of a leader's message (`from_leader`), saving it
    /// before the message is handled; it refuses anything else until then.
    pub fn admit(&self, theirs: &str, from_leader: bool) -> Result<(), Refusal> {
        if let Some(r) = self.record.lock().as_ref() {
            return if r.cluster == theirs {
                Ok(())
            } else {
                Err(Refusal::ForeignCluster {
                    ours: r.cluster.clone(),
                    theirs: theirs.to_string(),
                })
            };
        }
        if let Some(ours) = &self.expected
            && ours != theirs
        {
            return Err(Refusal::ForeignCluster {
                ours: ours.clone(),
                theirs: theirs.to_string(),
            });
        }
        if !from_leader || valid_cluster_id(theirs).is_err() {
            return Err(Refusal::NotJoined);
        }
        let _gate = self.write_gate.lock();
        // Another handler may have adopted it meanwhile.
        if self.record.lock().is_some() {
            drop(_gate);
            return self.admit(theirs, from_leader);
        }
        let record = IdentityRecord::fresh(theirs, self.node, &self.peers, false);
        write_durably(&self.path, record.encode().as_bytes())
            .map_err(|e| Refusal::Io(e.to_string()))?;
        log::info!(target: "node::identity", "node {}: joined cluster {theirs} (a leader contacted it); not voting until caught up", self.node);
        *self.record.lock() = Some(record);
        Ok(())
    }

    /// Records the high-water mark (term synced, index applied) and whether the node votes,
    /// if any changed and the last write is [`RECORD_INTERVAL`] old (a change of `voter` is
    /// written at once). Nothing without a cluster. Never lowers the mark.
    pub fn record_progress(
        &self,
        term: u64,
        applied: u64,
        voter: bool,
    ) -> Result<(), IdentityError> {
        let mut gate = self.write_gate.lock();
        let next = {
            let current = self.record.lock();
            let Some(r) = current.as_ref() else {
                return Ok(());
            };
            let next = IdentityRecord {
                term: r.term.max(term),
                applied: r.applied.max(applied),
                voter: r.voter || voter,
                ..r.clone()
            };
            if next == *r {
                return Ok(());
            }
            let due = gate.is_none_or(|at| at.elapsed() >= RECORD_INTERVAL);
            if !due && next.voter == r.voter {
                return Ok(());
            }
            next
        };
        write_durably(&self.path, next.encode().as_bytes())?;
        *gate = Some(Instant::now());
        *self.record.lock() = Some(next);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("raftkv-identity-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn peers() -> Vec<String> {
        vec!["1=127.0.0.1:1".into(), "2=127.0.0.1:2".into()]
    }

    #[test]
    fn bootstrap_then_reopen_and_foreign_id_refused() {
        let d = dir("boot");
        let id = ClusterIdentity::open(&d, 1, &peers(), Some("aaaaaaaa11"), None).unwrap();
        assert_eq!(id.cluster_id().as_deref(), Some("aaaaaaaa11"));
        assert!(id.is_voter());
        id.record_progress(3, 40, true).unwrap();
        let again = ClusterIdentity::open(&d, 1, &peers(), None, None).unwrap();
        let r = again.record().unwrap();
        assert_eq!((r.term, r.applied), (3, 40));
        let e = ClusterIdentity::open(&d, 1, &peers(), Some("bbbbbbbb22"), None).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("aaaaaaaa11") && msg.contains("bbbbbbbb22"),
            "{msg}"
        );
        let e = ClusterIdentity::open(&d, 1, &peers(), None, Some("bbbbbbbb22")).unwrap_err();
        assert!(matches!(e, IdentityError::ForeignCluster { .. }), "{e}");
        let e = ClusterIdentity::open(&d, 2, &peers(), None, None).unwrap_err();
        assert!(matches!(e, IdentityError::OtherNode { .. }), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn joining_node_adopts_only_from_a_leader() {
        let d = dir("join");
        let picky = ClusterIdentity::open(&d, 2, &peers(), None, Some("ffffffff66")).unwrap();
        assert!(matches!(
            picky.admit("cccccccc33", true),
            Err(Refusal::ForeignCluster { .. })
        ));
        let id = ClusterIdentity::open(&d, 2, &peers(), None, None).unwrap();
        assert_eq!(id.cluster_id(), None);
        assert_eq!(id.admit("cccccccc33", false), Err(Refusal::NotJoined));
        assert!(!d.join(IDENTITY_FILE).exists());
        id.admit("cccccccc33", true).unwrap();
        assert!(!id.is_voter());
        assert!(matches!(
            id.admit("dddddddd44", true),
            Err(Refusal::ForeignCluster { .. })
        ));
        let reopened = ClusterIdentity::open(&d, 2, &peers(), None, None).unwrap();
        assert_eq!(reopened.cluster_id().as_deref(), Some("cccccccc33"));
        assert!(!reopened.is_voter());
        reopened.record_progress(1, 1, true).unwrap();
        assert!(
            ClusterIdentity::open(&d, 2, &peers(), None, None)
                .unwrap()
                .is_voter()
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn format_1_is_refused_or_upgraded() {
        let d = dir("legacy");
        fs::write(
            d.join(LEGACY_FILE),
            "id 1\npeers 1=127.0.0.1:1,2=127.0.0.1:2\n",
        )
        .unwrap();
        let e = ClusterIdentity::open(&d, 1, &peers(), None, None).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("format 1") && msg.contains("format 2"),
            "{msg}"
        );
        let id = ClusterIdentity::open(&d, 1, &peers(), Some("eeeeeeee55"), None).unwrap();
        assert_eq!(id.cluster_id().as_deref(), Some("eeeeeeee55"));
        assert!(!d.join(LEGACY_FILE).exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn malformed_identity_is_an_error() {
        let d = dir("bad");
        fs::write(d.join(IDENTITY_FILE), "raftkv identity 9\n").unwrap();
        let e = ClusterIdentity::open(&d, 1, &peers(), None, None).unwrap_err();
        assert!(e.to_string().contains("format 9"), "{e}");
        assert!(valid_cluster_id("short").is_err());
        assert!(valid_cluster_id(&random_cluster_id()).is_ok());
        fs::remove_dir_all(&d).unwrap();
    }
}
