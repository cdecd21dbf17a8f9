//! Raft agreement cost on a reliable simulated network: latency from `start` to apply on the
//! leader (3 and 5 peers), and throughput with many concurrent `start`s.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use crossbeam::channel::{self, Receiver};
use raftkv::labrpc::{Network, Server};
use raftkv::raft::{ApplyMsg, Raft};
use raftkv::tester::{Persister, RaftRpcService};

/// The service snapshots this often, as a real one would, so the log stays short.
const SNAPSHOT_EVERY: u64 = 1000;

struct Cluster {
    net: Network,
    rafts: Vec<Arc<Raft>>,
    /// Per peer: applied indexes, forwarded by a thread that also takes snapshots.
    applied: Vec<Receiver<u64>>,
    appliers: Vec<thread::JoinHandle<()>>,
}

impl Cluster {
    fn new(n: usize) -> Cluster {
        let net = Network::with_seed(1);
        let mut rafts = Vec::new();
        let mut applied = Vec::new();
        let mut appliers = Vec::new();
        for i in 0..n {
            let ends: Vec<_> = (0..n)
                .map(|j| {
                    let e = net
                        .make_end(&format!("end-{i}-{j}"))
                        .expect("unique end name");
                    net.connect(e.name(), &format!("server-{j}"));
                    net.enable(e.name(), true);
                    e
                })
                .collect();
            let (tx, rx) = channel::unbounded();
            let raft = Arc::new(Raft::new(ends, i, Persister::new(), tx).expect("raft starts"));
            let mut server = Server::new();
            server.add_service(raft.rpc_service());
            net.add_server(&format!("server-{i}"), server);
            let (idx_tx, idx_rx) = channel::unbounded();
            let weak = Arc::downgrade(&raft);
            appliers.push(thread::spawn(move || {
                for m in rx {
                    if let ApplyMsg::Command { index, .. } = m {
                        if index % SNAPSHOT_EVERY == 0
                            && let Some(r) = weak.upgrade()
                        {
                            r.snapshot(index, index.to_le_bytes().to_vec());
                        }
                        let _ = idx_tx.send(index);
                    }
                }
            }));
            rafts.push(raft);
            applied.push(idx_rx);
        }
        Cluster {
            net,
            rafts,
            applied,
            appliers,
        }
    }

    fn leader(&self) -> usize {
        let t0 = Instant::now();
        loop {
            if let Some(l) = (0..self.rafts.len()).find(|&i| self.rafts[i].get_state().1) {
                return l;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "no leader elected");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `leader` has applied `index`.
    fn wait_applied(&self, leader: usize, index: u64) {
        loop {
            match self.applied[leader].recv_timeout(Duration::from_secs(10)) {
                Ok(i) if i >= index => return,
                Ok(_) => {}
                Err(e) => panic!("leader {leader} did not apply {index}: {e}"),
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for r in &self.rafts {
            r.kill();
        }
        self.rafts.clear();
        for h in self.appliers.drain(..) {
            let _ = h.join();
        }
        self.net.cleanup();
    }
}

fn start_to_apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("raft_start_to_apply");
    for n in [3usize, 5] {
        let cluster = Cluster::new(n);
        let leader = cluster.leader();
        let raft = cluster.rafts[leader].clone();
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{n}_peers")),
            &n,
            |b, _| {
                b.iter(|| {
                    let (index, _, ok) = raft.start(vec![7u8; 8]);
                    assert!(ok, "leader lost leadership during the bench");
                    cluster.wait_applied(leader, index);
                })
            },
        );
    }
    group.finish();
}

fn concurrent_starts(c: &mut Criterion) {
    const CLIENTS: usize = 16;
    const PER_CLIENT: usize = 250;
    let mut group = c.benchmark_group("raft_agreement_throughput");
    group.throughput(Throughput::Elements((CLIENTS * PER_CLIENT) as u64));
    group.sample_size(20);
    for n in [3usize, 5] {
        let cluster = Cluster::new(n);
        let leader = cluster.leader();
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{n}_peers_16_clients")),
            &n,
            |b, _| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t0 = Instant::now();
                        let last = thread::scope(|s| {
                            let hs: Vec<_> = (0..CLIENTS)
                                .map(|_| {
                                    let raft = cluster.rafts[leader].clone();
                                    s.spawn(move || {
                                        let mut last = 0;
                                        for _ in 0..PER_CLIENT {
                                            let (i, _, ok) = raft.start(vec![7u8; 8]);
                                            assert!(ok, "leader lost leadership during the bench");
                                            last = last.max(i);
                                        }
                                        last
                                    })
                                })
                                .collect();
                            hs.into_iter().map(|h| h.join().unwrap()).max().unwrap()
                        });
                        cluster.wait_applied(leader, last);
                        total += t0.elapsed();
                    }
                    total
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, start_to_apply, concurrent_starts);
criterion_main!(benches);
