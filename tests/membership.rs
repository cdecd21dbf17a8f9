//! Membership changes on a real cluster (issue 20; Raft dissertation §4): `raftkv member
//! list|add|remove` against real `raftkv serve` processes on loopback. A node whose disk was
//! lost is replaced by a brand-new node; a removed leader steps down; a removed node left
//! running disrupts nothing; one change at a time; the new configuration survives a restart
//! of the whole cluster. Every process is killed and every file removed when a test ends.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use raftkv::proc::{NodeProcess, NodeStatusFile, ServeSpec};

const EXE: &str = env!("CARGO_BIN_EXE_raftkv");
/// How long a cluster may take to elect a leader, or a command to succeed after a fault.
const PATIENCE: Duration = Duration::from_secs(30);
/// The most one `raftkv member` command may take here (an add waits for catch-up).
const MEMBER_LIMIT: Duration = Duration::from_secs(120);

static DIRS: AtomicU32 = AtomicU32::new(0);

struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "raftkv-membership-{what}-{}-{}",
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

/// One node: its id, ports, the `--peers` it is started with, and its process.
struct Node {
    id: usize,
    peer_port: u16,
    client_port: u16,
    peers: Vec<String>,
    founded: bool,
    bootstrap: bool,
    child: Option<NodeProcess>,
}

/// Nodes by id; ports for up to `MAX_NODES` of them taken at once from the quiet range.
struct Cluster {
    dir: PathBuf,
    cluster_id: String,
    ports: Vec<u16>,
    nodes: BTreeMap<usize, Node>,
}

const MAX_NODES: usize = 6;

