//! When the rsm snapshots a state far larger than its threshold. A node's state can be many
//! times its `maxraftstate`: with a fixed threshold it would rewrite the whole state every
//! few writes. With [`Rsm::grow_snapshots_with_state`] the bytes written by snapshots stay
//! within a small multiple of the final state; without it (the labs' fixed threshold, kept
//! here as the variant the bound exists to catch) they do not.
//!
//! One peer on a real file log in a temporary directory: it elects itself and commits alone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use raftkv::raft::RaftTransport;
use raftkv::rsm::{RestoreError, Rsm, StateMachine};
use raftkv::storage::{FileLog, FileLogOptions};
use raftkv::tester::Solo;

/// Keys to values; counts the bytes of every snapshot it makes.
#[derive(Default)]
struct Store {
    map: Mutex<BTreeMap<u64, Vec<u8>>>,
    snapshot_bytes: AtomicUsize,
    snapshots: AtomicUsize,
}

impl StateMachine for Store {
    type Op = (u64, Vec<u8>);
    type Reply = ();

    fn apply(&self, ops: Vec<Self::Op>) -> Vec<()> {
        let mut map = self.map.lock();
        ops.into_iter()
            .map(|(k, v)| {
                map.insert(k, v);
            })
            .collect()
    }

    fn snapshot(&self) -> Vec<u8> {
        let data = bincode::serialize(&*self.map.lock()).expect("encode the map");
        self.snapshot_bytes.fetch_add(data.len(), Ordering::Relaxed);
        self.snapshots.fetch_add(1, Ordering::Relaxed);
        data
    }

    fn restore(&self, data: &[u8]) -> Result<(), RestoreError> {
        *self.map.lock() = bincode::deserialize(data)?;
        Ok(())
    }
}

const THRESHOLD: usize = 64 << 10;
const VALUE: usize = 4 << 10;
/// 4 MiB of state: 64 times the threshold.
const KEYS: u64 = 1024;

/// Writes [`KEYS`] values of [`VALUE`] bytes through one peer and returns (bytes written by
/// snapshots, snapshots taken, the final state's size).
fn write_state(grow: bool) -> (usize, usize, usize) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let storage = FileLog::open(dir.path(), FileLogOptions::default()).expect("open the log");
    let store = Arc::new(Store::default());
    let rsm = Rsm::new(
        Box::new(Solo) as Box<dyn RaftTransport>,
        0,
        Box::new(storage) as Box<dyn raftkv::raft::Storage>,
        Some(THRESHOLD),
        store.clone(),
    )
    .expect("start the rsm");
    if grow {
        rsm.grow_snapshots_with_state();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rsm.raft().get_state().1 {
        assert!(
            Instant::now() < deadline,
            "the lone peer did not lead within 20 s"
        );
        thread::sleep(Duration::from_millis(10));
    }
    for k in 0..KEYS {
        let value = vec![k as u8; VALUE];
        rsm.submit((k, value))
            .unwrap_or_else(|e| panic!("write {k}: {e:?}"));
    }
    let state = bincode::serialize(&*store.map.lock()).unwrap().len();
    rsm.kill();
    (
        store.snapshot_bytes.load(Ordering::Relaxed),
        store.snapshots.load(Ordering::Relaxed),
        state,
    )
}

#[test]
fn snapshots_of_a_growing_state_write_a_bounded_multiple_of_it() {
    let (written, snapshots, state) = write_state(true);
    println!("growing threshold: {snapshots} snapshots, {written} bytes for a {state}-byte state");
    assert!(
        snapshots >= 3,
        "only {snapshots} snapshots of a state 64 times the threshold"
    );
    assert!(
        written <= 4 * state,
        "snapshots wrote {written} bytes ({snapshots} of them) for a {state}-byte state: more than 4 times it"
    );

    // The variant the bound exists to catch: the fixed threshold rewrites the state every
    // 64 KiB of log.
    let (written, snapshots, state) = write_state(false);
    println!("fixed threshold: {snapshots} snapshots, {written} bytes for a {state}-byte state");
    assert!(
        written > 4 * state,
        "the fixed threshold wrote only {written} bytes for a {state}-byte state: the bound above cannot fail"
    );
}
