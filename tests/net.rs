//! The TCP RPC layer (`raftkv::net`) on 127.0.0.1 with ephemeral ports: round trips,
//! pipelining on one connection, re-dial after a server restart, garbage and oversized frames,
//! timeouts, a full handler queue, and shutdown joining every thread.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam::channel;
use raftkv::net::{
    ClientEnd, ClientOptions, NetError, RemoteError, Server, ServerOptions, Service,
};

/// The threads of this process whose name starts with `prefix` (names are cut to 15 bytes).
fn threads_named(prefix: &str) -> Vec<String> {
    let mut names = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let comm = task.expect("task entry").path().join("comm");
        // A thread that exited between the listing and the read has no comm any more.
        if let Ok(name) = std::fs::read_to_string(comm) {
            let name = name.trim_end().to_string();
            if name.starts_with(prefix) {
                names.push(name);
            }
        }
    }
    names
}

/// Joined threads can linger in /proc for a moment after `join` returns.
fn assert_no_threads(prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = threads_named(prefix);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "threads still running: {left:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

fn services() -> Vec<Service> {
    vec![
        Service::new("Arith")
            .method("Neg", |x: i64| -x)
            .method("Concat", |(a, b): (String, String)| a + &b),
        Service::new("Echo").raw_method("Bytes", |body| body.to_vec()),
        Service::new("Slow").method("Sleep", |ms: u64| {
            thread::sleep(Duration::from_millis(ms));
            ms
        }),
    ]
}

fn server(name: &str, options: ServerOptions) -> Server {
    let server = Server::start(name, "127.0.0.1:0", options).expect("bind an ephemeral port");
    for service in services() {
        server.add_service(service);
    }
    server
}

/// Calls that must succeed get a long timeout: the machine may be heavily loaded. Tests of
/// timeouts set short ones on the calls that should time out.
const MUST_SUCCEED: Duration = Duration::from_secs(30);

fn end(name: &str, peer: SocketAddr) -> ClientEnd {
    ClientEnd::connect(
        name,
        peer,
        ClientOptions {
            call_timeout: MUST_SUCCEED,
            ..ClientOptions::default()
        },
    )
}

#[test]
fn round_trips_and_remote_errors() {
    let srv = server("rt-s", ServerOptions::default());
    let client = end("rt-c", srv.local_addr());
    assert_eq!(client.call::<i64, i64>("Arith.Neg", &7), Ok(-7));
    assert_eq!(
        client.call::<_, String>("Arith.Concat", &("ab".to_string(), "cd".to_string())),
        Ok("abcd".to_string())
    );
    let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let echoed: Vec<u8> = client.call("Echo.Bytes", &big).unwrap();
    assert_eq!(echoed, big);
    let remote = |r: Result<i64, NetError>| match r {
        Err(NetError::Remote { error, .. }) => error,
        other => panic!("want a remote error, got {other:?}"),
    };
    assert_eq!(
        remote(client.call("Nope.Neg", &1i64)),
        RemoteError::UnknownService("Nope".into())
    );
    assert_eq!(
        remote(client.call("Arith.Nope", &1i64)),
        RemoteError::UnknownMethod {
            service: "Arith".into(),
            method: "Nope".into()
        }
    );
    assert_eq!(
        remote(client.call("ArithNeg", &1i64)),
        RemoteError::BadMethodName("ArithNeg".into())
    );
    // A String where an i64 is expected: the handler is not run.
    assert!(matches!(
        remote(client.call("Arith.Neg", &"x".repeat(40))),
        RemoteError::BadArguments(_)
    ));
    assert_eq!(srv.connections(), 1);
    assert_eq!(srv.dispatched(), 7);
}

#[test]
fn call_async_reports_on_another_thread() {
    let srv = server("as-s", ServerOptions::default());
    let client = end("as-c", srv.local_addr());
    let (tx, rx) = channel::unbounded();
    let caller = thread::current().id();
    for x in 0..100i64 {
        let tx = tx.clone();
        client.call_async("Arith.Neg", &x, move |r: Result<i64, NetError>| {
            tx.send((x, r, thread::current().id() != caller)).unwrap();
        });
    }
    let mut seen = [false; 100];
    for _ in 0..100 {
        let (x, r, elsewhere) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(r, Ok(-x));
        assert!(elsewhere, "callback ran on the caller's thread");
        seen[x as usize] = true;
    }
    assert!(seen.iter().all(|&s| s));
    // An argument that cannot be encoded is reported the same way, never on the caller.
    let unencodable = std::iter::repeat_n(1u8, 3).filter(|_| true);
    struct Unsized<I>(std::cell::RefCell<Option<I>>);
    impl<I: Iterator<Item = u8>> serde::Serialize for Unsized<I> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(self.0.borrow_mut().take().unwrap())
        }
    }
    let args = Unsized(std::cell::RefCell::new(Some(unencodable)));
    let (tx, rx) = channel::unbounded();
    client.call_async("Echo.Bytes", &args, move |r: Result<Vec<u8>, NetError>| {
        tx.send((r, thread::current().id() != caller)).unwrap();
    });
    let (r, elsewhere) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(matches!(r, Err(NetError::Codec(_))), "{r:?}");
    assert!(elsewhere);
}

