//! The client port of a real `raftkv serve` cluster under the load an attacker or a careless
//! fleet of clients puts on it: ten thousand idle connections and slowloris clients, AUTH
//! with `--requirepass-file` through the `redis` crate, protected mode, private files, and
//! many pipelining clients at once on every node, some leaving with their batches in flight.
//! Every node is killed and every file removed when the test ends (the process kit,
//! `tests/kit`: the cluster's drop, and `--stop-on-stdin-eof` if the test process itself
//! dies); everything listens on 127.0.0.1.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::kit;

use kit::{Cluster, PATIENCE, proc_status_number};
use raftkv::resp::{Limits, Reply, decode_reply, encode_command};

/// `n` nodes, started; node `i` gets `extra(i)` on its command line.
fn start(what: &str, n: usize, extra: impl Fn(usize) -> Vec<String>) -> Cluster {
    Cluster::start_new_with(&format!("clientport-{what}"), n, |i, command| {
        command.args(extra(i));
    })
}

/// Node `i` process starts with `umask`.
fn with_umask(command: &mut Command, mask: u32) {
    // SAFETY: umask is async-signal-safe and only sets the child's mask.
    unsafe {
        command.pre_exec(move || {
            libc::umask(mask as libc::mode_t);
            Ok(())
        });
    }
}

fn url(cluster: &Cluster, i: usize, password: Option<&str>) -> String {
    match password {
        Some(p) => format!("redis://:{p}@{}/", cluster.client_addr(i)),
        None => format!("redis://{}/", cluster.client_addr(i)),
    }
}

/// A connection to node `i` on which `f` succeeded, retried (on a fresh connection, so a
/// call interrupted by a signal is retried too) until the cluster serves.
fn serving<T>(
    cluster: &Cluster,
    i: usize,
    password: Option<&str>,
    f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
) -> (redis::Connection, T) {
    let client = redis::Client::open(url(cluster, i, password)).expect("redis url");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let attempt = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .and_then(|mut con| {
                con.set_read_timeout(Some(Duration::from_secs(10)))?;
                let value = f(&mut con)?;
                Ok((con, value))
            });
        match attempt {
            Ok(done) => return done,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "node {} does not serve within {PATIENCE:?}: {e}",
                    i + 1
                );
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// `VmRSS` in bytes and `Threads` of process `pid`.
fn rss_and_threads(pid: u32) -> (u64, u64) {
    (
        proc_status_number(pid, "VmRSS:") * 1024,
        proc_status_number(pid, "Threads:"),
    )
}

/// Waits up to `limit` for the server to close `stream`.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

const IDLE: usize = 10_000;
const SLOWLORIS: usize = 200;
/// What node 1 may take in resident memory holding them all. Measured: 14 MB with 10,000
/// idle connections on the event loop; one thread per connection took 178 MB for 9,900.
const RSS_BOUND: u64 = 64 << 20;
const THREADS_BOUND: u64 = 200;

#[test]
fn ten_thousand_idle_and_slowloris_clients_leave_room_for_a_new_one() {
    // This process holds both 10,200 sockets; the node raises its own limit.
    let limit = raftkv::node::files::raise_open_files_limit().expect("raise RLIMIT_NOFILE");
    assert!(
        limit >= (IDLE + SLOWLORIS + 256) as u64,
        "this test holds {} connections but may open only {limit} files; raise the hard limit (ulimit -Hn)",
        IDLE + SLOWLORIS
    );
    let cluster = start("idle", 3, |i| {
        if i == 0 {
            let flags = ["--maxclients", "10300", "--partial-frame-timeout", "4"];
            flags.iter().map(|s| s.to_string()).collect()
        } else {
            Vec::new()
        }
    });
    serving(&cluster, 0, None, |c| {
        redis::cmd("SET").arg("warm").arg("up").query::<String>(c)
    });
    let addr = cluster.client_addr(0);
    let (rss_before, _) = rss_and_threads(cluster.pid(0));
    let mut idle: Vec<TcpStream> = (0..IDLE)
        .map(|k| TcpStream::connect(&addr).unwrap_or_else(|e| panic!("idle connection {k}: {e}")))
        .collect();
    let mut slow: Vec<TcpStream> = (0..SLOWLORIS)
        .map(|k| {
            let mut s = TcpStream::connect(&addr).unwrap_or_else(|e| panic!("slowloris {k}: {e}"));
            // Half a SET, then silence.
            s.write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100\r\nhalf")
                .unwrap();
            s
        })
        .collect();
    let slow_since = Instant::now();
    // A new client gets in and is served while all of them are held.
    let (mut con, pong) = serving(&cluster, 0, None, |c| redis::cmd("PING").query::<String>(c));
    assert_eq!(pong, "PONG");
    let set: String = redis::cmd("SET")
        .arg("new")
        .arg("client")
        .query(&mut con)
        .unwrap();
    assert_eq!(set, "OK");
    let got: String = redis::cmd("GET").arg("new").query(&mut con).unwrap();
    assert_eq!(got, "client");
    let info: String = redis::cmd("INFO").arg("clients").query(&mut con).unwrap();
    assert!(
        info.contains(&format!("connected_clients:{}\r\n", IDLE + SLOWLORIS + 1)),
        "{info}"
    );
    let (rss, threads) = rss_and_threads(cluster.pid(0));
    println!(
        "node 1 holding {IDLE} idle + {SLOWLORIS} slowloris connections: RSS {} MB (before {} MB), {threads} threads",
        rss >> 20,
        rss_before >> 20
    );
    assert!(rss < RSS_BOUND, "RSS {rss} bytes, bound {RSS_BOUND}");
    assert!(
        threads < THREADS_BOUND,
        "{threads} threads, bound {THREADS_BOUND}"
    );
    // The partial-frame timeout (4 s) closes every slowloris connection...
    for (k, s) in slow.iter_mut().enumerate() {
        let left = Duration::from_secs(12).saturating_sub(slow_since.elapsed());
        assert!(
            closed_within(s, left),
            "slowloris {k} still open after {:?}",
            slow_since.elapsed()
        );
    }
    assert!(
        slow_since.elapsed() >= Duration::from_secs(3),
        "closed before the timeout"
    );
    // ...and none of the idle ones (no idle timeout by default): each still answers.
    for s in &mut idle {
        s.write_all(b"PING\r\n").unwrap();
    }
    for (k, s) in idle.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut pong = [0u8; 7];
        s.read_exact(&mut pong)
            .unwrap_or_else(|e| panic!("idle connection {k}: {e}"));
        assert_eq!(&pong, b"+PONG\r\n", "idle connection {k}");
    }
}

