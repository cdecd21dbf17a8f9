//! Lab 4A/4C rsm tests, ported from the Go labs' `kvraft1/rsm/rsm_test.go` (Spring 2025): same
//! scenarios, constants and assertions. `cargo test --test rsm 4a` runs one part.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam::channel;
use raftkv::tester::kvraft::{CounterReq, FAULT_ENV, NSEC, NSRV, RsmTest};
use raftkv::tester::{panic_message, run_test_in_child};

/// The rsm tests' snapshot threshold (Go's `MAXRAFTSTATE`).
const MAXRAFTSTATE: usize = 1000;

fn sleep_ms(ms: u64) {
    thread::sleep(Duration::from_millis(ms));
}

/// Runs `n` copies of `f` on their own threads. The receiver gets one message once all are
/// done: `Err` with the first panic's message if any of them failed a check.
fn spawn_all<F>(n: usize, f: F) -> channel::Receiver<Result<(), String>>
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
        let mut outcome = Ok(());
        for h in handles {
            if let Err(e) = h.join()
                && outcome.is_ok()
            {
                outcome = Err(panic_message(&*e));
            }
        }
        let _ = tx.send(outcome);
    });
    rx
}

/// Waits up to `timeout` for a [`spawn_all`] batch: true if it finished, and fails the test
/// with the helper's message if one of them failed.
fn finished_within(
    ts: &RsmTest,
    done: &channel::Receiver<Result<(), String>>,
    timeout: Duration,
) -> bool {
    match done.recv_timeout(timeout) {
        Ok(Ok(())) => true,
        Ok(Err(msg)) => ts.fatal(&format!("a submitting thread failed: {msg}")),
        Err(_) => false,
    }
}