#[test]
fn calls_pipeline_on_one_connection() {
    // Every handler waits until all of them have started: only calls in flight together on
    // the one connection can get there.
    const CALLS: usize = 16;
    let srv = server(
        "pl-s",
        ServerOptions {
            handler_threads: CALLS,
            ..ServerOptions::default()
        },
    );
    let barrier = Arc::new(Barrier::new(CALLS));
    srv.add_service(Service::new("Meet").method("All", {
        let barrier = barrier.clone();
        move |x: u64| {
            barrier.wait();
            x * 2
        }
    }));
    let client = end("pl-c", srv.local_addr());
    let (tx, rx) = channel::unbounded();
    for x in 0..CALLS as u64 {
        let tx = tx.clone();
        client.call_async("Meet.All", &x, move |r: Result<u64, NetError>| {
            tx.send((x, r)).unwrap();
        });
    }
    for _ in 0..CALLS {
        let (x, r) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(r, Ok(x * 2));
    }
    assert_eq!(srv.connections(), 1);

    // Many blocking callers on clones of one end: replies find their callers by request id.
    let callers: Vec<_> = (0..8i64)
        .map(|t| {
            let client = client.clone();
            thread::spawn(move || {
                for k in 0..500i64 {
                    let x = t * 1000 + k;
                    assert_eq!(client.call::<i64, i64>("Arith.Neg", &x), Ok(-x));
                }
            })
        })
        .collect();
    for caller in callers {
        caller.join().expect("caller thread panicked");
    }
    assert_eq!(srv.connections(), 1);
}

#[test]
fn client_redials_a_restarted_server() {
    let srv = server("rd-s", ServerOptions::default());
    let addr = srv.local_addr();
    let client = ClientEnd::connect(
        "rd-c",
        addr,
        ClientOptions {
            call_timeout: MUST_SUCCEED,
            backoff_max: Duration::from_millis(100),
            ..ClientOptions::default()
        },
    );
    assert_eq!(client.call::<i64, i64>("Arith.Neg", &1), Ok(-1));
    srv.shutdown();
    // Down: the call fails (the connection broke, or nothing answers within the timeout).
    let down = client.call_timeout::<i64, i64>("Arith.Neg", &2, Duration::from_millis(300));
    assert!(
        matches!(
            down,
            Err(NetError::ConnectionLost { .. } | NetError::Timeout { .. })
        ),
        "{down:?}"
    );
    assert!(!client.is_connected());
    // A call made while the server is down waits for the re-dial, within its timeout.
    let waiting = {
        let client = client.clone();
        thread::spawn(move || client.call::<i64, i64>("Arith.Neg", &3))
    };
    thread::sleep(Duration::from_millis(200));
    let srv = Server::start("rd-s2", addr, ServerOptions::default()).expect("rebind the same port");
    for service in services() {
        srv.add_service(service);
    }
    assert_eq!(waiting.join().expect("waiting caller panicked"), Ok(-3));
    assert_eq!(client.call::<i64, i64>("Arith.Neg", &4), Ok(-4));
    assert!(client.is_connected());
}

