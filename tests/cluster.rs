//! The `raftkv` binary as a real cluster: three `raftkv serve` processes on loopback, talked to
//! with the `redis` crate. Every node is killed when the test ends, passing or failing (the
//! cluster's drop, and `--stop-on-stdin-eof` if the test process itself dies).
//!
//! Nodes are started by the process kit (`raftkv::proc`): each in its own process group, and
//! signalled only through its handle, never once reaped. A socket read with a timeout
//! (SO_RCVTIMEO) fails with EINTR when the test process is stopped and continued or runs a
//! signal handler, and is never restarted: [`no_eintr`] retries such a call on a fresh
//! connection.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use std::thread;
use std::time::{Duration, Instant};

/// How long a cluster may take to elect a leader, or a command to succeed after a fault.
const PATIENCE: Duration = Duration::from_secs(15);

mod kit;

// The other multi-process tests, a module each: one binary is one build and one link, and
// their clusters share the kit's four slots with the tests of this file
// (`cargo test --release --test cluster membership::` runs one module).
#[path = "cluster/big_state.rs"]
mod big_state;
#[path = "cluster/client_port.rs"]
mod client_port;
#[path = "cluster/durability.rs"]
mod durability;
#[path = "cluster/membership.rs"]
mod membership;
#[path = "cluster/membership_removed.rs"]
mod membership_removed;
#[path = "cluster/node_info.rs"]
mod node_info;
#[path = "cluster/peer_security.rs"]
mod peer_security;

use kit::{Cluster, EXE, TempDir, no_eintr};

fn get(con: &mut redis::Connection, key: &str) -> redis::RedisResult<Option<String>> {
    redis::cmd("GET").arg(key).query(con)
}

fn set(con: &mut redis::Connection, key: &str, value: &str) -> redis::RedisResult<String> {
    redis::cmd("SET").arg(key).arg(value).query(con)
}

#[test]
fn basic_commands() {
    let cluster = Cluster::start_new("cluster", 3);
    let leader = cluster.leader();
    let mut c = cluster.client(leader);
    let pong: String = redis::cmd("PING").query(&mut c).unwrap();
    assert_eq!(pong, "PONG");
    assert_eq!(set(&mut c, "a", "1").unwrap(), "OK");
    assert_eq!(get(&mut c, "a").unwrap().as_deref(), Some("1"));
    assert_eq!(get(&mut c, "missing").unwrap(), None);
    let n: i64 = redis::cmd("INCR").arg("a").query(&mut c).unwrap();
    assert_eq!(n, 2);
    let n: i64 = redis::cmd("INCR").arg("fresh").query(&mut c).unwrap();
    assert_eq!(n, 1);
    set(&mut c, "text", "abc").unwrap();
    let e = redis::cmd("INCR")
        .arg("text")
        .query::<i64>(&mut c)
        .unwrap_err();
    assert!(e.to_string().contains("not an integer"), "{e}");
    let found: i64 = redis::cmd("EXISTS")
        .arg("a")
        .arg("zz")
        .arg("a")
        .query(&mut c)
        .unwrap();
    assert_eq!(found, 2);
    let values: Vec<Option<String>> = redis::cmd("MGET")
        .arg("a")
        .arg("zz")
        .arg("fresh")
        .query(&mut c)
        .unwrap();
    assert_eq!(values, vec![Some("2".into()), None, Some("1".into())]);
    let removed: i64 = redis::cmd("DEL").arg("a").arg("zz").query(&mut c).unwrap();
    assert_eq!(removed, 1);
    assert_eq!(get(&mut c, "a").unwrap(), None);
    // The lab's versioned operations.
    let ok: String = redis::cmd("VSET")
        .arg("v")
        .arg("x")
        .arg(0)
        .query(&mut c)
        .unwrap();
    assert_eq!(ok, "OK");
    let (value, version): (String, u64) = redis::cmd("VGET").arg("v").query(&mut c).unwrap();
    assert_eq!((value.as_str(), version), ("x", 1));
    let e = redis::cmd("VSET")
        .arg("v")
        .arg("y")
        .arg(0)
        .query::<String>(&mut c)
        .unwrap_err();
    assert!(e.to_string().contains("ERRVERSION"), "{e}");
    let ok: String = redis::cmd("VSET")
        .arg("v")
        .arg("y")
        .arg(1)
        .query(&mut c)
        .unwrap();
    assert_eq!(ok, "OK");
    let none: Option<(String, u64)> = redis::cmd("VGET").arg("nothing").query(&mut c).unwrap();
    assert_eq!(none, None);
    // Errors keep the connection.
    let e = redis::cmd("FLUSHALL").query::<String>(&mut c).unwrap_err();
    assert!(e.to_string().contains("unknown command"), "{e}");
    let e = redis::cmd("GET").query::<String>(&mut c).unwrap_err();
    assert!(e.to_string().contains("wrong number of arguments"), "{e}");
    // Binary keys and values.
    let key: Vec<u8> = (0..=255u8).collect();
    let value = vec![0u8, 0xff, b'\r', b'\n'];
    let ok: String = redis::cmd("SET")
        .arg(&key)
        .arg(&value)
        .query(&mut c)
        .unwrap();
    assert_eq!(ok, "OK");
    let back: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut c).unwrap();
    assert_eq!(back, value);
    // A pipeline goes through as one batch, in order.
    let (a, b, n): (String, Option<String>, i64) = redis::pipe()
        .cmd("SET")
        .arg("p")
        .arg("1")
        .cmd("GET")
        .arg("p")
        .cmd("INCR")
        .arg("p")
        .query(&mut c)
        .unwrap();
    assert_eq!((a.as_str(), b.as_deref(), n), ("OK", Some("1"), 2));
}