#[test]
fn idle_timeout_closes_idle_clients_and_maxclients_refuses_with_redis_error() {
    let cluster = start("timeout", 1, |_| {
        ["--timeout", "1", "--maxclients", "3"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    });
    let (mut con, timeout) = serving(&cluster, 0, None, |c| {
        redis::cmd("CONFIG")
            .arg("GET")
            .arg("timeout")
            .query::<Vec<String>>(c)
    });
    assert_eq!(timeout, ["timeout", "1"]);
    let addr = cluster.client_addr(0);
    let mut idle = TcpStream::connect(&addr).unwrap();
    let _second = TcpStream::connect(&addr).unwrap();
    let mut refused = TcpStream::connect(&addr).unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = refused.read_to_end(&mut answer);
    assert_eq!(answer, b"-ERR max number of clients reached\r\n");
    let since = Instant::now();
    assert!(
        closed_within(&mut idle, Duration::from_secs(5)),
        "idle client still open"
    );
    assert!(since.elapsed() < Duration::from_secs(3));
    drop(con);
    con = serving(&cluster, 0, None, |c| redis::cmd("PING").query::<String>(c)).0;
    drop(con);
}

fn write_password(dir: &Path, password: &str) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let path = dir.join("requirepass");
    fs::write(&path, format!("{password}\n")).unwrap();
    path
}

