//! What the multi-process cluster tests share: a temporary directory, ports, and a cluster of
//! real `raftkv serve` processes on loopback started through the process kit
//! (`raftkv::proc`), talked to with the `redis` crate; `raftkv member` runs against it, and a
//! node's `/proc` figures (peak resident memory) are read through it.
//!
//! A cluster has founding nodes (started with `--bootstrap` the first time) and may have spare
//! slots: nodes with their own ports that start on an empty directory without `--bootstrap`
//! and wait until `member add` takes them in.
//!
//! Every node runs in its own process group with `--stop-on-stdin-eof`, and is signalled only
//! through its handle (never once reaped); every node is killed when its [`Cluster`] drops,
//! passing or failing, and every file goes with the [`TempDir`]. A node's stderr goes to
//! `DIR/node-<i>.err`, shown with how the node exited when a failing test drops the cluster;
//! nodes log nothing unless `RAFTKV_NODE_LOG` holds a `RUST_LOG` filter for them (the test
//! process's own `RUST_LOG` is not passed on, so a node's one-line errors can be checked
//! exactly).
//!
//! A socket read with a timeout (SO_RCVTIMEO) fails with EINTR when the test process is stopped
//! and continued or runs a signal handler, and is never restarted: [`Cluster::retry`] and
//! [`no_eintr`] make every call on a fresh connection. Every wait is bounded: a node's
//! patience ([`Cluster::patience`]), a `raftkv member` run ([`MEMBER_LIMIT`]).

#![allow(dead_code)] // each test binary uses its part

pub mod heavy;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use raftkv::node::identity::random_cluster_id;
use raftkv::node::secret::{SECRET_FILE, create_secret};
use raftkv::proc::ports::PortLease;
use raftkv::proc::{NodeProcess, NodeStatusFile, ServeSpec, leader_of};

/// The `raftkv` binary under test.
pub const EXE: &str = env!("CARGO_BIN_EXE_raftkv");
/// How long a cluster may take to elect a leader, or a command to succeed after a fault.
pub const PATIENCE: Duration = Duration::from_secs(20);
/// The environment variable whose value becomes the nodes' `RUST_LOG`.
pub const NODE_LOG_ENV: &str = "RAFTKV_NODE_LOG";
/// How long one `raftkv member` run may take unless told otherwise (an add waits for the new
/// node to catch up).
pub const MEMBER_LIMIT: Duration = Duration::from_secs(120);

/// A fresh directory under the system temp directory, removed with everything in it on drop.
/// What a multi-process test starts lives in one, so it also holds the test's share of the
/// binary's limit on clusters at once ([`heavy`]): a chaos run or a `raftkv local` started
/// by hand counts like a [`Cluster`].
pub struct TempDir(tempfile::TempDir, heavy::Slot);

