//! The RESP front end (`raftkv::resp::server`) on 127.0.0.1 with the node's KV executor
//! (`kvapi::KvMap`, no log) as its handler: every command of the table end to end,
//! pipelining in batches, inline commands, errors that keep the connection and errors that
//! close it, the connection limit, and shutdown joining every thread; and a handler that
//! answers later from a thread of its own, as the node's does (`CommandHandler::submit`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use raftkv::kvapi::{KvCmd, KvMap};
use raftkv::resp::auth::Password;
use raftkv::resp::command::NOT_AN_INTEGER;
use raftkv::resp::server::{Batch, CommandHandler, RespOptions, RespServer, check_protected_mode};
use raftkv::resp::{Limits, Reply, decode_reply, encode_command};

/// A single-node store: the executor of a node's state machine, without the log.
#[derive(Default)]
struct MemStore {
    data: Mutex<KvMap>,
    largest_batch: AtomicUsize,
}

impl CommandHandler for MemStore {
    fn handle(&self, command: KvCmd) -> Reply {
        self.data.lock().execute(&command).into()
    }

    fn handle_batch(&self, commands: Vec<KvCmd>) -> Vec<Reply> {
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

    /// Sends a command and returns its reply exactly as it came on the wire.
    fn raw(&mut self, args: &[&str]) -> String {
        self.send(&encode_command(args));
        loop {
            if let Some((_, used)) = decode_reply(&self.buf, &Limits::default()).unwrap() {
                let bytes: Vec<u8> = self.buf.drain(..used).collect();
                return String::from_utf8_lossy(&bytes).into_owned();
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).expect("a reply");
            assert!(n > 0, "connection closed while waiting for a reply");
            self.buf.extend_from_slice(&chunk[..n]);
        }
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

/// HELLO's map after the protocol number: what Redis 7.2 answers, with raftkv's client id.
fn hello_tail(id: u64) -> String {
    format!(
        ":{id}\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n"
    )
}

fn hello(proto: u8, id: u64) -> String {
    let head = if proto == 3 { "%7" } else { "*14" };
    format!(
        "{head}\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$5\r\n7.2.0\r\n$5\r\nproto\r\n:{proto}\r\n$2\r\nid\r\n{}",
        hello_tail(id)
    )
}

/// The connection commands real clients send at connect, byte for byte as redis-server 7.0
/// answered them when these were written (CLIENT SETINFO as 7.2 documents it).
#[test]
fn handshake_commands_answer_as_redis_does() {
    let (server, _store) = start("rh-r", RespOptions::default());
    let mut c = Client::connect(server.local_addr());
    let id: u64 = match c.cmd(&["CLIENT", "ID"]) {
        Reply::Integer(id) => id as u64,
        other => panic!("CLIENT ID answered {other:?}"),
    };
    assert_eq!(c.raw(&["HELLO"]), hello(2, id));
    assert_eq!(c.raw(&["HELLO", "2"]), hello(2, id));
    assert_eq!(
        c.raw(&["HELLO", "4"]),
        "-NOPROTO unsupported protocol version\r\n"
    );
    assert_eq!(
        c.raw(&["HELLO", "x"]),
        "-ERR Protocol version is not an integer or out of range\r\n"
    );
    assert_eq!(
        c.raw(&["HELLO", "2", "AUTH"]),
        "-ERR Syntax error in HELLO option 'AUTH'\r\n"
    );
    assert_eq!(
        c.raw(&["HELLO", "2", "BOGUS"]),
        "-ERR Syntax error in HELLO option 'BOGUS'\r\n"
    );
    assert_eq!(
        c.raw(&["HELLO", "2", "AUTH", "default", "any", "SETNAME", "n1"]),
        hello(2, id)
    );
    assert_eq!(c.raw(&["CLIENT", "GETNAME"]), "$2\r\nn1\r\n");
    assert_eq!(
        c.raw(&["AUTH", "pw"]),
        "-ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?\r\n"
    );
    assert_eq!(c.raw(&["AUTH", "default", "pw"]), "+OK\r\n");
    assert_eq!(c.raw(&["AUTH", "a", "b", "c"]), "-ERR syntax error\r\n");
    assert_eq!(c.raw(&["CLIENT", "SETNAME", "myname"]), "+OK\r\n");
    assert_eq!(
        c.raw(&["CLIENT", "SETNAME", "my name"]),
        "-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
    );
    assert_eq!(
        c.raw(&["CLIENT", "SETNAME", "my", "name"]),
        "-ERR wrong number of arguments for 'client|setname' command\r\n"
    );
    assert_eq!(c.raw(&["CLIENT", "GETNAME"]), "$6\r\nmyname\r\n");
    assert_eq!(
        c.raw(&["CLIENT", "SETINFO", "LIB-NAME", "redis-py"]),
        "+OK\r\n"
    );
    assert_eq!(c.raw(&["CLIENT", "SETINFO", "LIB-VER", "8.2.0"]), "+OK\r\n");
    assert_eq!(
        c.raw(&["CLIENT", "SETINFO", "BAD", "x"]),
        "-ERR Unrecognized option 'BAD'\r\n"
    );
    assert_eq!(
        c.raw(&["CLIENT", "BOGUS"]),
        "-ERR unknown subcommand 'BOGUS'. Try CLIENT HELP.\r\n"
    );
    assert_eq!(
        c.raw(&["CLIENT"]),
        "-ERR wrong number of arguments for 'client' command\r\n"
    );
    let info = c.raw(&["CLIENT", "INFO"]);
    assert!(
        info.contains(&format!("id={id} addr=127.0.0.1:"))
            && info.contains(" name=myname ")
            && info.contains(" lib-name=redis-py lib-ver=8.2.0 resp=2\n"),
        "{info}"
    );
    let list = c.raw(&["CLIENT", "LIST"]);
    assert!(list.contains(&format!("id={id} ")), "{list}");
    assert_eq!(c.raw(&["SELECT", "0"]), "+OK\r\n");
    assert_eq!(c.raw(&["SELECT", "1"]), "-ERR DB index is out of range\r\n");
    assert_eq!(
        c.raw(&["SELECT", "x"]),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(c.raw(&["DBSIZE"]), ":0\r\n");
    assert_eq!(
        c.raw(&["DBSIZE", "x"]),
        "-ERR wrong number of arguments for 'dbsize' command\r\n"
    );
    assert_eq!(c.raw(&["ECHO", "hi"]), "$2\r\nhi\r\n");
    assert_eq!(
        c.raw(&["ECHO"]),
        "-ERR wrong number of arguments for 'echo' command\r\n"
    );
    // What redis-benchmark reads before it starts.
    assert_eq!(
        c.raw(&["CONFIG", "GET", "save"]),
        "*2\r\n$4\r\nsave\r\n$0\r\n\r\n"
    );
    assert_eq!(
        c.raw(&["CONFIG", "GET", "appendonly"]),
        "*2\r\n$10\r\nappendonly\r\n$3\r\nyes\r\n"
    );
    assert_eq!(
        c.raw(&["CONFIG", "GET", "maxclients"]),
        "*2\r\n$10\r\nmaxclients\r\n$5\r\n10000\r\n"
    );
    assert_eq!(
        c.raw(&["CONFIG", "GET", "timeout"]),
        "*2\r\n$7\r\ntimeout\r\n$1\r\n0\r\n"
    );
    assert_eq!(c.raw(&["CONFIG", "GET", "nosuch"]), "*0\r\n");
    assert_eq!(
        c.raw(&["CONFIG"]),
        "-ERR wrong number of arguments for 'config' command\r\n"
    );
    assert_eq!(c.raw(&["COMMAND", "COUNT"]), ":22\r\n");
    assert_eq!(
        c.raw(&["COMMAND", "DOCS", "get"]),
        "*2\r\n$3\r\nget\r\n*6\r\n$7\r\nsummary\r\n$34\r\nReturns the string value of a key.\r\n$5\r\nsince\r\n$5\r\n1.0.0\r\n$5\r\ngroup\r\n$6\r\nstring\r\n"
    );
    assert_eq!(c.raw(&["COMMAND", "DOCS", "nosuch"]), "*0\r\n");
    assert_eq!(
        c.raw(&["COMMAND", "FOO"]),
        "-ERR unknown subcommand 'FOO'. Try COMMAND HELP.\r\n"
    );
    match c.cmd(&["COMMAND"]) {
        Reply::Array(entries) => assert_eq!(entries.len(), 22),
        other => panic!("COMMAND answered {other:?}"),
    }
    let info = c.raw(&["INFO"]);
    for section in [
        "# Server\r\n",
        "# Clients\r\nconnected_clients:1\r\nmaxclients:10000\r\n",
        "# Keyspace\r\n",
    ] {
        assert!(info.contains(section), "{section:?} missing from {info}");
    }
    assert_eq!(c.raw(&["INFO", "keyspace"]), "$12\r\n# Keyspace\r\n\r\n");
    assert_eq!(c.cmd(&["SET", "k", "v"]), Reply::ok());
    assert_eq!(
        c.raw(&["INFO", "keyspace"]),
        "$44\r\n# Keyspace\r\ndb0:keys=1,expires=0,avg_ttl=0\r\n\r\n"
    );
    // RESP3 after HELLO 3: nil is `_`, maps are `%`, text is verbatim.
    assert_eq!(c.raw(&["HELLO", "3"]), hello(3, id));
    assert_eq!(c.raw(&["GET", "nosuch"]), "_\r\n");
    assert_eq!(c.raw(&["MGET", "k", "nosuch"]), "*2\r\n$1\r\nv\r\n_\r\n");
    assert_eq!(
        c.raw(&["CONFIG", "GET", "save"]),
        "%1\r\n$4\r\nsave\r\n$0\r\n\r\n"
    );
    assert_eq!(
        c.raw(&["INFO", "keyspace"]),
        "=48\r\ntxt:# Keyspace\r\ndb0:keys=1,expires=0,avg_ttl=0\r\n\r\n"
    );
    assert_eq!(c.raw(&["HELLO", "2"]), hello(2, id));
    assert_eq!(c.raw(&["GET", "nosuch"]), "$-1\r\n");
}

#[test]
fn multi_exec_runs_the_queued_commands_as_one_batch() {
    let (server, store) = start("rm-r", RespOptions::default());
    let mut c = Client::connect(server.local_addr());
    assert_eq!(c.raw(&["EXEC"]), "-ERR EXEC without MULTI\r\n");
    assert_eq!(c.raw(&["DISCARD"]), "-ERR DISCARD without MULTI\r\n");
    assert_eq!(c.raw(&["MULTI"]), "+OK\r\n");
    assert_eq!(c.raw(&["MULTI"]), "-ERR MULTI calls can not be nested\r\n");
    for i in 0..5 {
        assert_eq!(c.raw(&["INCR", "n"]), "+QUEUED\r\n", "INCR {i}");
    }
    assert_eq!(c.raw(&["PING"]), "+QUEUED\r\n");
    assert_eq!(c.raw(&["GET", "n"]), "+QUEUED\r\n");
    assert_eq!(
        c.raw(&["EXEC"]),
        "*7\r\n:1\r\n:2\r\n:3\r\n:4\r\n:5\r\n+PONG\r\n$1\r\n5\r\n"
    );
    assert_eq!(
        store.largest_batch.load(Ordering::SeqCst),
        6,
        "one batch for the transaction"
    );
    // A refused command discards the whole transaction.
    assert_eq!(c.raw(&["MULTI"]), "+OK\r\n");
    assert_eq!(
        c.raw(&["NOSUCH"]),
        "-ERR unknown command 'NOSUCH', with args beginning with: \r\n"
    );
    assert_eq!(
        c.raw(&["SET", "m"]),
        "-ERR wrong number of arguments for 'set' command\r\n"
    );
    assert_eq!(c.raw(&["SET", "m", "1"]), "+QUEUED\r\n");
    assert_eq!(
        c.raw(&["EXEC"]),
        "-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(c.raw(&["GET", "m"]), "$-1\r\n");
    assert_eq!(c.raw(&["MULTI"]), "+OK\r\n");
    assert_eq!(c.raw(&["SET", "m", "1"]), "+QUEUED\r\n");
    assert_eq!(c.raw(&["DISCARD"]), "+OK\r\n");
    assert_eq!(c.raw(&["GET", "m"]), "$-1\r\n");
}

const NOAUTH: &str = "-NOAUTH Authentication required.\r\n";
const WRONGPASS: &str = "-WRONGPASS invalid username-password pair or user is disabled.\r\n";

/// AUTH as Redis documents it (`requirepass`): error strings byte for byte as redis-server
/// 7.0 answered them.
#[test]
fn auth_as_redis_documents() {
    let options = RespOptions {
        password: Some(Password::new(b"s3cret").unwrap()),
        ..RespOptions::default()
    };
    let (server, _store) = start("ra-r", options);
    let mut c = Client::connect(server.local_addr());
    for command in [
        &["PING"][..],
        &["GET", "a"],
        &["SET", "a", "1"],
        &["CLIENT", "SETNAME", "x"],
        &["SELECT", "0"],
        &["INFO"],
        &["DBSIZE"],
        &["MULTI"],
        &["CONFIG", "GET", "save"],
    ] {
        assert_eq!(c.raw(command), NOAUTH, "{command:?} before AUTH");
    }
    // Unknown commands and wrong arity are reported first, as Redis does.
    assert_eq!(
        c.raw(&["NOSUCH", "a"]),
        "-ERR unknown command 'NOSUCH', with args beginning with: 'a' \r\n"
    );
    assert_eq!(
        c.raw(&["GET"]),
        "-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert_eq!(
        c.raw(&["HELLO", "2"]),
        "-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n"
    );
    assert_eq!(
        c.raw(&["HELLO", "2", "AUTH", "default", "wrong"]),
        WRONGPASS
    );
    assert_eq!(c.raw(&["HELLO", "2", "AUTH", "bob", "s3cret"]), WRONGPASS);
    assert_eq!(c.raw(&["AUTH", "wrong"]), WRONGPASS);
    assert_eq!(c.raw(&["AUTH", "default", "wrong"]), WRONGPASS);
    assert_eq!(c.raw(&["AUTH", "bob", "s3cret"]), WRONGPASS);
    assert_eq!(c.raw(&["AUTH", "s3cre"]), WRONGPASS);
    assert_eq!(c.raw(&["AUTH", "s3crett"]), WRONGPASS);
    assert_eq!(c.raw(&["PING"]), NOAUTH);
    assert_eq!(c.raw(&["AUTH", "s3cret"]), "+OK\r\n");
    assert_eq!(c.raw(&["PING"]), "+PONG\r\n");
    assert_eq!(c.raw(&["SET", "a", "1"]), "+OK\r\n");
    // A failed AUTH later does not log the client out (Redis keeps it authenticated).
    assert_eq!(c.raw(&["AUTH", "wrong"]), WRONGPASS);
    assert_eq!(c.raw(&["GET", "a"]), "$1\r\n1\r\n");

    let mut d = Client::connect(server.local_addr());
    assert_eq!(d.raw(&["AUTH", "default", "s3cret"]), "+OK\r\n");
    assert_eq!(d.raw(&["GET", "a"]), "$1\r\n1\r\n");

    let mut e = Client::connect(server.local_addr());
    let reply = e.raw(&["HELLO", "3", "AUTH", "default", "s3cret", "SETNAME", "n1"]);
    assert!(reply.starts_with("%7\r\n$6\r\nserver\r\n"), "{reply}");
    assert_eq!(e.raw(&["CLIENT", "GETNAME"]), "$2\r\nn1\r\n");

    // QUIT needs no AUTH.
    let mut q = Client::connect(server.local_addr());
    assert_eq!(q.raw(&["QUIT"]), "+OK\r\n");
    q.expect_closed();

    // Before AUTH, commands are read under small limits: no 1 MB value from a stranger.
    let mut big = Client::connect(server.local_addr());
    big.send(b"*2\r\n$4\r\nAUTH\r\n$20000\r\n");
    match big.reply() {
        Reply::Error(e) => assert!(
            e.starts_with("ERR Protocol error: invalid bulk length"),
            "{e}"
        ),
        other => panic!("a 20,000-byte password was answered {other:?}"),
    }
    big.expect_closed();
}

#[test]
fn protected_mode_refuses_an_open_port_without_a_password() {
    let refused = RespServer::start(
        "rpm-r",
        "0.0.0.0:0",
        RespOptions::default(),
        Arc::new(MemStore::default()),
    );
    let e = refused
        .err()
        .expect("an open port without a password must be refused");
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
    let text = e.to_string();
    assert!(
        text.contains("protected mode")
            && text.contains("--requirepass-file")
            && text.contains("127.0.0.1"),
        "{text}"
    );
    // With a password the same address is allowed (checked without binding it).
    let with_password = RespOptions {
        password: Some(Password::new(b"pw").unwrap()),
        ..RespOptions::default()
    };
    let open: Vec<SocketAddr> = vec!["0.0.0.0:0".parse().unwrap()];
    check_protected_mode(&open, &with_password).unwrap();
    let loopback: Vec<SocketAddr> =
        vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
    check_protected_mode(&loopback, &RespOptions::default()).unwrap();
}

/// Waits up to `limit` for the server to close `stream`; the time it took.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("not closed within {limit:?}: {e}"),
    }
    start.elapsed()
}

#[test]
fn idle_and_partial_frame_timeouts_close_what_they_should() {
    // Each timeout on its own server, so that one cannot do the other's work. Long enough
    // that the active client, pinging every 100 ms, is not taken for idle when this test's
    // thread is starved of CPU for a while on a loaded machine.
    let timeout = Duration::from_secs(3);
    let (idle_server, _store) = start(
        "rti-r",
        RespOptions {
            idle_timeout: timeout,
            ..RespOptions::default()
        },
    );
    let (partial_server, _store) = start(
        "rtp-r",
        RespOptions {
            partial_frame_timeout: timeout,
            ..RespOptions::default()
        },
    );
    // Idle timeout: a silent client goes, an active one stays.
    let mut idle = TcpStream::connect(idle_server.local_addr()).unwrap();
    let mut active_a = Client::connect(idle_server.local_addr());
    // Partial-frame timeout: half a SET then silence goes, and so does a client trickling a
    // command that never completes (it is not idle); a silent client and an active one stay.
    let mut half = TcpStream::connect(partial_server.local_addr()).unwrap();
    half.write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100\r\nabc")
        .unwrap();
    let mut trickle = TcpStream::connect(partial_server.local_addr()).unwrap();
    let mut silent = Client::connect(partial_server.local_addr());
    let mut active_p = Client::connect(partial_server.local_addr());
    let begin = Instant::now();
    let mut trickled = 0;
    while begin.elapsed() < timeout + Duration::from_millis(1500) {
        assert_eq!(active_a.cmd(&["PING"]), Reply::Simple("PONG".into()));
        assert_eq!(active_p.cmd(&["PING"]), Reply::Simple("PONG".into()));
        if trickle.write_all(b"x").is_ok() {
            trickled += 1;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(trickled > 0);
    for (name, stream) in [
        ("idle", &mut idle),
        ("half a frame", &mut half),
        ("trickle", &mut trickle),
    ] {
        let waited = closed_within(stream, Duration::from_secs(10));
        assert!(waited < Duration::from_secs(10), "{name} still open");
    }
    assert_eq!(active_a.cmd(&["PING"]), Reply::Simple("PONG".into()));
    assert_eq!(active_p.cmd(&["PING"]), Reply::Simple("PONG".into()));
    assert_eq!(
        silent.cmd(&["PING"]),
        Reply::Simple("PONG".into()),
        "no idle timeout there"
    );
    assert_eq!(idle_server.limit_closes(), 1);
    assert_eq!(partial_server.limit_closes(), 2);
}

#[test]
fn stalled_large_commands_are_bounded_in_total() {
    let options = RespOptions {
        max_input_bytes: 16 << 20,
        ..RespOptions::default()
    };
    let (server, _store) = start("rb-r", options);
    let addr = server.local_addr();
    // 12 clients each send 3.5 MB of a 4 MB MGET and stall: 42 MB wanted, 16 MB allowed.
    let chunk = vec![b'k'; 1000];
    let mut stalled: Vec<TcpStream> = Vec::new();
    for _ in 0..12 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"*4000\r\n$4\r\nMGET\r\n").unwrap();
        let mut sent = 0;
        while sent < 3_500_000 {
            let mut element = format!("${}\r\n", chunk.len()).into_bytes();
            element.extend_from_slice(&chunk);
            element.extend_from_slice(b"\r\n");
            if s.write_all(&element).is_err() {
                break; // closed already: over the budget
            }
            sent += element.len();
        }
        stalled.push(s);
    }
    let mut closed = 0;
    for s in &mut stalled {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut byte = [0u8; 1];
        match s.read(&mut byte) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            _ => {}
        }
    }
    // At most 16 MB / 3.5 MB = 4 can be held at once.
    assert!(
        closed >= 12 - 5,
        "only {closed} of 12 stalled clients were closed"
    );
    let mut c = Client::connect(addr);
    assert_eq!(c.cmd(&["SET", "still", "here"]), Reply::ok());
    assert!(server.limit_closes() >= 7);
}

/// A handler that never blocks the event loop, as the node's: `submit` queues the batches
/// for a thread of the test's (`answer_later`), which runs them on a [`MemStore`] and answers
/// the batches it finds together in reverse order (so connections are answered out of the
/// order they were submitted in); while `held`, batches wait until released.
#[derive(Default)]
struct LaterStore {
    store: MemStore,
    queue: Mutex<LaterQueue>,
    queued: parking_lot::Condvar,
    /// `submit` calls from a thread other than the event loop.
    submits_off_the_loop: AtomicUsize,
    /// `submit` calls, and batches they carried.
    submits: AtomicUsize,
    batches: AtomicUsize,
}

#[derive(Default)]
struct LaterQueue {
    batches: Vec<Batch>,
    held: bool,
    /// Drop the next batch's completion unanswered.
    drop_next: bool,
    stop: bool,
}

impl CommandHandler for LaterStore {
    fn handle(&self, command: KvCmd) -> Reply {
        self.store.handle(command)
    }

    fn submits_without_blocking(&self) -> bool {
        true
    }

    fn submit(&self, batches: Vec<Batch>) {
        let on_loop = thread::current()
            .name()
            .is_some_and(|n| n.ends_with("-loop"));
        if !on_loop {
            self.submits_off_the_loop.fetch_add(1, Ordering::SeqCst);
        }
        self.submits.fetch_add(1, Ordering::SeqCst);
        self.batches.fetch_add(batches.len(), Ordering::SeqCst);
        let mut q = self.queue.lock();
        q.batches.extend(batches);
        self.queued.notify_one();
    }
}

impl LaterStore {
    fn set_held(&self, held: bool) {
        self.queue.lock().held = held;
        self.queued.notify_one();
    }

    fn waiting(&self) -> usize {
        self.queue.lock().batches.len()
    }

    fn stop(&self) {
        self.queue.lock().stop = true;
        self.queued.notify_one();
    }
}

fn answer_later(store: &LaterStore) {
    loop {
        let (mut batches, drop_next) = {
            let mut q = store.queue.lock();
            while (q.batches.is_empty() || q.held) && !q.stop {
                store.queued.wait(&mut q);
            }
            if q.stop {
                // What is left is dropped unanswered: each command answered with an error.
                return;
            }
            (
                std::mem::take(&mut q.batches),
                std::mem::take(&mut q.drop_next),
            )
        };
        batches.reverse();
        for (i, Batch { commands, done }) in batches.into_iter().enumerate() {
            if drop_next && i == 0 {
                drop(done);
                continue;
            }
            done.complete(store.store.handle_batch(commands));
        }
    }
}

/// A server on a [`LaterStore`], and the thread answering its batches (stopped and joined
/// on drop).
struct Later {
    server: Option<RespServer>,
    store: Arc<LaterStore>,
    answerer: Option<thread::JoinHandle<()>>,
}

impl Later {
    fn start(name: &str, options: RespOptions) -> Later {
        let store = Arc::new(LaterStore::default());
        let server = RespServer::start(name, "127.0.0.1:0", options, store.clone()).unwrap();
        let answerer = {
            let store = store.clone();
            thread::Builder::new()
                .name(format!("{name}-answer"))
                .spawn(move || answer_later(&store))
                .unwrap()
        };
        Later {
            server: Some(server),
            store,
            answerer: Some(answerer),
        }
    }

    fn server(&self) -> &RespServer {
        self.server.as_ref().expect("server running")
    }
}

impl Drop for Later {
    fn drop(&mut self) {
        drop(self.server.take());
        self.store.stop();
        if let Some(h) = self.answerer.take() {
            let joined = h.join();
            if !thread::panicking() {
                joined.expect("answerer panicked");
            }
        }
    }
}

/// Polls `done` every 5 ms for up to 10 s.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn pipelined_clients_at_once_each_get_their_own_replies_in_order_from_a_handler_answering_later() {
    let later = Later::start("rq-r", RespOptions::default());
    let addr = later.server().local_addr();
    const CLIENTS: usize = 16;
    const ROUNDS: usize = 20;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            thread::spawn(move || {
                let mut client = Client::connect(addr);
                let mut count = 0i64;
                for r in 0..ROUNDS {
                    // 40 commands in four writes a moment apart, so that more arrive while
                    // the first batch is with the store: this client's counter, its own
                    // key's fresh values, answers known at once in between, and a
                    // transaction.
                    let mut commands = Vec::new();
                    let mut want = Vec::new();
                    for i in 0..8 {
                        let value = format!("v{c}-{r}-{i}");
                        commands.push(encode_command(&["INCR", &format!("n{c}")]));
                        count += 1;
                        want.push(Reply::Integer(count));
                        commands.push(encode_command(&["SET", &format!("k{c}"), &value]));
                        want.push(Reply::ok());
                        commands.push(encode_command(&["ECHO", &value]));
                        want.push(bulk(&value));
                        commands.push(encode_command(&["GET", &format!("k{c}")]));
                        want.push(bulk(&value));
                    }
                    for args in [
                        &["MULTI"][..],
                        &["INCR", &format!("n{c}")],
                        &["GET", &format!("k{c}")],
                        &["EXEC"],
                    ] {
                        commands.push(encode_command(args));
                    }
                    count += 1;
                    want.push(Reply::ok());
                    want.push(Reply::Simple("QUEUED".into()));
                    want.push(Reply::Simple("QUEUED".into()));
                    want.push(Reply::Array(vec![
                        Reply::Integer(count),
                        bulk(&format!("v{c}-{r}-7")),
                    ]));
                    for part in commands.chunks(10) {
                        client.send(&part.concat());
                        thread::sleep(Duration::from_millis(1));
                    }
                    for (k, want) in want.into_iter().enumerate() {
                        assert_eq!(client.reply(), want, "client {c}, round {r}, reply {k}");
                    }
                }
            })
        })
        .collect();
    for (c, h) in clients.into_iter().enumerate() {
        h.join()
            .unwrap_or_else(|_| panic!("client {c} got a wrong reply"));
    }
    let store = &later.store;
    assert_eq!(
        store.submits_off_the_loop.load(Ordering::SeqCst),
        0,
        "a batch went through a thread other than the event loop"
    );
    let (submits, batches) = (
        store.submits.load(Ordering::SeqCst),
        store.batches.load(Ordering::SeqCst),
    );
    assert!(
        submits > 0 && batches >= CLIENTS * ROUNDS,
        "{submits} submits, {batches} batches"
    );
    eprintln!("{batches} batches in {submits} submit calls");
    assert_eq!(later.server().commands(), (CLIENTS * ROUNDS * 36) as u64);
}

