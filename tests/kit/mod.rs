//! What the multi-process cluster tests share: a temporary directory, ports, and a cluster of
//! real `raftkv serve` processes on loopback started through the process kit
//! (`raftkv::proc`), talked to with the `redis` crate.
//!
//! Every node runs in its own process group with `--stop-on-stdin-eof`, and is signalled only
//! through its handle (never once reaped); every node is killed when its [`Cluster`] drops,
//! passing or failing, and every file goes with the [`TempDir`]. A node's stderr goes to
//! `DIR/node-<i>.err`; nodes log nothing unless `RAFTKV_NODE_LOG` holds a `RUST_LOG` filter for
//! them (the test process's own `RUST_LOG` is not passed on, so a node's one-line errors can
//! be checked exactly).
//!
//! A socket read with a timeout (SO_RCVTIMEO) fails with EINTR when the test process is stopped
//! and continued or runs a signal handler, and is never restarted: [`Cluster::retry`] and
//! [`no_eintr`] make every call on a fresh connection.

#![allow(dead_code)] // each test binary uses its part

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use raftkv::node::identity::random_cluster_id;
use raftkv::node::secret::{SECRET_FILE, create_secret};
use raftkv::proc::{NodeProcess, NodeStatusFile, ServeSpec, leader_of};

/// The `raftkv` binary under test.
pub const EXE: &str = env!("CARGO_BIN_EXE_raftkv");
/// How long a cluster may take to elect a leader, or a command to succeed after a fault.
pub const PATIENCE: Duration = Duration::from_secs(20);
/// The environment variable whose value becomes the nodes' `RUST_LOG`.
pub const NODE_LOG_ENV: &str = "RAFTKV_NODE_LOG";

/// A fresh directory under the system temp directory, removed with everything in it on drop.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    /// A directory named `raftkv-<what>-…`.
    pub fn new(what: &str) -> TempDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("raftkv-{what}-"))
            .tempdir()
            .expect("create the test directory");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// `n` distinct free loopback ports, below the kernel's ephemeral range where it leaves room
/// (an outgoing connection can then never take a node's port between its pick and its bind,
/// nor while the node restarts).
pub fn ports(n: usize) -> Vec<u16> {
    raftkv::chaos::cluster::cluster_ports(n).expect("free loopback ports")
}

/// The error of a call interrupted by a signal (EINTR), which says nothing about the node.
pub fn interrupted(e: &redis::RedisError) -> bool {
    use std::error::Error as _;
    let kind = e
        .source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind);
    kind == Some(std::io::ErrorKind::Interrupted)
        || (e.is_io_error() && e.to_string().contains("os error 4"))
}

/// Runs `f` on a connection from `connect`, again on a fresh one (within [`PATIENCE`]) while it
/// fails with EINTR: a read interrupted by a signal loses the reply's place in the stream, so
/// the connection cannot be reused.
pub fn no_eintr<T>(
    mut connect: impl FnMut() -> redis::Connection,
    f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
) -> redis::RedisResult<T> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match f(&mut connect()) {
            Err(e) if interrupted(&e) && Instant::now() < deadline => {
                eprintln!("a call was interrupted by a signal ({e}); again on a fresh connection");
            }
            other => return other,
        }
    }
}

/// A cluster of `raftkv serve` processes, nodes numbered from 0 here (ids from 1).
pub struct Cluster {
    dir: PathBuf,
    pub peer_ports: Vec<u16>,
    pub client_ports: Vec<u16>,
    pub children: Vec<Option<NodeProcess>>,
    /// `--cluster` on every start, `--bootstrap` on each node's first.
    pub cluster_id: String,
    /// Started once already: later starts get no `--bootstrap`.
    founded: Vec<bool>,
    /// The directory the cluster made for itself, if it did.
    _temp: Option<TempDir>,
}

impl Cluster {
    /// A cluster of `n` nodes in its own temporary directory, every node started.
    pub fn start_new(what: &str, n: usize) -> Cluster {
        let temp = TempDir::new(what);
        let mut cluster = Cluster::new(temp.path(), &ports(2 * n));
        cluster._temp = Some(temp);
        cluster
    }

