//! `shardkvbench [--secs S] [--moves N]`: the sharded KV service on the tests' simulated
//! (reliable) network.
//!
//! - Throughput: 32 clerks over 3 groups of 3 servers, each alternating a versioned Put and
//!   a Get of its own key for S seconds (default 5); every operation goes through its group's
//!   Raft log.
//! - Shard move: one shard holding 1 KB, then 1 MB, moved N times (default 5) between two
//!   groups: the time of the controller's change (freeze → install → delete → new
//!   configuration posted) and until a clerk's Get is served by the new group.
//!
//! ```text
//! cargo build --release --features testing --bin shardkvbench && target/release/shardkvbench
//! ```

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use raftkv::kvapi::KvErr;
use raftkv::shardkv::Change;
use raftkv::shardkv::shardcfg::key2shard;
use raftkv::tester::kvtest::rand_value;
use raftkv::tester::shardkv::make_test;

const NCLERKS: usize = 32;
const SIZES: [(usize, &str); 2] = [(1 << 10, "1 KB"), (1 << 20, "1 MB")];

/// The sharded KV service on the tests' simulated network: throughput, then shard moves.
#[derive(clap::Parser)]
#[command(
    name = "shardkvbench",
    help_template = "{about-with-newline}\nusage: {usage}\n\n{all-args}"
)]
struct Cli {
    /// Seconds of the throughput run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    secs: u64,
    /// Moves of each shard size.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    moves: u64,
}

fn main() -> ExitCode {
    raftkv::logging::init("shardkvbench", None);
    let cli = <Cli as clap::Parser>::parse();
    let (secs, moves) = (cli.secs, cli.moves as usize);
    match throughput(Duration::from_secs(secs)).and_then(|()| shard_moves(moves)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardkvbench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn throughput(dur: Duration) -> Result<(), String> {
    let ts = make_test("shardkvbench: throughput, 32 clerks, 3 groups", true);
    ts.setup_kv_service();
    let sck = ts.shard_ctrler();
    let grps = ts.groups(2);
    if !ts.join_groups(&sck, &grps) {
        return Err("join failed".into());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..NCLERKS)
        .map(|i| {
            let ck = ts.make_clerk();
            let stop = stop.clone();
            thread::Builder::new()
                .name(format!("bench-clerk-{i}"))
                .spawn(move || -> Result<(usize, Duration), String> {
                    let key = format!("bench-{i}");
                    let (mut ops, mut busy, mut ver) = (0, Duration::ZERO, 0);
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        match ck.ck.put(&key, &rand_value(20), ver) {
                            KvErr::Ok => ver += 1,
                            e => return Err(format!("put {key} v{ver}: {e}")),
                        }
                        let (_, v, e) = ck.ck.get(&key);
                        if e != KvErr::Ok || v != ver {
                            return Err(format!("get {key}: {e} at version {v}, want {ver}"));
                        }
                        busy += t.elapsed();
                        ops += 2;
                    }
                    Ok((ops, busy))
                })
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    let (mut ops, mut busy) = (0, Duration::ZERO);
    for h in handles {
        let (o, b) = h
            .join()
            .map_err(|_| "a clerk thread panicked".to_string())??;
        ops += o;
        busy += b;
    }
    let wall = t0.elapsed().as_secs_f64();
    println!(
        "throughput: {NCLERKS} clerks, 3 groups x 3 servers: {ops} ops in {wall:.1} s = {:.0} ops/s, mean latency {:.2} ms",
        ops as f64 / wall,
        busy.as_secs_f64() * 1e3 / ops.max(1) as f64
    );
    ts.cleanup();
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn shard_moves(moves: usize) -> Result<(), String> {
    for (size, label) in SIZES {
        let ts = make_test("shardkvbench: shard move", true);
        let gid1 = ts.setup_kv_service();
        let sck = ts.shard_ctrler();
        let gid2 = ts.new_gid();
        if !ts.join_groups(&sck, &[gid2]) {
            return Err("join failed".into());
        }
        let ck = ts.make_clerk();
        let key = "moving";
        let shard = key2shard(key);
        let value = rand_value(size);
        if ck.ck.put(key, &value, 0) != KvErr::Ok {
            return Err("put failed".into());
        }
        let (mut change, mut served) = (Vec::new(), Vec::new());
        for _ in 0..moves {
            let mut cfg = sck.query().map_err(|e| e.to_string())?;
            let to = if cfg.shards[shard] == gid1 {
                gid2
            } else {
                gid1
            };
            cfg.num += 1;
            cfg.shards[shard] = to;
            let t0 = Instant::now();
            if sck.change_config_to(&cfg).map_err(|e| e.to_string())? != Change::Done {
                return Err("change superseded".into());
            }
            change.push(t0.elapsed());
            let (v, _, e) = ck.ck.get(key);
            served.push(t0.elapsed());
            if e != KvErr::Ok || v != value {
                return Err(format!("get after move: {e}"));
            }
        }
        println!(
            "shard move, {label}: change (freeze, install, delete, post) median {:.2} ms; served by the new group after {:.2} ms (median of {moves})",
            median(change).as_secs_f64() * 1e3,
            median(served).as_secs_f64() * 1e3
        );
        ts.cleanup();
    }
    Ok(())
}
