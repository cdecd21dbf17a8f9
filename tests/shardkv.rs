//! Lab 5 tests, ported from the Go labs' `shardkv1/shardkv_test.go` (Spring 2025): same
//! scenarios, constants and assertions. `cargo test --test shardkv 5b` runs one part.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, RecvTimeoutError, TryRecvError};
use raftkv::shardkv::shardcfg::{GID1, NSHARDS, ShardConfig, Tshid, key2shard};
use raftkv::tester::Tgid;
use raftkv::tester::kvtest::{ClntRes, TestClerk, make_keys};
use raftkv::tester::shardkv::{NSRV, ShardKvTest, make_test, make_test_leases, make_test_max_raft};

/// Groups joined and left by the many-groups tests.
const NGRP: usize = 8;
/// Keys the tests put: five per shard on average.
const NKEYS: usize = 5 * NSHARDS;

fn spawn<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .expect("cannot start a test thread")
}

/// Joins a test thread; its panic fails the test.
fn join<T>(ts: &ShardKvTest, h: JoinHandle<T>, what: &str) -> T {
    match h.join() {
        Ok(t) => t,
        Err(_) => ts.fatal(&format!("{what} failed")),
    }
}

fn check_gets(ts: &ShardKvTest, ck: &TestClerk, ka: &[String], va: &[String]) {
    for (k, v) in ka.iter().zip(va) {
        ts.ts.check_get(ck.ck.as_ref(), k, v, 1);
    }
}

fn query(ts: &ShardKvTest) -> ShardConfig {
    match ts.query(&ts.shard_ctrler()) {
        Some(c) => c,
        None => ts.fatal("test controller killed"),
    }
}

// ---------------------------------------------------------------- 5A

/// The controller's init_config and query, on the Lab 2 server of group 0.
#[test]
fn init_query_5a() {
    let ts = make_test("Test (5A): Init and Query ...", true);
    let sck = ts.make_shard_ctrler();
    let mut scfg = ShardConfig::new();
    scfg.join_balance(&BTreeMap::from([(GID1, vec!["xxx".to_string()])]))
        .unwrap();
    if let Err(e) = sck.init_config(&scfg) {
        ts.fatal(&format!("init_config: {e}"));
    }
    let cfg = match ts.query(&sck) {
        Some(c) => c,
        None => ts.fatal("controller killed"),
    };
    if cfg.num != 1 || cfg.shards[0] != GID1 {
        ts.fatal(&format!("Static wrong {cfg}"));
    }
    if let Err(e) = cfg.check_config(&[GID1]) {
        ts.fatal(&e.to_string());
    }
    ts.end();
}

/// Gets and Puts with one shard group, before and after its leader crashes.
#[test]
fn static_one_shard_group_5a() {
    let ts = make_test("Test (5A): one shard group ...", true);
    ts.setup_kv_service();
    let ck = ts.make_clerk();
    let (ka, va) = ts.ts.spread_puts(ck.ck.as_ref(), NKEYS);
    check_gets(&ts, &ck, &ka, &va);
    // The remaining two servers must serve every key.
    ts.disconnect_clnt_from_leader(GID1);
    check_gets(&ts, &ck, &ka, &va);
    ts.end();
}

/// A second group joins: shards move to it, and the data really is split.
#[test]
fn join_basic_5a() {
    let ts = make_test("Test (5A): a group joins...", true);
    let gid1 = ts.setup_kv_service();
    let ck = ts.make_clerk();
    let (ka, va) = ts.ts.spread_puts(ck.ck.as_ref(), NKEYS);
    let sck = ts.shard_ctrler();
    let cfg = query(&ts);
    let gid2 = ts.new_gid();
    if !ts.join_groups(&sck, &[gid2]) {
        ts.fatal("join_groups failed");
    }
    let cfg1 = query(&ts);
    if cfg.num + 1 != cfg1.num {
        ts.fatal(&format!("wrong num {} expected {}", cfg1.num, cfg.num + 1));
    }
    if !cfg1.is_member(gid2) {
        ts.fatal(&format!("{gid2} isn't a member of {cfg1}"));
    }
    ts.check_shutdown_sharding(gid1, &ka, &va);
    check_gets(&ts, &ck, &ka, &va);
    ts.check_shutdown_sharding(gid2, &ka, &va);
    check_gets(&ts, &ck, &ka, &va);
    ts.end();
}