    /// A cluster in `dir` on `ports` (peer ports, then client ports), no node started yet. The
    /// peer secret is created in `dir`.
    pub fn empty(dir: &Path, ports: &[u16]) -> Cluster {
        fs::create_dir_all(dir).expect("the cluster's directory");
        create_secret(&dir.join(SECRET_FILE)).expect("create the peer secret");
        let n = ports.len() / 2;
        Cluster {
            dir: dir.to_path_buf(),
            peer_ports: ports[..n].to_vec(),
            client_ports: ports[n..].to_vec(),
            children: (0..n).map(|_| None).collect(),
            cluster_id: random_cluster_id(),
            founded: vec![false; n],
            _temp: None,
        }
    }

    /// A new cluster in `dir` on `ports`, every node started.
    pub fn new(dir: &Path, ports: &[u16]) -> Cluster {
        let mut cluster = Cluster::empty(dir, ports);
        for i in 0..cluster.len() {
            cluster.start(i);
        }
        cluster
    }

    pub fn len(&self) -> usize {
        self.children.len()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn data(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{}", i + 1))
    }

    pub fn stderr_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{}.err", i + 1))
    }

    /// What node `i` printed on stderr since its last start.
    pub fn stderr(&self, i: usize) -> String {
        fs::read_to_string(self.stderr_path(i)).unwrap_or_default()
    }

    /// How node `i` is started.
    pub fn spec(&self, i: usize) -> ServeSpec {
        ServeSpec {
            exe: PathBuf::from(EXE),
            id: i + 1,
            peers: self
                .peer_ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect(),
            client: format!("127.0.0.1:{}", self.client_ports[i]),
            data: self.data(i),
            peer_secret: self.dir.join(SECRET_FILE),
            cluster: Some(self.cluster_id.clone()),
            bootstrap: !self.founded[i],
        }
    }

    /// Starts node `i` on its data directory; its stderr file starts afresh.
    pub fn start(&mut self, i: usize) {
        self.start_with(i, |_| {});
    }

    /// Starts node `i` with `adjust` applied to its command (more flags, limits, environment).
    pub fn start_with(&mut self, i: usize, adjust: impl FnOnce(&mut Command)) {
        assert!(self.children[i].is_none(), "node {} already runs", i + 1);
        let err = fs::File::create(self.stderr_path(i)).expect("stderr file");
        let spec = self.spec(i);
        let mut command = spec.command();
        command.stderr(err).env_remove("RUST_LOG");
        if let Some(filter) = std::env::var_os(NODE_LOG_ENV) {
            command.env("RUST_LOG", filter);
        }
        adjust(&mut command);
        let child = spec
            .spawn(&mut command)
            .unwrap_or_else(|e| panic!("start node {}: {e}", i + 1));
        self.founded[i] = true;
        self.children[i] = Some(child);
    }

