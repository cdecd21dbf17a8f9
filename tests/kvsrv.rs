//! Lab 2 tests, ported from the Go labs' `kvsrv1/kvsrv_test.go` (Spring 2025).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};
use std::thread;
use std::time::Duration;

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use raftkv::kvapi::KvClerk;
use raftkv::kvapi::KvErr;
use raftkv::tester::kvsrv::make_test_kv;
use raftkv::tester::kvtest::ClntRes;
use raftkv::tester::randstring;

/// Counts the bytes currently allocated on the heap, for the memory test (Go reads
/// `runtime.MemStats.HeapAlloc`).
struct CountingAlloc;

static HEAP_BYTES: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            HEAP_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        HEAP_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HEAP_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The memory test measures the whole process's heap, so it runs alone: it takes this lock
/// for writing, every other test in this file for reading.
static HEAP_MEASUREMENT: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    HEAP_MEASUREMENT.read()
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    HEAP_MEASUREMENT.write()
}

/// Test Put with a single client and a reliable network.
#[test]
fn reliable_put() {
    let _g = shared();
    const VAL: &str = "6.5840";
    const VER: u64 = 0;
    let ts = make_test_kv(true);
    ts.cfg.begin("One client and reliable Put");
    let ck = ts.make_clerk();
    let ck = ck.ck.as_ref();
    let err = ck.put("k", VAL, VER);
    if err != KvErr::Ok {
        ts.fatal(&format!("Put err {err}"));
    }
    let (val, ver, err) = ck.get("k");
    if err != KvErr::Ok {
        ts.fatal(&format!("Get err {err}; expected OK"));
    }
    if val != VAL {
        ts.fatal(&format!("Get value err {val}; expected {VAL}"));
    }
    if ver != VER + 1 {
        ts.fatal(&format!("Get wrong version {ver}; expected {}", VER + 1));
    }
    let err = ck.put("k", VAL, 0);
    if err != KvErr::Version {
        ts.fatal(&format!(
            "expected Put to fail with ErrVersion; got err={err}"
        ));
    }
    let err = ck.put("y", VAL, 1);
    if err != KvErr::NoKey {
        ts.fatal(&format!(
            "expected Put to fail with ErrNoKey; got err={err}"
        ));
    }
    let (_, _, err) = ck.get("y");
    if err != KvErr::NoKey {
        ts.fatal(&format!(
            "expected Get to fail with ErrNoKey; got err={err}"
        ));
    }
    ts.end();
}

/// Many clients putting on the same key.
#[test]
fn put_concurrent_reliable() {
    let _g = shared();
    const PORCUPINE_TIME: Duration = Duration::from_secs(10);
    const NCLNT: usize = 10;
    const NSEC: u64 = 1;
    let ts = make_test_kv(true);
    ts.cfg
        .begin("Test: many clients racing to put values to the same key");
    let rs = ts.spawn_clients_and_wait(NCLNT, Duration::from_secs(NSEC), {
        let ts = ts.clone();
        move |me, ck, done| ts.one_client_put(me, ck.ck.as_ref(), &["k".to_string()], done)
    });
    let ck = ts.make_clerk();
    let mut res = ClntRes::default();
    ts.check_put_concurrent(ck.ck.as_ref(), "k", &rs, &mut res, ts.cfg.is_reliable());
    ts.check_porcupine_t(PORCUPINE_TIME);
    ts.end();
}

/// Check if memory used on server is reasonable.
#[test]
fn mem_put_many_clients_reliable() {
    let _g = exclusive();
    const NCLIENT: usize = 100_000;
    const MEM: usize = 1000;
    let ts = make_test_kv(true);
    let v = randstring(MEM);
    let cks: Vec<_> = (0..NCLIENT).map(|_| ts.make_clerk()).collect();
    // Force allocation of ends for server in each client.
    for (i, ck) in cks.iter().enumerate() {
        let err = ck.ck.put("k", "", 1);
        if err != KvErr::NoKey {
            ts.fatal(&format!("Put error {err} (client {i})"));
        }
    }
    ts.cfg.begin("Test: memory use many put clients");
    // Allow threads started by labrpc to start.
    thread::sleep(Duration::from_secs(1));
    let m0 = HEAP_BYTES.load(Ordering::SeqCst);
    for (i, ck) in cks.iter().enumerate() {
        let err = ck.ck.put("k", &v, i as u64);
        if err != KvErr::Ok {
            ts.fatal(&format!("Put error {err} (client {i})"));
        }
    }
    // Allow threads started by labrpc to shut down.
    thread::sleep(Duration::from_secs(1));
    let m1 = HEAP_BYTES.load(Ordering::SeqCst);
    let growth = m1 - m0;
    println!(
        "heap growth {growth} bytes for {NCLIENT} clients ({} per client)",
        growth / NCLIENT as i64
    );
    if m1 > m0 + (NCLIENT as i64 * 200) {
        ts.fatal(&format!(
            "error: server using too much memory m0 {m0} m1 {m1} ({} per client)",
            growth / NCLIENT as i64
        ));
    }
    ts.end();
}

/// Test with one client and unreliable network. If Clerk.Put returns ErrMaybe, the Put must
/// have happened, since the test uses only one client.
#[test]
fn unreliable_net() {
    let _g = shared();
    const NTRY: u64 = 100;
    let ts = make_test_kv(false);
    ts.cfg.begin("One client");
    let ck = ts.make_clerk();
    let ck: &dyn KvClerk = ck.ck.as_ref();
    let mut retried = false;
    for try_ in 0..NTRY {
        let mut i = 0usize;
        loop {
            let err = ts.put_json(ck, "k", &i, try_, 0);
            if err != KvErr::Maybe {
                if i > 0 && err != KvErr::Version {
                    ts.fatal(&format!("Put shouldn't have happen more than once {err}"));
                }
                break;
            }
            // Try put again; it should fail with ErrVersion.
            retried = true;
            i += 1;
        }
        let (v, ver): (usize, u64) = ts.get_json(ck, "k", 0);
        if ver != try_ + 1 {
            ts.fatal(&format!("Wrong version {ver} expect {}", try_ + 1));
        }
        if v != 0 {
            ts.fatal(&format!("Wrong value {v} expect 0"));
        }
    }
    if !retried {
        ts.fatal("Clerk.Put never returned ErrMaybe");
    }
    ts.check_porcupine();
    ts.end();
}