impl Cluster {
    /// Nodes 1..=3 founded and started.
    fn new(dir: &Path) -> Cluster {
        raftkv::node::secret::create_secret(&dir.join(raftkv::node::secret::SECRET_FILE))
            .expect("create the peer secret");
        let ports = raftkv::chaos::cluster::cluster_ports(2 * MAX_NODES).expect("ports");
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            cluster_id: raftkv::node::identity::random_cluster_id(),
            ports,
            nodes: BTreeMap::new(),
        };
        let founding: Vec<String> = (1..=3).map(|id| c.peer_addr(id)).collect();
        for id in 1..=3 {
            c.add_node(id, founding.clone(), true);
            c.start(id);
        }
        c
    }

    fn peer_addr(&self, id: usize) -> String {
        format!("127.0.0.1:{}", self.ports[id - 1])
    }

    fn client_addr(&self, id: usize) -> String {
        format!("127.0.0.1:{}", self.ports[MAX_NODES + id - 1])
    }

    /// Registers node `id` (not started) with its `--peers`.
    fn add_node(&mut self, id: usize, peers: Vec<String>, bootstrap: bool) {
        let node = Node {
            id,
            peer_port: self.ports[id - 1],
            client_port: self.ports[MAX_NODES + id - 1],
            peers,
            founded: false,
            bootstrap,
            child: None,
        };
        self.nodes.insert(id, node);
    }

    fn data(&self, id: usize) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    fn stderr(&self, id: usize) -> String {
        fs::read_to_string(self.dir.join(format!("node-{id}.err"))).unwrap_or_default()
    }

    fn start(&mut self, id: usize) {
        let n = &self.nodes[&id];
        assert!(n.child.is_none(), "node {id} already runs");
        assert_eq!(n.peer_port, self.ports[id - 1]);
        let spec = ServeSpec {
            exe: PathBuf::from(EXE),
            id,
            peers: n.peers.clone(),
            client: format!("127.0.0.1:{}", n.client_port),
            data: self.data(id),
            peer_secret: self.dir.join(raftkv::node::secret::SECRET_FILE),
            cluster: Some(self.cluster_id.clone()),
            bootstrap: n.bootstrap && !n.founded,
        };
        let err = fs::File::create(self.dir.join(format!("node-{id}.err"))).expect("stderr");
        let mut command = spec.command();
        command.stderr(err).env_remove("RUST_LOG");
        let child = spec
            .spawn(&mut command)
            .unwrap_or_else(|e| panic!("start node {id}: {e}"));
        let n = self.nodes.get_mut(&id).expect("registered");
        n.founded = true;
        n.child = Some(child);
    }

    fn kill9(&mut self, id: usize) {
        if let Some(mut child) = self.nodes.get_mut(&id).and_then(|n| n.child.take()) {
            child.kill9().expect("SIGKILL and reap");
        }
    }

    fn running(&self) -> Vec<usize> {
        self.nodes
            .values()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect()
    }

    fn status(&self, id: usize) -> Option<NodeStatusFile> {
        NodeStatusFile::read(&NodeStatusFile::path(&self.data(id)))
    }

    /// The running node (among `among`) that leads in the highest term, within [`PATIENCE`].
    fn leader_among(&self, among: &[usize]) -> usize {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let found = raftkv::proc::leader_of(among.iter().map(|&id| (id, self.status(id))));
            if let Some(id) = found {
                return id;
            }
            assert!(
                Instant::now() < deadline,
                "no leader among {among:?} within {PATIENCE:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn leader(&self) -> usize {
        self.leader_among(&self.running())
    }

    fn connect(&self, id: usize) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(format!("redis://{}/", self.client_addr(id)))?;
        let con = client.get_connection_with_timeout(Duration::from_secs(2))?;
        con.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(con)
    }

    fn retry<T>(
        &self,
        id: usize,
        what: &str,
        f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.connect(id).and_then(|mut c| f(&mut c)) {
                Ok(v) => return v,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "{what} on node {id} failed for {PATIENCE:?}: {e}"
                    );
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn write_keys(
        &self,
        via: usize,
        prefix: &str,
        count: usize,
        acked: &mut BTreeMap<String, String>,
    ) {
        for k in 0..count {
            let (key, value) = (format!("{prefix}{k}"), format!("{prefix}-value-{k}"));
            let reply: String = self.retry(via, &format!("SET {key}"), |c| {
                redis::cmd("SET").arg(&key).arg(&value).query(c)
            });
            assert_eq!(reply, "OK");
            acked.insert(key, value);
        }
    }

    fn check_keys(&self, via: usize, acked: &BTreeMap<String, String>) {
        let keys: Vec<&String> = acked.keys().collect();
        for chunk in keys.chunks(100) {
            let values: Vec<Option<String>> = self.retry(via, "MGET", |c| {
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
                    "node {via}: acknowledged key {k} lost"
                );
            }
        }
    }

    /// Starts `raftkv member ARGS` against the client ports of `via`, then of every other
    /// running node (as an operator would list them: leadership may move meanwhile, and a
    /// follower may not know the leader's client address).
    fn member_spawn(&self, via: &[usize], args: &[&str]) -> std::process::Child {
        let mut order: Vec<usize> = via.to_vec();
        order.extend(self.running().into_iter().filter(|id| !via.contains(id)));
        let nodes: Vec<String> = order.iter().map(|&id| self.client_addr(id)).collect();
        Command::new(EXE)
            .arg("member")
            .arg("--node")
            .arg(nodes.join(","))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG")
            .spawn()
            .expect("run raftkv member")
    }

    /// Runs `raftkv member ARGS` to its end (within [`MEMBER_LIMIT`]): exit code, stdout,
    /// stderr.
    fn member(&self, via: &[usize], args: &[&str]) -> (i32, String, String) {
        finish(self.member_spawn(via, args), args)
    }

    /// `member list`, parsed: (id, role, match index) per member.
    fn members(&self, via: &[usize]) -> Vec<(usize, String, u64)> {
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

    /// Waits until node `id`'s status file says it is `member` in its configuration.
    fn wait_member_role(&self, id: usize, member: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if self.status(id).is_some_and(|s| s.member == member) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} is {:?}, not {member}, after {PATIENCE:?}",
                self.status(id).map(|s| s.member)
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let ids: Vec<usize> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill9(id);
        }
    }
}