#[test]
fn unreachable_server_times_out() {
    // A port that was just free: nothing listens there.
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let client = ClientEnd::connect(
        "ur-c",
        addr,
        ClientOptions {
            call_timeout: Duration::from_millis(200),
            ..ClientOptions::default()
        },
    );
    let start = Instant::now();
    let r = client.call::<i64, i64>("Arith.Neg", &1);
    let took = start.elapsed();
    assert!(matches!(r, Err(NetError::Timeout { .. })), "{r:?}");
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(10),
        "took {took:?}"
    );
}

#[test]
fn slow_handler_times_out_and_the_connection_survives() {
    let srv = server("to-s", ServerOptions::default());
    // The handler answers only when the test lets it: the reply cannot beat the timeout.
    let (release_tx, release_rx) = channel::unbounded::<()>();
    srv.add_service(Service::new("Gate").method("Wait", move |x: u64| {
        release_rx.recv().expect("the test releases the call");
        x
    }));
    let client = end("to-c", srv.local_addr());
    assert_eq!(client.call::<i64, i64>("Arith.Neg", &5), Ok(-5));
    let start = Instant::now();
    let r = client.call_timeout::<u64, u64>("Gate.Wait", &1, Duration::from_millis(100));
    let took = start.elapsed();
    match r {
        Err(NetError::Timeout { method, after, .. }) => {
            assert_eq!(method, "Gate.Wait");
            assert_eq!(after, Duration::from_millis(100));
        }
        other => panic!("want a timeout, got {other:?}"),
    }
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_secs(10),
        "took {took:?}"
    );
    assert_eq!(client.in_flight(), 0);
    // The late reply is dropped; the connection carries on.
    release_tx.send(()).unwrap();
    assert_eq!(client.call::<i64, i64>("Arith.Neg", &6), Ok(-6));
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv.dispatched() < 3 {
        assert!(Instant::now() < deadline, "the released call never ran");
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(client.call::<i64, i64>("Arith.Neg", &7), Ok(-7));
    assert_eq!(client.in_flight(), 0);
    assert_eq!(srv.connections(), 1);
}

/// Writes `bytes` on a fresh connection and waits for the server to close it.
fn server_closes_after(addr: SocketAddr, bytes: &[u8]) {
    let mut raw = TcpStream::connect(addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(bytes).unwrap();
    let mut buf = [0u8; 64];
    // Closed: end of stream (or a reset, if our bytes were still unread).
    match raw.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("want the connection closed, got {other:?}"),
    }
}

