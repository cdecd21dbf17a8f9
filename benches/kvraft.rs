//! KV-on-Raft throughput and latency on the simulated network (reliable): every clerk runs
//! its own loop of versioned Puts on its own key (or alternates Get and Put), for a fixed
//! time, against 3 or 5 replicas, with or without snapshots. Prints a table.
//!
//! ```sh
//! cargo bench --bench kvraft                       # the full table (about 2 minutes)
//! cargo bench --bench kvraft -- --secs 5 --clerks 1,32 --servers 3
//! cargo bench --bench kvraft -- --decay 60         # 1 clerk, Puts only, ops per second over 60 s
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use raftkv::kvapi::KvClerk;
use raftkv::kvapi::KvErr;
use raftkv::kvraft::Clerk;
use raftkv::labrpc::ClientEnd;
use raftkv::tester::kvraft::start_kv_server;
use raftkv::tester::{Config, GRP0, Persister, StartFn, Tgid};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    Puts,
    HalfGets,
}

struct Cell {
    servers: usize,
    snapshots: Option<usize>,
    workload: Workload,
    clerks: usize,
}

struct Outcome {
    ops: usize,
    elapsed: Duration,
    latencies_us: Vec<u64>,
    /// Completed ops in each second of the run.
    per_second: Vec<usize>,
}

fn start_group(servers: usize, maxraftstate: Option<usize>) -> Arc<Config> {
    let start_fn: StartFn = Arc::new(
        move |ends: Vec<ClientEnd>, gid: Tgid, i: usize, persister: Persister| {
            let (_, services) = start_kv_server(ends, gid, i, persister, maxraftstate)
                .expect("a fresh KV server starts");
            services
        },
    );
    Config::new(servers, true, start_fn)
}

fn run(cell: &Cell, run_for: Duration) -> Outcome {
    let cfg = start_group(cell.servers, cell.snapshots);
    // One op first, so the run does not time the first election.
    let warm = Clerk::new(cfg.clnts().make_client(), cfg.group(GRP0).srv_names());
    assert_eq!(warm.put("warm", "x", 0), KvErr::Ok, "first Put failed");
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..cell.clerks)
        .map(|c| {
            let ck = Clerk::new(cfg.clnts().make_client(), cfg.group(GRP0).srv_names());
            let stop = stop.clone();
            let workload = cell.workload;
            thread::Builder::new()
                .name(format!("bench-clerk-{c}"))
                .spawn(move || {
                    let key = format!("k{c}");
                    let value = "v".repeat(16);
                    let mut version = 0;
                    let mut latencies = Vec::new();
                    let mut done_at = Vec::new();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        if workload == Workload::HalfGets && n % 2 == 1 {
                            let (_, _, err) = ck.get(&key);
                            assert!(matches!(err, KvErr::Ok | KvErr::NoKey), "Get: {err}");
                        } else {
                            match ck.put(&key, &value, version) {
                                KvErr::Ok => version += 1,
                                // A retried Put that had landed: read the version back.
                                KvErr::Maybe => version = ck.get(&key).1,
                                err => panic!("Put {key} at version {version}: {err}"),
                            }
                        }
                        latencies.push(t.elapsed().as_micros() as u64);
                        done_at.push(t0.elapsed());
                        n += 1;
                    }
                    (latencies, done_at)
                })
                .expect("spawn a bench clerk")
        })
        .collect();
    thread::sleep(run_for);
    stop.store(true, Ordering::Relaxed);
    let elapsed = t0.elapsed();
    let mut latencies_us = Vec::new();
    let mut per_second = vec![0; run_for.as_secs().max(1) as usize];
    for h in handles {
        let (lat, done_at) = h.join().expect("a bench clerk failed");
        latencies_us.extend(lat);
        for d in done_at {
            if let Some(slot) = per_second.get_mut(d.as_secs() as usize) {
                *slot += 1;
            }
        }
    }
    cfg.cleanup();
    latencies_us.sort_unstable();
    Outcome {
        ops: latencies_us.len(),
        elapsed,
        latencies_us,
        per_second,
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// `cargo bench --bench kvraft -- [--secs S] [--clerks 1,8,32,128] [--servers 3,5] [--decay SECS]`
#[derive(clap::Parser)]
#[command(
    name = "kvraft bench",
    help_template = "{about-with-newline}\nusage: {usage}\n\n{all-args}"
)]
struct Cli {
    /// Seconds per cell.
    #[arg(long, default_value_t = 3)]
    secs: u64,
    /// Clerk counts, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    clerks: Vec<usize>,
    /// Server counts, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "3,5")]
    servers: Vec<usize>,
    /// Instead of the table: one clerk's Puts for SECS, counted per second.
    #[arg(long)]
    decay: Option<u64>,
    /// What `cargo bench` passes; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let Cli {
        secs,
        clerks,
        servers,
        decay,
        ..
    } = <Cli as clap::Parser>::parse();

    if let Some(d) = decay {
        let cell = Cell {
            servers: 3,
            snapshots: None,
            workload: Workload::Puts,
            clerks: 1,
        };
        let o = run(&cell, Duration::from_secs(d));
        println!("1 clerk, 3 servers, Puts, no snapshots: ops completed in each second");
        for (s, n) in o.per_second.iter().enumerate() {
            println!("{:>4} s  {n:>7}", s + 1);
        }
        let first = o.per_second.first().copied().unwrap_or(0).max(1);
        let last = o.per_second.last().copied().unwrap_or(0);
        println!(
            "last second / first second: {:.2}",
            last as f64 / first as f64
        );
        return;
    }

    println!(
        "{:>7} {:>9} {:>9} {:>6} {:>10} {:>9} {:>9}",
        "servers", "snapshot", "workload", "clerks", "ops/s", "p50 µs", "p99 µs"
    );
    for &n in &servers {
        for snapshots in [None, Some(1000)] {
            for workload in [Workload::Puts, Workload::HalfGets] {
                for &c in &clerks {
                    let cell = Cell {
                        servers: n,
                        snapshots,
                        workload,
                        clerks: c,
                    };
                    let o = run(&cell, Duration::from_secs(secs));
                    println!(
                        "{:>7} {:>9} {:>9} {:>6} {:>10.0} {:>9} {:>9}",
                        n,
                        snapshots.map_or("none".to_string(), |m| m.to_string()),
                        match workload {
                            Workload::Puts => "put",
                            Workload::HalfGets => "get/put",
                        },
                        c,
                        o.ops as f64 / o.elapsed.as_secs_f64(),
                        percentile(&o.latencies_us, 0.50),
                        percentile(&o.latencies_us, 0.99),
                    );
                }
            }
        }
    }
}