/// Waits for a `raftkv member` run (killed past [`MEMBER_LIMIT`]).
fn finish(mut child: std::process::Child, args: &[&str]) -> (i32, String, String) {
    let deadline = Instant::now() + MEMBER_LIMIT;
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("raftkv member {args:?} still runs after {MEMBER_LIMIT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!(
        "raftkv member {args:?} -> {:?}: {stdout}{stderr}",
        out.status.code()
    );
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

fn voters(list: &[(usize, String, u64)]) -> Vec<usize> {
    list.iter()
        .filter(|(_, role, _)| role == "voter")
        .map(|(id, _, _)| *id)
        .collect()
}

/// A follower's `raft/` directory is lost: it refuses to start; `member remove` takes it out
/// and `member add` brings in a brand-new node (new id, new ports, empty directory), which
/// catches up as a learner and becomes a voter: three voters again, no acknowledged write
/// lost. Then the old leader is killed and the two others still serve every key; the whole
/// cluster restarted keeps the new configuration.
#[test]
fn lost_disk_node_is_replaced_by_a_new_member_and_nothing_is_lost() {
    let dir = TempDir::new("replace");
    let mut cluster = Cluster::new(&dir.0);
    let leader = cluster.leader();
    let lost = leader % 3 + 1;
    let other = (0..3)
        .map(|i| i + 1)
        .find(|&i| i != leader && i != lost)
        .expect("3 nodes");
    let mut acked = BTreeMap::new();
    cluster.write_keys(leader, "a", 200, &mut acked);
    // The follower's identity records its progress within a second.
    thread::sleep(Duration::from_millis(1500));
    cluster.kill9(lost);
    fs::remove_dir_all(cluster.data(lost).join("raft")).expect("wipe raft/");
    cluster.start(lost);
    let status = cluster
        .nodes
        .get_mut(&lost)
        .and_then(|n| n.child.as_mut())
        .expect("started")
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("node {lost} runs without its raft/"));
    assert_eq!(status.code(), Some(1));
    cluster.nodes.get_mut(&lost).expect("node").child = None;
    assert!(
        cluster.stderr(lost).contains("lost state"),
        "{}",
        cluster.stderr(lost)
    );

    let (code, out, err) = cluster.member(&[other, leader], &["remove", &lost.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(voters(&cluster.members(&[leader, other])), {
        let mut v = vec![leader, other];
        v.sort();
        v
    });
    cluster.write_keys(other, "b", 50, &mut acked);

    // The new node: id 4, its own ports, an empty directory, no --bootstrap.
    let mut peers: Vec<String> = (1..=3).map(|id| cluster.peer_addr(id)).collect();
    peers.push(cluster.peer_addr(4));
    cluster.add_node(4, peers, false);
    cluster.start(4);
    cluster.wait_member_role(4, "waiting to be added");
    let (code, out, err) = cluster.member(
        &[leader, other],
        &["add", "4", &cluster.peer_addr(4), &cluster.client_addr(4)],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("node 4 added"), "{out}");
    let list = cluster.members(&[leader, other, 4]);
    let mut expect = vec![leader, other, 4];
    expect.sort();
    assert_eq!(voters(&list), expect, "{list:?}");
    cluster.wait_member_role(4, "voter");
    cluster.write_keys(4, "c", 20, &mut acked);
    cluster.check_keys(4, &acked);

    // Without the old leader, node 4 and the other elect a leader holding every key.
    cluster.kill9(leader);
    cluster.write_keys(4, "d", 20, &mut acked);
    cluster.check_keys(4, &acked);
    cluster.check_keys(other, &acked);

    // The whole cluster restarted (the lost node's leftovers stay stopped) keeps it.
    cluster.kill9(4);
    cluster.kill9(other);
    for id in [leader, other, 4] {
        cluster.start(id);
    }
    let new_leader = cluster.leader_among(&[leader, other, 4]);
    cluster.check_keys(new_leader, &acked);
    cluster.write_keys(new_leader, "e", 10, &mut acked);
    for id in [leader, other, 4] {
        cluster.check_keys(id, &acked);
    }
    assert_eq!(voters(&cluster.members(&[new_leader])), expect);
}

/// The leader removes itself: once the removal commits it steps down, its status says it was
/// removed, and the other two elect a leader that serves every acknowledged key.
#[test]
fn removed_leader_steps_down_and_the_rest_elect_a_leader() {
    let dir = TempDir::new("leader");
    let cluster = Cluster::new(&dir.0);
    let leader = cluster.leader();
    let rest: Vec<usize> = (1..=3).filter(|&i| i != leader).collect();
    let mut acked = BTreeMap::new();
    cluster.write_keys(leader, "a", 50, &mut acked);
    let (code, out, err) = cluster.member(&[leader], &["remove", &leader.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    cluster.wait_member_role(leader, "removed");
    let deadline = Instant::now() + PATIENCE;
    while cluster.status(leader).is_none_or(|s| s.leader) {
        assert!(
            Instant::now() < deadline,
            "node {leader} still leads after its removal"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let new_leader = cluster.leader_among(&rest);
    assert_ne!(new_leader, leader);
    cluster.write_keys(new_leader, "b", 50, &mut acked);
    for &id in &rest {
        cluster.check_keys(id, &acked);
    }
    assert_eq!(voters(&cluster.members(&rest)), rest);
    // The removed node still runs, and never leads again.
    for _ in 0..20 {
        assert!(
            cluster
                .status(leader)
                .is_some_and(|s| !s.leader && s.member == "removed")
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// A removed follower left running (campaigning, since it may never learn the change
/// committed) changes nothing: the leader and the term of the rest stay as they were over
/// several seconds, and every write succeeds.
#[test]
fn removed_node_left_running_does_not_disrupt() {
    let dir = TempDir::new("disrupt");
    let cluster = Cluster::new(&dir.0);
    let leader = cluster.leader();
    let removed = leader % 3 + 1;
    let mut acked = BTreeMap::new();
    cluster.write_keys(leader, "a", 20, &mut acked);
    let (code, out, err) = cluster.member(&[leader], &["remove", &removed.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    let term = cluster.status(leader).expect("leader's status").term;
    let until = Instant::now() + Duration::from_secs(6);
    let mut k = 0;
    while Instant::now() < until {
        cluster.write_keys(leader, &format!("b{k}-"), 1, &mut acked);
        k += 1;
        let s = cluster.status(leader).expect("leader's status");
        assert!(s.leader, "node {leader} lost leadership to a removed node");
        assert_eq!(
            s.term, term,
            "the term moved while node {removed} was removed"
        );
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "{k} writes during the check; node {removed} says {:?}",
        cluster.status(removed).map(|s| (s.term, s.member))
    );
    for id in (1..=3).filter(|&i| i != removed) {
        cluster.check_keys(id, &acked);
    }
}

/// One change at a time: while `member add` waits for its learner to catch up (the new node
/// is not started yet), a second change is refused with an error naming the one under way;
/// once the node starts, the add completes.
#[test]
fn second_change_while_one_is_under_way_is_refused() {
    let dir = TempDir::new("pending");
    let mut cluster = Cluster::new(&dir.0);
    let leader = cluster.leader();
    let follower = leader % 3 + 1;
    let mut acked = BTreeMap::new();
    cluster.write_keys(leader, "a", 20, &mut acked);
    let mut peers: Vec<String> = (1..=3).map(|id| cluster.peer_addr(id)).collect();
    peers.push(cluster.peer_addr(4));
    cluster.add_node(4, peers, false);
    let add_args = ["add", "4", &cluster.peer_addr(4), &cluster.client_addr(4)];
    let add = cluster.member_spawn(&[leader], &add_args);
    // The learner is in the configuration (the add now waits for it to catch up).
    let deadline = Instant::now() + PATIENCE;
    while !cluster
        .members(&[leader])
        .iter()
        .any(|(id, role, _)| *id == 4 && role == "learner")
    {
        assert!(Instant::now() < deadline, "node 4 never became a learner");
        thread::sleep(Duration::from_millis(100));
    }
    let (code, out, err) = cluster.member(&[leader], &["remove", &follower.to_string()]);
    assert_eq!(code, 1, "a second change was accepted: {out}{err}");
    assert!(
        err.contains("one change at a time") && err.contains("add 4"),
        "{err}"
    );
    let (code, _, err) = cluster.member(
        &[leader],
        &["add", "5", &cluster.peer_addr(5), &cluster.client_addr(5)],
    );
    assert_eq!(code, 1);
    assert!(err.contains("one change at a time"), "{err}");
    cluster.start(4);
    let (code, out, err) = finish(add, &add_args);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(voters(&cluster.members(&[leader])), vec![1, 2, 3, 4]);
    // Now free again: a change goes through.
    let (code, out, err) = cluster.member(&[leader], &["remove", "4"]);
    assert_eq!(code, 0, "{out}{err}");
    cluster.write_keys(leader, "b", 20, &mut acked);
    cluster.check_keys(follower, &acked);
}

/// Usage errors exit 2 and name what is wrong; an unknown node id is refused naming it.
#[test]
fn member_usage_errors_and_unknown_ids() {
    let dir = TempDir::new("usage");
    let cluster = Cluster::new(&dir.0);
    let leader = cluster.leader();
    let (code, _, err) = cluster.member(&[leader], &["add", "4", "nocolon", "127.0.0.1:1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nocolon"), "{err}");
    let (code, _, err) = cluster.member(&[leader], &["remove", "0"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = cluster.member(&[leader], &["frobnicate"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = cluster.member(&[leader], &["remove", "9"]);
    assert_eq!(code, 1);
    assert!(err.contains("node 9 is not a member"), "{err}");
    let (code, _, err) = cluster.member(&[leader], &["add", "2", "127.0.0.1:1", "127.0.0.1:2"]);
    assert_eq!(code, 1);
    assert!(err.contains("node 2 is already a member"), "{err}");
    let list = cluster.members(&[leader]);
    assert_eq!(voters(&list), vec![1, 2, 3], "{list:?}");
}

/// `raftkv chaos` with only the "replace follower" fault: followers are removed, wiped and
/// added back while clients run; the history stays linearizable and every node comes back.
#[test]
fn chaos_replace_follower_stays_linearizable() {
    let dir = TempDir::new("chaos");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    eprintln!("chaos seed {seed}");
    let mut opts = raftkv::chaos::ChaosOptions::new(PathBuf::from(EXE));
    opts.dir = dir.0.clone();
    opts.seed = seed;
    opts.duration = Duration::from_secs(20);
    opts.clients = 6;
    opts.fault_kinds = vec![raftkv::chaos::FaultKind::ReplaceFollower];
    let report = raftkv::chaos::run(&opts).unwrap_or_else(|e| panic!("chaos seed {seed}: {e}"));
    assert!(report.passed(), "{report}");
    let replaced = report
        .faults
        .get(&raftkv::chaos::FaultKind::ReplaceFollower)
        .copied()
        .unwrap_or(0);
    assert!(replaced >= 1, "no follower replaced:\n{report}");
    assert!(report.ops > 100, "too few operations:\n{report}");
}

/// Raft's own rules, on one peer with a transport that never delivers (the other member is
/// unreachable): a change is refused while the previous one is uncommitted, naming its
/// index; the configuration is in effect as soon as it is appended; a restart on the same
/// storage finds it again; a Raft without a membership host (the labs') refuses changes.
#[test]
fn raft_refuses_a_second_change_while_one_is_uncommitted() {
    use raftkv::raft::{
        ChangeError, ConfChange, Configuration, Member, MembershipHost, OnReply, Raft, RaftOptions,
        RaftTransport,
    };
    use std::sync::Arc;

    /// Sends nothing (every callback dropped): peer 1 never answers.
    struct Silent {
        host: Option<Arc<Host>>,
    }
    struct Host {
        saved: parking_lot::Mutex<Option<(u64, Configuration)>>,
        initial: Configuration,
    }
    impl MembershipHost for Host {
        fn load(&self) -> Result<(u64, Configuration), String> {
            Ok(self
                .saved
                .lock()
                .clone()
                .unwrap_or((0, self.initial.clone())))
        }
        fn save(&self, index: u64, config: &Configuration) -> Result<(), String> {
            *self.saved.lock() = Some((index, config.clone()));
            Ok(())
        }
        fn changed(&self, _config: &Configuration) {}
    }
    impl RaftTransport for Silent {
        fn len(&self) -> usize {
            raftkv::raft::membership::MAX_PEERS
        }
        fn request_vote(
            &self,
            _: usize,
            _: raftkv::raft::RequestVoteArgs,
            _: OnReply<raftkv::raft::RequestVoteReply>,
        ) {
        }
        fn append_entries(
            &self,
            _: usize,
            _: raftkv::raft::AppendEntriesArgs,
            _: OnReply<raftkv::raft::AppendEntriesReply>,
        ) {
        }
        fn install_snapshot(
            &self,
            _: usize,
            _: raftkv::raft::InstallSnapshotArgs,
            _: OnReply<raftkv::raft::InstallSnapshotReply>,
        ) {
        }
        fn membership(&self) -> Option<&dyn MembershipHost> {
            self.host.as_deref().map(|h| h as &dyn MembershipHost)
        }
    }

    let dir = TempDir::new("raft");
    let host = Arc::new(Host {
        saved: parking_lot::Mutex::new(None),
        initial: Configuration {
            members: vec![Member {
                peer: 0,
                voter: true,
                addr: String::new(),
                client_addr: String::new(),
            }],
        },
    });
    let start = |host: Option<Arc<Host>>| {
        let storage = raftkv::storage::FileLog::open(
            dir.0.join("raft"),
            raftkv::storage::FileLogOptions::default(),
        )
        .expect("open the log");
        let (tx, rx) = crossbeam::channel::unbounded();
        let raft = Raft::with_options(
            Box::new(Silent { host }) as Box<dyn RaftTransport>,
            0,
            Box::new(storage) as Box<dyn raftkv::raft::Storage>,
            tx,
            RaftOptions::default(),
        )
        .expect("start");
        (raft, rx)
    };
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + PATIENCE;
        while !f() {
            assert!(Instant::now() < deadline, "{what} within {PATIENCE:?}");
            thread::sleep(Duration::from_millis(10));
        }
    };
    let (raft, rx) = start(Some(host.clone()));
    wait("leader alone", &|| raft.get_state().1);
    // Its first entry records the founding configuration; committed alone.
    wait("the founding configuration committed", &|| {
        raft.membership()
            .is_some_and(|s| s.index > 0 && s.committed)
    });
    let learner = ConfChange::AddLearner {
        peer: 1,
        addr: "127.0.0.1:1".into(),
        client_addr: "127.0.0.1:2".into(),
    };
    let (added, _) = raft.change_membership(&learner).expect("add a learner");
    // A learner does not count: it commits with the leader alone.
    wait("the learner committed", &|| raft.progress().0 >= added);
    let (promoted, _) = raft
        .change_membership(&ConfChange::Promote { peer: 1 })
        .expect("promote");
    let s = raft.membership().expect("membership on");
    assert_eq!(s.index, promoted, "in effect once appended");
    assert!(!s.committed && s.config.is_voter(1));
    thread::sleep(Duration::from_millis(300));
    assert!(
        raft.progress().0 < promoted,
        "committed without the new voter"
    );
    assert_eq!(
        raft.change_membership(&ConfChange::Remove { peer: 1 }),
        Err(ChangeError::Pending { index: promoted })
    );
    // No configuration entry reached the apply channel undistinguished.
    while let Ok(msg) = rx.try_recv() {
        if let raftkv::raft::ApplyMsg::Command { command, .. } = msg {
            assert!(raftkv::raft::membership::is_config_entry(&command));
        }
    }
    raft.kill();
    drop(raft);
    // Restarted: the uncommitted configuration is read back from the log; peer 1 is a voter
    // it cannot reach, so it cannot win an election alone.
    let (raft, _rx) = start(Some(host.clone()));
    let s = raft.membership().expect("membership on");
    assert_eq!(s.index, promoted);
    assert!(s.config.is_voter(1));
    thread::sleep(Duration::from_secs(2));
    assert!(
        !raft.get_state().1,
        "elected without a majority of its configuration"
    );
    raft.kill();
    drop(raft);
    // Without a host: the labs' fixed peer set.
    let (raft, _rx) = start(None);
    assert!(raft.membership().is_none());
    assert_eq!(
        raft.change_membership(&ConfChange::Remove { peer: 1 }),
        Err(ChangeError::Disabled)
    );
    raft.kill();
}

/// A brand-new node added to a cluster whose log was compacted (about 12 MiB written with
/// 1 MiB values, past the 8 MiB snapshot threshold) gets the snapshot streamed in pieces
/// with the configuration as of it: it becomes a voter that knows every member, serves every
/// key, and after a restart (its configuration then read back from its membership file and
/// log) still does.
#[test]
fn new_member_catches_up_from_a_snapshot_and_keeps_the_configuration() {
    let dir = TempDir::new("snapshot");
    let mut cluster = Cluster::new(&dir.0);
    let leader = cluster.leader();
    let value = "v".repeat(1 << 20);
    let mut acked = BTreeMap::new();
    for k in 0..12 {
        let key = format!("big{k}");
        let reply: String = cluster.retry(leader, "SET big", |c| {
            redis::cmd("SET").arg(&key).arg(&value).query(c)
        });
        assert_eq!(reply, "OK");
        acked.insert(key, value.clone());
    }
    cluster.write_keys(leader, "s", 50, &mut acked);
    // The leader has snapshotted: its file is there.
    let deadline = Instant::now() + PATIENCE;
    while !cluster.data(leader).join("raft").join("snapshot").exists() {
        assert!(Instant::now() < deadline, "node {leader} never snapshotted");
        thread::sleep(Duration::from_millis(100));
    }
    let mut peers: Vec<String> = (1..=3).map(|id| cluster.peer_addr(id)).collect();
    peers.push(cluster.peer_addr(4));
    cluster.add_node(4, peers, false);
    cluster.start(4);
    let (code, out, err) = cluster.member(
        &[leader],
        &["add", "4", &cluster.peer_addr(4), &cluster.client_addr(4)],
    );
    assert_eq!(code, 0, "{out}{err}");
    cluster.wait_member_role(4, "voter");
    assert!(
        cluster.data(4).join("membership").exists(),
        "node 4 got no configuration with its snapshot"
    );
    cluster.check_keys(4, &acked);
    cluster.kill9(4);
    cluster.start(4);
    cluster.wait_member_role(4, "voter");
    // With a founding follower down, a majority of the four voters needs node 4.
    let down: Vec<usize> = (1..=3).filter(|&i| i != leader).collect();
    cluster.kill9(down[0]);
    cluster.write_keys(4, "t", 10, &mut acked);
    cluster.check_keys(4, &acked);
    cluster.check_keys(leader, &acked);
}
