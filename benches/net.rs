//! `net` over loopback TCP: the round trip of one small RPC, the throughput of 64 calls
//! pipelined on one connection, of 16 blocking callers sharing one end, and of a 64 KiB
//! echo (bytes per second).

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use crossbeam::channel;
use raftkv::net::{ClientEnd, ClientOptions, NetError, Server, ServerOptions, Service};

/// Calls in flight at once in the pipelined benchmark.
const WINDOW: usize = 64;
/// Blocking callers in the concurrent benchmark, and the calls each makes per iteration.
const CALLERS: usize = 16;
const CALLS_PER_CALLER: usize = 50;

fn server() -> Server {
    let server = Server::start("bench-s", "127.0.0.1:0", ServerOptions::default()).unwrap();
    server.add_service(
        Service::new("Bench")
            .method("Neg", |x: i64| -x)
            .raw_method("Echo", |body| body.to_vec()),
    );
    server
}

fn end(peer: SocketAddr) -> ClientEnd {
    let client = ClientEnd::connect("bench-c", peer, ClientOptions::default());
    // Connected before measuring.
    assert_eq!(client.call::<i64, i64>("Bench.Neg", &1), Ok(-1));
    client
}

fn net(c: &mut Criterion) {
    let srv = server();
    let client = end(srv.local_addr());
    let mut group = c.benchmark_group("net");
    group.measurement_time(Duration::from_secs(4));
    group.sample_size(30);

    let mut x = 0i64;
    group.bench_function("round_trip_i64", |b| {
        b.iter(|| {
            x += 1;
            let reply: i64 = client.call("Bench.Neg", &x).expect("loopback");
            assert_eq!(reply, -x);
        })
    });

    group.throughput(Throughput::Elements(WINDOW as u64));
    group.bench_function("pipelined_64_one_connection", |b| {
        b.iter(|| {
            let (tx, rx) = channel::bounded(WINDOW);
            for k in 0..WINDOW as i64 {
                let tx = tx.clone();
                client.call_async("Bench.Neg", &k, move |r: Result<i64, NetError>| {
                    tx.send((k, r)).unwrap();
                });
            }
            for _ in 0..WINDOW {
                let (k, r) = rx.recv().unwrap();
                assert_eq!(r, Ok(-k));
            }
        })
    });

    // Long-lived callers, so an iteration measures RPCs, not thread start-up.
    let (done_tx, done_rx) = channel::unbounded::<()>();
    let mut starts = Vec::new();
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        let (start_tx, start_rx) = channel::unbounded::<()>();
        starts.push(start_tx);
        let client = client.clone();
        let done_tx = done_tx.clone();
        callers.push(thread::spawn(move || {
            for () in start_rx {
                for k in 0..CALLS_PER_CALLER as i64 {
                    let reply: i64 = client.call("Bench.Neg", &k).expect("loopback");
                    assert_eq!(reply, -k);
                }
                done_tx.send(()).unwrap();
            }
        }));
    }
    group.throughput(Throughput::Elements((CALLERS * CALLS_PER_CALLER) as u64));
    group.bench_function("16_blocking_callers_one_end", |b| {
        b.iter(|| {
            for s in &starts {
                s.send(()).unwrap();
            }
            for _ in 0..CALLERS {
                done_rx.recv().unwrap();
            }
        })
    });
    drop(starts);
    for caller in callers {
        caller.join().expect("caller panicked");
    }

    let body = vec![0x5au8; 64 << 10];
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("echo_64KiB", |b| {
        b.iter(|| {
            let reply: Vec<u8> = client.call("Bench.Echo", &body).expect("loopback");
            assert_eq!(reply.len(), body.len());
        })
    });
    group.finish();
}

criterion_group!(benches, net);
criterion_main!(benches);