/// AUTH on a cluster, through the `redis` crate: plain commands, an atomic pipeline, a
/// write forwarded by a follower, and the errors without or with a wrong password.
#[test]
fn auth_with_requirepass_file_and_the_redis_crate() {
    let mut cluster = Cluster::new_empty("clientport-auth", 3);
    let file = write_password(&cluster.dir().join("secrets"), "correct horse");
    for i in 0..3 {
        cluster.start_with(i, |c| {
            c.arg("--requirepass-file").arg(&file);
        });
    }
    let password = Some("correct%20horse");
    let (mut con, ok) = serving(&cluster, 0, password, |c| {
        redis::cmd("SET").arg("a").arg("1").query::<String>(c)
    });
    assert_eq!(ok, "OK");
    let (a, b): (String, i64) = redis::pipe()
        .atomic()
        .cmd("GET")
        .arg("a")
        .cmd("INCR")
        .arg("n")
        .query(&mut con)
        .unwrap();
    assert_eq!((a.as_str(), b), ("1", 1));
    // Every node: a follower forwards to the leader, and DBSIZE is read after everything
    // acknowledged before it.
    for i in 0..3 {
        let (mut con, size) = serving(&cluster, i, password, |c| {
            redis::cmd("DBSIZE").query::<i64>(c)
        });
        assert_eq!(size, 2 + i as i64, "node {}", i + 1);
        let key = format!("from-node-{}", i + 1);
        let set: String = redis::cmd("SET")
            .arg(&key)
            .arg("x")
            .query(&mut con)
            .unwrap();
        assert_eq!(set, "OK");
    }
    // No password: NOAUTH; a wrong one: WRONGPASS.
    let plain = redis::Client::open(url(&cluster, 1, None)).unwrap();
    let mut unauthenticated = plain
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap();
    let err = redis::cmd("GET")
        .arg("a")
        .query::<Option<String>>(&mut unauthenticated)
        .unwrap_err();
    assert_eq!(err.code(), Some("NOAUTH"), "{err}");
    let wrong = redis::Client::open(url(&cluster, 1, Some("wrong"))).unwrap();
    let err = wrong
        .get_connection_with_timeout(Duration::from_secs(5))
        .err()
        .expect("a wrong password must be refused");
    // The crate reads the server's WRONGPASS as a failed authentication.
    assert_eq!(err.kind(), redis::ErrorKind::AuthenticationFailed, "{err}");
}

/// Runs `raftkv serve` that must refuse to start: its stderr.
/// Runs `raftkv serve` (one node, its client port on `host`, `extra` flags) that must refuse
/// to start: its stderr.
fn serve_refuses(host: &str, extra: &[&str]) -> String {
    let mut cluster = Cluster::new_empty("clientport-refuse", 1);
    let client = format!("{host}:{}", cluster.client_ports[0]);
    cluster.start_spec(
        0,
        |spec| spec.client = client.clone(),
        |command| {
            command.args(extra);
        },
    );
    let status = cluster.wait_exit(0, Duration::from_secs(20));
    let stderr = cluster.stderr(0);
    assert_eq!(status.code(), Some(1), "{stderr}");
    stderr
}

#[test]
fn protected_mode_and_bad_password_files_refuse_to_start() {
    let stderr = serve_refuses("0.0.0.0", &[]);
    assert!(
        stderr.contains("protected mode")
            && stderr.contains("--requirepass-file")
            && stderr.contains("127.0.0.1"),
        "{stderr}"
    );
    let missing = serve_refuses(
        "127.0.0.1",
        &["--requirepass-file", "/nonexistent/raftkv-password"],
    );
    assert!(
        missing.contains("cannot read the password file /nonexistent/raftkv-password"),
        "{missing}"
    );
    let dir = kit::TempDir::new("clientport-empty");
    let empty = write_password(dir.path(), "");
    let refused = serve_refuses(
        "127.0.0.1",
        &["--requirepass-file", &empty.display().to_string()],
    );
    assert!(refused.contains("is empty"), "{refused}");
}

/// Every file a node keeps is private (0600, directories 0700) though it was started with
/// umask 000 on a data directory an older version left open.
#[test]
fn data_files_are_private_whatever_the_umask() {
    let mut cluster = Cluster::new_empty("clientport-umask", 1);
    cluster.start_with(0, |c| with_umask(c, 0o000));
    let (mut con, _) = serving(&cluster, 0, None, |c| {
        redis::cmd("SET").arg("k").arg("v").query::<String>(c)
    });
    for i in 0..50 {
        let _: String = redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg("v")
            .query(&mut con)
            .unwrap();
    }
    // The status file is rewritten every 250 ms.
    thread::sleep(Duration::from_millis(600));
    let mut seen = 0;
    let mut stack = vec![cluster.data(0)];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{} is {mode:o}", path.display());
            stack.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(mode, 0o600, "{} is {mode:o}", path.display());
        }
        seen += 1;
    }
    assert!(seen >= 5, "only {seen} paths in the data directory");
}