#[test]
fn a_client_gone_closed_or_dropped_while_its_batch_is_in_flight_leaves_the_server_serving() {
    let mut later = Later::start(
        "rg-r",
        RespOptions {
            max_input_bytes: 4096,
            ..RespOptions::default()
        },
    );
    let addr = later.server().local_addr();
    // A client sends a write and goes away while it is with the store.
    later.store.set_held(true);
    let mut gone = Client::connect(addr);
    gone.send(
        &[
            encode_command(&["SET", "gone", "1"]),
            encode_command(&["INCR", "g"]),
        ]
        .concat(),
    );
    wait_until("the gone client's batch reaches the store", || {
        later.store.waiting() == 1
    });
    drop(gone);
    // The loop serves others meanwhile.
    let mut other = Client::connect(addr);
    assert_eq!(other.cmd(&["PING"]), Reply::Simple("PONG".into()));
    assert_eq!(later.server().connections(), 2);
    // Its answer comes for a closed connection: dropped; the connection is let go.
    later.store.set_held(false);
    wait_until("the gone client's connection is closed", || {
        later.server().connections() == 1
    });
    assert_eq!(other.cmd(&["GET", "gone"]), bulk("1"));
    assert_eq!(other.cmd(&["GET", "g"]), bulk("1"));
    // A connection the server closes while its batch is in flight: it holds the most of
    // the input budget (part of a large command after its SET) when another client's
    // partial command takes the total over. Its answer comes for no connection: dropped.
    later.store.set_held(true);
    let mut hog = Client::connect(addr);
    let partial = |key: &str, bytes: usize| {
        let mut b = format!("*3\r\n$3\r\nSET\r\n$1\r\n{key}\r\n$100000\r\n").into_bytes();
        b.resize(b.len() + bytes, b'x');
        b
    };
    hog.send(&[encode_command(&["SET", "hog", "1"]), partial("h", 3000)].concat());
    wait_until("the hog's batch reaches the store", || {
        later.store.waiting() == 1
    });
    let mut second = Client::connect(addr);
    second.send(&partial("s", 2000));
    hog.expect_closed();
    later.store.set_held(false);
    wait_until("the hog's batch is answered", || later.store.waiting() == 0);
    assert_eq!(other.cmd(&["GET", "hog"]), bulk("1"));
    assert_eq!(other.cmd(&["PING"]), Reply::Simple("PONG".into()));
    drop(second);
    // A batch whose completion is dropped unanswered: an error per command, and the
    // connection goes on.
    later.store.queue.lock().drop_next = true;
    assert_eq!(
        other.cmd(&["SET", "x", "1"]),
        error("ERR internal error: no reply")
    );
    assert_eq!(other.cmd(&["GET", "x"]), Reply::Null);
    assert_eq!(other.cmd(&["SET", "x", "2"]), Reply::ok());
    assert_eq!(other.cmd(&["GET", "x"]), bulk("2"));
    // Shutdown with a batch in flight: the connection is closed at once, and the answer
    // that comes after the server stopped goes nowhere.
    later.store.set_held(true);
    let mut waiting = Client::connect(addr);
    waiting.send(&encode_command(&["SET", "late", "1"]));
    wait_until("the late batch reaches the store", || {
        later.store.waiting() == 1
    });
    let server = later.server.take().expect("server running");
    let began = Instant::now();
    server.shutdown();
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "shutdown waited for a batch"
    );
    waiting.expect_closed();
    other.expect_closed();
    later.store.set_held(false);
    wait_until("the late batch is answered", || later.store.waiting() == 0);
    let left: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|n| n.starts_with("rg-r") && !n.starts_with("rg-r-answer"))
        .collect();
    assert!(left.is_empty(), "threads still running: {left:?}");
}