    /// `kill -9` node `i` (if it runs) and reap it.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            child.kill9().expect("SIGKILL and reap");
        }
    }

    /// Node `i` was started and has not exited.
    pub fn alive(&mut self, i: usize) -> bool {
        self.children[i].as_mut().is_some_and(NodeProcess::alive)
    }

    /// Node `i` was started and has exited on its own (it is reaped).
    pub fn exited(&mut self, i: usize) -> bool {
        self.children[i]
            .as_mut()
            .is_some_and(|c| c.try_exit().is_some())
    }

    /// Waits up to `within` for node `i` to exit on its own; reaps it.
    pub fn wait_exit(&mut self, i: usize, within: Duration) -> ExitStatus {
        let child = self.children[i].as_mut().expect("node was started");
        let Some(status) = child.wait_exit(within) else {
            panic!(
                "node {} still runs after {within:?}; stderr: {}",
                i + 1,
                self.stderr(i)
            );
        };
        self.children[i] = None;
        status
    }

    /// Node `i`'s status file.
    pub fn status(&self, i: usize) -> Option<NodeStatusFile> {
        NodeStatusFile::read(&NodeStatusFile::path(&self.data(i)))
    }

    /// The running node that leads in the highest term, waiting up to `patience`.
    pub fn leader_within(&self, patience: Duration) -> Option<usize> {
        let deadline = Instant::now() + patience;
        loop {
            let running = (0..self.len()).filter(|&i| self.children[i].is_some());
            if let Some(i) = leader_of(running.map(|i| (i, self.status(i)))) {
                return Some(i);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The running node that leads in the highest term, waiting up to [`PATIENCE`].
    pub fn leader(&self) -> usize {
        self.leader_within(PATIENCE)
            .unwrap_or_else(|| panic!("no leader within {PATIENCE:?}"))
    }

    /// A connection to node `i` whose reads time out after `timeout`.
    pub fn connect(&self, i: usize, timeout: Duration) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.client_ports[i]))?;
        let con = client.get_connection_with_timeout(Duration::from_secs(2))?;
        con.set_read_timeout(Some(timeout))?;
        Ok(con)
    }

    /// A connection to node `i` (reads time out after 10 s), waiting up to [`PATIENCE`] for
    /// the node to accept clients.
    pub fn client(&self, i: usize) -> redis::Connection {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.connect(i, Duration::from_secs(10)) {
                Ok(con) => return con,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "node {} does not accept clients: {e}",
                        i + 1
                    );
                    thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Runs `f` on a fresh connection to node `i` until it succeeds, within [`PATIENCE`] (a
    /// node answers TRYAGAIN while there is no leader).
    pub fn retry<T>(
        &self,
        i: usize,
        what: &str,
        f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> T {
        self.retry_within(i, what, PATIENCE, f)
    }

    /// [`retry`](Self::retry) with its own patience.
    pub fn retry_within<T>(
        &self,
        i: usize,
        what: &str,
        patience: Duration,
        f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> T {
        let deadline = Instant::now() + patience;
        loop {
            let result = self
                .connect(i, Duration::from_secs(10))
                .and_then(|mut con| f(&mut con));
            match result {
                Ok(v) => return v,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "{what} on node {} failed for {patience:?}: {e}",
                        i + 1
                    );
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// SETs `key` = `value` through node `i` until acknowledged.
    pub fn set(&self, i: usize, key: &str, value: &str) {
        let reply: String = self.retry(i, &format!("SET {key}"), |c| {
            redis::cmd("SET").arg(key).arg(value).query(c)
        });
        assert_eq!(reply, "OK");
    }

    /// SETs `count` keys `<prefix><k>` through node `via`, recording each in `acked`.
    pub fn write_keys(
        &self,
        via: usize,
        prefix: &str,
        count: usize,
        acked: &mut BTreeMap<String, String>,
    ) {
        for k in 0..count {
            let (key, value) = (format!("{prefix}{k}"), format!("{prefix}-value-{k}"));
            self.set(via, &key, &value);
            acked.insert(key, value);
        }
    }

    /// Every key of `acked` reads back its value through node `i`.
    pub fn check_keys(&self, i: usize, acked: &BTreeMap<String, String>) {
        let keys: Vec<&String> = acked.keys().collect();
        for chunk in keys.chunks(100) {
            let values: Vec<Option<String>> = self.retry(i, "MGET", |c| {
                let mut cmd = redis::cmd("MGET");
                for k in chunk {
                    cmd.arg(k.as_str());
                }
                cmd.query(c)
            });
            for (k, v) in chunk.iter().zip(values) {
                assert_eq!(
                    v.as_deref(),
                    Some(acked[*k].as_str()),
                    "node {}: acknowledged key {k} lost",
                    i + 1
                );
            }
        }
    }

    /// Waits until node `i` has applied at least `applied` requests.
    pub fn wait_applied(&self, i: usize, applied: u64, patience: Duration) {
        let deadline = Instant::now() + patience;
        loop {
            if self.status(i).is_some_and(|s| s.applied >= applied) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} applied {:?} of {applied} after {patience:?}",
                i + 1,
                self.status(i).map(|s| s.applied)
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill9();
        }
    }
}