#[test]
fn garbage_and_oversized_frames_drop_the_connection_only() {
    let srv = server(
        "gb-s",
        ServerOptions {
            max_frame_bytes: 1 << 16,
            ..ServerOptions::default()
        },
    );
    let client = end("gb-c", srv.local_addr());
    assert_eq!(client.call::<i64, i64>("Arith.Neg", &1), Ok(-1));
    // A length prefix of almost 4 GiB: refused from the prefix, never allocated.
    server_closes_after(srv.local_addr(), &[0xff, 0xff, 0xff, 0xf0, 1, 2, 3]);
    // Just above the limit.
    server_closes_after(srv.local_addr(), &((1u32 << 16) + 1).to_be_bytes());
    // Bytes that are no frame.
    server_closes_after(srv.local_addr(), &[0, 0, 0, 4, 0xff, 0xfe, 0xfd, 0xfc]);
    // An HTTP request.
    server_closes_after(srv.local_addr(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    // A reply frame sent to a server.
    let reply = raftkv::net::wire::encode_reply(1, Ok(&[1, 2])).unwrap();
    server_closes_after(srv.local_addr(), &reply);
    // The server and the good client's connection are unharmed.
    assert_eq!(client.call::<i64, i64>("Arith.Neg", &2), Ok(-2));
    assert_eq!(srv.dispatched(), 2);

    // Within the client's limit but above the server's: the server drops the connection and
    // the call fails; the next call re-dials.
    let over_server = client.call::<_, Vec<u8>>("Echo.Bytes", &vec![7u8; (1 << 16) + 10]);
    assert!(
        matches!(over_server, Err(NetError::ConnectionLost { .. })),
        "{over_server:?}"
    );
    let almost = vec![7u8; (1 << 16) - 100];
    assert_eq!(client.call::<_, Vec<u8>>("Echo.Bytes", &almost), Ok(almost));
    // Above the client's own limit: refused here, never sent.
    let small_limit = ClientEnd::connect(
        "gb-c2",
        srv.local_addr(),
        ClientOptions {
            max_frame_bytes: 1 << 16,
            ..ClientOptions::default()
        },
    );
    match small_limit.call::<_, Vec<u8>>("Echo.Bytes", &vec![7u8; 1 << 17]) {
        Err(NetError::FrameTooLarge { max, .. }) => assert_eq!(max, 1 << 16),
        other => panic!("want FrameTooLarge, got {other:?}"),
    }
    assert_eq!(srv.dispatched(), 3);
}

#[test]
fn reply_above_the_frame_limit_is_an_error() {
    let srv = server(
        "rl-s",
        ServerOptions {
            max_frame_bytes: 1 << 12,
            ..ServerOptions::default()
        },
    );
    srv.add_service(Service::new("Big").method("Make", |n: usize| vec![1u8; n]));
    let client = end("rl-c", srv.local_addr());
    assert_eq!(
        client.call::<usize, Vec<u8>>("Big.Make", &100),
        Ok(vec![1u8; 100])
    );
    match client.call::<usize, Vec<u8>>("Big.Make", &10_000) {
        Err(NetError::Remote {
            error: RemoteError::ReplyTooLarge { max, .. },
            ..
        }) => assert_eq!(max, 1 << 12),
        other => panic!("want ReplyTooLarge, got {other:?}"),
    }
}

#[test]
fn full_handler_queue_refuses_calls() {
    let srv = server(
        "bz-s",
        ServerOptions {
            handler_threads: 1,
            handler_queue: 1,
            ..ServerOptions::default()
        },
    );
    let (release_tx, release_rx) = channel::unbounded::<()>();
    let started = Arc::new(AtomicUsize::new(0));
    srv.add_service(Service::new("Gate").method("Wait", {
        let started = started.clone();
        move |x: u64| {
            started.fetch_add(1, Ordering::SeqCst);
            release_rx.recv().expect("the test releases every call");
            x
        }
    }));
    let client = end("bz-c", srv.local_addr());
    let (tx, rx) = channel::unbounded();
    let send = |x: u64| {
        let tx = tx.clone();
        client.call_async("Gate.Wait", &x, move |r: Result<u64, NetError>| {
            tx.send(r).unwrap()
        });
    };
    // The first call occupies the only handler thread …
    send(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while started.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the first call never started");
        thread::sleep(Duration::from_millis(1));
    }
    // … one of the next two takes the only queue slot, the other is refused at once.
    send(1);
    send(2);
    let refused = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(refused.as_ref().is_err_and(|e| e.is_busy()), "{refused:?}");
    assert_eq!(srv.refused(), 1);
    release_tx.send(()).unwrap();
    release_tx.send(()).unwrap();
    let mut got: Vec<u64> = (0..2)
        .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap())
        .collect();
    got.sort_unstable();
    assert_eq!(got[0], 0);
    assert!(got[1] == 1 || got[1] == 2, "{got:?}");
    assert_eq!(started.load(Ordering::SeqCst), 2);
}

/// `inline_methods` run on the connection's reader thread, one after another in the order
/// they arrived; the other methods still go to the handler pool.
#[test]
fn inline_methods_run_on_the_connection_reader_in_order() {
    let srv = server(
        "il-s",
        ServerOptions {
            inline_methods: vec!["Where.Inline".to_string()],
            ..ServerOptions::default()
        },
    );
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let here = || thread::current().name().unwrap_or("").to_string();
    srv.add_service(
        Service::new("Where")
            .method("Inline", {
                let seen = seen.clone();
                move |x: u64| {
                    seen.lock().push(x);
                    here()
                }
            })
            .method("Pooled", move |_: u64| here()),
    );
    let client = end("il-c", srv.local_addr());
    let inline: String = client.call("Where.Inline", &u64::MAX).unwrap();
    assert!(
        inline.starts_with("il-s-c") && inline.ends_with("-r"),
        "inline call ran on {inline}"
    );
    let pooled: String = client.call("Where.Pooled", &0u64).unwrap();
    assert!(pooled.starts_with("il-s-h"), "pooled call ran on {pooled}");
    // Pipelined on one connection, they run in the order sent.
    const CALLS: u64 = 200;
    let (tx, rx) = channel::unbounded();
    for x in 0..CALLS {
        let tx = tx.clone();
        client.call_async("Where.Inline", &x, move |r: Result<String, NetError>| {
            tx.send(r).unwrap()
        });
    }
    for _ in 0..CALLS {
        let r = rx.recv_timeout(MUST_SUCCEED).expect("every call answered");
        assert!(r.is_ok(), "{r:?}");
    }
    let seen = seen.lock().clone();
    let expected: Vec<u64> = std::iter::once(u64::MAX).chain(0..CALLS).collect();
    assert_eq!(seen, expected, "inline calls ran out of order");
    assert_eq!(srv.dispatched(), 2 + CALLS as usize);
}

#[test]
fn handler_panic_is_an_error_reply() {
    let srv = server("pn-s", ServerOptions::default());
    srv.add_service(Service::new("Bad").method("Boom", |x: u64| -> u64 {
        if x == 13 {
            panic!("handler bug on purpose");
        }
        x
    }));
    let client = end("pn-c", srv.local_addr());
    match client.call::<u64, u64>("Bad.Boom", &13) {
        Err(NetError::Remote {
            error: RemoteError::HandlerPanicked,
            ..
        }) => {}
        other => panic!("want HandlerPanicked, got {other:?}"),
    }
    assert_eq!(client.call::<u64, u64>("Bad.Boom", &1), Ok(1));
}

#[test]
fn shutdown_joins_every_thread() {
    let srv = server(
        "sj-s",
        ServerOptions {
            handler_threads: 3,
            ..ServerOptions::default()
        },
    );
    let clients: Vec<ClientEnd> = (0..3)
        .map(|i| end(&format!("sj-c{i}"), srv.local_addr()))
        .collect();
    for client in &clients {
        assert_eq!(client.call::<i64, i64>("Arith.Neg", &1), Ok(-1));
    }
    // Server: accept + 3 handlers + 2 per connection; each end: dialer + 2.
    assert_eq!(threads_named("sj-s").len(), 1 + 3 + 2 * 3);
    assert_eq!(threads_named("sj-c").len(), 3 * 3);
    // A pending call when its end shuts down: its callback is dropped, not run.
    let (tx, rx) = channel::unbounded::<Result<u64, NetError>>();
    clients[0].call_async("Slow.Sleep", &300u64, move |r| tx.send(r).unwrap());
    let clone = clients[0].clone();
    clients[0].shutdown();
    drop(clients);
    assert_no_threads("sj-c");
    assert!(rx.recv().is_err(), "a callback ran after shutdown");
    // A clone left after shutdown fails at once.
    assert_eq!(
        clone.call::<i64, i64>("Arith.Neg", &1),
        Err(NetError::Shutdown)
    );
    drop(clone);
    srv.shutdown();
    assert_no_threads("sj-s");
}

#[test]
fn end_dropped_inside_its_own_callback() {
    let srv = server("dc-s", ServerOptions::default());
    let client = end("dc-c", srv.local_addr());
    let (tx, rx) = channel::unbounded();
    let holder = client.clone();
    // The reply comes after `client` is dropped: the callback owns the last clone and drops
    // it on the end's own reader thread.
    client.call_async("Slow.Sleep", &100u64, move |r: Result<u64, NetError>| {
        drop(holder);
        tx.send(r).unwrap();
    });
    drop(client);
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), Ok(100));
    assert_no_threads("dc-c");
}

