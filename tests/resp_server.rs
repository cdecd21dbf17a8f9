//! The RESP front end (`raftkv::resp::server`) on 127.0.0.1 with a small in-memory store as
//! its handler: every command of the table end to end, pipelining in batches, inline
//! commands, errors that keep the connection and errors that close it, the connection limit,
//! and shutdown joining every thread.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use raftkv::resp::command::NOT_AN_INTEGER;
use raftkv::resp::server::{CommandHandler, RespOptions, RespServer};
use raftkv::resp::{Command, Limits, Reply, decode_reply, encode_command};

/// Key → (value, version).
type Versioned = HashMap<Vec<u8>, (Vec<u8>, u64)>;

/// A single-node store with the lab's versioned semantics, standing in for the cluster.
#[derive(Default)]
struct MemStore {
    data: Mutex<Versioned>,
    largest_batch: AtomicUsize,
}

impl CommandHandler for MemStore {
    fn handle(&self, command: Command) -> Reply {
        let mut data = self.data.lock();
        match command {
            Command::Ping(None) => Reply::Simple("PONG".into()),
            Command::Ping(Some(message)) => Reply::Bulk(message),
            Command::Get(key) => data
                .get(&key)
                .map_or(Reply::Null, |(v, _)| Reply::Bulk(v.clone())),
            Command::Set { key, value } => {
                let version = data.get(&key).map_or(0, |(_, ver)| *ver);
                data.insert(key, (value, version + 1));
                Reply::ok()
            }
            Command::Del(keys) => {
                Reply::Integer(keys.iter().filter(|k| data.remove(*k).is_some()).count() as i64)
            }
            Command::Exists(keys) => {
                Reply::Integer(keys.iter().filter(|k| data.contains_key(*k)).count() as i64)
            }
            Command::Incr(key) => {
                let (value, version) = data.get(&key).cloned().unwrap_or((b"0".to_vec(), 0));
                let Some(n) = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .and_then(|n| n.checked_add(1))
                else {
                    return Reply::Error(NOT_AN_INTEGER.into());
                };
                data.insert(key, (n.to_string().into_bytes(), version + 1));
                Reply::Integer(n)
            }
            Command::MGet(keys) => Reply::Array(
                keys.iter()
                    .map(|k| {
                        data.get(k)
                            .map_or(Reply::Null, |(v, _)| Reply::Bulk(v.clone()))
                    })
                    .collect(),
            ),
            Command::VGet(key) => data
                .get(&key)
                .map_or(Reply::Null, |(v, ver)| Reply::versioned(v.clone(), *ver)),
            Command::VSet {
                key,
                value,
                version,
            } => {
                let current = data.get(&key).map_or(0, |(_, ver)| *ver);
                if current != version {
                    return Reply::err_version();
                }
                data.insert(key, (value, version + 1));
                Reply::ok()
            }
            Command::DbSize => Reply::Integer(data.len() as i64),
            Command::Quit => unreachable!("the server answers QUIT itself"),
        }
    }

    fn handle_batch(&self, commands: Vec<Command>) -> Vec<Reply> {
        self.largest_batch
            .fetch_max(commands.len(), Ordering::SeqCst);
        commands.into_iter().map(|c| self.handle(c)).collect()
    }
}

fn start(name: &str, options: RespOptions) -> (RespServer, Arc<MemStore>) {
    let store = Arc::new(MemStore::default());
    let server = RespServer::start(name, "127.0.0.1:0", options, store.clone()).unwrap();
    (server, store)
}

/// A raw client: writes bytes, reads replies with the crate's own reply decoder.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn reply(&mut self) -> Reply {
        loop {
            if let Some((reply, used)) = decode_reply(&self.buf, &Limits::default()).unwrap() {
                self.buf.drain(..used);
                return reply;
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).expect("a reply");
            assert!(n > 0, "connection closed while waiting for a reply");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn cmd(&mut self, args: &[&str]) -> Reply {
        self.send(&encode_command(args));
        self.reply()
    }

    /// Reads until the server closes the connection; whatever came before must be empty.
    fn expect_closed(&mut self) {
        let mut rest = Vec::new();
        match self.stream.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("want the connection closed, got {e}"),
        }
        assert!(
            self.buf.is_empty() && rest.is_empty(),
            "unexpected bytes before close: {:?}",
            [&self.buf[..], &rest[..]].concat()
        );
    }
}