/// Moved shards are deleted from the old group's state and snapshot.
#[test]
fn delete_basic_5a() {
    const MAXRAFTSTATE: usize = 1000;
    const VALUESIZE: usize = 10000;
    let ts = make_test_max_raft("Test (5A): delete ...", true, false, Some(VALUESIZE));
    let gid1 = ts.setup_kv_service();
    let ck = ts.make_clerk();
    let (ka, va) = ts.ts.spread_puts_size(ck.ck.as_ref(), NKEYS, MAXRAFTSTATE);
    let sz = ts.cfg().group(gid1).snapshot_size();
    let sck = ts.shard_ctrler();
    let gid2 = ts.new_gid();
    if !ts.join_groups(&sck, &[gid2]) {
        ts.fatal("join_groups failed");
    }
    // Push more Gets through so that every peer snapshots.
    for _ in 0..5 {
        check_gets(&ts, &ck, &ka, &va);
    }
    let sz1 = ts.cfg().group(gid1).snapshot_size();
    let sz2 = ts.cfg().group(gid2).snapshot_size();
    if sz1 + sz2 > sz + 10000 {
        ts.fatal(&format!(
            "gid1 {sz1} + gid2 {sz2} = {} use too much space {sz}",
            sz1 + sz2
        ));
    }
    ts.end();
}

/// A group joins, the first group leaves (and is shut down), then rejoins.
#[test]
fn join_leave_basic_5a() {
    let ts = make_test("Test (5A): basic groups join/leave ...", true);
    let gid1 = ts.setup_kv_service();
    let ck = ts.make_clerk();
    let (ka, va) = ts.ts.spread_puts(ck.ck.as_ref(), NKEYS);
    let sck = ts.shard_ctrler();
    let gid2 = ts.new_gid();
    if !ts.join_groups(&sck, &[gid2]) {
        ts.fatal("join_groups failed");
    }
    ts.check_shutdown_sharding(gid1, &ka, &va);
    check_gets(&ts, &ck, &ka, &va);

    ts.leave(&sck, GID1);
    let cfg = query(&ts);
    if cfg.is_member(GID1) {
        ts.fatal(&format!("{GID1} is a member of {cfg}"));
    }
    ts.cfg().group(GID1).shutdown();
    check_gets(&ts, &ck, &ka, &va);

    // Bring the crashed group back to life, and rejoin it.
    ts.cfg().group(GID1).start_servers();
    ts.join(&sck, GID1, ts.cfg().group(GID1).srv_names());
    check_gets(&ts, &ck, &ka, &va);

    ts.check_shutdown_sharding(gid2, &ka, &va);
    ts.end();
}

/// Eight groups join one by one, one is shut down and restarted, then all leave.
fn join_leave_5a(reliable: bool, part: &str) {
    let ts = make_test(part, reliable);
    ts.setup_kv_service();
    let ck = ts.make_clerk();
    let (ka, va) = ts.ts.spread_puts(ck.ck.as_ref(), NKEYS);
    let sck = ts.shard_ctrler();
    let grps = ts.groups(NGRP);
    ts.join_groups(&sck, &grps);
    ts.check_shutdown_sharding(grps[0], &ka, &va);
    check_gets(&ts, &ck, &ka, &va);
    ts.leave_groups(&sck, &grps);
    check_gets(&ts, &ck, &ka, &va);
    ts.end();
}

#[test]
fn many_join_leave_reliable_5a() {
    join_leave_5a(true, "Test (5A): many groups join/leave reliable...");
}

#[test]
fn many_join_leave_unreliable_5a() {
    join_leave_5a(false, "Test (5A): many groups join/leave unreliable...");
}

