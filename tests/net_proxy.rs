//! The fault-injecting proxy (`raftkv::net::proxy`) between a `net::ClientEnd` and a
//! `net::Server` on 127.0.0.1: forwarding, cut, blackhole, heal, delay, and shutdown.

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam::channel;
use raftkv::net::proxy::{LinkMode, Proxy};
use raftkv::net::{ClientEnd, ClientOptions, NetError, Server, ServerOptions, Service};

fn server(name: &str) -> Server {
    let server = Server::start(name, "127.0.0.1:0", ServerOptions::default()).unwrap();
    server.add_service(Service::new("Arith").method("Neg", |x: i64| -x).method(
        "Sleep",
        |ms: u64| {
            thread::sleep(Duration::from_millis(ms));
            ms
        },
    ));
    server
}

/// Calls that must succeed get a long timeout (the machine may be heavily loaded); calls
/// expected to fail get `SHORT`.
const MUST_SUCCEED: Duration = Duration::from_secs(30);
const SHORT: Duration = Duration::from_millis(300);

fn end(name: &str, peer: SocketAddr) -> ClientEnd {
    ClientEnd::connect(
        name,
        peer,
        ClientOptions {
            call_timeout: MUST_SUCCEED,
            backoff_max: Duration::from_millis(50),
            ..ClientOptions::default()
        },
    )
}

/// Calls until one succeeds (the end re-dials after a heal), at most 20 s.
fn eventually_neg(client: &ClientEnd, x: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.call_timeout::<i64, i64>("Arith.Neg", &x, SHORT) {
            Ok(reply) => {
                assert_eq!(reply, -x);
                return;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "no reply 20 s after healing: {e}"
            ),
        }
    }
}

fn threads_named(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_string())
        .filter(|name| name.starts_with(prefix))
        .collect()
}

#[test]
fn forwards_calls() {
    let srv = server("pf-s");
    let proxy = Proxy::start("pf-p", "127.0.0.1:0", srv.local_addr()).unwrap();
    let client = end("pf-c", proxy.local_addr());
    for x in 0..50 {
        assert_eq!(client.call::<i64, i64>("Arith.Neg", &x), Ok(-x));
    }
    assert_eq!(proxy.mode(), LinkMode::Forward);
    assert_eq!(proxy.connections(), 1);
    assert_eq!(proxy.accepted(), 1);
    assert!(proxy.bytes_forwarded() > 0);
    assert_eq!(proxy.bytes_dropped(), 0);
    assert_eq!(srv.connections(), 1);
}

#[test]
fn cut_drops_connections_and_refuses_new_ones_until_healed() {
    let srv = server("pc-s");
    let proxy = Proxy::start("pc-p", "127.0.0.1:0", srv.local_addr()).unwrap();
    let client = end("pc-c", proxy.local_addr());
    assert_eq!(client.call::<i64, i64>("Arith.Neg", &1), Ok(-1));
    // A call in flight when the link is cut fails at once, not at its timeout.
    let (tx, rx) = channel::unbounded();
    client.call_bytes(
        "Arith.Sleep",
        raftkv::labcodec::encode(&2000u64).unwrap(),
        Duration::from_secs(10),
        move |r| tx.send(r).unwrap(),
    );
    thread::sleep(Duration::from_millis(100));
    let cut_at = Instant::now();
    proxy.cut();
    let in_flight = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(
        matches!(in_flight, Err(NetError::ConnectionLost { .. })),
        "{in_flight:?}"
    );
    // Its timeout is 10 s: failing well before means the cut was noticed.
    assert!(cut_at.elapsed() < Duration::from_secs(5));
    // While cut: every dial is closed on accept; calls time out.
    for x in 0..3 {
        let r = client.call_timeout::<i64, i64>("Arith.Neg", &x, SHORT);
        assert!(
            matches!(
                r,
                Err(NetError::Timeout { .. } | NetError::ConnectionLost { .. })
            ),
            "{r:?}"
        );
    }
    assert!(proxy.refused() > 0);
    assert_eq!(proxy.connections(), 0);
    proxy.heal();
    eventually_neg(&client, 7);
    assert_eq!(proxy.connections(), 1);
}

#[test]
fn blackhole_times_calls_out_and_heal_starts_a_clean_connection() {
    let srv = server("pb-s");
    let proxy = Proxy::start("pb-p", "127.0.0.1:0", srv.local_addr()).unwrap();
    let client = end("pb-c", proxy.local_addr());
    assert_eq!(client.call::<i64, i64>("Arith.Neg", &1), Ok(-1));
    let dispatched = srv.dispatched();
    proxy.blackhole();
    for x in 0..3 {
        let start = Instant::now();
        let r = client.call_timeout::<i64, i64>("Arith.Neg", &x, SHORT);
        assert!(matches!(r, Err(NetError::Timeout { .. })), "{r:?}");
        assert!(start.elapsed() >= Duration::from_millis(300));
    }
    // The connection stayed up; nothing reached the server.
    assert!(client.is_connected());
    assert_eq!(srv.dispatched(), dispatched);
    assert!(proxy.bytes_dropped() > 0);
    proxy.heal();
    eventually_neg(&client, 8);
    // The connection that lost bytes was closed at the heal; a fresh one carries calls.
    assert_eq!(proxy.accepted(), 2);
    for x in 0..20 {
        assert_eq!(client.call::<i64, i64>("Arith.Neg", &x), Ok(-x));
    }
}

