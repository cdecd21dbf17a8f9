//! What a node does when its disk lets it down (issue 20): a wiped Raft directory, a directory
//! of another cluster, a full disk, and a leader cut off from its majority (CheckQuorum).
//! Real `raftkv serve` processes on loopback, talked to with the `redis` crate; every process
//! is killed and every file removed when a test ends, passing or failing.

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use raftkv::proc::{NodeProcess, NodeStatusFile, ServeSpec};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_raftkv");
/// How long a cluster may take to elect a leader, or a command to succeed after a fault.
const PATIENCE: Duration = Duration::from_secs(20);

static DIRS: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under the system temp directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "raftkv-durability-{what}-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the test directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `n` free loopback ports (all bound at once, so they differ, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// A cluster of `raftkv serve` processes (started through the process kit); each node's
/// stderr goes to `DIR/node-<i>.err`.
struct Cluster {
    dir: PathBuf,
    peer_ports: Vec<u16>,
    client_ports: Vec<u16>,
    children: Vec<Option<NodeProcess>>,
    cluster_id: String,
    /// Started once already: later starts get no `--bootstrap`.
    founded: Vec<bool>,
}

impl Cluster {
    /// A cluster in `dir` on `ports` (peer ports, then client ports), no node started yet.
    fn empty(dir: &Path, ports: &[u16]) -> Cluster {
        fs::create_dir_all(dir).expect("the cluster's directory");
        raftkv::node::secret::create_secret(&dir.join(raftkv::node::secret::SECRET_FILE))
            .expect("create the peer secret");
        let n = ports.len() / 2;
        Cluster {
            dir: dir.to_path_buf(),
            peer_ports: ports[..n].to_vec(),
            client_ports: ports[n..].to_vec(),
            children: (0..n).map(|_| None).collect(),
            cluster_id: raftkv::node::identity::random_cluster_id(),
            founded: vec![false; n],
        }
    }

    /// A new cluster in `dir` on `ports`, every node started.
    fn new(dir: &Path, ports: &[u16]) -> Cluster {
        let mut cluster = Cluster::empty(dir, ports);
        for i in 0..cluster.children.len() {
            cluster.start(i);
        }
        cluster
    }

    fn data(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{}", i + 1))
    }