impl TempDir {
    /// A directory named `raftkv-<what>-…`.
    pub fn new(what: &str) -> TempDir {
        let slot = heavy::slot();
        let dir = tempfile::Builder::new()
            .prefix(&format!("raftkv-{what}-"))
            .tempdir()
            .expect("create the test directory");
        TempDir(dir, slot)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// `n` distinct free loopback ports, claimed while the lease (or a cluster given it) lives:
/// no other local cluster, in this process or another, takes one meanwhile, even while the
/// node on it is down (see `raftkv::proc::ports`).
pub fn ports(n: usize) -> PortLease {
    raftkv::proc::ports::cluster_ports(n).expect("free loopback ports")
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
    /// `--cluster` on every start, `--bootstrap` on each founding node's first.
    pub cluster_id: String,
    /// Started once already: later starts get no `--bootstrap`.
    founded: Vec<bool>,
    /// Nodes `0..founders` found the cluster and are given the founders' `--peers`; each
    /// node after them (a spare) starts without `--bootstrap`, its `--peers` the founders'
    /// and every slot up to its own, and waits to be added.
    founders: usize,
    /// How long a leader, a node's first answer or a command's success is waited for.
    pub patience: Duration,
    /// How long a call's reply is waited for on one connection.
    pub read_timeout: Duration,
    /// The directory the cluster made for itself, if it did.
    _temp: Option<TempDir>,
    /// The claim on the cluster's ports, held while it lives.
    _ports: PortLease,
    /// This cluster's share of the binary's limit on clusters at once (see [`heavy`]);
    /// given back after the nodes are killed.
    _slot: heavy::Slot,
}

impl Cluster {
    /// A cluster of `n` nodes in its own temporary directory, every node started.
    pub fn start_new(what: &str, n: usize) -> Cluster {
        Cluster::start_new_with(what, n, |_, _| {})
    }

    /// [`start_new`](Self::start_new), node `i` started with `adjust(i, command)` (more
    /// flags, limits, environment).
    pub fn start_new_with(what: &str, n: usize, adjust: impl Fn(usize, &mut Command)) -> Cluster {
        let mut cluster = Cluster::new_empty(what, n);
        for i in 0..n {
            cluster.start_with(i, |c| adjust(i, c));
        }
        cluster
    }

    /// `founders` nodes founding a cluster in its own temporary directory, started, and
    /// `spares` more slots (ports, a directory) not started: see [`Cluster::empty_with_spares`].
    pub fn start_new_with_spares(what: &str, founders: usize, spares: usize) -> Cluster {
        let temp = TempDir::new(what);
        let n = founders + spares;
        let mut cluster = Cluster::empty_with_spares(temp.path(), &ports(2 * n), founders);
        cluster._temp = Some(temp);
        for i in 0..founders {
            cluster.start(i);
        }
        cluster
    }

    /// A cluster of `n` nodes in its own temporary directory, no node started yet.
    pub fn new_empty(what: &str, n: usize) -> Cluster {
        let temp = TempDir::new(what);
        let mut cluster = Cluster::empty(temp.path(), &ports(2 * n));
        cluster._temp = Some(temp);
        cluster
    }

    /// A cluster in `dir` on `ports` (peer ports, then client ports), no node started yet. The
    /// peer secret is created in `dir`.
    pub fn empty(dir: &Path, ports: &PortLease) -> Cluster {
        Cluster::empty_with_spares(dir, ports, ports.len() / 2)
    }

    /// [`empty`](Self::empty), only nodes `0..founders` founding the cluster: node `i` after
    /// them starts on an empty directory without `--bootstrap`, with `--peers` naming the
    /// founders and every slot up to its own, and waits for `member add`.
    pub fn empty_with_spares(dir: &Path, ports: &PortLease, founders: usize) -> Cluster {
        let slot = heavy::slot();
        fs::create_dir_all(dir).expect("the cluster's directory");
        create_secret(&dir.join(SECRET_FILE)).expect("create the peer secret");
        let n = ports.len() / 2;
        assert!(founders <= n, "{founders} founders among {n} nodes");
        Cluster {
            dir: dir.to_path_buf(),
            peer_ports: ports[..n].to_vec(),
            client_ports: ports[n..].to_vec(),
            children: (0..n).map(|_| None).collect(),
            cluster_id: random_cluster_id(),
            founded: vec![false; n],
            founders,
            patience: PATIENCE,
            read_timeout: Duration::from_secs(10),
            _temp: None,
            _ports: ports.clone(),
            _slot: slot,
        }
    }

    /// A new cluster in `dir` on `ports`, every node started.
    pub fn new(dir: &Path, ports: &PortLease) -> Cluster {
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

    /// Node `i`'s peer address, as every node dials it.
    pub fn peer_addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.peer_ports[i])
    }

    /// Node `i`'s client address.
    pub fn client_addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.client_ports[i])
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
        let peers = self.founders.max(i + 1);
        ServeSpec {
            exe: PathBuf::from(EXE),
            id: i + 1,
            peers: (0..peers).map(|j| self.peer_addr(j)).collect(),
            client: self.client_addr(i),
            data: self.data(i),
            peer_secret: self.dir.join(SECRET_FILE),
            cluster: Some(self.cluster_id.clone()),
            bootstrap: i < self.founders && !self.founded[i],
        }
    }

    /// Starts node `i` on its data directory; its stderr file starts afresh.
    pub fn start(&mut self, i: usize) {
        self.start_with(i, |_| {});
    }

    /// Starts node `i` with `adjust` applied to its command (more flags, limits, environment).
    pub fn start_with(&mut self, i: usize, adjust: impl FnOnce(&mut Command)) {
        self.start_spec(i, |_| {}, adjust);
    }

    /// Starts node `i` from its [`spec`](Self::spec) changed by `change` (another client
    /// address, …), its command then changed by `adjust`. No deliberate fault is passed on
    /// unless `adjust` sets one (`raftkv::node::FAULT_ENV`).
    pub fn start_spec(
        &mut self,
        i: usize,
        change: impl FnOnce(&mut ServeSpec),
        adjust: impl FnOnce(&mut Command),
    ) {
        assert!(self.children[i].is_none(), "node {} already runs", i + 1);
        let err = fs::File::create(self.stderr_path(i)).expect("stderr file");
        let mut spec = self.spec(i);
        change(&mut spec);
        let mut command = spec.command();
        command
            .stderr(err)
            .env_remove("RUST_LOG")
            .env_remove(raftkv::node::FAULT_ENV);
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
        self.exit_status(i).is_some()
    }

    /// How node `i` exited, if it was started and has exited on its own (it is reaped).
    pub fn exit_status(&mut self, i: usize) -> Option<ExitStatus> {
        self.children[i].as_mut().and_then(NodeProcess::try_exit)
    }

    /// The nodes started (and not killed since), exited or not.
    pub fn running(&self) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| self.children[i].is_some())
            .collect()
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

    /// Node `i`'s process id (it must have been started).
    pub fn pid(&self, i: usize) -> u32 {
        self.children[i]
            .as_ref()
            .unwrap_or_else(|| panic!("node {} was not started", i + 1))
            .pid()
    }

    /// Peak resident memory of node `i`'s process so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self, i: usize) -> u64 {
        proc_status_number(self.pid(i), "VmHWM:") * 1024
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

    /// The running node that leads in the highest term, waiting up to [`patience`](Self::patience).
    pub fn leader(&self) -> usize {
        let patience = self.patience;
        self.leader_within(patience)
            .unwrap_or_else(|| panic!("no leader within {patience:?}"))
    }

    /// The node among `among` that leads in the highest term, waiting up to
    /// [`patience`](Self::patience).
    pub fn leader_among(&self, among: &[usize]) -> usize {
        let deadline = Instant::now() + self.patience;
        loop {
            if let Some(i) = leader_of(among.iter().map(|&i| (i, self.status(i)))) {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "no leader among nodes {:?} within {:?}",
                among.iter().map(|i| i + 1).collect::<Vec<_>>(),
                self.patience
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node other than `old` that leads in a term after `old_term` (the others elected it
    /// while `old`, their leader in `old_term`, was paused or cut off), waiting up to
    /// `patience`.
    pub fn leader_after(&self, old: usize, old_term: u64, patience: Duration) -> usize {
        let deadline = Instant::now() + patience;
        loop {
            let newer = (0..self.len()).filter(|&i| i != old).find(|&i| {
                self.status(i)
                    .is_some_and(|s| s.leader && s.term > old_term)
            });
            if let Some(i) = newer {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "no new leader within {patience:?} after node {} (leader in term {old_term}) was paused",
                old + 1
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// A connection to node `i` whose reads time out after `timeout`.
    pub fn connect(&self, i: usize, timeout: Duration) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(format!("redis://{}/", self.client_addr(i)))?;
        let con = client.get_connection_with_timeout(Duration::from_secs(2))?;
        con.set_read_timeout(Some(timeout))?;
        Ok(con)
    }

    /// A connection to node `i` (reads time out after [`read_timeout`](Self::read_timeout)),
    /// waiting up to [`patience`](Self::patience) for the node to accept clients.
    pub fn client(&self, i: usize) -> redis::Connection {
        let deadline = Instant::now() + self.patience;
        loop {
            match self.connect(i, self.read_timeout) {
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

    /// Runs `f` on a fresh connection to node `i` until it succeeds, within
    /// [`patience`](Self::patience) (a node answers TRYAGAIN while there is no leader).
    pub fn retry<T>(
        &self,
        i: usize,
        what: &str,
        f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> T {
        self.retry_within(i, what, self.patience, f)
    }

    /// [`retry`](Self::retry) with its own patience.
    pub fn retry_within<T>(
        &self,
        i: usize,
        what: &str,
        patience: Duration,
        f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> T {
        self.try_retry_within(i, what, patience, f)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`retry_within`](Self::retry_within), its failure (naming the call, the node and the
    /// last error) returned rather than raised.
    pub fn try_retry_within<T>(
        &self,
        i: usize,
        what: &str,
        patience: Duration,
        f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + patience;
        loop {
            let result = self
                .connect(i, self.read_timeout)
                .and_then(|mut con| f(&mut con));
            match result {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "{what} on node {} failed for {patience:?}: {e}",
                        i + 1
                    ));
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
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

    /// Starts `raftkv member ARGS` against the client ports of `via`, then of every other
    /// started node (as an operator would list them: leadership may move meanwhile, and a
    /// follower may not know the leader's client address).
    pub fn member_spawn(&self, via: &[usize], args: &[&str]) -> MemberRun {
        let mut order: Vec<usize> = via.to_vec();
        order.extend(self.running().into_iter().filter(|i| !via.contains(i)));
        let nodes: Vec<String> = order.iter().map(|&i| self.client_addr(i)).collect();
        let child = Command::new(EXE)
            .arg("member")
            .arg("--node")
            .arg(nodes.join(","))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG")
            .spawn()
            .expect("run raftkv member");
        MemberRun {
            child: Some(child),
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// Runs `raftkv member ARGS` to its end (within [`MEMBER_LIMIT`]): exit code, stdout,
    /// stderr.
    pub fn member(&self, via: &[usize], args: &[&str]) -> (i32, String, String) {
        self.member_spawn(via, args).finish(MEMBER_LIMIT)
    }

    /// `member list`, parsed: (id, role, match index) per member.
    pub fn members(&self, via: &[usize]) -> Vec<(usize, String, u64)> {
        let (code, out, err) = self.member(via, &["list"]);
        assert_eq!(code, 0, "member list: {out}{err}");
        out.lines()
            .skip(1)
            .map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let matched = words
                    .iter()
                    .find_map(|w| w.strip_prefix("match="))
                    .and_then(|m| m.parse().ok())
                    .unwrap_or_else(|| panic!("no match index in '{l}'"));
                (
                    words[0].parse().expect("an id"),
                    words[1].to_string(),
                    matched,
                )
            })
            .collect()
    }

    /// Waits up to [`patience`](Self::patience) until node `i`'s status file says it is
    /// `member` in its configuration (`voter`, `learner`, `removed`, `waiting to be added`).
    pub fn wait_member_role(&self, i: usize, member: &str) {
        let deadline = Instant::now() + self.patience;
        loop {
            if self.status(i).is_some_and(|s| s.member == member) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} is {:?}, not {member}, after {:?}",
                i + 1,
                self.status(i).map(|s| s.member),
                self.patience
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The ids (from 1) of `member list`'s voters, in its order.
pub fn voters(list: &[(usize, String, u64)]) -> Vec<usize> {
    list.iter()
        .filter(|(_, role, _)| role == "voter")
        .map(|(id, _, _)| *id)
        .collect()
}

/// A `raftkv member` run under way; killed and reaped if dropped before it is
/// [`finish`](Self::finish)ed (a test that fails meanwhile leaves nothing running).
pub struct MemberRun {
    child: Option<Child>,
    args: Vec<String>,
}

impl MemberRun {
    /// Waits for the run to end (killing it, and failing, past `limit`): exit code (-1 if
    /// a signal ended it), stdout, stderr.
    pub fn finish(mut self, limit: Duration) -> (i32, String, String) {
        let mut child = self.child.take().expect("a run is finished once");
        let deadline = Instant::now() + limit;
        // Its answer is a few lines: the pipes never fill while it runs.
        while child.try_wait().expect("wait for raftkv member").is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("raftkv member {:?} still runs after {limit:?}", self.args);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().expect("raftkv member's output");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        eprintln!(
            "raftkv member {:?} -> {:?}: {stdout}{stderr}",
            self.args,
            out.status.code()
        );
        (out.status.code().unwrap_or(-1), stdout, stderr)
    }
}

impl Drop for MemberRun {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The first number on the `field` line (`VmHWM:`, `VmRSS:`, `Threads:`, …) of
/// `/proc/PID/status`, in the unit the kernel gives it (kB for memory).
pub fn proc_status_number(pid: u32, field: &str) -> u64 {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {path}"))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failing test's nodes leave their account in the test's output before their
        // directory goes: how each exited (if it did on its own) and what it printed.
        if thread::panicking() {
            for i in 0..self.len() {
                if let Some(status) = self.exit_status(i) {
                    eprintln!("node {} had exited: {status}", i + 1);
                }
                let stderr = self.stderr(i);
                let lines: Vec<&str> = stderr.lines().collect();
                for line in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("node {} stderr: {line}", i + 1);
                }
            }
        }
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill9();
        }
    }
}
