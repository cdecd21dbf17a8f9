//! Lab 4B/4C tests, ported from the Go labs' `kvraft1/kvraft_test.go` (Spring 2025): same
//! scenarios, constants and assertions. `cargo test --test kvraft 4b` runs one part.

use std::thread;
use std::time::{Duration, Instant};

use crossbeam::channel;
use raftkv::kvapi::{KvErr, Tversion};
use raftkv::tester::kvraft::{KvRaftParams, KvRaftTest};
use raftkv::tester::kvtest::{ClntRes, ELECTION_TIMEOUT, make_keys};
use raftkv::tester::{GRP0, join_helper};

/// Iterations of the generic test.
const NITER: usize = 3;
/// How long the clients of each iteration run.
const T: Duration = Duration::from_secs(1);
/// Keys of the random-keys tests.
const NKEYS: usize = 100;
/// The client id of operations the tests make themselves (Go's -1).
const TESTER: usize = u32::MAX as usize;
/// The 4C snapshot threshold.
const MAXRAFTSTATE: usize = 1000;

#[allow(clippy::too_many_arguments)]
fn make_test(
    part: &'static str,
    nclients: usize,
    nservers: usize,
    reliable: bool,
    crash: bool,
    partitions: bool,
    maxraftstate: Option<usize>,
    randomkeys: bool,
) -> KvRaftTest {
    KvRaftTest::new(KvRaftParams {
        part,
        nclients,
        nservers,
        reliable,
        crash,
        partitions,
        maxraftstate,
        randomkeys,
    })
}

/// Basic test: clients Put concurrently (to one key, or random keys) for a second, each
/// checking its own Puts; optionally with a partitioner and a restart of every server after
/// each iteration. The history must be linearizable and the log trimmed (or, without
/// snapshots, no snapshot made).
fn generic_test(t: KvRaftTest) {
    let ts = t.ts.clone();
    let p = t.p.clone();
    let ck = ts.make_clerk();
    let keys: Vec<String> = if p.randomkeys {
        make_keys(NKEYS)
    } else {
        vec!["k".to_string()]
    };
    let mut res = ClntRes::default();
    for i in 0..NITER {
        log::info!(target: "tester", "generic test iteration {i}");
        // The clients, then (without random keys) the check of the Put count.
        let clients = {
            let ts = ts.clone();
            let keys = keys.clone();
            let ck = ck.clone();
            let reliable = ts.cfg.is_reliable() && !p.crash && !p.partitions;
            let randomkeys = p.randomkeys;
            thread::spawn(move || {
                let ts2 = ts.clone();
                let rs = ts.spawn_clients_and_wait(p.nclients, T, move |cli, ck, done| {
                    ts2.one_client_put(cli, ck.ck.as_ref(), &keys, done)
                });
                if !randomkeys {
                    ts.check_put_concurrent(ck.ck.as_ref(), "k", &rs, &mut res, reliable);
                }
                res
            })
        };
        let partitioner = if p.partitions {
            // Let the clients perform some operations without interruption.
            thread::sleep(Duration::from_secs(1));
            Some(ts.partitioner(GRP0))
        } else {
            None
        };
        res = join_helper(clients);
        ts.check_porcupine();
        if let Some(pt) = partitioner {
            pt.stop();
            t.g().connect_all();
            // Wait for a while so that we have a new term.
            thread::sleep(ELECTION_TIMEOUT);
        }
        if p.crash {
            let g = t.g();
            for s in 0..p.nservers {
                g.shutdown_server(s);
            }
            // Wait for a while so that servers really forget state.
            thread::sleep(ELECTION_TIMEOUT);
            for s in 0..p.nservers {
                g.start_server(s);
            }
            g.connect_all();
        }
        match p.maxraftstate {
            Some(max) => {
                let sz = t.g().log_size();
                if sz > 8 * max {
                    let sizes: Vec<usize> = (0..p.nservers)
                        .map(|s| t.g().persister(s).raft_state_size())
                        .collect();
                    println!("persisted Raft state per server after iteration {i}: {sizes:?}");
                    t.fatal(&format!("logs were not trimmed ({sz} > 8*{max})"));
                }
            }
            None => {
                let ssz = t.g().snapshot_size();
                if ssz > 0 {
                    t.fatal(&format!(
                        "snapshot too large ({ssz}), should not be used when maxraftstate = -1"
                    ));
                }
            }
        }
    }
    ts.end();
}