fn bulk(s: &str) -> Reply {
    Reply::Bulk(s.as_bytes().to_vec())
}

fn error(s: &str) -> Reply {
    Reply::Error(s.into())
}

#[test]
fn every_command_end_to_end() {
    let (server, _store) = start("rc-r", RespOptions::default());
    let mut c = Client::connect(server.local_addr());
    assert_eq!(c.cmd(&["PING"]), Reply::Simple("PONG".into()));
    assert_eq!(c.cmd(&["ping", "hi"]), bulk("hi"));
    assert_eq!(c.cmd(&["GET", "k"]), Reply::Null);
    assert_eq!(c.cmd(&["SET", "k", "v1"]), Reply::ok());
    assert_eq!(c.cmd(&["GET", "k"]), bulk("v1"));
    assert_eq!(c.cmd(&["VGET", "k"]), Reply::versioned(b"v1".to_vec(), 1));
    assert_eq!(c.cmd(&["VSET", "k", "v2", "1"]), Reply::ok());
    assert_eq!(c.cmd(&["VSET", "k", "v3", "1"]), Reply::err_version());
    assert_eq!(c.cmd(&["VSET", "new", "x", "0"]), Reply::ok());
    assert_eq!(
        c.cmd(&["EXISTS", "k", "nope", "new", "k"]),
        Reply::Integer(3)
    );
    assert_eq!(
        c.cmd(&["MGET", "k", "nope", "new"]),
        Reply::Array(vec![bulk("v2"), Reply::Null, bulk("x")])
    );
    assert_eq!(c.cmd(&["INCR", "n"]), Reply::Integer(1));
    assert_eq!(c.cmd(&["INCR", "n"]), Reply::Integer(2));
    assert_eq!(c.cmd(&["INCR", "k"]), error(NOT_AN_INTEGER));
    assert_eq!(c.cmd(&["DEL", "k", "n", "nope"]), Reply::Integer(2));
    assert_eq!(c.cmd(&["GET", "k"]), Reply::Null);
    // Errors that leave the connection open.
    assert_eq!(
        c.cmd(&["GET"]),
        error("ERR wrong number of arguments for 'get' command")
    );
    assert_eq!(
        c.cmd(&["FLUSHALL", "now"]),
        error("ERR unknown command 'FLUSHALL', with args beginning with: 'now' ")
    );
    assert_eq!(c.cmd(&["SET", "a", "b", "NX"]), error("ERR syntax error"));
    assert_eq!(c.cmd(&["VSET", "a", "b", "x"]), error(NOT_AN_INTEGER));
    assert_eq!(c.cmd(&["GET", "new"]), bulk("x"));
    assert_eq!(c.cmd(&["QUIT"]), Reply::ok());
    c.expect_closed();
    assert_eq!(server.protocol_errors(), 0);
}

#[test]
fn inline_commands_as_typed_in_telnet() {
    let (server, _store) = start("ri-r", RespOptions::default());
    let mut c = Client::connect(server.local_addr());
    c.send(b"PING\r\nSET greeting \"hello world\"\nGET greeting\r\n\r\nEXISTS greeting x\r\n");
    assert_eq!(c.reply(), Reply::Simple("PONG".into()));
    assert_eq!(c.reply(), Reply::ok());
    assert_eq!(c.reply(), bulk("hello world"));
    assert_eq!(c.reply(), Reply::Integer(1));
}

#[test]
fn pipelined_commands_run_in_batches_and_answer_in_order() {
    let (server, store) = start("rp-r", RespOptions::default());
    let mut c = Client::connect(server.local_addr());
    let mut stream = Vec::new();
    for i in 0..200 {
        stream.extend_from_slice(&encode_command(&[
            "SET",
            &format!("k{i}"),
            &format!("v{i}"),
        ]));
        stream.extend_from_slice(&encode_command(&["GET", &format!("k{i}")]));
    }
    c.send(&stream);
    for i in 0..200 {
        assert_eq!(c.reply(), Reply::ok());
        assert_eq!(c.reply(), bulk(&format!("v{i}")));
    }
    assert!(
        store.largest_batch.load(Ordering::SeqCst) > 1,
        "pipelined commands were never batched"
    );
    assert_eq!(server.commands(), 400);
}