/// Every shard group is shut down and restarted: the state must survive.
#[test]
fn shutdown_5a() {
    const NJOIN: usize = 2;
    const NGRP: Tgid = 2 + NJOIN;
    let ts = make_test("Test (5A): shutdown ...", true);
    ts.setup_kv_service();
    let ck = ts.make_clerk();
    let (ka, va) = ts.ts.spread_puts(ck.ck.as_ref(), NKEYS);
    let sck = ts.shard_ctrler();
    let grps = ts.groups(NJOIN);
    ts.join_groups(&sck, &grps);
    ts.check_shutdown_sharding(grps[0], &ka, &va);
    check_gets(&ts, &ck, &ka, &va);
    for g in GID1..NGRP {
        ts.cfg().group(g).shutdown();
    }
    for g in GID1..NGRP {
        ts.cfg().group(g).start_servers();
    }
    check_gets(&ts, &ck, &ka, &va);
    ts.end();
}

/// With two of five groups down, Gets of keys on live groups finish within 2 s.
#[test]
fn progress_shutdown_5a() {
    const NJOIN: usize = 4;
    const NSEC: Duration = Duration::from_secs(2);
    let ts = make_test("Test (5A): progress ...", true);
    ts.setup_kv_service();
    let ck = ts.make_clerk();
    let (ka, va) = ts.ts.spread_puts(ck.ck.as_ref(), NKEYS);
    let sck = ts.shard_ctrler();
    let grps = ts.groups(NJOIN);
    ts.join_groups(&sck, &grps);
    let end = 2;
    for &g in &grps[..end] {
        ts.cfg().group(g).shutdown();
    }
    let alive: HashSet<Tgid> = grps[end..].iter().copied().collect();
    let cfg = query(&ts);
    let (tx, rx) = channel::bounded::<()>(1);
    let h = {
        let (ts, ck) = (ts.clone(), ck.clone());
        spawn("progress-gets", move || {
            for (k, v) in ka.iter().zip(&va) {
                if alive.contains(&cfg.shards[key2shard(k)]) {
                    ts.ts.check_get(ck.ck.as_ref(), k, v, 1);
                }
            }
            let _ = tx.send(());
        })
    };
    match rx.recv_timeout(NSEC) {
        Ok(()) => join(&ts, h, "the Gets"),
        Err(RecvTimeoutError::Timeout) => ts.fatal("Gets didn't finish"),
        Err(RecvTimeoutError::Disconnected) => {
            join(&ts, h, "the Gets");
            ts.fatal("Gets didn't finish")
        }
    }
    ts.end();
}