/// 1000 sequential Puts must average at most a third of a 100 ms heartbeat interval: the
/// leader must replicate new entries at once.
fn generic_test_speed(t: KvRaftTest) {
    const NUM_OPS: u64 = 1000;
    let ts = t.ts.clone();
    let ck = ts.make_clerk();
    // Wait until we have a leader.
    ck.ck.get("x");
    let start = Instant::now();
    for i in 0..NUM_OPS {
        let err = ts.put(ck.ck.as_ref(), "k", &i.to_string(), i as Tversion, 0);
        if err != KvErr::Ok {
            t.fatal(&format!("Put err {err}"));
        }
    }
    let dur = start.elapsed();
    let (_, ver, _) = ck.ck.get("k");
    if ver != NUM_OPS {
        t.fatal(&format!("Get wrong version {ver} expected {NUM_OPS}"));
    }
    // Heartbeat interval should be ~100 ms; require at least 3 ops per interval.
    let limit = Duration::from_millis(100) / 3 * NUM_OPS as u32;
    if dur > limit {
        t.fatal(&format!(
            "Operations completed too slowly {:?}/op > {:?}/op",
            dur / NUM_OPS as u32,
            limit / NUM_OPS as u32
        ));
    }
    ts.end();
}

// ---------------------------------------------------------------- 4B

/// Basic test: one client, reliable network.
#[test]
fn basic_4b() {
    generic_test(make_test("4B basic", 1, 5, true, false, false, None, false));
}

/// 1000 sequential Puts fast enough.
#[test]
fn speed_4b() {
    generic_test_speed(make_test("4B speed", 1, 3, true, false, false, None, false));
}

/// Many clients, reliable network.
#[test]
fn concurrent_4b() {
    generic_test(make_test(
        "4B many clients",
        5,
        5,
        true,
        false,
        false,
        None,
        false,
    ));
}

/// Many clients, unreliable network.
#[test]
fn unreliable_4b() {
    generic_test(make_test(
        "4B many clients",
        5,
        5,
        false,
        false,
        false,
        None,
        false,
    ));
}

/// A majority makes progress while the old leader sits in a minority; the minority makes none
/// until the partition heals, and then its pending Put completes.
#[test]
fn one_partition_4b() {
    let t = make_test(
        "4B progress in majority",
        0,
        5,
        false,
        false,
        false,
        None,
        false,
    );
    let ts = t.ts.clone();
    let ck = ts.make_clerk();
    let ver0 = ts.put_at_least_once(ck.ck.as_ref(), "1", "13", 0, TESTER);

    let l = t.leader().unwrap_or_else(|| t.fatal("no leader"));
    let (p1, p2) = t.g().make_partition(l);
    t.g().partition(&p1, &p2);

    let ckp1 = t.make_clerk_to(&p1); // connect ckp1 to p1
    let ckp2a = t.make_clerk_to(&p2); // connect ckp2a to p2
    let ckp2b = t.make_clerk_to(&p2); // connect ckp2b to p2

    let ver1 = ts.put_at_least_once(ckp1.ck.as_ref(), "1", "14", ver0, TESTER);
    ts.check_get(ckp1.ck.as_ref(), "1", "14", ver1);
    ts.end();

    ts.cfg.begin("Test: no progress in minority (4B)");
    let (done0_tx, done0) = channel::bounded::<Tversion>(1);
    let (done1_tx, done1) = channel::bounded::<()>(1);
    let put_thread = {
        let ts = ts.clone();
        let ckp2a = ckp2a.clone();
        thread::spawn(move || {
            let ver = ts.put_at_least_once(ckp2a.ck.as_ref(), "1", "15", ver1, TESTER);
            let _ = done0_tx.send(ver);
        })
    };
    let get_thread = {
        let ts = ts.clone();
        let ckp2b = ckp2b.clone();
        thread::spawn(move || {
            // Different clerk in p2.
            ts.get(ckp2b.ck.as_ref(), "1", TESTER);
            let _ = done1_tx.send(());
        })
    };
    // A closed channel means its thread failed a check: join it to fail with its message.
    channel::select! {
        recv(done0) -> r => match r {
            Ok(_) => t.fatal("Put in minority completed"),
            Err(_) => {
                join_helper(put_thread);
                t.fatal("the Put thread ended without a result")
            }
        },
        recv(done1) -> r => match r {
            Ok(_) => t.fatal("Get in minority completed"),
            Err(_) => {
                join_helper(get_thread);
                t.fatal("the Get thread ended without a result")
            }
        },
        default(Duration::from_secs(1)) => {}
    }
    ts.check_get(ckp1.ck.as_ref(), "1", "14", ver1);
    let ver2 = ts.put_at_least_once(ckp1.ck.as_ref(), "1", "16", ver1, TESTER);
    ts.check_get(ckp1.ck.as_ref(), "1", "16", ver2);
    ts.end();

    ts.cfg.begin("Test: completion after heal (4B)");
    t.g().connect_all();
    ckp2a.clnt.connect_all();
    ckp2b.clnt.connect_all();
    thread::sleep(ELECTION_TIMEOUT);

    let ver15 = match done0.recv_timeout(Duration::from_millis(30 * 100)) {
        Ok(v) => v,
        Err(_) if put_thread.is_finished() => {
            join_helper(put_thread);
            t.fatal("the Put thread ended without a result")
        }
        Err(_) => t.fatal("Put did not complete"),
    };
    join_helper(put_thread);
    // As in Go, the Get's completion is looked at but not required; if it ended, it must
    // have ended well.
    let _ = done1.try_recv();
    if get_thread.is_finished() {
        join_helper(get_thread);
    }
    ts.check_get(ck.ck.as_ref(), "1", "15", ver15);
    ts.end();
}