#[test]
fn follower_forwards() {
    let cluster = Cluster::start_new("cluster", 3);
    let leader = cluster.leader();
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let mut f0 = cluster.client(followers[0]);
    let mut f1 = cluster.client(followers[1]);
    for k in 0..20 {
        assert_eq!(
            set(&mut f0, &format!("k{k}"), &format!("v{k}")).unwrap(),
            "OK"
        );
        // Reads go through the log, so a write acknowledged anywhere is seen everywhere.
        assert_eq!(
            get(&mut f1, &format!("k{k}")).unwrap(),
            Some(format!("v{k}"))
        );
    }
    let n: i64 = redis::cmd("INCR").arg("count").query(&mut f1).unwrap();
    assert_eq!(n, 1);
    let n: i64 = redis::cmd("INCR").arg("count").query(&mut f0).unwrap();
    assert_eq!(n, 2);
}

#[test]
fn set_survives_leader_kill9() {
    let mut cluster = Cluster::start_new("cluster", 3);
    let leader = cluster.leader();
    let mut c = cluster.client(leader);
    assert_eq!(set(&mut c, "durable", "yes").unwrap(), "OK");
    drop(c);
    cluster.kill9(leader);
    let survivor = (leader + 1) % 3;
    let value = cluster.retry(survivor, "GET after the leader's kill -9", |c| {
        get(c, "durable")
    });
    assert_eq!(value.as_deref(), Some("yes"));
    // The survivors elect a new leader and keep serving writes.
    let new_leader = cluster.leader();
    assert_ne!(new_leader, leader, "a killed node cannot lead");
    cluster.retry(survivor, "SET after failover", |c| set(c, "after", "1"));
    // The old leader comes back, catches up, and serves the same data.
    cluster.start(leader);
    let back = cluster.retry(leader, "GET on the restarted node", |c| get(c, "after"));
    assert_eq!(back.as_deref(), Some("1"));
}

