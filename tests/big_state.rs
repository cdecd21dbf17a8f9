//! State above the old 64 MiB record and frame limits, on a real three-process cluster over
//! loopback: 110 values of 1 MiB are written while one follower is down; that follower then
//! catches up (its snapshot streamed in chunks; killed once in the middle of the transfer,
//! which then starts over), a restart of the whole cluster serves every key, and no node's
//! peak resident memory reaches three times the live data.
//!
//! Every node is killed when the test ends, passing or failing (the cluster's drop, and
//! `--stop-on-stdin-eof` if the test process itself dies); the data directories are removed.

use std::fs;
use std::net::TcpListener;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use raftkv::proc::{NodeProcess, NodeStatusFile, ServeSpec};

const EXE: &str = env!("CARGO_BIN_EXE_raftkv");
/// Keys written, each with a value of [`VALUE_BYTES`].
const KEYS: usize = 110;
const VALUE_BYTES: usize = 1 << 20;
/// How long a cluster may take to elect a leader, or a command to succeed after a fault.
const PATIENCE: Duration = Duration::from_secs(30);
/// How long the lagging follower may take to catch up, and a restarted cluster to serve.
const CATCH_UP: Duration = Duration::from_secs(180);

struct Cluster {
    dir: PathBuf,
    peer_ports: Vec<u16>,
    client_ports: Vec<u16>,
    children: Vec<Option<NodeProcess>>,
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

/// What the test reads of a node's status file.
#[derive(Debug, Clone, Copy, Default)]
struct Status {
    applied: u64,
    keys: usize,
}

impl Cluster {
    fn new(n: usize) -> Cluster {
        let dir = std::env::temp_dir().join(format!("raftkv-bigstate-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the test directory");
        let ports = free_ports(2 * n);
        Cluster {
            dir,
            peer_ports: ports[..n].to_vec(),
            client_ports: ports[n..].to_vec(),
            children: (0..n).map(|_| None).collect(),
        }
    }

    fn data(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{}", i + 1))
    }

    fn start(&mut self, i: usize) {
        self.start_with(i, None);
    }

    /// Starts node `i`, with `RAFTKV_NODE_FAULT` set to `fault` if given.
    fn start_with(&mut self, i: usize, fault: Option<&str>) {
        assert!(self.children[i].is_none(), "node {} already runs", i + 1);
        let spec = ServeSpec {
            exe: PathBuf::from(EXE),
            id: i + 1,
            peers: self
                .peer_ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect(),
            client: format!("127.0.0.1:{}", self.client_ports[i]),
            data: self.data(i),
        };
        let mut cmd = spec.command();
        cmd.env_remove("RAFTKV_NODE_FAULT");
        if let Some(f) = fault {
            cmd.env("RAFTKV_NODE_FAULT", f);
        }
        let child = spec
            .spawn(&mut cmd)
            .unwrap_or_else(|e| panic!("start node {}: {e}", i + 1));
        self.children[i] = Some(child);
    }

    fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            child.kill9().expect("SIGKILL and reap");
        }
    }

    /// Peak resident memory of node `i` so far (`VmHWM`), in bytes.
    fn peak_rss(&self, i: usize) -> u64 {
        let pid = self.children[i].as_ref().expect("node runs").pid();
        let text = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
        let kb: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status");
        kb * 1024
    }

    /// Whether node `i` has exited (and how).
    fn exited(&mut self, i: usize) -> Option<String> {
        let child = self.children[i].as_mut()?;
        child
            .try_exit()
            .map(|st| format!("node {} exited: {st}", i + 1))
    }

    fn status(&self, i: usize) -> Option<Status> {
        NodeStatusFile::read(&NodeStatusFile::path(&self.data(i))).map(|s| Status {
            applied: s.applied,
            keys: s.keys,
        })
    }