/// Waits (boundedly) until the server closes `stream`; returns how long that took.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return start.elapsed(),
        }
        assert!(
            start.elapsed() < limit,
            "the server kept the connection for {limit:?}"
        );
    }
}

/// Authenticated peers (each holding the secret, each as another node) that begin frames
/// and stall: the one holding the most of the partial-frame budget is closed when another
/// needs room, a frame not complete within the partial-frame timeout closes its connection
/// (also when its bytes trickle in faster than the reader's wake-ups), the memory held for
/// partial frames stays under the budget and returns to zero, and the server still serves
/// a member that behaves.
#[test]
fn authenticated_peers_stalled_in_frames_are_closed_and_their_memory_bounded() {
    use raftkv::net::DialAuth;
    use raftkv::net::handshake::{self, PeerAuth};
    const MIB: usize = 1 << 20;
    let secret = b"net test secret of the cluster!!";
    let auth = |id| PeerAuth::new(secret, b"net-test", id, 5).expect("auth");
    let timeout = Duration::from_secs(2);
    let budget = 8 * MIB;
    let server = server(
        "partial",
        ServerOptions {
            auth: Some(auth(1)),
            partial_frame_timeout: timeout,
            max_partial_bytes: budget,
            ..ServerOptions::default()
        },
    );
    let member = |id: u64| {
        let mut s = TcpStream::connect(server.local_addr()).expect("connect");
        handshake::dial(&mut s, &auth(id), 1, Instant::now() + MUST_SUCCEED)
            .expect("the secret passes the handshake");
        s
    };
    let held_at_least = |bytes: usize| {
        let deadline = Instant::now() + MUST_SUCCEED;
        while server.partial_frame_bytes() < bytes {
            assert!(
                Instant::now() < deadline,
                "the server never held {bytes} bytes"
            );
            thread::sleep(Duration::from_millis(10));
        }
    };
    // Node 2 claims a 40 MiB frame (within the 64 MiB frame limit), sends 5 MiB, stalls.
    let mut two = member(2);
    two.write_all(&(40 * MIB as u32).to_be_bytes()).unwrap();
    two.write_all(&vec![7u8; 5 * MIB]).unwrap();
    held_at_least(5 * MIB);
    // Node 3 sends 3 MiB of its own large frame: past the budget, so node 2, holding the
    // most, is closed to make room.
    let mut three = member(3);
    three.write_all(&(40 * MIB as u32).to_be_bytes()).unwrap();
    three.write_all(&vec![7u8; 3 * MIB]).unwrap();
    closed_within(&mut two, MUST_SUCCEED);
    held_at_least(3 * MIB);
    assert!(server.partial_frame_bytes() <= budget);
    // Node 3 stalls: closed once its frame has taken the partial-frame timeout.
    let stalled = closed_within(&mut three, MUST_SUCCEED);
    println!("a member stalled 3 MiB into a frame was closed after {stalled:?} more");
    // Node 4 trickles a frame a byte every 100 ms (more often than the reader wakes): closed
    // all the same, about the timeout after its first byte.
    let mut four = member(4);
    let started = Instant::now();
    four.write_all(&1000u32.to_be_bytes()).unwrap();
    let closed = loop {
        thread::sleep(Duration::from_millis(100));
        if four.write_all(&[7]).is_err() {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < MUST_SUCCEED,
            "a trickling member was kept for {MUST_SUCCEED:?}"
        );
    };
    assert!(
        closed >= timeout,
        "a frame was cut after {closed:?}, before its {timeout:?}"
    );
    let deadline = Instant::now() + MUST_SUCCEED;
    while server.partial_frame_bytes() != 0 {
        assert!(
            Instant::now() < deadline,
            "partial-frame memory not returned"
        );
        thread::sleep(Duration::from_millis(10));
    }
    // A member that sends whole frames is served.
    let good = ClientEnd::connect(
        "partial-good",
        server.local_addr(),
        ClientOptions {
            call_timeout: MUST_SUCCEED,
            auth: Some(DialAuth {
                local: auth(5),
                remote_node: 1,
            }),
            ..ClientOptions::default()
        },
    );
    let neg: i64 = good.call("Arith.Neg", &7i64).expect("a call from a member");
    assert_eq!(neg, -7);
}

