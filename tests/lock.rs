//! Lab 2 lock tests, ported from the Go labs' `kvsrv1/lock/lock_test.go` (Spring 2025).

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use raftkv::kvapi::KvErr;
use raftkv::kvsrv::lock::Lock;
use raftkv::tester::kvsrv::make_test_kv;
use raftkv::tester::kvtest::{ClntRes, Done, KvTest, TestClerk};

const NCLNT: usize = 10;
const NSEC: u64 = 2;

fn one_client(ts: &KvTest, me: usize, ck: &TestClerk, done: &Done) -> ClntRes {
    let lk = Lock::new(ck.ck.clone(), "l");
    let ck = ck.ck.as_ref();
    let _ = ck.put("l0", "", 0);
    let mut i = 1;
    while !done.is_done() {
        lk.acquire();
        let (val, ver, err) = ck.get("l0");
        if err != KvErr::Ok {
            ts.fatal(&format!("{me}: get failed {err}"));
        }
        if !val.is_empty() {
            ts.fatal(&format!("{me}: two clients acquired lock {val}"));
        }
        let err = ck.put("l0", &me.to_string(), ver);
        if err != KvErr::Ok && err != KvErr::Maybe {
            ts.fatal(&format!("{me}: put failed {err}"));
        }
        thread::sleep(Duration::from_millis(10));
        let err = ck.put("l0", "", ver + 1);
        if err != KvErr::Ok && err != KvErr::Maybe {
            ts.fatal(&format!("{me}: put failed {err}"));
        }
        lk.release();
        i += 1;
    }
    ClntRes { nok: i, nmaybe: 0 }
}

/// Run test clients.
fn run_clients(nclnt: usize, reliable: bool) {
    let ts: Arc<KvTest> = make_test_kv(reliable);
    ts.cfg.begin(&format!("Test: {nclnt} lock clients"));
    ts.spawn_clients_and_wait(nclnt, Duration::from_secs(NSEC), {
        let ts = ts.clone();
        move |me, ck, done| one_client(&ts, me, ck, done)
    });
    ts.end();
}

#[test]
fn one_client_reliable() {
    run_clients(1, true);
}

#[test]
fn many_clients_reliable() {
    run_clients(NCLNT, true);
}

#[test]
fn one_client_unreliable() {
    run_clients(1, false);
}

#[test]
fn many_clients_unreliable() {
    run_clients(NCLNT, false);
}