    /// The running node that leads in the highest term, waiting up to `patience`.
    fn leader(&mut self, patience: Duration) -> Result<usize, String> {
        let deadline = Instant::now() + patience;
        loop {
            let running = (0..self.children.len()).filter(|&i| self.children[i].is_some());
            let statuses = running.map(|i| {
                (
                    i,
                    NodeStatusFile::read(&NodeStatusFile::path(&self.data(i))),
                )
            });
            if let Some(i) = raftkv::proc::leader_of(statuses) {
                return Ok(i);
            }
            for i in 0..self.children.len() {
                if let Some(why) = self.exited(i) {
                    return Err(why);
                }
            }
            if Instant::now() > deadline {
                return Err(format!("no leader within {patience:?}"));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn client(&self, i: usize) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.client_ports[i]))?;
        let con = client.get_connection_with_timeout(Duration::from_secs(2))?;
        con.set_read_timeout(Some(Duration::from_secs(20)))?;
        Ok(con)
    }

    /// Runs `f` on a connection to node `i` until it succeeds, within `patience`.
    fn retry<T>(
        &self,
        i: usize,
        patience: Duration,
        what: &str,
        f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + patience;
        loop {
            match self.client(i).and_then(|mut c| f(&mut c)) {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "{what} on node {} failed for {patience:?}: {e}",
                        i + 1
                    ));
                }
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Each node is killed and reaped as its handle drops.
        self.children.clear();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn key(k: usize) -> String {
    format!("big{k:03}")
}

/// A 1 MiB ASCII value that differs per key in every position.
fn value(k: usize) -> String {
    (0..VALUE_BYTES)
        .map(|i| (b'a' + ((i * 7 + k * 3) % 26) as u8) as char)
        .collect()
}

/// Every key through node `i`'s client port, compared with what was written.
fn check_every_key(cluster: &Cluster, i: usize, what: &str) -> Result<(), String> {
    for k in 0..KEYS {
        let got: Option<String> = cluster.retry(i, CATCH_UP, what, |c| {
            redis::cmd("GET").arg(key(k)).query(c)
        })?;
        match got {
            Some(v) if v == value(k) => {}
            Some(v) => {
                return Err(format!(
                    "{what}: {} has a wrong value ({} bytes)",
                    key(k),
                    v.len()
                ));
            }
            None => return Err(format!("{what}: acknowledged {} lost", key(k))),
        }
    }
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

#[test]
fn state_above_64_mib_reaches_a_lagging_follower_and_survives_a_full_restart() {
    let t0 = Instant::now();
    let mut cluster = Cluster::new(3);
    for i in 0..3 {
        cluster.start(i);
    }
    let leader = cluster.leader(PATIENCE).expect("a first leader");
    // The follower that is down through all the writes.
    let lagging = (leader + 1) % 3;
    cluster.kill9(lagging);
    let live: u64 = (0..KEYS).map(|k| (key(k).len() + VALUE_BYTES) as u64).sum();
    let mut failures: Vec<String> = Vec::new();
    let mut peaks: Vec<(String, u64)> = Vec::new();
    for k in 0..KEYS {
        let v = value(k);
        let reply: String = cluster
            .retry(leader, PATIENCE, "SET of 1 MiB", |c| {
                redis::cmd("SET").arg(key(k)).arg(&v).query(c)
            })
            .expect("every SET is acknowledged");
        assert_eq!(reply, "OK");
    }
    let written = t0.elapsed();

    // The follower that missed everything starts receiving the snapshot; it is killed in
    // the middle of the transfer (its partial file on disk), and started again: the transfer
    // starts over and the partial file is gone.
    cluster.start(lagging);
    let raft_dir = cluster.data(lagging).join("raft");
    let partial = || -> Option<(PathBuf, u64)> {
        fs::read_dir(&raft_dir).ok()?.flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let len = e.metadata().ok()?.len();
            (name.starts_with("snapshot-recv-") && name.ends_with(".tmp")).then(|| (e.path(), len))
        })
    };
    let t = Instant::now();
    let interrupted = loop {
        if let Some((path, len)) = partial()
            && len >= 8 << 20
        {
            cluster.kill9(lagging);
            let left = fs::metadata(&path).map_or(0, |m| m.len());
            break Ok((path, left));
        }
        if cluster.status(lagging).is_some_and(|s| s.keys == KEYS) {
            break Err("the transfer finished before it could be interrupted".to_string());
        }
        if t.elapsed() > CATCH_UP {
            break Err(format!("no snapshot transfer to node {} seen", lagging + 1));
        }
        thread::sleep(Duration::from_millis(2));
    };
    match &interrupted {
        Ok((_, left)) => {
            eprintln!(
                "big_state: node {} killed with {} MiB of the snapshot received",
                lagging + 1,
                left >> 20
            );
            assert!(*left < live, "the partial file is partial");
            cluster.start(lagging);
        }
        Err(e) => {
            failures.push(format!("interrupted transfer: {e}"));
            cluster.kill9(lagging);
            cluster.start(lagging);
        }
    }

