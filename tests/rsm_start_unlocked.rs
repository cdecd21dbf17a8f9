//! The rsm calls `Raft::start` outside its locks: `start` syncs the storage (an fsync with the
//! file log), and a submitter stuck in that sync must not hold up the reader or another
//! submitter. A one-peer cluster on the real file log, whose storage parks one chosen thread
//! inside `sync` until the test lets it go.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender};
use parking_lot::Mutex;
use raftkv::kvraft::rsm::{Rsm, StateMachine};
use raftkv::raft::log::Entry;
use raftkv::raft::{HardState, RaftTransport, Restored, Storage, StorageError};
use raftkv::storage::{FileLog, FileLogOptions};
use raftkv::tester::Solo;

/// The file log, except that the thread named by [`Gate::arm`] blocks in its next `sync` until
/// released (it reports on `entered` when it gets there).
struct GatedLog {
    inner: FileLog,
    gate: Arc<Gate>,
}

struct Gate {
    thread: Mutex<Option<ThreadId>>,
    entered: Sender<()>,
    release: Receiver<()>,
}

impl Gate {
    fn arm(&self) {
        *self.gate_thread() = Some(thread::current().id());
    }
    fn gate_thread(&self) -> parking_lot::MutexGuard<'_, Option<ThreadId>> {
        self.thread.lock()
    }
}

impl Storage for GatedLog {
    fn restore(&self) -> Result<Restored, StorageError> {
        self.inner.restore()
    }
    fn set_hard_state(&self, hs: HardState) -> Result<(), StorageError> {
        self.inner.set_hard_state(hs)
    }
    fn append(&self, first: u64, entries: &[Entry]) -> Result<(), StorageError> {
        self.inner.append(first, entries)
    }
    fn truncate_after(&self, index: u64) -> Result<(), StorageError> {
        self.inner.truncate_after(index)
    }
    fn save_snapshot(&self, index: u64, term: u64, data: &[u8]) -> Result<(), StorageError> {
        self.inner.save_snapshot(index, term, data)
    }
    fn sync(&self) -> Result<(), StorageError> {
        let me = thread::current().id();
        let gated = {
            let mut thread = self.gate.gate_thread();
            (*thread == Some(me)).then(|| thread.take())
        };
        if gated.is_some() {
            let _ = self.gate.entered.send(());
            // Bounded, so a broken run cannot hang the suite.
            let _ = self.gate.release.recv_timeout(Duration::from_secs(30));
        }
        self.inner.sync()
    }
    fn state_size(&self) -> usize {
        self.inner.state_size()
    }
}

/// Answers each request with itself and the number of requests applied before it.
#[derive(Default)]
struct Echo {
    applied: AtomicU64,
}

impl StateMachine for Echo {
    fn do_op(&self, req: &[u8]) -> Vec<u8> {
        let n = self.applied.fetch_add(1, Ordering::SeqCst);
        let mut reply = req.to_vec();
        reply.extend_from_slice(format!("#{n}").as_bytes());
        reply
    }
    fn snapshot(&self) -> Vec<u8> {
        Vec::new()
    }
    fn restore(&self, _: &[u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(())
    }
}

#[test]
fn a_submitter_stuck_in_sync_holds_up_neither_the_reader_nor_another_submitter() {
    let dir = std::env::temp_dir().join(format!("raftkv-rsm-unlocked-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (entered_tx, entered_rx) = channel::bounded(1);
    let (release_tx, release_rx) = channel::bounded(1);
    let gate = Arc::new(Gate {
        thread: Mutex::new(None),
        entered: entered_tx,
        release: release_rx,
    });
    let storage = GatedLog {
        inner: FileLog::open(&dir, FileLogOptions::default()).expect("open the file log"),
        gate: gate.clone(),
    };
    let sm = Arc::new(Echo::default());
    let transport: Box<dyn RaftTransport> = Box::new(Solo);
    let storage: Box<dyn Storage> = Box::new(storage);
    let rsm = Arc::new(Rsm::new(transport, 0, storage, None, sm.clone()).expect("start the rsm"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rsm.raft().get_state().1 {
        assert!(
            Instant::now() < deadline,
            "the only peer did not become leader"
        );
        thread::sleep(Duration::from_millis(10));
    }
    // Warm up: one op through the log.
    assert!(rsm.submit(b"warm".to_vec()).is_ok());

    // A: its `start` parks in the storage sync.
    let a = {
        let (rsm, gate) = (rsm.clone(), gate.clone());
        thread::Builder::new()
            .name("submitter-a".into())
            .spawn(move || {
                gate.arm();
                rsm.submit(b"a".to_vec())
            })
            .expect("spawn submitter a")
    };
    entered_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("submitter a never reached the storage sync");
    // B submits while A is parked: with `start` under the rsm's lock it could not even
    // start (and the reader could not apply A's op) until A's sync returned.
    let (b_tx, b_rx) = channel::bounded(1);
    let b = {
        let rsm = rsm.clone();
        thread::Builder::new()
            .name("submitter-b".into())
            .spawn(move || {
                let _ = b_tx.send(rsm.submit(b"b".to_vec()));
            })
            .expect("spawn submitter b")
    };
    let b_result = b_rx.recv_timeout(Duration::from_secs(5));
    let a_parked = !a.is_finished();
    let applied = sm.applied.load(Ordering::SeqCst);
    let _ = release_tx.send(());
    let a_result = a.join().expect("submitter a panicked");
    b.join().expect("submitter b panicked");
    rsm.kill();
    let _ = std::fs::remove_dir_all(&dir);

    let b_reply = b_result
        .expect("submitter b waited for submitter a's storage sync")
        .expect("submitter b's op failed");
    assert!(a_parked, "submitter a was not held in the sync while b ran");
    assert!(b_reply.starts_with(b"b#"), "b's reply: {b_reply:?}");
    // The reader applied A's op (before B's) while A was still inside `start`; A's reply,
    // answered before A learned its index, is not lost.
    assert!(applied >= 3, "{applied} ops applied while a was parked");
    let a_reply = a_result.expect("submitter a's op failed");
    assert!(a_reply.starts_with(b"a#"), "a's reply: {a_reply:?}");
}
