//! The Go labs' `labrpc/test_test.go`, ported: same scenarios, constants and bounds, plus
//! tests of the typed errors that replace Go's `log.Fatalf`.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam::channel;
use parking_lot::Mutex;
use raftkv::labcodec;
use raftkv::labrpc::{Network, RpcError, Server, Service};
use raftkv::tester::join_helper;
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct JunkArgs {
    x: i64,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct JunkReply {
    x: String,
}

/// The Go tests' `JunkServer`: what Handler1 and Handler2 were called with.
#[derive(Default)]
struct JunkServer {
    log1: Mutex<Vec<String>>,
    log2: Mutex<Vec<i64>>,
    /// Held by Handler3 while it sleeps, as the Go handler holds `js.mu`.
    busy: Mutex<()>,
}

/// How long Handler3 sleeps.
const HANDLER3_SLEEP: Duration = Duration::from_secs(20);

fn junk_service(js: &Arc<JunkServer>) -> Service {
    let (j1, j2, j3) = (js.clone(), js.clone(), js.clone());
    Service::new("JunkServer")
        .method("Handler1", move |args: String| -> i64 {
            j1.log1.lock().push(args.clone());
            args.parse().unwrap_or(0)
        })
        .method("Handler2", move |args: i64| -> String {
            j2.log2.lock().push(args);
            format!("handler2-{args}")
        })
        .method("Handler3", move |args: i64| -> i64 {
            let _busy = j3.busy.lock();
            thread::sleep(HANDLER3_SLEEP);
            -args
        })
        .method("Handler4", |_args: JunkArgs| JunkReply {
            x: "pointer".to_string(),
        })
        .method("Handler5", |_args: JunkArgs| JunkReply {
            x: "no pointer".to_string(),
        })
        .method("Handler6", |args: String| -> i64 { args.len() as i64 })
        .method("Handler7", |args: i64| -> String {
            "y".repeat(args as usize)
        })
}

/// A network that is cleaned up when the test ends, like Go's `defer rn.Cleanup()`.
struct Net(Network);

impl Drop for Net {
    fn drop(&mut self) {
        self.0.cleanup();
    }
}

impl std::ops::Deref for Net {
    type Target = Network;
    fn deref(&self) -> &Network {
        &self.0
    }
}

/// A network with a `JunkServer` service on server `server`.
fn junk_network(server: &str) -> (Net, Arc<JunkServer>) {
    let net = Net(Network::new());
    let js = Arc::new(JunkServer::default());
    let mut rs = Server::new();
    rs.add_service(junk_service(&js));
    net.add_server(server, rs);
    (net, js)
}

/// `junk_network("server99")` plus the enabled end `end1-99` connected to it.
fn basic_setup() -> (Net, Arc<JunkServer>, raftkv::labrpc::ClientEnd) {
    let (net, js) = junk_network("server99");
    let e = net.make_end("end1-99").expect("fresh end name");
    net.connect("end1-99", "server99");
    net.enable("end1-99", true);
    (net, js, e)
}

#[test]
fn basic() {
    let (_net, _js, e) = basic_setup();
    let reply: String = e.call("JunkServer.Handler2", &111i64).unwrap();
    assert_eq!(reply, "handler2-111", "wrong reply from Handler2");
    let reply: i64 = e.call("JunkServer.Handler1", &"9099".to_string()).unwrap();
    assert_eq!(reply, 9099, "wrong reply from Handler1");
}

/// Go's pointer/value distinction has no Rust counterpart: a struct argument reaches the
/// handler, and an argument of the wrong type is a codec error, not a crash.
#[test]
fn types() {
    let (_net, _js, e) = basic_setup();
    let reply: JunkReply = e.call("JunkServer.Handler4", &JunkArgs::default()).unwrap();
    assert_eq!(reply.x, "pointer", "wrong reply from Handler4");
    let reply: JunkReply = e.call("JunkServer.Handler5", &JunkArgs { x: 7 }).unwrap();
    assert_eq!(reply.x, "no pointer", "wrong reply from Handler5");

    // A String where Handler4 wants a JunkArgs: decoded on the server, leaves trailing bytes.
    let wrong: Result<JunkReply, RpcError> =
        e.call("JunkServer.Handler4", &"not a JunkArgs".to_string());
    assert!(
        matches!(wrong, Err(RpcError::Codec(_))),
        "wrong argument type gave {wrong:?}"
    );
}

#[test]
fn unknown_service_method_and_bad_name_are_errors() {
    let (_net, _js, e) = basic_setup();
    let r: Result<i64, RpcError> = e.call("NoSuchServer.Handler1", &"1".to_string());
    assert_eq!(
        r,
        Err(RpcError::UnknownService {
            service: "NoSuchServer".to_string()
        })
    );
    let r: Result<i64, RpcError> = e.call("JunkServer.Handler99", &"1".to_string());
    assert_eq!(
        r,
        Err(RpcError::UnknownMethod {
            service: "JunkServer".to_string(),
            method: "Handler99".to_string()
        })
    );
    let r: Result<i64, RpcError> = e.call("Handler1", &"1".to_string());
    assert_eq!(r, Err(RpcError::BadMethodName("Handler1".to_string())));
    // The network still works afterwards.
    let ok: i64 = e.call("JunkServer.Handler1", &"5".to_string()).unwrap();
    assert_eq!(ok, 5);
}

#[test]
fn reply_type_mismatch_is_an_error() {
    let (_net, _js, e) = basic_setup();
    // Handler2 replies with a String; an i64 decodes from its length and leaves the rest.
    let r: Result<i64, RpcError> = e.call("JunkServer.Handler2", &111i64);
    assert!(matches!(r, Err(RpcError::Codec(_))), "got {r:?}");
    // Handler1 replies with an i64; a Vec<u64> would claim 9099 elements it does not have.
    let r: Result<Vec<u64>, RpcError> = e.call("JunkServer.Handler1", &"9099".to_string());
    assert!(matches!(r, Err(RpcError::Codec(_))), "got {r:?}");
}

/// Does `enable(end, false)` really disconnect a client?
#[test]
fn disconnect() {
    let (net, _js) = junk_network("server99");
    let e = net.make_end("end1-99").unwrap();
    net.connect("end1-99", "server99");

    let r: Result<String, RpcError> = e.call("JunkServer.Handler2", &111i64);
    assert_eq!(r, Err(RpcError::NoReply), "unexpected reply from Handler2");

    net.enable("end1-99", true);
    let reply: i64 = e.call("JunkServer.Handler1", &"9099".to_string()).unwrap();
    assert_eq!(reply, 9099, "wrong reply from Handler1");
}

/// `Network::count`.
#[test]
fn counts() {
    let (net, _js) = junk_network("99");
    let e = net.make_end("end1-99").unwrap();
    net.connect("end1-99", "99");
    net.enable("end1-99", true);
    for i in 0..17i64 {
        let reply: String = e.call("JunkServer.Handler2", &i).unwrap();
        assert_eq!(reply, format!("handler2-{i}"), "wrong reply from Handler2");
    }
    assert_eq!(net.count("99"), 17, "wrong count");
}

/// `Network::total_bytes`. The Go bounds were set for gob; our varint bincode gives:
/// * Handler6 request: a 284-char String = 3-byte length (284 >= 251: marker 0xFB + u16) + 284
///   = 287 bytes; reply: the i64 284, zigzag 568, also >= 251, so 3 bytes. 17 x 290 = 4930.
/// * Handler7 request: the i64 107, zigzag 214 < 251, 1 byte; reply: 107 'y's = 1-byte
///   length + 107 = 108 bytes. 17 x 109 = 1853.
#[test]
fn bytes() {
    let (net, _js) = junk_network("99");
    let e = net.make_end("end1-99").unwrap();
    net.connect("end1-99", "99");
    net.enable("end1-99", true);

    let args = "x".repeat(71).repeat(4);
    assert_eq!(args.len(), 284);
    assert_eq!(labcodec::encode(&args).unwrap().len(), 287);
    assert_eq!(labcodec::encode(&284i64).unwrap().len(), 3);
    for _ in 0..17 {
        let reply: i64 = e.call("JunkServer.Handler6", &args).unwrap();
        assert_eq!(reply, args.len() as i64, "wrong reply from Handler6");
    }
    let n = net.total_bytes();
    assert!(
        (4828..=6000).contains(&n),
        "total bytes {n}, expected about 5000"
    );
    assert_eq!(n, 17 * (287 + 3));

    for _ in 0..17 {
        let reply: String = e.call("JunkServer.Handler7", &107i64).unwrap();
        assert_eq!(reply.len(), 107, "wrong reply length from Handler7");
    }
    let nn = net.total_bytes() - n;
    assert!(
        (1800..=2500).contains(&nn),
        "bytes {nn}, expected about 2000"
    );
    assert_eq!(nn, 17 * (1 + 108));
}

/// RPCs from concurrent client ends.
#[test]
fn concurrent_many() {
    let (net, _js) = junk_network("1000");
    let nclients = 20;
    let nrpcs = 10;
    let (tx, rx) = channel::unbounded();
    let mut helpers = Vec::new();
    for i in 0..nclients {
        let net = net.0.clone();
        let tx = tx.clone();
        helpers.push(thread::spawn(move || {
            let mut n = 0;
            let name = i.to_string();
            let e = net.make_end(&name).unwrap();
            net.connect(&name, "1000");
            net.enable(&name, true);
            for j in 0..nrpcs {
                let arg = (i * 100 + j) as i64;
                match e.call::<_, String>("JunkServer.Handler2", &arg) {
                    Ok(reply) if reply == format!("handler2-{arg}") => n += 1,
                    other => panic!("wrong reply {other:?} from Handler2 for {arg}"),
                }
            }
            tx.send(n).unwrap();
        }));
    }
    drop(tx);
    let total: usize = rx.iter().sum();
    helpers.into_iter().for_each(join_helper);
    assert_eq!(total, nclients * nrpcs, "wrong number of RPCs completed");
    assert_eq!(net.count("1000"), total, "wrong count");
}

#[test]
fn unreliable() {
    let (net, _js) = junk_network("1000");
    net.set_reliable(false);
    let nclients = 300;
    let (tx, rx) = channel::unbounded();
    let mut helpers = Vec::new();
    for i in 0..nclients {
        let net = net.0.clone();
        let tx = tx.clone();
        helpers.push(thread::spawn(move || {
            let name = i.to_string();
            let e = net.make_end(&name).unwrap();
            net.connect(&name, "1000");
            net.enable(&name, true);
            let arg = (i * 100) as i64;
            let n = match e.call::<_, String>("JunkServer.Handler2", &arg) {
                Ok(reply) => {
                    assert_eq!(reply, format!("handler2-{arg}"), "wrong reply");
                    1
                }
                Err(RpcError::NoReply) => 0,
                Err(other) => panic!("unexpected error {other}"),
            };
            tx.send(n).unwrap();
        }));
    }
    drop(tx);
    let results: Vec<usize> = rx.iter().collect();
    helpers.into_iter().for_each(join_helper);
    assert_eq!(results.len(), nclients, "a client thread died");
    let total: usize = results.iter().sum();
    assert!(
        total != nclients && total != 0,
        "{total} of {nclients} RPCs succeeded despite unreliable"
    );
}

/// Concurrent RPCs from a single client end.
#[test]
fn concurrent_one() {
    let (net, js) = junk_network("1000");
    let e = net.make_end("c").unwrap();
    net.connect("c", "1000");
    net.enable("c", true);
    let nrpcs = 20;
    let (tx, rx) = channel::unbounded();
    let mut helpers = Vec::new();
    for i in 0..nrpcs {
        let e = e.clone();
        let tx = tx.clone();
        helpers.push(thread::spawn(move || {
            let arg = 100 + i as i64;
            let reply: String = e.call("JunkServer.Handler2", &arg).unwrap();
            assert_eq!(
                reply,
                format!("handler2-{arg}"),
                "wrong reply from Handler2"
            );
            tx.send(1).unwrap();
        }));
    }
    drop(tx);
    let total: usize = rx.iter().sum();
    helpers.into_iter().for_each(join_helper);
    assert_eq!(total, nrpcs, "wrong number of RPCs completed");
    assert_eq!(
        js.log2.lock().len(),
        nrpcs,
        "wrong number of RPCs delivered"
    );
    assert_eq!(net.count("1000"), total, "wrong count");
}

/// Regression: an RPC delayed while its end was disabled must not delay later RPCs
/// (after the end is enabled again).
#[test]
fn regression1() {
    let (net, js) = junk_network("1000");
    let e = net.make_end("c").unwrap();
    net.connect("c", "1000");

    // Some RPCs while the end is disabled: they are delayed, then fail.
    net.enable("c", false);
    let nrpcs = 20;
    let (tx, rx) = channel::unbounded();
    let mut helpers = Vec::new();
    for i in 0..nrpcs {
        let e = e.clone();
        let tx = tx.clone();
        helpers.push(thread::spawn(move || {
            let r: Result<String, RpcError> = e.call("JunkServer.Handler2", &(100 + i as i64));
            tx.send(r).unwrap();
        }));
    }
    drop(tx);

    thread::sleep(Duration::from_millis(100));

    // Now enable the end: an RPC must complete quickly.
    let t0 = Instant::now();
    net.enable("c", true);
    let reply: String = e.call("JunkServer.Handler2", &99i64).unwrap();
    assert_eq!(reply, "handler2-99", "wrong reply from Handler2");
    let dur = t0.elapsed();
    assert!(
        dur <= Duration::from_millis(30),
        "RPC took too long ({dur:?}) after enable"
    );

    let results: Vec<_> = rx.iter().collect();
    helpers.into_iter().for_each(join_helper);
    assert_eq!(results.len(), nrpcs);
    assert_eq!(js.log2.lock().len(), 1, "wrong number of RPCs delivered");
    assert_eq!(net.count("1000"), 1, "wrong count");
}

/// If an RPC is stuck in a server and the server is deleted, does the RPC get unstuck?
#[test]
fn killed() {
    let (net, _js, e) = basic_setup();
    let (done_tx, done_rx) = channel::bounded(1);
    thread::spawn(move || {
        let r: Result<i64, RpcError> = e.call("JunkServer.Handler3", &99i64);
        let _ = done_tx.send(r);
    });

    thread::sleep(Duration::from_millis(1000));
    // As the Go test: 1 s, then another 100 ms in which the call must still be pending.
    if let Ok(r) = done_rx.recv_timeout(Duration::from_millis(100)) {
        panic!("Handler3 should not have returned yet, got {r:?}");
    }

    net.delete_server("server99");

    match done_rx.recv_timeout(Duration::from_millis(100)) {
        Ok(r) => assert_eq!(
            r,
            Err(RpcError::NoReply),
            "Handler3 returned successfully despite delete_server"
        ),
        Err(_) => panic!("Handler3 should return after delete_server"),
    }
}

/// 100000 sequential RPCs; prints the time per RPC (Go, March 2016: 22 µs per RPC).
#[test]
fn benchmark() {
    let (_net, _js, e) = basic_setup();
    let n = 100_000;
    let t0 = Instant::now();
    for _ in 0..n {
        let reply: String = e.call("JunkServer.Handler2", &111i64).unwrap();
        assert_eq!(reply, "handler2-111", "wrong reply from Handler2");
    }
    let elapsed = t0.elapsed();
    println!(
        "{elapsed:?} for {n} RPCs, {:.2} µs per RPC",
        elapsed.as_secs_f64() * 1e6 / n as f64
    );
}

/// Regression (Go: a data race): toggling long delays while a call to a deleted server is
/// being delayed.
#[test]
fn long_delay_race() {
    let (net, _js, e) = basic_setup();
    let _: Result<i64, RpcError> = e.call("JunkServer.Handler1", &"9099".to_string());

    net.set_long_delays(true);
    net.delete_server("server99");

    let (done_tx, done_rx) = channel::bounded(1);
    thread::spawn(move || {
        let r: Result<i64, RpcError> = e.call("JunkServer.Handler1", &"9099".to_string());
        let _ = done_tx.send(r);
    });

    net.set_long_delays(true);
    if let Ok(r) = done_rx.recv_timeout(Duration::from_millis(200)) {
        assert_eq!(
            r,
            Err(RpcError::NoReply),
            "call to a deleted server succeeded"
        );
    }
    net.set_long_delays(true);
}

/// After cleanup, pending and new calls fail promptly and the handler threads go away once
/// their handlers return.
#[test]
fn cleanup_stops_calls_and_handler_threads() {
    let net = Network::new();
    let mut rs = Server::new();
    rs.add_service(Service::new("Slow").method("Sleep", |ms: u64| -> u64 {
        thread::sleep(Duration::from_millis(ms));
        ms
    }));
    net.add_server("slow", rs);
    let e = net.make_end("e").unwrap();
    net.connect("e", "slow");
    net.enable("e", true);

    let ok: u64 = e.call("Slow.Sleep", &0u64).unwrap();
    assert_eq!(ok, 0);
    assert!(net.handler_threads() >= 1);

    let pending = {
        let e = e.clone();
        thread::spawn(move || {
            let t0 = Instant::now();
            let r: Result<u64, RpcError> = e.call("Slow.Sleep", &500u64);
            (r, t0.elapsed())
        })
    };
    thread::sleep(Duration::from_millis(50));
    let t_cleanup = Instant::now();
    net.cleanup();

    let t0 = Instant::now();
    let r: Result<u64, RpcError> = e.call("Slow.Sleep", &0u64);
    assert_eq!(r, Err(RpcError::NoReply), "call after cleanup");
    assert!(
        t0.elapsed() < Duration::from_millis(50),
        "call after cleanup took {:?}",
        t0.elapsed()
    );

    let (r, _) = pending.join().unwrap();
    assert_eq!(r, Err(RpcError::NoReply), "call pending at cleanup");
    // The pending call notices cleanup at its next 100 ms check, before its handler returns.
    assert!(
        t_cleanup.elapsed() < Duration::from_millis(400),
        "call pending at cleanup took {:?} to fail",
        t_cleanup.elapsed()
    );

    // The slow handler returns ~450 ms after cleanup; then its thread must exit.
    let deadline = Instant::now() + Duration::from_secs(3);
    while net.handler_threads() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} handler threads still alive 3 s after cleanup",
            net.handler_threads()
        );
        thread::sleep(Duration::from_millis(20));
    }
}