    fn stderr_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{}.err", i + 1))
    }

    fn stderr(&self, i: usize) -> String {
        fs::read_to_string(self.stderr_path(i)).unwrap_or_default()
    }

    fn spec(&self, i: usize) -> ServeSpec {
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
            peer_secret: self.dir.join(raftkv::node::secret::SECRET_FILE),
            cluster: Some(self.cluster_id.clone()),
            bootstrap: !self.founded[i],
        }
    }

    /// Starts node `i` (0-based) on its data directory; its stderr starts afresh.
    fn start(&mut self, i: usize) {
        self.start_with(i, |_| {});
    }

    fn start_with(&mut self, i: usize, adjust: impl FnOnce(&mut Command)) {
        assert!(self.children[i].is_none(), "node {} already runs", i + 1);
        let err = fs::File::create(self.stderr_path(i)).expect("stderr file");
        let spec = self.spec(i);
        let mut command = spec.command();
        command.stderr(err).env_remove("RUST_LOG");
        adjust(&mut command);
        let child = spec
            .spawn(&mut command)
            .unwrap_or_else(|e| panic!("start node {}: {e}", i + 1));
        self.founded[i] = true;
        self.children[i] = Some(child);
    }

    fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            child.kill9().expect("SIGKILL and reap");
        }
    }

    /// Node `i` has exited on its own (reaped), or still runs.
    fn exited(&mut self, i: usize) -> bool {
        self.children[i]
            .as_mut()
            .is_some_and(|c| c.try_exit().is_some())
    }

    /// Waits up to `within` for node `i` to exit on its own; reaps it.
    fn wait_exit(&mut self, i: usize, within: Duration) -> ExitStatus {
        let child = self.children[i].as_mut().expect("node was started");
        let status = child.wait_exit(within);
        let Some(status) = status else {
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
    fn status(&self, i: usize) -> Option<NodeStatusFile> {
        NodeStatusFile::read(&NodeStatusFile::path(&self.data(i)))
    }

    /// The running node that leads in the highest term, waiting up to [`PATIENCE`].
    fn leader(&self) -> usize {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let running = (0..self.children.len()).filter(|&i| self.children[i].is_some());
            if let Some(i) = raftkv::proc::leader_of(running.map(|i| (i, self.status(i)))) {
                return i;
            }
            assert!(Instant::now() < deadline, "no leader within {PATIENCE:?}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn connect(&self, i: usize, timeout: Duration) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.client_ports[i]))?;
        let con = client.get_connection_with_timeout(Duration::from_secs(2))?;
        con.set_read_timeout(Some(timeout))?;
        Ok(con)
    }

    /// Runs `f` on a fresh connection to node `i` until it succeeds, within [`PATIENCE`].
    fn retry<T>(
        &self,
        i: usize,
        what: &str,
        f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let result = self
                .connect(i, Duration::from_secs(10))
                .and_then(|mut con| f(&mut con));
            match result {
                Ok(v) => return v,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "{what} on node {} failed for {PATIENCE:?}: {e}",
                        i + 1
                    );
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// SETs `key` = `value` through node `i` until acknowledged.
    fn set(&self, i: usize, key: &str, value: &str) {
        let reply: String = self.retry(i, &format!("SET {key}"), |c| {
            redis::cmd("SET").arg(key).arg(value).query(c)
        });
        assert_eq!(reply, "OK");
    }

    /// Every key of `acked` reads back its value through node `i`.
    fn check_keys(&self, i: usize, acked: &BTreeMap<String, String>) {
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
    fn wait_applied(&self, i: usize, applied: u64, patience: Duration) {
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

    /// The `applied` high-water mark node `i`'s identity file records.
    fn recorded_applied(&self, i: usize) -> u64 {
        fs::read_to_string(self.data(i).join("identity"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("applied ")?.parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill9(i);
        }
    }
}

/// SETs `count` keys `<prefix><k>` through node `via`; returns what was acknowledged.
fn write_keys(
    cluster: &Cluster,
    via: usize,
    prefix: &str,
    count: usize,
    acked: &mut BTreeMap<String, String>,
) {
    for k in 0..count {
        let (key, value) = (format!("{prefix}{k}"), format!("{prefix}-value-{k}"));
        cluster.set(via, &key, &value);
        acked.insert(key, value);
    }
}

/// The one line a node printed on stderr (without RUST_LOG it prints nothing else).
fn one_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {stderr}");
    eprintln!("the node said: {}", lines[0]);
    lines[0]
}

/// A follower whose `raft/` directory was wiped refuses to start, saying what is missing and
/// how to replace it; the other two keep serving. Replaced as the message says (its whole
/// directory removed, started without `--bootstrap`), it rejoins, catches up and votes
/// again: with the old leader then killed, it helps elect a leader that holds every
/// acknowledged key.
#[test]
fn wiped_raft_dir_is_refused_and_the_replaced_node_catches_up() {
    let dir = TempDir::new("wiped");
    let mut cluster = Cluster::new(&dir.0, &free_ports(6));
    let leader = cluster.leader();
    let follower = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let mut acked = BTreeMap::new();
    write_keys(&cluster, leader, "a", 200, &mut acked);
    // The follower's identity records how far it got (at most a second later).
    let deadline = Instant::now() + PATIENCE;
    while cluster.recorded_applied(follower) == 0 {
        assert!(
            Instant::now() < deadline,
            "node {} never recorded its progress",
            follower + 1
        );
        thread::sleep(Duration::from_millis(100));
    }
    cluster.kill9(follower);
    fs::remove_dir_all(cluster.data(follower).join("raft")).expect("wipe raft/");
    cluster.start(follower);
    let status = cluster.wait_exit(follower, Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{status}");
    let stderr = cluster.stderr(follower);
    let line = one_line(&stderr);
    assert!(
        line.contains("lost state") && line.contains("raft") && line.contains("remove"),
        "{line}"
    );
    // The other two keep serving.
    write_keys(&cluster, other, "b", 50, &mut acked);
    cluster.check_keys(other, &acked);
    // Replaced: an empty directory, no --bootstrap.
    fs::remove_dir_all(cluster.data(follower)).expect("remove the node's directory");
    cluster.start(follower);
    write_keys(&cluster, leader, "c", 20, &mut acked);
    let leader_applied = cluster.status(leader).expect("leader status").applied;
    cluster.wait_applied(follower, leader_applied, PATIENCE);
    // It caught up and votes: without the old leader, it and `other` elect a leader that
    // serves every acknowledged key.
    let deadline = Instant::now() + PATIENCE;
    while cluster.recorded_applied(follower) == 0
        || !fs::read_to_string(cluster.data(follower).join("identity"))
            .unwrap_or_default()
            .contains("member voter")
    {
        assert!(
            Instant::now() < deadline,
            "node {} never became a voter",
            follower + 1
        );
        thread::sleep(Duration::from_millis(100));
    }
    cluster.kill9(leader);
    write_keys(&cluster, follower, "d", 20, &mut acked);
    cluster.check_keys(follower, &acked);
    cluster.check_keys(other, &acked);
    assert!(cluster.children[follower].is_some() && cluster.children[other].is_some());
}

/// A node whose whole directory was wiped cannot help elect a leader that lacks committed
/// writes: with the leader down, the wiped node (no identity, no log) and the node that missed
/// the writes must not form a majority. No read may return a state without an acknowledged
/// key; once the old leader is back, every key is served.
#[test]
fn wiped_node_does_not_elect_a_leader_missing_writes() {
    let dir = TempDir::new("noelect");
    let mut cluster = Cluster::new(&dir.0, &free_ports(6));
    let leader = cluster.leader();
    let behind = (leader + 1) % 3;
    let wiped = (leader + 2) % 3;
    let mut acked = BTreeMap::new();
    write_keys(&cluster, leader, "a", 10, &mut acked);
    cluster.kill9(behind);
    // Committed on the leader and `wiped` only.
    write_keys(&cluster, leader, "b", 50, &mut acked);
    cluster.kill9(leader);
    cluster.kill9(wiped);
    fs::remove_dir_all(cluster.data(wiped)).expect("wipe the node's directory");
    cluster.start(wiped);
    cluster.start(behind);
    // For a while (several election timeouts), neither may serve a read that lacks a key.
    let until = Instant::now() + Duration::from_secs(5);
    let mut answered = 0;
    while Instant::now() < until {
        for i in [behind, wiped] {
            let Ok(mut con) = cluster.connect(i, Duration::from_secs(6)) else {
                continue;
            };
            let got: redis::RedisResult<Option<String>> =
                redis::cmd("GET").arg("b49").query(&mut con);
            if let Ok(value) = got {
                answered += 1;
                assert_eq!(
                    value.as_deref(),
                    Some("b-value-49"),
                    "node {} served a state without the acknowledged key b49",
                    i + 1
                );
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    eprintln!("reads answered without the old leader: {answered}");
    cluster.start(leader);
    for i in 0..3 {
        cluster.check_keys(i, &acked);
    }
}

/// A follower whose `raft/` directory was replaced by an older copy of itself (a restored
/// backup) refuses to start: its identity records more than the copy holds.
#[test]
fn raft_dir_older_than_recorded_is_refused() {
    let dir = TempDir::new("older");
    let mut cluster = Cluster::new(&dir.0, &free_ports(6));
    let leader = cluster.leader();
    let follower = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let mut acked = BTreeMap::new();
    write_keys(&cluster, leader, "a", 20, &mut acked);
    cluster.wait_applied(follower, 20, PATIENCE);
    cluster.kill9(follower);
    let raft = cluster.data(follower).join("raft");
    let old = cluster.data(follower).join("raft.old");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&raft)
        .arg(&old)
        .status()
        .expect("cp");
    assert!(copied.success(), "cp -a {}: {copied}", raft.display());
    let copied_at = cluster.recorded_applied(follower);
    cluster.start(follower);
    write_keys(&cluster, leader, "b", 200, &mut acked);
    let deadline = Instant::now() + PATIENCE;
    while cluster.recorded_applied(follower) <= copied_at + 100 {
        assert!(
            Instant::now() < deadline,
            "node {} recorded {} (copy at {copied_at})",
            follower + 1,
            cluster.recorded_applied(follower)
        );
        thread::sleep(Duration::from_millis(100));
    }
    cluster.kill9(follower);
    fs::remove_dir_all(&raft).expect("remove raft/");
    fs::rename(&old, &raft).expect("put the old copy in place");
    cluster.start(follower);
    let status = cluster.wait_exit(follower, Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{status}");
    let stderr = cluster.stderr(follower);
    let line = one_line(&stderr);
    assert!(
        line.contains("lost state") && line.contains("records term") && line.contains("remove"),
        "{line}"
    );
    write_keys(&cluster, other, "c", 20, &mut acked);
    cluster.check_keys(other, &acked);
}

/// Every file under `dir` with its bytes, but the status file (which [`Cluster::start`]
/// removes, so that an old one is not taken for the new process's).
fn contents(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n != "status") {
                out.insert(path.clone(), fs::read(&path).expect("read"));
            }
        }
    }
    out
}

/// Two clusters on the same ports and node ids; cluster A's node-1 directory moved into
/// cluster B. B's node 1 refuses to start on it, naming both cluster ids, and writes nothing
/// into it; put back where they belong, both clusters serve every key they acknowledged.
#[test]
fn directory_of_another_cluster_is_refused_and_both_keep_every_key() {
    let dir = TempDir::new("foreign");
    let ports = free_ports(6);
    let (dir_a, dir_b) = (dir.0.join("a"), dir.0.join("b"));
    let mut acked_a = BTreeMap::new();
    let mut acked_b = BTreeMap::new();
    let mut a = Cluster::new(&dir_a, &ports);
    let leader = a.leader();
    write_keys(&a, leader, "a", 100, &mut acked_a);
    a.check_keys(0, &acked_a);
    for i in 0..3 {
        a.kill9(i);
    }
    let mut b = Cluster::new(&dir_b, &ports);
    let leader = b.leader();
    write_keys(&b, leader, "b", 100, &mut acked_b);
    b.check_keys(0, &acked_b);
    b.kill9(0);
    let own = dir.0.join("b-node-1");
    fs::rename(b.data(0), &own).expect("move B's node 1 aside");
    fs::rename(a.data(0), b.data(0)).expect("move A's node 1 into B");
    let before = contents(&b.data(0));
    b.start(0);
    let status = b.wait_exit(0, Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{status}");
    let stderr = b.stderr(0);
    let line = one_line(&stderr);
    assert!(
        line.contains(&a.cluster_id) && line.contains(&b.cluster_id),
        "{line}"
    );
    let after = contents(&b.data(0));
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "files in the refused directory changed"
    );
    assert!(before == after, "the refused directory was written to");
    // B's other two keep serving.
    let leader = b.leader();
    write_keys(&b, leader, "b2-", 20, &mut acked_b);
    // Each directory back in its cluster: both serve everything they acknowledged.
    fs::rename(b.data(0), a.data(0)).expect("move A's node 1 back");
    fs::rename(&own, b.data(0)).expect("move B's node 1 back");
    b.start(0);
    for i in 0..3 {
        b.check_keys(i, &acked_b);
    }
    for i in 0..3 {
        b.kill9(i);
    }
    for i in 0..3 {
        a.start(i);
    }
    for i in 0..3 {
        a.check_keys(i, &acked_a);
    }
}

/// A small tmpfs mounted for one node's data directory, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` at `dir`; `None` if this process may not mount.
    fn mount(dir: &Path, bytes: u64) -> Option<Tmpfs> {
        fs::create_dir_all(dir).expect("mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` with `filler` until a write fails.
fn fill(filler: &Path) {
    use std::io::Write;
    let mut f = fs::File::create(filler).expect("filler");
    let block = vec![0xabu8; 64 << 10];
    for _ in 0..100_000 {
        if f.write_all(&block).is_err() {
            break;
        }
    }
    let _ = f.sync_all();
}

/// Node 3's data directory on a small tmpfs (or, where this process may not mount, under a
/// file-size limit with SIGXFSZ ignored), filled up while the cluster takes writes: node 3
/// stops with one line naming the operation, the file and the OS error; the other two keep
/// serving; with space freed and node 3 restarted, it catches up and holds every key (the
/// cluster with it and without one of the others serves them all).
#[test]
fn full_disk_stops_the_node_naming_the_cause_and_it_catches_up_after() {
    let dir = TempDir::new("fulldisk");
    let ports = free_ports(6);
    let full = 2;
    let tmpfs = Tmpfs::mount(&dir.0.join(format!("node-{}", full + 1)), 32 << 20);
    let mut cluster = Cluster::empty(&dir.0, &ports);
    for i in 0..3 {
        if i == full && tmpfs.is_none() {
            cluster.start_with(i, |c| limit_file_size(c, 4 << 20));
        } else {
            cluster.start(i);
        }
    }
    let mut acked = BTreeMap::new();
    let leader = cluster.leader();
    write_keys(&cluster, leader, "a", 50, &mut acked);
    let filler = cluster.data(full).join("filler");
    if tmpfs.is_some() {
        fill(&filler);
    }
    // Writes until node 3 has stopped: 8 KiB values fill what is left quickly.
    let big = "x".repeat(8 << 10);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut k = 0;
    let via = (full + 1) % 3;
    loop {
        if cluster.exited(full) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {} still runs after 60 s of writes on a full disk",
            full + 1
        );
        let key = format!("big{k}");
        cluster.set(via, &key, &big);
        acked.insert(key, big.clone());
        k += 1;
    }
    let status = cluster.wait_exit(full, Duration::from_secs(1));
    assert_eq!(status.code(), Some(1), "{status}");
    let stderr = cluster.stderr(full);
    // Its last status says it stopped and why.
    let last = cluster
        .status(full)
        .expect("the stopped node's last status");
    let why = last.stopped.expect("the status file says the node stopped");
    assert!(!last.leader, "{why}");
    let line = one_line(&stderr);
    let cause = if tmpfs.is_some() {
        "No space left on device"
    } else {
        "File too large"
    };
    assert!(
        line.contains(cause) && line.contains(&cluster.data(full).display().to_string()),
        "{line}"
    );
    assert!(why.contains(cause), "status file: {why}");
    assert!(
        ["write", "fsync", "create", "sync"]
            .iter()
            .any(|op| line.contains(op)),
        "{line}"
    );
    // The other two keep serving.
    write_keys(&cluster, via, "b", 50, &mut acked);
    // Space freed, node 3 restarted: it catches up.
    let _ = fs::remove_file(&filler);
    cluster.start(full);
    let applied = cluster.status(via).expect("status").applied;
    cluster.wait_applied(full, applied, PATIENCE);
    // With one of the others down, node 3 is needed for every write and read.
    let leader = cluster.leader();
    let down = (0..3)
        .find(|&i| i != full && i != leader)
        .expect("a third node");
    cluster.kill9(down);
    write_keys(&cluster, full, "c", 20, &mut acked);
    cluster.check_keys(full, &acked);
    for i in 0..3 {
        cluster.kill9(i);
    }
    drop(tmpfs);
}

/// Where mounting is not allowed: the node may write no file beyond `bytes` (a write past it
/// fails with EFBIG instead of killing the process).
fn limit_file_size(command: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// CheckQuorum: a leader cut off from both followers steps down within about two election
/// timeouts, and a client writing to it is told to try again (TRYAGAIN) instead of waiting
/// for as long as the partition lasts.
#[test]
fn isolated_leader_steps_down_and_its_clients_are_told_to_try_again() {
    use raftkv::chaos::{ChaosCluster, ClusterOptions};
    use raftkv::net::proxy::LinkMode;
    let dir = TempDir::new("checkquorum");
    let mut cluster = ChaosCluster::start(ClusterOptions {
        exe: PathBuf::from(EXE),
        nodes: 3,
        dir: dir.0.join("nodes"),
        fault: None,
        node_log: None,
    })
    .unwrap_or_else(|e| panic!("the cluster did not start: {e}"));
    let leader = cluster.wait_for_leader(PATIENCE).expect("a leader");
    let addr = cluster.client_addr(leader);
    let connect = |timeout: Duration| {
        let client = redis::Client::open(format!("redis://{addr}/")).expect("redis url");
        let con = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .expect("connect to the leader");
        con.set_read_timeout(Some(timeout)).expect("read timeout");
        con
    };
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r: redis::RedisResult<String> = redis::cmd("SET")
            .arg("k")
            .arg("before")
            .query(&mut connect(Duration::from_secs(8)));
        if r.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "SET before the partition: {r:?}");
        thread::sleep(Duration::from_millis(100));
    }
    let status = dir
        .0
        .join("nodes")
        .join(format!("node-{}", leader + 1))
        .join("status");
    let leads = || NodeStatusFile::read(&status).is_some_and(|s| s.leader);
    assert!(leads(), "node {} should lead", leader + 1);
    cluster.partition(&[leader], LinkMode::Blackhole);
    let cut_at = Instant::now();
    // Two election timeouts (700 ms each), plus the status file's 250 ms period and some
    // scheduling slack on a loaded machine (20 stress runs: 0.72 s to 1.65 s).
    let bound = Duration::from_millis(2 * 700 + 250 + 350);
    while leads() {
        assert!(
            cut_at.elapsed() < Duration::from_secs(10),
            "node {} still leads 10 s after losing both followers",
            leader + 1
        );
        thread::sleep(Duration::from_millis(20));
    }
    let stepped_down = cut_at.elapsed();
    eprintln!("the isolated leader stepped down after {stepped_down:?}");
    assert!(
        stepped_down <= bound,
        "node {} stepped down only after {stepped_down:?} (bound {bound:?})",
        leader + 1
    );
    // A write sent to it now is answered, and not with OK.
    let sent = Instant::now();
    let reply: redis::RedisResult<String> = redis::cmd("SET")
        .arg("k")
        .arg("minority")
        .query(&mut connect(Duration::from_secs(15)));
    let took = sent.elapsed();
    match reply {
        Ok(r) => panic!("an isolated node acknowledged a write: {r}"),
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.to_ascii_uppercase().contains("TRYAGAIN"),
                "after {took:?}: expected TRYAGAIN, got {text}"
            );
        }
    }
    cluster.heal();
    cluster.shutdown();
}