/// Random partitions, one client.
#[test]
fn many_partitions_one_client_4b() {
    generic_test(make_test(
        "4B partitions, one client",
        1,
        5,
        true,
        false,
        true,
        None,
        false,
    ));
}

/// Random partitions, many clients.
#[test]
fn many_partitions_many_clients_4b() {
    generic_test(make_test(
        "4B partitions, many clients (4B)",
        5,
        5,
        true,
        false,
        true,
        None,
        false,
    ));
}

/// Every server restarts after each iteration, one client.
#[test]
fn persist_one_client_4b() {
    generic_test(make_test(
        "4B restarts, one client 4B ",
        1,
        5,
        true,
        true,
        false,
        None,
        false,
    ));
}

/// Every server restarts after each iteration, many clients.
#[test]
fn persist_concurrent_4b() {
    generic_test(make_test(
        "4B restarts, many clients",
        5,
        5,
        true,
        true,
        false,
        None,
        false,
    ));
}

/// Restarts, many clients, unreliable network.
#[test]
fn persist_concurrent_unreliable_4b() {
    generic_test(make_test(
        "4B restarts, many clients ",
        5,
        5,
        false,
        true,
        false,
        None,
        false,
    ));
}

/// Restarts and random partitions, many clients.
#[test]
fn persist_partition_4b() {
    generic_test(make_test(
        "4B restarts, partitions, many clients",
        5,
        5,
        true,
        true,
        true,
        None,
        false,
    ));
}

/// Restarts and random partitions, many clients, unreliable network.
#[test]
fn persist_partition_unreliable_4b() {
    generic_test(make_test(
        "4B restarts, partitions, many clients",
        5,
        5,
        false,
        true,
        true,
        None,
        false,
    ));
}

/// Restarts, random partitions, unreliable network, 15 clients on random keys, 7 servers.
#[test]
fn persist_partition_unreliable_linearizable_4b() {
    generic_test(make_test(
        "4B restarts, partitions, random keys, many clients",
        15,
        7,
        false,
        true,
        true,
        None,
        true,
    ));
}

// ---------------------------------------------------------------- 4C

/// A server that missed many entries while partitioned catches up through InstallSnapshot.
#[test]
fn snapshot_rpc_4c() {
    let t = make_test(
        "4C SnapshotsRPC",
        0,
        3,
        true,
        false,
        false,
        Some(MAXRAFTSTATE),
        false,
    );
    let ts = t.ts.clone();
    let ck = ts.make_clerk();
    let vera = ts.put_at_least_once(ck.ck.as_ref(), "a", "A", 0, TESTER);
    ts.check_get(ck.ck.as_ref(), "a", "A", vera);

    // A bunch of puts into the majority partition.
    t.g().partition(&[0, 1], &[2]);
    let verb = {
        let ck1 = t.make_clerk_to(&[0, 1]);
        for i in 0..50 {
            let s = i.to_string();
            ts.put_at_least_once(ck1.ck.as_ref(), &s, &s, 0, TESTER);
        }
        thread::sleep(ELECTION_TIMEOUT);
        ts.put_at_least_once(ck1.ck.as_ref(), "b", "B", 0, TESTER)
    };

    // Check that the majority partition has thrown away most of its log entries.
    let sz = t.g().log_size();
    if sz > 8 * MAXRAFTSTATE {
        t.fatal(&format!("logs were not trimmed ({sz} > 8*{MAXRAFTSTATE})"));
    }

    // Now make a group that requires the lagging server, so that it has to catch up.
    t.g().partition(&[0, 2], &[1]);
    let verc = {
        let ck1 = t.make_clerk_to(&[0, 2]);
        let verc = ts.put_at_least_once(ck1.ck.as_ref(), "c", "C", 0, TESTER);
        ts.put_at_least_once(ck1.ck.as_ref(), "d", "D", 0, TESTER);
        ts.check_get(ck1.ck.as_ref(), "a", "A", vera);
        ts.check_get(ck1.ck.as_ref(), "b", "B", verb);
        ts.check_get(ck1.ck.as_ref(), "1", "1", 1);
        ts.check_get(ck1.ck.as_ref(), "49", "49", 1);
        verc
    };

    // Now everybody.
    t.g().partition(&[0, 1, 2], &[]);
    let vere = ts.put_at_least_once(ck.ck.as_ref(), "e", "E", 0, TESTER);
    ts.check_get(ck.ck.as_ref(), "c", "C", verc);
    ts.check_get(ck.ck.as_ref(), "e", "E", vere);
    ts.check_get(ck.ck.as_ref(), "1", "1", 1);
    ts.end();
}

