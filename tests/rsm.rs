//! Lab 4A/4C rsm tests, ported from the Go labs' `kvraft1/rsm/rsm_test.go` (Spring 2025): same
//! scenarios, constants and assertions. `cargo test --test rsm 4a` runs one part.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam::channel;
use raftkv::kvraft::harness::{CounterReq, NSEC, NSRV, RsmTest};

/// The rsm tests' snapshot threshold (Go's `MAXRAFTSTATE`).
const MAXRAFTSTATE: usize = 1000;

fn sleep_ms(ms: u64) {
    thread::sleep(Duration::from_millis(ms));
}

/// Runs `n` copies of `f` on their own threads; the receiver gets one message once all are done.
fn spawn_all<F>(n: usize, f: F) -> channel::Receiver<()>
where
    F: Fn() + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let (tx, rx) = channel::bounded(1);
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let f = f.clone();
            thread::spawn(move || f())
        })
        .collect();
    thread::spawn(move || {
        for h in handles {
            let _ = h.join();
        }
        let _ = tx.send(());
    });
    rx
}

/// NINC sequential Incs on a fresh group, each checked; returns the last counter.
fn inc_sequence(ts: &RsmTest, ninc: i64) -> i64 {
    let mut n = 0;
    for i in 0..ninc {
        n = ts.one_inc();
        if n != i + 1 {
            ts.fatal(&format!("expected {}, got {n}", i + 1));
        }
    }
    n
}

/// Test basic operation: each Inc returns the next counter and every peer executes it.
#[test]
fn basic_4a() {
    const NINC: i64 = 10;
    let ts = RsmTest::new(None);
    ts.begin("Test RSM basic");
    for i in 0..NINC {
        let n = ts.one_inc();
        if n != i + 1 {
            ts.fatal(&format!("expected {}, got {n}", i + 1));
        }
        ts.check_counter(n, NSRV);
    }
    ts.end();
}

/// Test concurrent submits: each Inc is executed exactly once.
#[test]
fn concurrent_4a() {
    const NINC: usize = 50;
    let ts = RsmTest::new(None);
    ts.begin("Test concurrent submit");
    let done = {
        let ts = ts.clone();
        spawn_all(NINC, move || {
            ts.one_inc();
        })
    };
    let _ = done.recv();
    ts.check_counter(NINC as i64, NSRV);
    ts.end();
}

/// Test that the rsm goes on after the leader is cut off, and the old leader catches up.
#[test]
fn leader_failure_4a() {
    let ts = RsmTest::new(None);
    ts.begin("Test Leader Failure");
    let n = ts.one_inc();
    ts.check_counter(n, NSRV);
    let l = ts
        .leader()
        .unwrap_or_else(|| ts.fatal("no leader after a successful Inc"));
    ts.g().disconnect_all(l);
    let n = ts.one_inc();
    ts.check_counter(n, NSRV - 1);
    ts.g().connect_one(l);
    ts.check_counter(n, NSRV);
    ts.end();
}

/// Test that Submits to a leader alone in a minority never succeed, wait while it is cut off,
/// and all return soon after the partition heals.
#[test]
fn leader_partition_4a() {
    const NSUBMIT: usize = 100;
    let ts = RsmTest::new(None);
    ts.begin("Test Leader Partition");
    // Submit an Inc so there is a leader.
    let n = ts.one_inc();
    ts.check_counter(n, NSRV);
    let l = ts
        .leader()
        .unwrap_or_else(|| ts.fatal("no leader after a successful Inc"));
    let (p1, p2) = ts.g().make_partition(l);
    ts.g().partition(&p1, &p2);

    // Decs to the old leader: none may commit, and none may return while it is cut off.
    let srv = ts.srv(l).unwrap_or_else(|| ts.fatal("leader has no rsm"));
    let done = {
        let ts = ts.clone();
        spawn_all(NSUBMIT, move || {
            if let Some(rep) = srv.submit(CounterReq::Dec) {
                ts.fatal(&format!("Submit Dec in minority completed: {rep:?}"));
            }
        })
    };

    // Submit an Inc in the majority.
    sleep_ms(10);
    let rep = ts.one_partition(Some(&p1), CounterReq::Inc);
    let n = match rep {
        Some(raftkv::kvraft::harness::CounterRep::Inc { n }) => n,
        other => ts.fatal(&format!("Inc in majority failed: {other:?}")),
    };

    // The Decs must still be waiting.
    if done.recv_timeout(Duration::from_secs(1)).is_ok() {
        ts.fatal("Submit in minority completed");
    }

    // Heal: every pending Dec must return (not OK) within a second.
    ts.g().connect_one(l);
    if done.recv_timeout(Duration::from_secs(1)).is_err() {
        ts.fatal("Submit after healing didn't return");
    }

    // Check the counter after healing.
    ts.check_counter(n, NSRV);
    ts.end();
}