#[test]
fn broken_frames_close_the_connection_and_leave_the_server_serving() {
    let (server, _store) = start(
        "rb-r",
        RespOptions {
            limits: Limits {
                max_bulk_bytes: 1024,
                ..Limits::default()
            },
            ..RespOptions::default()
        },
    );
    let cases: &[(&[u8], &str)] = &[
        (b"*1\r\n$x\r\n", "ERR Protocol error: invalid bulk length"),
        (b"*abc\r\n", "ERR Protocol error: invalid multibulk length"),
        (b"*1\r\n:5\r\n", "ERR Protocol error: expected '$', got ':'"),
        (
            b"SET \"open\r\n",
            "ERR Protocol error: unbalanced quotes in request",
        ),
        // A value above the limit: refused from its header, never read or allocated.
        (
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$999999999999\r\n",
            "ERR Protocol error: invalid bulk length (999999999999 bytes, at most 1024)",
        ),
    ];
    for (bytes, want) in cases {
        let mut c = Client::connect(server.local_addr());
        // A good command first: its reply comes before the error.
        c.send(&encode_command(&["PING"]));
        c.send(bytes);
        assert_eq!(c.reply(), Reply::Simple("PONG".into()));
        assert_eq!(c.reply(), error(want), "{bytes:?}");
        c.expect_closed();
    }
    assert_eq!(server.protocol_errors(), cases.len() as u64);
    // Random garbage from several clients at once.
    let garbage: Vec<_> = (0..4u64)
        .map(|seed| {
            let addr = server.local_addr();
            thread::spawn(move || {
                let mut c = Client::connect(addr);
                let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                let bytes: Vec<u8> = (0..100_000)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                // The server may close before reading it all.
                let _ = c.stream.write_all(&bytes);
            })
        })
        .collect();
    for g in garbage {
        g.join().expect("garbage sender panicked");
    }
    let mut c = Client::connect(server.local_addr());
    assert_eq!(c.cmd(&["SET", "still", "here"]), Reply::ok());
    assert_eq!(c.cmd(&["GET", "still"]), bulk("here"));
}

#[test]
fn connection_limit_refuses_with_an_error() {
    let (server, _store) = start(
        "rl-r",
        RespOptions {
            max_clients: 2,
            ..RespOptions::default()
        },
    );
    let mut first = Client::connect(server.local_addr());
    let mut second = Client::connect(server.local_addr());
    assert_eq!(first.cmd(&["PING"]), Reply::Simple("PONG".into()));
    assert_eq!(second.cmd(&["PING"]), Reply::Simple("PONG".into()));
    let mut third = Client::connect(server.local_addr());
    assert_eq!(third.reply(), error("ERR max number of clients reached"));
    third.expect_closed();
    // A slot frees when a client leaves.
    assert_eq!(first.cmd(&["QUIT"]), Reply::ok());
    first.expect_closed();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = Client::connect(server.local_addr());
        again.send(&encode_command(&["PING"]));
        match again.reply() {
            Reply::Simple(pong) if pong == "PONG" => break,
            other => assert!(Instant::now() < deadline, "still refused: {other:?}"),
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn shutdown_joins_every_thread() {
    let (server, _store) = start("rs-r", RespOptions::default());
    let mut clients: Vec<Client> = (0..3)
        .map(|_| Client::connect(server.local_addr()))
        .collect();
    for c in &mut clients {
        assert_eq!(c.cmd(&["PING"]), Reply::Simple("PONG".into()));
    }
    server.shutdown();
    for c in &mut clients {
        c.expect_closed();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<String> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|n| n.starts_with("rs-r"))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "threads still running: {left:?}");
        thread::sleep(Duration::from_millis(10));
    }
}