#[test]
fn delay_holds_every_chunk() {
    let srv = server("pd-s");
    let proxy = Proxy::start("pd-p", "127.0.0.1:0", srv.local_addr()).unwrap();
    let client = end("pd-c", proxy.local_addr());
    assert_eq!(client.call::<i64, i64>("Arith.Neg", &1), Ok(-1));
    proxy.set_delay(Duration::from_millis(150));
    let start = Instant::now();
    assert_eq!(client.call::<i64, i64>("Arith.Neg", &2), Ok(-2));
    let delayed = start.elapsed();
    // Request and reply are each held 150 ms.
    assert!(
        delayed >= Duration::from_millis(300),
        "round trip {delayed:?}"
    );
    // Pipelined calls are delayed together, not one after another.
    let (tx, rx) = channel::unbounded();
    let start = Instant::now();
    for x in 0..20i64 {
        let tx = tx.clone();
        client.call_async("Arith.Neg", &x, move |r: Result<i64, NetError>| {
            tx.send((x, r)).unwrap()
        });
    }
    for _ in 0..20 {
        let (x, r) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(r, Ok(-x));
    }
    // One after another they would take 20 × 300 ms.
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    proxy.set_delay(Duration::ZERO);
    // Let chunks queued under the old delay drain.
    thread::sleep(Duration::from_millis(200));
    let fastest = (0..5)
        .map(|x| {
            let start = Instant::now();
            assert_eq!(client.call::<i64, i64>("Arith.Neg", &x), Ok(-x));
            start.elapsed()
        })
        .min()
        .unwrap();
    assert!(fastest < Duration::from_millis(300), "fastest {fastest:?}");
}

/// Regression (seen once in 150 stress runs of `repeated_cuts_never_mix_up_replies` under load):
/// a connection the proxy closed on accept could close before the end installed it; the end
/// then kept the dead connection and never dialled again. The race needs the manager thread
/// preempted between starting the connection and installing it, so this test exercises the
/// path but rarely loses the race; the stress runs of both tests are the real check.
#[test]
fn connections_closed_on_accept_are_redialled() {
    let srv = server("pa-s");
    let proxy = Proxy::start("pa-p", "127.0.0.1:0", srv.local_addr()).unwrap();
    proxy.cut();
    let client = end("pa-c", proxy.local_addr());
    for x in 0..3 {
        let r = client.call_timeout::<i64, i64>("Arith.Neg", &x, SHORT);
        assert!(
            matches!(
                r,
                Err(NetError::Timeout { .. } | NetError::ConnectionLost { .. })
            ),
            "{r:?}"
        );
    }
    assert!(proxy.refused() > 0);
    proxy.heal();
    eventually_neg(&client, 4);
}

#[test]
fn repeated_cuts_never_mix_up_replies() {
    let srv = server("pr-s");
    let proxy = Proxy::start("pr-p", "127.0.0.1:0", srv.local_addr()).unwrap();
    let client = end("pr-c", proxy.local_addr());
    let callers: Vec<_> = (0..4i64)
        .map(|t| {
            let client = client.clone();
            thread::spawn(move || {
                let mut ok = 0;
                for k in 0..300i64 {
                    let x = t * 10_000 + k;
                    match client.call_timeout::<i64, i64>("Arith.Neg", &x, SHORT) {
                        Ok(reply) => {
                            assert_eq!(reply, -x, "reply to another call");
                            ok += 1;
                        }
                        Err(
                            NetError::Timeout { .. }
                            | NetError::ConnectionLost { .. }
                            | NetError::Overloaded { .. },
                        ) => {}
                        Err(e) => panic!("unexpected error: {e}"),
                    }
                }
                ok
            })
        })
        .collect();
    for round in 0..10 {
        thread::sleep(Duration::from_millis(20));
        if round % 2 == 0 {
            proxy.cut();
        } else {
            proxy.blackhole();
        }
        thread::sleep(Duration::from_millis(20));
        proxy.heal();
    }
    let mut ok = 0;
    for caller in callers {
        ok += caller.join().expect("caller thread panicked");
    }
    assert!(ok > 0, "no call got through");
    eventually_neg(&client, 5);
}

#[test]
fn shutdown_joins_every_thread() {
    let srv = server("ps-s");
    let proxy = Proxy::start("ps-p", "127.0.0.1:0", srv.local_addr()).unwrap();
    let clients: Vec<ClientEnd> = (0..2)
        .map(|i| end(&format!("ps-c{i}"), proxy.local_addr()))
        .collect();
    for client in &clients {
        assert_eq!(client.call::<i64, i64>("Arith.Neg", &1), Ok(-1));
    }
    proxy.set_delay(Duration::from_secs(5));
    // Leave a chunk waiting in a delayed writer.
    clients[0].call_async("Arith.Neg", &2i64, |_: Result<i64, NetError>| {});
    thread::sleep(Duration::from_millis(50));
    // accept + 4 per forwarded connection.
    assert_eq!(threads_named("ps-p").len(), 1 + 4 * 2);
    let start = Instant::now();
    proxy.shutdown();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "shutdown waited for the delay"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !threads_named("ps-p").is_empty() {
        assert!(Instant::now() < deadline, "{:?}", threads_named("ps-p"));
        thread::sleep(Duration::from_millis(10));
    }
}