    // The follower that missed everything catches up: its state machine holds every key.
    let t1 = Instant::now();
    let caught_up = loop {
        let leader_applied = (0..3)
            .filter(|&i| i != lagging)
            .filter_map(|i| cluster.status(i))
            .map(|s| s.applied)
            .max()
            .unwrap_or(0);
        let s = cluster.status(lagging).unwrap_or_default();
        if s.keys == KEYS && s.applied >= leader_applied && leader_applied > 0 {
            break Ok(t1.elapsed());
        }
        if let Some(why) = cluster.exited(lagging) {
            break Err(why);
        }
        if t1.elapsed() > CATCH_UP {
            break Err(format!(
                "node {} did not catch up within {CATCH_UP:?}: applied {}, {} keys (the others applied {leader_applied})",
                lagging + 1,
                s.applied,
                s.keys
            ));
        }
        thread::sleep(Duration::from_millis(100));
    };
    match &caught_up {
        Ok(d) => eprintln!("big_state: node {} caught up in {d:.1?}", lagging + 1),
        Err(e) => failures.push(format!("lagging follower: {e}")),
    }
    if let (Ok(_), Ok((path, _))) = (&caught_up, &interrupted)
        && path.exists()
    {
        failures.push(format!("{} was left behind", path.display()));
    }
    for i in 0..3 {
        if cluster.exited(i).is_none() {
            peaks.push((
                format!("node {} before the restart", i + 1),
                cluster.peak_rss(i),
            ));
        }
    }

    // Every node killed at once, then started again: every key is served.
    for i in 0..3 {
        cluster.kill9(i);
    }
    let t2 = Instant::now();
    for i in 0..3 {
        cluster.start(i);
    }
    let restarted = cluster
        .leader(CATCH_UP)
        .and_then(|l| check_every_key(&cluster, l, "GET after restarting every node").map(|()| l));
    match &restarted {
        Ok(l) => eprintln!(
            "big_state: restarted cluster served every key in {:.1?} (leader node {})",
            t2.elapsed(),
            l + 1
        ),
        Err(e) => failures.push(format!("full restart: {e}")),
    }
    if caught_up.is_ok() && restarted.is_ok() {
        // The node that caught up by snapshot holds every value itself: restarted with the
        // deliberate fault that answers reads from the node's own state (no leader, no log),
        // its GETs show its replica.
        cluster.kill9(lagging);
        cluster.start_with(lagging, Some("local-reads"));
        let t3 = Instant::now();
        let result = loop {
            let s = cluster.status(lagging).unwrap_or_default();
            if s.keys == KEYS {
                break check_every_key(&cluster, lagging, "local GET on the caught-up node");
            }
            if t3.elapsed() > CATCH_UP {
                break Err(format!(
                    "node {} restarted with {} keys",
                    lagging + 1,
                    s.keys
                ));
            }
            thread::sleep(Duration::from_millis(100));
        };
        if let Err(e) = result {
            failures.push(format!("caught-up node's own state: {e}"));
        }
    }
    for i in 0..3 {
        if cluster.exited(i).is_none() && cluster.children[i].is_some() {
            peaks.push((
                format!("node {} after the restart", i + 1),
                cluster.peak_rss(i),
            ));
        }
    }
    for (who, peak) in &peaks {
        eprintln!(
            "big_state: {who}: peak RSS {:.0} MiB ({:.2} x the {:.0} MiB live)",
            mib(*peak),
            *peak as f64 / live as f64,
            mib(live)
        );
        if *peak >= 3 * live {
            failures.push(format!(
                "{who}: peak RSS {:.0} MiB is not under 3 x the live data ({:.0} MiB)",
                mib(*peak),
                mib(live)
            ));
        }
    }
    eprintln!(
        "big_state: writes {written:.1?}, whole test {:.1?}",
        t0.elapsed()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