/// Test that a restarted group replays its log: the counter continues at 101.
#[test]
fn restart_replay_4a() {
    const NINC: i64 = 100;
    let ts = RsmTest::new(None);
    ts.begin("Test Restart");
    inc_sequence(&ts, NINC);
    ts.g().shutdown();
    sleep_ms(1000);
    ts.g().start_servers();
    // The log must be replayed before this Inc executes.
    let n = ts.one_inc();
    if n != NINC + 1 {
        ts.fatal(&format!("expected {} got {n}", NINC + 1));
    }
    sleep_ms(1000);
    ts.check_counter(NINC + 1, NSRV);
    ts.end();
}

/// Test that pending Submits return after Raft is killed.
#[test]
fn shutdown_4a() {
    const NSUBMIT: usize = 100;
    let ts = RsmTest::new(None);
    ts.begin("Test Shutdown");
    let done = {
        let ts = ts.clone();
        spawn_all(NSUBMIT, move || {
            ts.one_null();
        })
    };
    sleep_ms(20);
    ts.g().shutdown();
    if done.recv_timeout(Duration::from_secs(NSEC + 1)).is_err() {
        ts.fatal("Submit didn't stop after shutdown");
    }
    ts.end();
}

/// Test that pending Submits return after Raft is killed, on a restarted group, and that the
/// group works again after another restart.
#[test]
fn restart_submit_4a() {
    const NINC: i64 = 100;
    const NSUBMIT: usize = 100;
    let ts = RsmTest::new(None);
    ts.begin("Test Restart and submit");
    inc_sequence(&ts, NINC);
    ts.g().shutdown();
    sleep_ms(1000);
    ts.g().start_servers();
    let n = ts.one_inc();
    if n != NINC + 1 {
        ts.fatal(&format!("expected {} got {n}", NINC + 1));
    }
    sleep_ms(1000);

    // Submits while the servers are shut down.
    let done = {
        let ts = ts.clone();
        spawn_all(NSUBMIT, move || {
            ts.one_null();
        })
    };
    sleep_ms(20);
    ts.g().shutdown();
    if done.recv_timeout(Duration::from_secs(NSEC + 1)).is_err() {
        ts.fatal("Submit didn't stop after shutdown");
    }

    // Restart and check that the servers work again.
    ts.g().start_servers();
    let n = ts.one_inc();
    ts.check_counter(n, NSRV);
    ts.end();
}

/// Test that the rsm snapshots (the log stays small) and restores from the snapshot after a
/// restart.
#[test]
fn snapshot_4c() {
    const N: i64 = 100;
    let ts = RsmTest::new(Some(MAXRAFTSTATE));
    ts.begin("Test creating and restoring snapshot");
    for _ in 0..N {
        ts.one_inc();
    }
    ts.check_counter(N, NSRV);
    let sz = ts.g().log_size();
    if sz > 2 * MAXRAFTSTATE {
        ts.fatal(&format!(
            "logs were not trimmed ({sz} > 2 * {MAXRAFTSTATE})"
        ));
    }
    // Rebuild from the snapshot.
    ts.g().shutdown();
    ts.g().start_servers();
    ts.one_inc();
    ts.check_counter(N + 1, NSRV);
    ts.end();
}