/// The body of call `k` of sender `t`: its tag, then `len` bytes that depend on both, so a
/// frame cut or mixed with another's fails the check.
fn tagged_body(t: u64, k: u64, len: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(16 + len);
    body.extend_from_slice(&t.to_be_bytes());
    body.extend_from_slice(&k.to_be_bytes());
    body.extend((0..len).map(|i| (i as u64 ^ t.wrapping_mul(31) ^ k.wrapping_mul(7)) as u8));
    body
}

fn check_tagged_body(body: &[u8]) -> (u64, u64) {
    assert!(body.len() >= 16, "a body of {} bytes", body.len());
    let t = u64::from_be_bytes(body[..8].try_into().unwrap());
    let k = u64::from_be_bytes(body[8..16].try_into().unwrap());
    assert_eq!(
        body,
        tagged_body(t, k, body.len() - 16),
        "body of sender {t} call {k}"
    );
    (t, k)
}

/// Sizes from one byte to past a socket's buffer, so some frames go whole, some in part.
fn body_len(t: u64, k: u64) -> usize {
    [1, 700, 9_000, 70_000, 300_000][((t + k) % 5) as usize]
}

/// A sender that finds the socket idle writes its frame itself, without blocking; what the
/// socket does not take goes to the writer thread ahead of what is queued. Several senders at
/// once, to a peer that reads nothing for a while: no sender blocks, and every frame arrives
/// whole, each sender's in the order it sent them.
#[test]
fn frames_from_many_senders_reach_a_slow_reader_whole_and_in_order() {
    const SENDERS: u64 = 6;
    const CALLS: u64 = 25;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = end("sr-c", listener.local_addr().unwrap());
    let (mut peer, _) = listener.accept().unwrap();
    let mut slowest = Duration::ZERO;
    let senders: Vec<_> = (0..SENDERS)
        .map(|t| {
            let client = client.clone();
            thread::spawn(move || {
                let mut slowest = Duration::ZERO;
                for k in 0..CALLS {
                    let body = tagged_body(t, k, body_len(t, k));
                    let started = Instant::now();
                    client.call_bytes("Echo.Bytes", body, MUST_SUCCEED, |_| {});
                    slowest = slowest.max(started.elapsed());
                }
                slowest
            })
        })
        .collect();
    for sender in senders {
        slowest = slowest.max(sender.join().expect("sender panicked"));
    }
    // Nothing has been read: a sender that waited for the socket would still be waiting.
    thread::sleep(Duration::from_millis(300));
    assert!(
        slowest < Duration::from_secs(2),
        "a send took {slowest:?} while the peer read nothing"
    );
    peer.set_read_timeout(Some(MUST_SUCCEED)).unwrap();
    let mut next = vec![0u64; SENDERS as usize];
    for _ in 0..SENDERS * CALLS {
        let frame = raftkv::net::wire::read_frame(&mut peer, 1 << 20).expect("a whole frame");
        let raftkv::net::wire::Frame::Request { method, body, .. } = frame else {
            panic!("a reply from the client: {frame:?}");
        };
        assert_eq!(method, "Echo.Bytes");
        let (t, k) = check_tagged_body(&body);
        assert_eq!(k, next[t as usize], "sender {t}'s calls out of order");
        next[t as usize] += 1;
    }
    assert_eq!(next, vec![CALLS; SENDERS as usize]);

    // Again with the peer reading meanwhile, in small pieces with pauses: the socket fills
    // and drains while the senders send, so a sender finds it idle while another's frame is
    // half written or queued.
    let reader = thread::spawn(move || {
        let mut slow = std::io::BufReader::with_capacity(4096, SlowRead(peer));
        let mut next = vec![CALLS; SENDERS as usize];
        for _ in 0..SENDERS * CALLS {
            let frame = raftkv::net::wire::read_frame(&mut slow, 1 << 20).expect("a whole frame");
            let raftkv::net::wire::Frame::Request { body, .. } = frame else {
                panic!("a reply from the client: {frame:?}");
            };
            let (t, k) = check_tagged_body(&body);
            assert_eq!(k, next[t as usize], "sender {t}'s calls out of order");
            next[t as usize] += 1;
        }
        next
    });
    let senders: Vec<_> = (0..SENDERS)
        .map(|t| {
            let client = client.clone();
            thread::spawn(move || {
                for k in CALLS..2 * CALLS {
                    let body = tagged_body(t, k, body_len(t, k));
                    client.call_bytes("Echo.Bytes", body, MUST_SUCCEED, |_| {});
                    thread::sleep(Duration::from_micros(200 * (t + 1)));
                }
            })
        })
        .collect();
    for sender in senders {
        sender.join().expect("sender panicked");
    }
    let next = reader
        .join()
        .expect("the reader found a frame cut, mixed or out of order");
    assert_eq!(next, vec![2 * CALLS; SENDERS as usize]);
    client.shutdown();
}