/// NINC sequential Incs on a fresh group, each checked (the value returned, and every
/// replica reaching it, as Go does); returns the last counter.
fn inc_sequence(ts: &RsmTest, ninc: i64) -> i64 {
    let mut n = 0;
    for i in 0..ninc {
        n = ts.one_inc();
        if n != i + 1 {
            ts.fatal(&format!("expected {}, got {n}", i + 1));
        }
        ts.check_counter(n, NSRV);
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
    if !finished_within(&ts, &done, Duration::from_secs(120)) {
        ts.fatal("concurrent Incs did not finish");
    }
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
        Some(raftkv::tester::kvraft::CounterRep::Inc { n }) => n,
        other => ts.fatal(&format!("Inc in majority failed: {other:?}")),
    };

    // The Decs must still be waiting.
    if finished_within(&ts, &done, Duration::from_secs(1)) {
        ts.fatal("Submit in minority completed");
    }

    // Heal: every pending Dec must return (not OK) within a second.
    ts.g().connect_one(l);
    if !finished_within(&ts, &done, Duration::from_secs(1)) {
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

/// Each new leader appends a term-start entry, so a restarted group replays its whole log
/// (entries of earlier terms commit only with an entry of the current term, Raft §5.4.2)
/// without waiting for a new request.
#[test]
fn restart_replays_without_a_new_request_4a() {
    const NINC: i64 = 10;
    let ts = RsmTest::new(None);
    ts.begin("Test Restart replays without a new request");
    inc_sequence(&ts, NINC);
    ts.g().shutdown();
    ts.g().start_servers();
    sleep_ms(2000);
    ts.check_counter(NINC, NSRV);
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
    if !finished_within(&ts, &done, Duration::from_secs(NSEC + 1)) {
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
    if !finished_within(&ts, &done, Duration::from_secs(NSEC + 1)) {
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

/// The check in the submitting threads can fail: an rsm that answers OK for a Dec it never
/// committed (the harness fault `minority-ok`, which turns the failed Submits into OKs once
/// the partition heals) must fail leader_partition_4a with that check's message.
#[test]
fn harness_fails_an_ok_from_a_cut_off_leader_4a() {
    let (passed, output) = run_test_in_child("leader_partition_4a", &[(FAULT_ENV, "minority-ok")]);
    assert!(
        !passed && output.contains("Submit Dec in minority completed"),
        "leader_partition_4a passed, or failed otherwise, with a minority OK:\n{output}"
    );
}

/// The per-Inc replica check can fail: a replica whose state lags until a restart replays
/// its log (the harness fault `replica-lag`) must fail restart_replay_4a.
#[test]
fn harness_fails_a_lagging_replica_4a() {
    let (passed, output) = run_test_in_child("restart_replay_4a", &[(FAULT_ENV, "replica-lag")]);
    assert!(
        !passed && output.contains("check_counter: only 2 servers reached 1"),
        "restart_replay_4a passed, or failed otherwise, with a lagging replica:\n{output}"
    );
}

// ---------------------------------------------------------------- bad snapshots

mod bad_snapshots {
    use std::sync::Arc;
    use std::thread;
    use std::time::{Duration, Instant};

    use parking_lot::Mutex;
    use raftkv::kvraft::rsm::{Rsm, RsmError, StateMachine};
    use raftkv::labrpc::{Network, Server};
    use raftkv::tester::{Persister, RaftRpcService};

    /// Counts ops; its snapshots are the count, and restoring one fails when told to.
    struct Tally {
        n: Mutex<u64>,
        refuse_restore: bool,
    }

    impl StateMachine for Tally {
        fn do_op(&self, _req: &[u8]) -> Vec<u8> {
            *self.n.lock() += 1;
            Vec::new()
        }
        fn snapshot(&self) -> Vec<u8> {
            self.n.lock().to_le_bytes().to_vec()
        }
        fn restore(&self, data: &[u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            if self.refuse_restore {
                return Err("this replica cannot read snapshots".into());
            }
            let bytes: [u8; 8] = data.try_into().map_err(|_| "snapshot is not 8 bytes")?;
            *self.n.lock() = u64::from_le_bytes(bytes);
            Ok(())
        }
    }

    fn ends(net: &Network, i: usize, n: usize) -> Vec<raftkv::labrpc::ClientEnd> {
        (0..n)
            .map(|j| {
                let name = format!("end-{i}-{j}");
                let e = net.make_end(&name).unwrap();
                net.connect(&name, &format!("server-{j}"));
                net.enable(&name, true);
                e
            })
            .collect()
    }

    /// A persisted snapshot the service cannot read: the replica does not start.
    #[test]
    fn unreadable_persisted_snapshot_is_an_error_4c() {
        let net = Network::new();
        let persister = Persister::new();
        persister.save(Vec::new(), Some(b"not an rsm snapshot".to_vec()));
        let sm = Arc::new(Tally {
            n: Mutex::new(0),
            refuse_restore: false,
        });
        match Rsm::new(ends(&net, 0, 1), 0, persister, Some(1000), sm) {
            Err(RsmError::CorruptSnapshot { peer: 0, .. }) => {}
            Err(e) => panic!("wrong error for a corrupt snapshot: {e}"),
            Ok(_) => panic!("started from a corrupt snapshot"),
        }
        net.cleanup();
    }

    /// A follower handed a snapshot it cannot restore stops for good: its Raft is killed
    /// and it never applies entries onto the wrong state; the others go on.
    #[test]
    fn unrestorable_installed_snapshot_stops_the_replica_4c() {
        let net = Network::new();
        let n = 3;
        let victim = 2;
        let mut rsms = Vec::new();
        let mut tallies = Vec::new();
        for i in 0..n {
            let sm = Arc::new(Tally {
                n: Mutex::new(0),
                refuse_restore: i == victim,
            });
            let rsm = Rsm::new(ends(&net, i, n), i, Persister::new(), Some(500), sm.clone())
                .expect("a fresh replica starts");
            let mut server = Server::new();
            server.add_service(rsm.raft().rpc_service());
            net.add_server(&format!("server-{i}"), server);
            rsms.push(rsm);
            tallies.push(sm);
        }
        // Cut the victim off, commit enough for the others to snapshot, then heal: the
        // leader can only catch the victim up with its snapshot.
        for j in 0..n {
            net.enable(&format!("end-{victim}-{j}"), false);
            net.enable(&format!("end-{j}-{victim}"), false);
        }
        let t0 = Instant::now();
        let mut done = 0;
        while done < 200 {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no progress in the majority"
            );
            if (0..n).any(|i| i != victim && rsms[i].submit(vec![0; 16]).is_ok()) {
                done += 1;
            } else {
                thread::sleep(Duration::from_millis(20));
            }
        }
        assert!(
            rsms[0].raft().persist_bytes() < 2000 || rsms[1].raft().persist_bytes() < 2000,
            "the majority did not snapshot"
        );
        for j in 0..n {
            net.enable(&format!("end-{victim}-{j}"), true);
            net.enable(&format!("end-{j}-{victim}"), true);
        }
        let t0 = Instant::now();
        while rsms[victim].failure().is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the victim did not stop on a snapshot it cannot restore"
            );
            thread::sleep(Duration::from_millis(20));
        }
        match rsms[victim].failure() {
            Some(RsmError::CorruptSnapshot {
                peer,
                index: Some(_),
                ..
            }) => assert_eq!(peer, victim),
            other => panic!("wrong failure: {other:?}"),
        }
        assert!(
            rsms[victim].raft().killed(),
            "a stopped replica's Raft still runs"
        );
        assert_eq!(
            *tallies[victim].n.lock(),
            0,
            "the victim applied onto the wrong state"
        );
        assert!(
            rsms[victim].submit(vec![1]).is_err(),
            "a stopped replica served"
        );
        // The other two still make progress.
        let t0 = Instant::now();
        while !(0..n).any(|i| i != victim && rsms[i].submit(vec![2]).is_ok()) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the majority stopped"
            );
            thread::sleep(Duration::from_millis(20));
        }
        drop(rsms);
        net.cleanup();
    }
}