/// Snapshots keep the log small and hold only the service state.
#[test]
fn snapshot_size_4c() {
    const MAX_SNAPSHOT_STATE: usize = 500;
    let t = make_test(
        "4C snapshot size is reasonable",
        0,
        3,
        true,
        false,
        false,
        Some(MAXRAFTSTATE),
        false,
    );
    let ts = t.ts.clone();
    let ck = ts.make_clerk();
    let mut ver = 0;
    for _ in 0..200 {
        ver = ts.put_at_least_once(ck.ck.as_ref(), "x", "0", ver, TESTER);
        ts.check_get(ck.ck.as_ref(), "x", "0", ver);
        ver = ts.put_at_least_once(ck.ck.as_ref(), "x", "1", ver, TESTER);
        ts.check_get(ck.ck.as_ref(), "x", "1", ver);
    }
    // Check that the servers have thrown away most of their log entries.
    let sz = t.g().log_size();
    if sz > 8 * MAXRAFTSTATE {
        t.fatal(&format!("logs were not trimmed ({sz} > 8*{MAXRAFTSTATE})"));
    }
    // Check that the snapshots are not unreasonably large.
    let ssz = t.g().snapshot_size();
    if ssz > MAX_SNAPSHOT_STATE {
        t.fatal(&format!(
            "snapshot too large ({ssz} > {MAX_SNAPSHOT_STATE}), should not be storing other info"
        ));
    }
    ts.end();
}

/// The speed test with snapshots.
#[test]
fn speed_4c() {
    generic_test_speed(make_test(
        "4C speed",
        1,
        3,
        true,
        false,
        false,
        Some(MAXRAFTSTATE),
        false,
    ));
}

/// Restarts recover from snapshots, one client.
#[test]
fn snapshot_recover_4c() {
    generic_test(make_test(
        "4C restarts, snapshots, one client",
        1,
        5,
        true,
        true,
        false,
        Some(MAXRAFTSTATE),
        false,
    ));
}

/// Restarts recover from snapshots, 20 clients.
#[test]
fn snapshot_recover_many_clients_4c() {
    generic_test(make_test(
        "4C restarts, snapshots, many clients ",
        20,
        5,
        true,
        true,
        false,
        Some(MAXRAFTSTATE),
        false,
    ));
}

/// Snapshots on an unreliable network.
#[test]
fn snapshot_unreliable_4c() {
    generic_test(make_test(
        "4C unreliable net, snapshots, many clients",
        5,
        5,
        false,
        false,
        false,
        Some(MAXRAFTSTATE),
        false,
    ));
}

/// Snapshots, restarts, unreliable network.
#[test]
fn snapshot_unreliable_recover_4c() {
    generic_test(make_test(
        "4C unreliable net, restarts, snapshots, many clients",
        5,
        5,
        false,
        true,
        false,
        Some(MAXRAFTSTATE),
        false,
    ));
}

/// Snapshots, restarts, random partitions, unreliable network.
#[test]
fn snapshot_unreliable_recover_concurrent_partition_4c() {
    generic_test(make_test(
        "4C unreliable net, restarts, partitions, snapshots, many clients",
        5,
        5,
        false,
        true,
        true,
        Some(MAXRAFTSTATE),
        false,
    ));
}

/// Snapshots, restarts, random partitions, unreliable network, 15 clients on random keys,
/// 7 servers.
#[test]
fn snapshot_unreliable_recover_concurrent_partition_linearizable_4c() {
    generic_test(make_test(
        "4C unreliable net, restarts, partitions, snapshots, random keys, many clients",
        15,
        7,
        false,
        true,
        true,
        Some(MAXRAFTSTATE),
        true,
    ));
}