/// A socket read a few KiB at a time, with a pause after each read.
struct SlowRead(TcpStream);

impl Read for SlowRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        thread::sleep(Duration::from_micros(300));
        let n = buf.len().min(8192);
        self.0.read(&mut buf[..n])
    }
}

/// The same on the server's side: handler threads answering at once through one connection
/// whose client reads nothing for a while, then every reply arrives whole, with its call's
/// id.
#[test]
fn replies_from_many_handlers_reach_a_slow_client_whole() {
    const CALLS: u64 = 120;
    let srv = server(
        "sw-s",
        ServerOptions {
            handler_threads: 8,
            ..ServerOptions::default()
        },
    );
    let mut conn = TcpStream::connect(srv.local_addr()).unwrap();
    for id in 0..CALLS {
        let body = tagged_body(id % 8, id, body_len(id % 8, id));
        let frame = raftkv::net::wire::encode_request(id, "Echo.Bytes", &body).unwrap();
        conn.write_all(&frame).unwrap();
    }
    // The handlers answer into a socket nobody reads yet.
    thread::sleep(Duration::from_millis(500));
    conn.set_read_timeout(Some(MUST_SUCCEED)).unwrap();
    let mut seen = vec![false; CALLS as usize];
    for _ in 0..CALLS {
        let frame = raftkv::net::wire::read_frame(&mut conn, 1 << 20).expect("a whole frame");
        let raftkv::net::wire::Frame::Reply { id, result } = frame else {
            panic!("a request from the server: {frame:?}");
        };
        let body = result.expect("echoed");
        let (_, k) = check_tagged_body(&body);
        assert_eq!(k, id, "the reply to call {id} carries call {k}'s body");
        assert!(
            !std::mem::replace(&mut seen[id as usize], true),
            "call {id} answered twice"
        );
    }
    assert!(seen.iter().all(|&s| s));
}