/// While a group joins and leaves over and over, Gets of shards that do not move keep
/// finishing: at least 100 in 4 s.
#[test]
fn progress_join_5a() {
    const NJOIN: usize = 4;
    const NSEC: Duration = Duration::from_secs(4);
    const NCNT: usize = 100;
    let ts = make_test("Test (5A): progress ...", true);
    ts.setup_kv_service();
    let ck = ts.make_clerk();
    let (ka, va) = ts.ts.spread_puts(ck.ck.as_ref(), NKEYS);
    let sck = ts.shard_ctrler();
    let grps = ts.groups(NJOIN);
    ts.join_groups(&sck, &grps);

    let cfg = query(&ts);
    let mut newcfg = cfg.clone();
    let newgid: Tgid = NJOIN + 3;
    if newcfg
        .join_balance(&BTreeMap::from([(newgid, vec!["xxx".to_string()])]))
        .is_err()
    {
        ts.fatal("JoinBalance failed");
    }
    let mut newcfg1 = newcfg.clone();
    if newcfg1.leave_balance(&[newgid]).is_err() {
        ts.fatal("LeaveBalance failed");
    }
    // Which shards don't move, and which groups take part in moving the others.
    let mut stable: HashSet<Tshid> = HashSet::new();
    let mut participating: HashSet<Tgid> = HashSet::new();
    for (s, &g) in newcfg1.shards.iter().enumerate() {
        if newcfg.shards[s] == g {
            stable.insert(s);
        } else {
            participating.insert(g);
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mover = {
        let (ts, sck, stop) = (ts.clone(), sck.clone(), stop.clone());
        spawn("join-leave", move || {
            while !stop.load(Ordering::SeqCst) {
                if !ts.join_groups(&sck, &[newgid]) {
                    ts.fatal("join failed");
                }
                if !ts.leave_groups(&sck, &[newgid]) {
                    ts.fatal("leave failed");
                }
            }
        })
    };
    let (tx, rx) = channel::bounded::<usize>(1);
    let getter = {
        let (ts, ck) = (ts.clone(), ck.clone());
        spawn("stable-gets", move || {
            let t = Instant::now() + NSEC;
            let mut nget = 0;
            while Instant::now() < t {
                for (k, v) in ka.iter().zip(&va) {
                    let s = key2shard(k);
                    if stable.contains(&s) && participating.contains(&newcfg1.shards[s]) {
                        ts.ts.check_get(ck.ck.as_ref(), k, v, 1);
                        nget += 1;
                    }
                }
            }
            let _ = tx.send(nget);
        })
    };
    match rx.recv_timeout(2 * NSEC) {
        Ok(cnt) => {
            println!("cnt {cnt}");
            if cnt < NCNT {
                ts.fatal(&format!(
                    "Two few gets finished {cnt}; expected more than {NCNT}"
                ));
            }
        }
        Err(_) => ts.fatal("Gets didn't finish"),
    }
    join(&ts, getter, "the Gets");
    stop.store(true, Ordering::SeqCst);
    join(&ts, mover, "the join/leave thread");
    ts.end();
}

/// `nclnt` clerks Put and Get concurrently for 20 s while eight groups join and leave; the
/// history must be linearizable.
fn concurrent_clerk(nclnt: usize, reliable: bool, part: &str) {
    const NSEC: Duration = Duration::from_secs(20);
    let ts = make_test(part, reliable);
    ts.setup_kv_service();
    let ka = make_keys(NKEYS);
    let clients = {
        let kv = ts.ts.clone();
        spawn("clients", move || {
            let kv2 = kv.clone();
            kv.spawn_clients_and_wait(nclnt, NSEC, move |me, ck, done| {
                kv2.one_client_put(me, ck.ck.as_ref(), &ka, done)
            })
        })
    };
    let sck = ts.shard_ctrler();
    let grps = ts.groups(NGRP);
    if !ts.join_groups(&sck, &grps) {
        ts.fatal("concurrentClerk: joinGroups failed");
    }
    if !ts.leave_groups(&sck, &grps) {
        ts.fatal("concurrentClerk: leaveGroups failed");
    }
    let _: Vec<ClntRes> = join(&ts, clients, "the clients");
    ts.ts.check_porcupine();
    ts.end();
}

#[test]
fn one_concurrent_clerk_reliable_5a() {
    concurrent_clerk(1, true, "Test (5A): one concurrent clerk reliable...");
}

#[test]
fn many_concurrent_clerk_reliable_5a() {
    const NCLNT: usize = 10;
    concurrent_clerk(NCLNT, true, "Test (5A): many concurrent clerks reliable...");
}

#[test]
fn one_concurrent_clerk_unreliable_5a() {
    concurrent_clerk(1, false, "Test (5A): one concurrent clerk unreliable ...");
}

#[test]
fn many_concurrent_clerk_unreliable_5a() {
    const NCLNT: usize = 10;
    concurrent_clerk(
        NCLNT,
        false,
        "Test (5A): many concurrent clerks unreliable...",
    );
}

// ---------------------------------------------------------------- 5B

/// A join (and a leave) cannot finish while a group it moves shards from (to) is down, and
/// finishes within 2 s of the group's restart.
#[test]
fn join_leave_5b() {
    const NSEC: Duration = Duration::from_secs(2);
    let ts = make_test("Test (5B): Join/leave while a shardgrp is down...", true);
    let gid1 = ts.setup_kv_service();
    let ck = ts.make_clerk();
    let (ka, va) = ts.ts.spread_puts(ck.ck.as_ref(), NKEYS);
    let sck = ts.shard_ctrler();
    let cfg = query(&ts);

    ts.cfg().group(gid1).shutdown();
    let gid2 = ts.new_gid();
    let (tx, rx) = channel::bounded::<bool>(1);
    let h = {
        let (ts, sck, tx) = (ts.clone(), sck.clone(), tx.clone());
        spawn("join", move || {
            let _ = tx.send(ts.join_groups(&sck, &[gid2]));
        })
    };
    // Go waits 1 * NSEC nanoseconds here: effectively a check that it has not finished.
    thread::sleep(Duration::from_nanos(2));
    match rx.try_recv() {
        Ok(ok) => ts.fatal(&format!("Join finished {ok}")),
        Err(TryRecvError::Empty) => {}
        Err(TryRecvError::Disconnected) => ts.fatal("join thread failed"),
    }
    // Now the join should be able to finish.
    ts.cfg().group(gid1).start_servers();
    match rx.recv_timeout(NSEC) {
        Ok(true) => {}
        Ok(false) => ts.fatal("TestJoinLeave5B: Join returned false"),
        Err(_) => ts.fatal("Join didn't complete"),
    }
    join(&ts, h, "the join thread");
    let cfg1 = query(&ts);
    if cfg.num + 1 != cfg1.num {
        ts.fatal(&format!("wrong num {} expected {}", cfg1.num, cfg.num + 1));
    }

    ts.cfg().group(gid2).shutdown();
    let h = {
        let (ts, sck) = (ts.clone(), sck.clone());
        spawn("leave", move || {
            let _ = tx.send(ts.leave_groups(&sck, &[GID1]));
        })
    };
    match rx.recv_timeout(NSEC) {
        Ok(_) => ts.fatal("Leave finished"),
        Err(RecvTimeoutError::Timeout) => {}
        Err(RecvTimeoutError::Disconnected) => ts.fatal("leave thread failed"),
    }
    // Now the leave should be able to finish.
    ts.cfg().group(gid2).start_servers();
    match rx.recv_timeout(NSEC) {
        Ok(true) => {}
        Ok(false) => ts.fatal("TestJoinLeave5B: Leave failed"),
        Err(_) => ts.fatal("Leave didn't complete"),
    }
    join(&ts, h, "the leave thread");
    check_gets(&ts, &ck, &ka, &va);
    ts.end();
}

/// Five times: a controller is cut off mid-change (never to return) and a new one recovers.
#[test]
fn recover_ctrler_5b() {
    const NPARTITION: usize = 5;
    let ts = make_test("Test (5B): recover controller ...", true);
    let gid = ts.setup_kv_service();
    let ck = ts.make_clerk();
    let (ka, va) = ts.ts.spread_puts(ck.ck.as_ref(), NKEYS);
    for _ in 0..NPARTITION {
        ts.partition_ctrler(&ck, gid, &ka, &va);
    }
    ts.end();
}

// ---------------------------------------------------------------- 5C

/// Four controllers join and leave groups concurrently.
#[test]
fn concurrent_reliable_5c() {
    let ts = make_test_leases("Test (5C): Concurrent ctrlers ...", true);
    ts.setup_kv_service();
    let ck = ts.make_clerk();
    let (ka, va) = ts.ts.spread_puts(ck.ck.as_ref(), NKEYS);
    ts.concur_ctrler(&ck, &ka, &va);
    ts.end();
}

#[test]
fn acquire_lock_concurrent_unreliable_5c() {
    let ts = make_test_leases("Test (5C): Concurrent ctrlers ...", false);
    ts.setup_kv_service();
    let ck = ts.make_clerk();
    let (ka, va) = ts.ts.spread_puts(ck.ck.as_ref(), NKEYS);
    ts.concur_ctrler(&ck, &ka, &va);
    ts.end();
}

/// A controller cut off in the middle of a join is superseded by a new one; when it comes
/// back it must not finish (or disturb) anything.
#[test]
fn partition_controller_join_5c() {
    const NSEC: Duration = Duration::from_secs(1);
    let ts = make_test_leases("Test (5C): partition controller in join...", true);
    ts.setup_kv_service();
    let ck = ts.make_clerk();
    let (ka, va) = ts.ts.spread_puts(ck.ck.as_ref(), NKEYS);

    let (sck, clnt) = ts.make_shard_ctrler_clnt();
    if let Err(e) = sck.init_controller() {
        ts.fatal(&format!("init_controller: {e}"));
    }
    let ngid = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = channel::bounded::<()>(1);
    let h = {
        let (ts, sck, ngid) = (ts.clone(), sck.clone(), ngid.clone());
        spawn("join", move || {
            let g = ts.new_gid();
            ngid.store(g, Ordering::SeqCst);
            ts.cfg().make_group_start(g, NSRV, ts.start_fn());
            ts.cfg().group(g).shutdown();
            ts.join(&sck, g, ts.cfg().group(g).srv_names());
            let _ = tx.send(());
        })
    };
    // Give the controller the chance to get stuck in the join, because ngid is down.
    thread::sleep(Duration::from_secs(1));
    clnt.disconnect_all();
    // Wait a while before restarting ngid.
    thread::sleep(NSEC);
    let g = ngid.load(Ordering::SeqCst);
    ts.cfg().group(g).start_servers();

    // A new controller supersedes the cut-off one.
    let sck0 = ts.make_shard_ctrler();
    if let Err(e) = sck0.init_controller() {
        ts.fatal(&format!("init_controller: {e}"));
    }
    let scfg = match ts.query(&sck0) {
        Some(c) => c,
        None => ts.fatal("controller killed"),
    };
    if !scfg.is_member(g) {
        ts.fatal(&format!("Didn't recover gid {g}"));
    }
    // Reconnect the old controller, which shouldn't finish its change.
    clnt.connect_all();
    // Wait for the old controller to finish or bail out.
    if rx.recv().is_err() {
        join(&ts, h, "the old controller's join");
        ts.fatal("the old controller's join failed");
    }
    join(&ts, h, "the old controller's join");
    thread::sleep(Duration::from_secs(1));
    check_gets(&ts, &ck, &ka, &va);
    ts.end();
}

/// `npart` times a controller is cut off mid-change, superseded, and reconnected; with
/// `nclnt` clerks Putting for 60 s meanwhile (then the history must be linearizable), or
/// with 60 keys that must keep their values.
fn partition_recovery_5c(reliable: bool, npart: usize, nclnt: usize) {
    const NSEC: Duration = Duration::from_secs(60);
    let ts = make_test_leases(
        "Test (5C): controllers with leased leadership ...",
        reliable,
    );
    let gid = ts.setup_kv_service();
    let ck = ts.make_clerk();
    let (mut ka, mut va) = (Vec::new(), Vec::new());
    if nclnt == 0 {
        (ka, va) = ts.ts.spread_puts(ck.ck.as_ref(), NKEYS);
    }
    let clients = (nclnt > 0).then(|| {
        let kv = ts.ts.clone();
        spawn("clients", move || {
            let kv2 = kv.clone();
            let keys = make_keys(1);
            kv.spawn_clients_and_wait(nclnt, NSEC, move |me, ck, done| {
                kv2.one_client_put(me, ck.ck.as_ref(), &keys, done)
            })
        })
    });
    for _ in 0..npart {
        ts.partition_ctrler(&ck, gid, &ka, &va);
    }
    if let Some(h) = clients {
        let _: Vec<ClntRes> = join(&ts, h, "the clients");
        ts.ts.check_porcupine();
    }
    ts.end();
}

#[test]
fn partition_recovery_reliable_no_clerk_5c() {
    const NPARTITION: usize = 5;
    partition_recovery_5c(true, NPARTITION, 0);
}

#[test]
fn partition_recovery_unreliable_no_clerk_5c() {
    const NPARTITION: usize = 3;
    partition_recovery_5c(false, NPARTITION, 0);
}

#[test]
fn partition_recovery_reliable_clerks_5c() {
    const NPARTITION: usize = 5;
    partition_recovery_5c(true, NPARTITION, 5);
}

#[test]
fn partition_recovery_unreliable_clerks_5c() {
    const NPARTITION: usize = 3;
    partition_recovery_5c(false, NPARTITION, 5);
}