#[test]
fn acknowledged_sets_survive_kill9_of_every_node() {
    let mut cluster = Cluster::start_new("cluster", 3);
    let leader = cluster.leader();
    let port = cluster.client_ports[leader];
    // A writer keeps writing while every node is killed with SIGKILL, one after another; it
    // records what was acknowledged.
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let writer = thread::Builder::new()
        .name("writer".into())
        .spawn(move || {
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
            let mut con = client
                .get_connection_with_timeout(Duration::from_secs(2))
                .unwrap();
            con.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
            let mut acknowledged = Vec::new();
            for k in 0..100_000 {
                if stop_rx.try_recv().is_ok() {
                    break;
                }
                match set(&mut con, &format!("key{k}"), &format!("value{k}")) {
                    Ok(reply) => {
                        assert_eq!(reply, "OK");
                        acknowledged.push(k);
                    }
                    Err(_) => break,
                }
            }
            acknowledged
        })
        .expect("spawn the writer");
    thread::sleep(Duration::from_millis(500));
    for i in [(leader + 1) % 3, (leader + 2) % 3, leader] {
        cluster.kill9(i);
        thread::sleep(Duration::from_millis(30));
    }
    let _ = stop_tx.send(());
    let acknowledged = writer.join().expect("the writer panicked");
    assert!(
        !acknowledged.is_empty(),
        "no SET acknowledged before the kills"
    );
    for i in 0..3 {
        cluster.start(i);
    }
    let leader = cluster.leader();
    let keys: Vec<String> = acknowledged.iter().map(|k| format!("key{k}")).collect();
    for chunk in keys.chunks(500) {
        let values: Vec<Option<String>> =
            cluster.retry(leader, "MGET after restarting every node", |c| {
                redis::cmd("MGET").arg(chunk).query(c)
            });
        for (key, value) in chunk.iter().zip(values) {
            assert_eq!(
                value.as_deref(),
                Some(key.replace("key", "value").as_str()),
                "acknowledged SET {key} lost ({} acknowledged)",
                acknowledged.len()
            );
        }
    }
}