/// A data directory an older version left readable by everyone is made private at start.
#[test]
fn open_data_directory_is_made_private_at_start() {
    let mut cluster = Cluster::new_empty("clientport-old", 1);
    let dir: PathBuf = cluster.data(0);
    // A directory left beside the node's own (not `raft/`: Raft state without an identity
    // is refused as lost state).
    fs::create_dir_all(dir.join("old")).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(dir.join("old"), fs::Permissions::from_mode(0o755)).unwrap();
    let stray = dir.join("notes");
    fs::write(&stray, "left by hand").unwrap();
    fs::set_permissions(&stray, fs::Permissions::from_mode(0o644)).unwrap();
    cluster.start(0);
    let deadline = Instant::now() + PATIENCE;
    while !dir.join("status").exists() {
        assert!(Instant::now() < deadline, "node did not start");
        thread::sleep(Duration::from_millis(50));
    }
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let modes = (mode(&dir), mode(&dir.join("old")), mode(&stray));
    cluster.kill9(0);
    assert_eq!(modes, (0o700, 0o700, 0o600));
}

#[test]
fn pipelined_clients_on_every_node_get_their_own_replies_and_gone_clients_writes_apply_once() {
    let cluster = start("pipelined", 3, |_| Vec::new());
    let leader = cluster.leader();
    serving(&cluster, leader, None, |c| {
        redis::cmd("SET").arg("warm").arg("up").query::<String>(c)
    });
    const PER_NODE: usize = 8;
    const ROUNDS: usize = 10;
    const GONE: usize = 12;
    const GONE_INCRS: usize = 5;
    // Clients that send a pipeline of INCRs and close without reading: their batches are
    // in flight when the connection goes.
    for k in 0..GONE {
        let mut s = TcpStream::connect(cluster.client_addr(k % 3)).unwrap();
        let incrs = "*2\r\n$4\r\nINCR\r\n$4\r\ngone\r\n".repeat(GONE_INCRS);
        s.write_all(incrs.as_bytes()).unwrap();
        drop(s);
    }
    thread::scope(|scope| {
        for c in 0..3 * PER_NODE {
            let cluster = &cluster;
            scope.spawn(move || {
                let node = c % 3;
                serving(cluster, node, None, |c| {
                    redis::cmd("PING").query::<String>(c)
                });
                let mut stream = TcpStream::connect(cluster.client_addr(node)).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                let mut buf = Vec::new();
                let mut count = 0i64;
                for r in 0..ROUNDS {
                    // 15 commands in three writes a moment apart, so that more arrive while
                    // the first batch is on its way through the log.
                    let mut commands = Vec::new();
                    let mut want = Vec::new();
                    for i in 0..5 {
                        let value = format!("v{c}-{r}-{i}");
                        commands.push(encode_command(&["INCR", &format!("n{c}")]));
                        count += 1;
                        want.push(Reply::Integer(count));
                        commands.push(encode_command(&["SET", &format!("k{c}"), &value]));
                        want.push(Reply::ok());
                        commands.push(encode_command(&["GET", &format!("k{c}")]));
                        want.push(Reply::Bulk(value.into_bytes()));
                    }
                    for part in commands.chunks(5) {
                        stream.write_all(&part.concat()).unwrap();
                        thread::sleep(Duration::from_millis(1));
                    }
                    for (k, want) in want.into_iter().enumerate() {
                        let got = loop {
                            if let Some((reply, used)) =
                                decode_reply(&buf, &Limits::default()).unwrap()
                            {
                                buf.drain(..used);
                                break reply;
                            }
                            let mut chunk = [0u8; 4096];
                            let n = stream
                                .read(&mut chunk)
                                .unwrap_or_else(|e| panic!("client {c} on node {}: {e}", node + 1));
                            assert!(n > 0, "client {c} on node {}: closed", node + 1);
                            buf.extend_from_slice(&chunk[..n]);
                        };
                        assert_eq!(
                            got,
                            want,
                            "client {c} on node {}, round {r}, reply {k}",
                            node + 1
                        );
                    }
                }
            });
        }
    });
    // Every INCR of the clients that left was applied, once.
    let want = (GONE * GONE_INCRS).to_string();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = cluster.retry(leader, "GET gone", |c| {
            redis::cmd("GET").arg("gone").query::<Option<String>>(c)
        });
        if got.as_deref() == Some(want.as_str()) {
            break;
        }
        let n: usize = got.as_deref().map_or(0, |g| g.parse().expect("a count"));
        assert!(n < GONE * GONE_INCRS, "gone = {n}: an INCR applied twice");
        assert!(
            Instant::now() < deadline,
            "gone = {n} after {PATIENCE:?}, want {want}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}
