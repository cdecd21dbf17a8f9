//! No submitter waits in an fsync: the rsm calls `Raft::start` outside its locks, and
//! `start` leaves the leader's own sync of the new entry to the peer's syncer thread
//! (`raft-<me>-syncer`), after its AppendEntries left. A one-peer cluster on the real file
//! log, whose syncs park while the test holds them: every submitter's op must reach the log
//! while they are held, no submitter's thread may be the one parked in a sync, and no op may
//! be answered before the sync that makes it durable (one peer: the leader is the majority).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender};
use raftkv::kvraft::rsm::{Rsm, StateMachine};
use raftkv::raft::log::Entry;
use raftkv::raft::{HardState, RaftTransport, Restored, Storage, StorageError};
use raftkv::storage::{FileLog, FileLogOptions};
use raftkv::tester::Solo;

/// The file log, except that while [`Gate::held`] every `sync` parks until the test drops
/// the release channel's sender, reporting the name of the thread that parked on `entered`.
struct GatedLog {
    inner: FileLog,
    gate: Arc<Gate>,
}

struct Gate {
    held: AtomicBool,
    entered: Sender<String>,
    release: Receiver<()>,
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
        if self.gate.held.load(Ordering::SeqCst) {
            let name = thread::current().name().unwrap_or("unnamed").to_string();
            let _ = self.gate.entered.send(name);
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
fn no_submitter_waits_in_an_fsync_and_none_is_answered_before_its_op_is_durable() {
    let dir = std::env::temp_dir().join(format!("raftkv-rsm-unlocked-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (entered_tx, entered_rx) = channel::unbounded();
    let (release_tx, release_rx) = channel::unbounded::<()>();
    let gate = Arc::new(Gate {
        held: AtomicBool::new(false),
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
    let applied_before = sm.applied.load(Ordering::SeqCst);
    let last_before = rsm.raft().restored_extent().1;

    gate.held.store(true, Ordering::SeqCst);
    let submit = |name: &'static str| {
        let rsm = rsm.clone();
        thread::Builder::new()
            .name(format!("submitter-{name}"))
            .spawn(move || rsm.submit(name.as_bytes().to_vec()))
            .expect("spawn a submitter")
    };
    let a = submit("a");
    let b = submit("b");
    // Both ops reach the log while the syncs are held.
    let deadline = Instant::now() + Duration::from_secs(5);
    while rsm.raft().restored_extent().1 < last_before + 2 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let last_held = rsm.raft().restored_extent().1;
    let parked = entered_rx.recv_timeout(Duration::from_secs(5));
    // Give a wrongly early answer time to show.
    thread::sleep(Duration::from_millis(200));
    let answered_while_held = [a.is_finished(), b.is_finished()];
    let applied_while_held = sm.applied.load(Ordering::SeqCst);
    let mut parked_threads: Vec<String> = parked.iter().cloned().collect();
    parked_threads.extend(entered_rx.try_iter());
    gate.held.store(false, Ordering::SeqCst);
    // Releases every parked sync (and any about to park).
    drop(release_tx);
    let a_result = a.join().expect("submitter a panicked");
    let b_result = b.join().expect("submitter b panicked");
    rsm.kill();
    let _ = std::fs::remove_dir_all(&dir);

    assert!(
        last_held >= last_before + 2,
        "the log went from {last_before} to {last_held} while the syncs were held: a \
         submitter's op waited for a sync before it reached the log"
    );
    assert!(
        parked.is_ok(),
        "no sync ran for the new ops while they were held"
    );
    for name in &parked_threads {
        assert!(
            !name.starts_with("submitter-"),
            "{name} waited in a storage sync (threads that did: {parked_threads:?})"
        );
    }
    assert_eq!(
        answered_while_held,
        [false, false],
        "a submitter was answered before the sync of its op ran (one peer: its own copy is \
         the majority)"
    );
    assert_eq!(
        applied_while_held, applied_before,
        "ops applied before they were durable"
    );
    let a_reply = a_result.expect("submitter a's op failed");
    assert!(a_reply.starts_with(b"a#"), "a's reply: {a_reply:?}");
    let b_reply = b_result.expect("submitter b's op failed");
    assert!(b_reply.starts_with(b"b#"), "b's reply: {b_reply:?}");
}