/// Writes `bytes` to `port` and reads until the node closes the connection or 2 s pass.
fn send_garbage(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // The node may close the connection before it has read everything: that is fine.
    let _ = s.write_all(bytes);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

#[test]
fn garbage_on_client_and_peer_ports_leaves_nodes_unharmed() {
    let mut cluster = Cluster::start_new("cluster", 3);
    let leader = cluster.leader();
    cluster.retry(leader, "SET before the garbage", |c| set(c, "before", "1"));
    let mut noise: Vec<u8> = Vec::new();
    let mut x: u32 = 12345;
    for _ in 0..64 << 10 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        noise.push((x >> 16) as u8);
    }
    for i in 0..3 {
        // Client port: random bytes, a malformed frame, a bulk length far above the limit.
        send_garbage(cluster.client_ports[i], &noise);
        let reply = send_garbage(cluster.client_ports[i], b"*1\r\n$abc\r\n");
        assert!(
            reply.starts_with(b"-ERR"),
            "malformed frame answered {reply:?}"
        );
        let reply = send_garbage(
            cluster.client_ports[i],
            b"*2\r\n$3\r\nGET\r\n$99999999999\r\n",
        );
        assert!(
            reply.starts_with(b"-ERR"),
            "oversized bulk answered {reply:?}"
        );
        // Peer port: random bytes, a frame length of 4 GiB, a well-framed body that decodes to
        // nothing.
        send_garbage(cluster.peer_ports[i], &noise);
        send_garbage(cluster.peer_ports[i], &[0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
        send_garbage(cluster.peer_ports[i], &[0, 0, 0, 8, 9, 9, 9, 9, 9, 9, 9, 9]);
    }
    for i in 0..3 {
        assert!(cluster.alive(i), "node {} died of garbage", i + 1);
    }
    for i in 0..3 {
        let v = cluster.retry(i, "GET after the garbage", |c| get(c, "before"));
        assert_eq!(v.as_deref(), Some("1"));
        cluster.retry(i, "SET after the garbage", |c| {
            set(c, &format!("after{i}"), "1")
        });
    }
}

/// The command line: bad flags exit 2 with a message; --help exits 0.
#[test]
fn bad_flags_exit_2() {
    let run = |args: &[&str]| {
        Command::new(EXE)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run raftkv")
    };
    for args in [
        &["serve"][..],
        &[
            "serve",
            "--id",
            "4",
            "--peers",
            "1=127.0.0.1:1,2=127.0.0.1:2",
            "--client",
            "127.0.0.1:0",
            "--data",
            "x",
        ],
        &[
            "serve",
            "--id",
            "1",
            "--peers",
            "1=nonsense",
            "--client",
            "127.0.0.1:0",
            "--data",
            "x",
        ],
        &["local", "--nodes", "zero"],
        &["local", "--bogus"],
        &["chaos", "--duration", "soon"],
        &["chaos", "--duration", "0s"],
        &["chaos", "--clients", "0"],
        &["chaos", "--nodes", "2"],
        &["chaos", "--seed", "-1"],
        &["chaos", "--bogus"],
        &["frobnicate"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{args:?} printed no message");
    }
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["local", "--help"],
        &["chaos", "--help"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("usage"));
    }
}

/// A data directory belongs to one node of one cluster.
#[test]
fn data_dir_of_another_node_is_refused() {
    let mut cluster = Cluster::start_new("cluster", 3);
    cluster.leader();
    cluster.kill9(0);
    let stderr = serve_fails(
        2,
        &cluster.spec(0).peer_list(),
        "127.0.0.1:0",
        &cluster.data(0),
    );
    assert!(stderr.contains("id 1"), "{stderr}");
    assert!(Path::new(&cluster.data(0)).join("identity").exists());
}

/// Runs `raftkv serve` once, expecting it to refuse to start: exit status 1. Returns its
/// standard error.
fn serve_fails(id: usize, peers: &str, client: &str, data: &Path) -> String {
    let out = Command::new(EXE)
        .arg("serve")
        .args([
            "--id",
            &id.to_string(),
            "--peers",
            peers,
            "--client",
            client,
        ])
        .arg("--data")
        .arg(data)
        // The cluster's secret, beside the nodes' data directories.
        .arg("--peer-secret-file")
        .arg(
            data.parent()
                .expect("a data directory in a directory")
                .join(raftkv::node::secret::SECRET_FILE),
        )
        .stdin(Stdio::null())
        .output()
        .expect("run raftkv");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A data directory that cannot be created is a clear error, not a panic.
#[test]
fn unusable_data_dir_is_an_error() {
    let dir = std::env::temp_dir().join(format!("raftkv-cluster-{}-file", std::process::id()));
    fs::write(&dir, b"a file, not a directory").unwrap();
    let ports = kit::ports(2);
    let stderr = serve_fails(
        1,
        &format!("1=127.0.0.1:{}", ports[0]),
        &format!("127.0.0.1:{}", ports[1]),
        &dir.join("node"),
    );
    let _ = fs::remove_file(&dir);
    assert!(stderr.contains("cannot create"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// INCR through a follower while the leader is killed: the follower retries forwards with the
/// same (client, seq), so no INCR applies twice. Each acknowledged value is the previous one
/// plus one, plus at most the INCRs in between whose outcome was unknown (an error reply).
#[test]
fn incr_through_follower_applies_once_across_leader_kill9() {
    let mut cluster = Cluster::start_new("cluster", 3);
    let leader = cluster.leader();
    let follower = (leader + 1) % 3;
    let mut con = cluster.client(follower);
    let mut last: i64 = 0;
    let mut unknown_since_last = 0;
    let mut acknowledged = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    for round in 0..300 {
        if round == 100 {
            cluster.kill9(leader);
        }
        assert!(
            Instant::now() < deadline,
            "300 INCRs took over 30 s ({acknowledged} acknowledged)"
        );
        match redis::cmd("INCR").arg("counter").query::<i64>(&mut con) {
            Ok(v) => {
                assert!(
                    v > last && v <= last + 1 + unknown_since_last,
                    "INCR answered {v} after {last} with {unknown_since_last} unknown outcomes between: applied twice or lost"
                );
                last = v;
                unknown_since_last = 0;
                acknowledged += 1;
            }
            Err(e) => {
                unknown_since_last += 1;
                // The connection may be broken by a timeout: take a fresh one.
                con = cluster.client(follower);
                let _ = e;
            }
        }
    }
    assert!(
        acknowledged >= 200,
        "only {acknowledged} of 300 INCRs acknowledged"
    );
    let total: i64 = cluster.retry(follower, "GET counter", |c| {
        redis::cmd("GET").arg("counter").query(c)
    });
    assert!(
        total >= last && total <= last + unknown_since_last,
        "counter {total}, last acknowledged {last}, {unknown_since_last} unknown after it"
    );
}

/// A data directory in use by a running node is refused by a second one (the file log's lock).
#[test]
fn locked_data_dir_is_refused() {
    let cluster = Cluster::start_new("cluster", 3);
    cluster.leader();
    let stderr = serve_fails(
        1,
        &cluster.spec(0).peer_list(),
        "127.0.0.1:0",
        &cluster.data(0),
    );
    assert!(stderr.contains("locked"), "{stderr}");
    let v = cluster.retry(0, "SET on the node that holds the lock", |c| {
        set(c, "still", "here")
    });
    assert_eq!(v, "OK");
}

// ---- faults: pauses, partitions, histories under chaos (issue 10) ----

/// A seed that differs from run to run, printed by every failure that uses it.
fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    (u64::from(std::process::id()) << 32) ^ nanos
}

fn chaos_options(dir: &Path, seed: u64, duration: Duration) -> raftkv::chaos::ChaosOptions {
    let mut opts = raftkv::chaos::ChaosOptions::new(PathBuf::from(EXE));
    opts.dir = dir.to_path_buf();
    opts.seed = seed;
    opts.duration = duration;
    opts.clients = 6;
    opts
}

#[test]
fn paused_old_leader_serves_no_stale_read() {
    let mut cluster = Cluster::start_new("cluster", 3);
    let old = cluster.leader();
    let old_term = cluster.status(old).expect("the leader's status").term;
    cluster.retry(old, "SET before the pause", |c| set(c, "k", "v1"));
    // Connected before the pause: the GET below reaches the old leader the moment it wakes.
    let mut stale = cluster.client(old);
    cluster.children[old]
        .as_mut()
        .expect("the leader runs")
        .signal(raftkv::signal::Signal::Stop)
        .expect("SIGSTOP");
    // The others elect a leader in a later term and take a write the old one never saw.
    let new = cluster.leader_after(old, old_term, PATIENCE);
    cluster.retry(new, "SET on the new leader", |c| set(c, "k", "v2"));
    // The GET is sent while the old leader sleeps; it still believes it leads when it wakes.
    let reader = thread::Builder::new()
        .name("stale-get".into())
        .spawn(move || get(&mut stale, "k"))
        .expect("spawn the reader");
    thread::sleep(Duration::from_millis(300));
    cluster.children[old]
        .as_mut()
        .expect("the leader runs")
        .signal(raftkv::signal::Signal::Cont)
        .expect("SIGCONT");
    let answer = reader.join().expect("the reader thread panicked");
    match answer {
        // An error (TRYAGAIN, a timeout) is allowed; a value must be the latest one.
        Ok(value) => assert_eq!(
            value.as_deref(),
            Some("v2"),
            "node {} (leader in term {old_term}, paused, then resumed) served a stale read",
            old + 1
        ),
        Err(e) => eprintln!("the resumed old leader answered an error: {e}"),
    }
    let value = cluster.retry(old, "GET on the resumed old leader", |c| get(c, "k"));
    assert_eq!(value.as_deref(), Some("v2"));
}

#[test]
fn partition_majority_serves_minority_does_not() {
    use raftkv::chaos::{ChaosCluster, ClusterOptions};
    use raftkv::net::proxy::LinkMode;
    let dir = TempDir::new("partition");
    let mut cluster = ChaosCluster::start(ClusterOptions {
        exe: PathBuf::from(EXE),
        nodes: 3,
        dir: dir.path().join("nodes"),
        fault: None,
        node_log: None,
    })
    .unwrap_or_else(|e| panic!("the cluster did not start: {e}"));
    let leader = cluster.wait_for_leader(PATIENCE).expect("a leader");
    let addrs: Vec<_> = (0..3).map(|i| cluster.client_addr(i)).collect();
    let connect = |i: usize, timeout: Duration| {
        let client = redis::Client::open(format!("redis://{}/", addrs[i])).expect("redis url");
        let con = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connect to node {}: {e}", i + 1));
        con.set_read_timeout(Some(timeout)).expect("read timeout");
        con
    };
    let retry = |i: usize, what: &str, f: &dyn Fn(&mut redis::Connection) -> bool| {
        let deadline = Instant::now() + PATIENCE;
        while !f(&mut connect(i, Duration::from_secs(8))) {
            assert!(
                Instant::now() < deadline,
                "{what} on node {} failed for {PATIENCE:?}",
                i + 1
            );
            thread::sleep(Duration::from_millis(100));
        }
    };
    retry(leader, "SET before the partition", &|c| {
        set(c, "k", "before").is_ok()
    });
    // The leader alone on one side: its links to both others drop every byte, both ways.
    cluster.partition(&[leader], LinkMode::Blackhole);
    let majority: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    retry(majority[0], "SET on the majority side", &|c| {
        set(c, "k", "majority").is_ok()
    });
    let m1 = no_eintr(
        || connect(majority[1], Duration::from_secs(8)),
        |c| get(c, "k"),
    );
    assert_eq!(m1.unwrap().as_deref(), Some("majority"));
    // The minority side neither writes nor reads: every command fails or times out (an
    // interrupted call says nothing, and is made again).
    let minority = || connect(leader, Duration::from_secs(3));
    match no_eintr(minority, |c| set(c, "k", "minority")) {
        Ok(reply) => panic!(
            "node {} alone in a minority acknowledged a write: {reply}",
            leader + 1
        ),
        Err(e) => eprintln!("minority SET: {e}"),
    }
    match no_eintr(minority, |c| get(c, "k")) {
        Ok(value) => panic!(
            "node {} alone in a minority served a read: {value:?}",
            leader + 1
        ),
        Err(e) => eprintln!("minority GET: {e}"),
    }
    // Healed, the old leader catches up and serves again; the minority's SET may or may not
    // have applied (its client never heard), nothing else.
    cluster.heal();
    let deadline = Instant::now() + PATIENCE;
    let value = loop {
        if let Ok(v) = get(&mut connect(leader, Duration::from_secs(8)), "k") {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "node {} does not serve after healing",
            leader + 1
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert!(
        matches!(value.as_deref(), Some("majority") | Some("minority")),
        "after healing node {} reads {value:?}",
        leader + 1
    );
    retry(leader, "SET after healing", &|c| {
        set(c, "k", "after").is_ok()
    });
    cluster.shutdown();
}

#[test]
fn chaos_history_is_linearizable() {
    let dir = TempDir::new("chaos");
    let seed = fresh_seed();
    let mut opts = chaos_options(dir.path(), seed, Duration::from_secs(8));
    let history = dir.path().join("history.jsonl");
    opts.history = Some(history.clone());
    let report = raftkv::chaos::run(&opts).unwrap_or_else(|e| panic!("chaos seed {seed}: {e}"));
    assert!(report.passed(), "{report}");
    assert!(
        report.faults.values().sum::<usize>() >= 1,
        "no fault injected:\n{report}"
    );
    assert!(report.ops > 100, "too few operations:\n{report}");
    // The history file holds the whole run, and checked on its own it gives the same verdict.
    assert_eq!(
        recheck(&history, report.ops),
        raftkv::chaos::Verdict::Linearizable
    );
}

/// Chaos with exactly the two faults of a lost or full disk, for 60 s: a follower replaced
/// (removed, wiped, started empty, added back) and a follower whose disk fills. Each kind is
/// injected (they come in rounds of both); each time a follower's disk fills it stops naming
/// the cause (expected, not a crash), then is started again once space is freed; every node
/// catches up with the others (`passed` holds no node lagging), none crashes, the history is
/// linearizable and every key reads back after healing: nothing acknowledged is lost.
#[test]
fn chaos_with_replaced_followers_and_full_disks_stays_linearizable() {
    use raftkv::chaos::FaultKind;
    let dir = TempDir::new("chaos-disk");
    let seed = fresh_seed();
    let mut opts = chaos_options(dir.path(), seed, Duration::from_secs(60));
    opts.fault_kinds = vec![FaultKind::ReplaceFollower, FaultKind::DiskFullFollower];
    let report = raftkv::chaos::run(&opts).unwrap_or_else(|e| panic!("chaos seed {seed}: {e}"));
    println!("{report}");
    assert!(report.passed(), "{report}");
    let count = |kind| report.faults.get(&kind).copied().unwrap_or(0);
    let (fills, replaced) = (
        count(FaultKind::DiskFullFollower),
        count(FaultKind::ReplaceFollower),
    );
    assert!(fills >= 3, "{fills} disk faults in 60 s:\n{report}");
    assert!(replaced >= 1, "no follower replaced in 60 s:\n{report}");
    assert_eq!(
        report.faults.values().sum::<usize>(),
        fills + replaced,
        "another fault than the two chosen:\n{report}"
    );
    assert!(
        !report.expected_stops.is_empty(),
        "no full disk stopped its node:\n{report}"
    );
    for stop in &report.expected_stops {
        assert!(
            stop.contains("File too large") && stop.contains("raft/log-"),
            "{stop}"
        );
    }
    assert!(report.ops > 100, "too few operations:\n{report}");
}

/// Reads a `--history` file back (it must hold `ops` operations) and checks it again.
fn recheck(history: &Path, ops: usize) -> raftkv::chaos::Verdict {
    let mut records = raftkv::chaos::history::read_history(history)
        .unwrap_or_else(|e| panic!("read the history back: {e}"));
    assert_eq!(records.len(), ops, "operations in {}", history.display());
    let end = records
        .iter()
        .map(|r| r.ret.unwrap_or(r.call))
        .max()
        .unwrap_or(0)
        + 1;
    let html = history.with_extension("html");
    raftkv::chaos::check_history(&mut records, end, Duration::from_secs(60), &html).verdict
}

#[test]
fn chaos_checker_catches_reads_that_bypass_the_log() {
    let dir = TempDir::new("chaos-fault");
    let seed = fresh_seed();
    let mut opts = chaos_options(dir.path(), seed, Duration::from_secs(8));
    opts.node_fault = Some(raftkv::node::NodeFault::LocalReads);
    let history = dir.path().join("history.jsonl");
    opts.history = Some(history.clone());
    let report = raftkv::chaos::run(&opts).unwrap_or_else(|e| panic!("chaos seed {seed}: {e}"));
    assert!(
        matches!(
            report.verdict,
            raftkv::chaos::Verdict::NotLinearizable { .. }
        ),
        "nodes reading without the log passed the checker:\n{report}"
    );
    // The file carries what the verdict rests on: checked on its own, it is rejected too.
    assert!(matches!(
        recheck(&history, report.ops),
        raftkv::chaos::Verdict::NotLinearizable { .. }
    ));
}

/// A base port `p` with `p..p+n` and `p+1000..p+1000+n` free now and claimed while the
/// lease lives (what `raftkv local --port p` needs), below the ephemeral range so that other
/// tests' ports do not collide.
fn local_base_port(n: u16) -> (u16, raftkv::proc::ports::PortLease) {
    let mut candidate = 20000 + (std::process::id() % 9000) as u16;
    for _ in 0..9000 {
        let wanted: Vec<u16> = (0..n)
            .flat_map(|i| [candidate + i, candidate + 1000 + i])
            .collect();
        if let Some(lease) = raftkv::proc::ports::claim_exact(&wanted).expect("claim ports") {
            return (candidate, lease);
        }
        candidate = 20000 + (candidate - 20000 + 37) % 9000;
    }
    panic!("no free base port for raftkv local in 20000..29000");
}

/// `raftkv local` as a child, killed and reaped on drop if still running.
struct Local(Child);

impl Local {
    fn start(dir: &Path, port: u16) -> Local {
        let child = Command::new(EXE)
            .args(["local", "--nodes", "3", "--port", &port.to_string()])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start raftkv local");
        Local(child)
    }

    /// Sends `signal` and waits for the exit, which must come within 10 s.
    fn stop(&mut self, signal: raftkv::signal::Signal) -> (std::process::ExitStatus, String) {
        raftkv::signal::to_child(&mut self.0, signal).expect("signal raftkv local");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = self.0.try_wait().expect("wait for raftkv local") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "raftkv local did not exit within 10 s of {signal:?}"
            );
            thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        if let Some(mut stdout) = self.0.stdout.take() {
            stdout.read_to_string(&mut out).expect("read its output");
        }
        (status, out)
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `f` on a fresh connection to `port` until it succeeds, within [`PATIENCE`].
fn retry_port<T>(
    port: u16,
    what: &str,
    f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
) -> T {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).expect("redis url");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let result = client
            .get_connection_with_timeout(Duration::from_secs(1))
            .and_then(|mut con| {
                con.set_read_timeout(Some(Duration::from_secs(10)))?;
                f(&mut con)
            });
        match result {
            Ok(v) => return v,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "{what} on port {port} failed for {PATIENCE:?}: {e}"
                );
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[test]
fn local_stops_cleanly_on_sigint_and_restarts_on_its_data() {
    let dir = TempDir::new("local");
    let (port, _ports) = local_base_port(3);
    let mut local = Local::start(dir.path(), port);
    retry_port(port + 1, "SET through raftkv local", |c| {
        set(c, "kept", "yes")
    });
    let (status, out) = local.stop(raftkv::signal::Signal::Int);
    assert!(
        status.success(),
        "raftkv local exited with {status} after SIGINT:\n{out}"
    );
    assert!(out.contains("stopped"), "no word of the stop:\n{out}");
    // Every node is gone: nothing listens on their ports, and their data directories are
    // unlocked (the restart below could not open them otherwise).
    for i in 0..3 {
        assert!(
            TcpStream::connect(("127.0.0.1", port + i)).is_err(),
            "node {} still listens after raftkv local stopped",
            i + 1
        );
    }
    let mut again = Local::start(dir.path(), port);
    let value = retry_port(port + 2, "GET after the restart", |c| get(c, "kept"));
    assert_eq!(value.as_deref(), Some("yes"));
    let (status, out) = again.stop(raftkv::signal::Signal::Term);
    assert!(
        status.success(),
        "raftkv local exited with {status} after SIGTERM:\n{out}"
    );
}

/// The processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

#[test]
fn chaos_ctrl_c_stops_and_reaps_every_node() {
    let dir = TempDir::new("chaos-int");
    let mut chaos = Local(
        Command::new(EXE)
            .args(["chaos", "--duration", "60s", "--clients", "2"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start raftkv chaos"),
    );
    let needle = dir.path().to_string_lossy().into_owned();
    let driver = chaos.0.id();
    let nodes = || {
        processes_mentioning(&needle)
            .into_iter()
            .filter(|(pid, _)| *pid != driver)
            .collect::<Vec<_>>()
    };
    // Wait for the nodes to run, then for the faults to begin.
    let deadline = Instant::now() + PATIENCE;
    while nodes().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "raftkv chaos did not start 3 nodes within {PATIENCE:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_secs(3));
    let (status, out) = chaos.stop(raftkv::signal::Signal::Int);
    assert_eq!(
        status.code(),
        Some(130),
        "raftkv chaos after SIGINT: {status}\n{out}"
    );
    let left = nodes();
    assert!(left.is_empty(), "nodes outlived raftkv chaos: {left:?}");
}

#[test]
fn chaos_reports_a_cluster_that_cannot_start() {
    use raftkv::chaos::{ChaosError, ClusterError};
    let dir = TempDir::new("chaos-nostart");
    let mut opts = chaos_options(dir.path(), 1, Duration::from_secs(1));
    opts.exe = dir.path().join("no-such-raftkv");
    match raftkv::chaos::run(&opts) {
        Err(ChaosError::Start(ClusterError::Spawn { node: 1, .. })) => {}
        other => panic!("a missing executable: {other:?}"),
    }
    // Nodes that exit at once (false(1) ignores its arguments and fails).
    opts.exe = PathBuf::from("/bin/false");
    match raftkv::chaos::run(&opts) {
        Err(e @ ChaosError::Start(ClusterError::Exited { .. })) => {
            assert!(e.to_string().contains("could not start"), "{e}");
        }
        other => panic!("nodes that exit at once: {other:?}"),
    }
}

/// A client that pipelines more than one log entry can hold (12 SETs of 3.5 MiB, 42 MiB in
/// all, to the leader) gets answers or is disconnected, and every node keeps running and
/// serving: the file log refuses a record above its limit, and that refusal must never reach
/// it. (Today the client port's input limits close such a connection before the front forms
/// a request that large; the front's own size check behind them is not reached here.)
#[test]
fn pipeline_larger_than_a_log_entry_stops_no_node() {
    let mut cluster = Cluster::start_new("cluster", 3);
    let leader = cluster.leader();
    let value = "v".repeat(3 << 19);
    let mut con = cluster.client(leader);
    con.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    let mut pipe = redis::pipe();
    for k in 0..12 {
        pipe.cmd("SET").arg(format!("big{k}")).arg(&value);
    }
    let answers: redis::RedisResult<Vec<redis::Value>> = pipe.query(&mut con);
    eprintln!("a 42 MiB pipeline: {:?}", answers.as_ref().map(|a| a.len()));
    thread::sleep(Duration::from_secs(1));
    for i in 0..3 {
        assert!(
            cluster.alive(i),
            "node {} stopped after a 42 MiB pipeline",
            i + 1
        );
    }
    let v = cluster.retry(leader, "SET after the large pipeline", |c| {
        set(c, "after", "ok")
    });
    assert_eq!(v, "OK");
    assert_eq!(
        cluster.retry(leader, "GET", |c| get(c, "after")).as_deref(),
        Some("ok")
    );
}
