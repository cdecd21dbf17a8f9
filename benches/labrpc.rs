//! labrpc on a reliable network: the round-trip latency of one small RPC, and the throughput
//! of 16 concurrent callers, each with its own end. Go's labrpc managed about 22 µs per RPC.

use std::thread;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use crossbeam::channel;
use raftkv::labrpc::{ClientEnd, Network, Server, Service};

/// Callers in the throughput benchmark.
const CALLERS: usize = 16;
/// RPCs each caller makes per benchmark iteration.
const CALLS_PER_CALLER: usize = 200;

fn network() -> Network {
    let net = Network::with_seed(1);
    let mut rs = Server::new();
    rs.add_service(Service::new("Bench").method("Neg", |x: i64| -x));
    net.add_server("server", rs);
    net
}

fn end(net: &Network, name: &str) -> ClientEnd {
    let e = net.make_end(name).expect("fresh end name");
    net.connect(name, "server");
    net.enable(name, true);
    e
}

fn round_trip(c: &mut Criterion) {
    let net = network();
    let e = end(&net, "latency");
    let mut x = 0i64;
    c.bench_function("labrpc/round_trip_i64", |b| {
        b.iter(|| {
            x += 1;
            let reply: i64 = e.call("Bench.Neg", &x).expect("reliable network");
            assert_eq!(reply, -x);
        })
    });
    net.cleanup();
}

fn throughput(c: &mut Criterion) {
    let net = network();
    // Long-lived callers, so an iteration measures RPCs, not thread start-up.
    let mut starts = Vec::new();
    let (done_tx, done_rx) = channel::unbounded::<()>();
    let mut workers = Vec::new();
    for i in 0..CALLERS {
        let e = end(&net, &format!("caller-{i}"));
        let (start_tx, start_rx) = channel::unbounded::<()>();
        starts.push(start_tx);
        let done_tx = done_tx.clone();
        workers.push(thread::spawn(move || {
            for () in start_rx {
                for k in 0..CALLS_PER_CALLER as i64 {
                    let reply: i64 = e.call("Bench.Neg", &k).expect("reliable network");
                    assert_eq!(reply, -k);
                }
                done_tx.send(()).unwrap();
            }
        }));
    }

    let mut group = c.benchmark_group("labrpc");
    group.throughput(Throughput::Elements((CALLERS * CALLS_PER_CALLER) as u64));
    group.sample_size(20);
    group.bench_function("throughput_16_callers", |b| {
        b.iter(|| {
            for s in &starts {
                s.send(()).unwrap();
            }
            for _ in 0..CALLERS {
                done_rx.recv().unwrap();
            }
        })
    });
    group.finish();

    drop(starts);
    for w in workers {
        w.join().unwrap();
    }
    net.cleanup();
}

criterion_group!(benches, round_trip, throughput);
criterion_main!(benches);