/// Voluntary context switches of this process's thread named `name` (cut to 15 bytes).
fn thread_switches(name: &str) -> u64 {
    let name = &name[..name.len().min(15)];
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let dir = task.expect("task entry").path();
        if std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim_end() == name) {
            let status = std::fs::read_to_string(dir.join("status")).expect("status");
            let line = status
                .lines()
                .find(|l| l.starts_with("voluntary_ctxt_switches"))
                .expect("voluntary_ctxt_switches");
            return line.split_whitespace().nth(1).unwrap().parse().unwrap();
        }
    }
    panic!("no thread named {name}");
}

/// The end's manager thread wakes for a call's deadline only if the call is still pending
/// then: answered calls cost it nothing (it used to wake once for each call made).
#[test]
fn answered_calls_do_not_wake_the_manager() {
    const CALLS: u64 = 1000;
    let srv = server("mw-s", ServerOptions::default());
    // A short timeout, so every call's deadline passes during the test.
    let client = ClientEnd::connect(
        "mw-c",
        srv.local_addr(),
        ClientOptions {
            call_timeout: Duration::from_millis(500),
            ..ClientOptions::default()
        },
    );
    let r = client.call_timeout::<i64, i64>("Arith.Neg", &1, MUST_SUCCEED);
    assert_eq!(r, Ok(-1));
    let before = thread_switches("mw-c-dial");
    let (tx, rx) = channel::unbounded();
    for x in 0..CALLS as i64 {
        let tx = tx.clone();
        client.call_async("Arith.Neg", &x, move |r: Result<i64, NetError>| {
            tx.send(r).unwrap()
        });
        if x % 10 == 0 {
            thread::sleep(Duration::from_millis(2));
        }
    }
    for _ in 0..CALLS {
        let r = rx.recv_timeout(MUST_SUCCEED).expect("every call answered");
        assert!(r.is_ok(), "{r:?}");
    }
    // Past every deadline.
    thread::sleep(Duration::from_millis(800));
    let woke = thread_switches("mw-c-dial") - before;
    assert!(
        woke < CALLS / 10,
        "the manager woke {woke} times for {CALLS} answered calls"
    );
}
