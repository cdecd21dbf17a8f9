//! What a node does when its disk lets it down (issue 20): a wiped Raft directory, a directory
//! of another cluster, a full disk, and a leader cut off from its majority (CheckQuorum).
//! Real `raftkv serve` processes on loopback, talked to with the `redis` crate; every process
//! is killed and every file removed when a test ends, passing or failing.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use raftkv::proc::NodeStatusFile;
use std::thread;
use std::time::{Duration, Instant};

use crate::kit;

use kit::{Cluster, EXE, PATIENCE, TempDir, ports};

/// The `applied` high-water mark node `i`'s identity file records.
fn recorded_applied(cluster: &Cluster, i: usize) -> u64 {
    fs::read_to_string(cluster.data(i).join("identity"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("applied ")?.parse().ok())
        })
        .unwrap_or(0)
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
    let dir = TempDir::new("durability-wiped");
    let mut cluster = Cluster::new(dir.path(), &ports(6));
    let leader = cluster.leader();
    let follower = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let mut acked = BTreeMap::new();
    cluster.write_keys(leader, "a", 200, &mut acked);
    // The follower's identity records how far it got (at most a second later).
    let deadline = Instant::now() + PATIENCE;
    while recorded_applied(&cluster, follower) == 0 {
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
    cluster.write_keys(other, "b", 50, &mut acked);
    cluster.check_keys(other, &acked);
    // Replaced: an empty directory, no --bootstrap.
    fs::remove_dir_all(cluster.data(follower)).expect("remove the node's directory");
    cluster.start(follower);
    cluster.write_keys(leader, "c", 20, &mut acked);
    let leader_applied = cluster.status(leader).expect("leader status").applied;
    cluster.wait_applied(follower, leader_applied, PATIENCE);
    // It caught up and votes: without the old leader, it and `other` elect a leader that
    // serves every acknowledged key.
    let deadline = Instant::now() + PATIENCE;
    while recorded_applied(&cluster, follower) == 0
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
    cluster.write_keys(follower, "d", 20, &mut acked);
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
    let dir = TempDir::new("durability-noelect");
    let mut cluster = Cluster::new(dir.path(), &ports(6));
    let leader = cluster.leader();
    let behind = (leader + 1) % 3;
    let wiped = (leader + 2) % 3;
    let mut acked = BTreeMap::new();
    cluster.write_keys(leader, "a", 10, &mut acked);
    cluster.kill9(behind);
    // Committed on the leader and `wiped` only.
    cluster.write_keys(leader, "b", 50, &mut acked);
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
    let dir = TempDir::new("durability-older");
    let mut cluster = Cluster::new(dir.path(), &ports(6));
    let leader = cluster.leader();
    let follower = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let mut acked = BTreeMap::new();
    cluster.write_keys(leader, "a", 20, &mut acked);
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
    let copied_at = recorded_applied(&cluster, follower);
    cluster.start(follower);
    cluster.write_keys(leader, "b", 200, &mut acked);
    let deadline = Instant::now() + PATIENCE;
    while recorded_applied(&cluster, follower) <= copied_at + 100 {
        assert!(
            Instant::now() < deadline,
            "node {} recorded {} (copy at {copied_at})",
            follower + 1,
            recorded_applied(&cluster, follower)
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
    cluster.write_keys(other, "c", 20, &mut acked);
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
    let dir = TempDir::new("durability-foreign");
    let ports = ports(6);
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    let mut acked_a = BTreeMap::new();
    let mut acked_b = BTreeMap::new();
    let mut a = Cluster::new(&dir_a, &ports);
    let leader = a.leader();
    a.write_keys(leader, "a", 100, &mut acked_a);
    a.check_keys(0, &acked_a);
    for i in 0..3 {
        a.kill9(i);
    }
    let mut b = Cluster::new(&dir_b, &ports);
    let leader = b.leader();
    b.write_keys(leader, "b", 100, &mut acked_b);
    b.check_keys(0, &acked_b);
    b.kill9(0);
    let own = dir.path().join("b-node-1");
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
    b.write_keys(leader, "b2-", 20, &mut acked_b);
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
    let dir = TempDir::new("durability-fulldisk");
    let ports = ports(6);
    let full = 2;
    let tmpfs = Tmpfs::mount(&dir.path().join(format!("node-{}", full + 1)), 32 << 20);
    let mut cluster = Cluster::empty(dir.path(), &ports);
    for i in 0..3 {
        if i == full && tmpfs.is_none() {
            cluster.start_with(i, |c| limit_file_size(c, 4 << 20));
        } else {
            cluster.start(i);
        }
    }
    let mut acked = BTreeMap::new();
    let leader = cluster.leader();
    cluster.write_keys(leader, "a", 50, &mut acked);
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
    cluster.write_keys(via, "b", 50, &mut acked);
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
    cluster.write_keys(full, "c", 20, &mut acked);
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
    let dir = TempDir::new("durability-checkquorum");
    let mut cluster = ChaosCluster::start(ClusterOptions {
        exe: PathBuf::from(EXE),
        nodes: 3,
        dir: dir.path().join("nodes"),
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
        .path()
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
