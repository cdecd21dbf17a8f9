//! The persister: where a server keeps its Raft state and snapshot across crashes.

use std::sync::Arc;

use parking_lot::Mutex;

#[derive(Default)]
struct Saved {
    raft_state: Arc<Vec<u8>>,
    snapshot: Arc<Vec<u8>>,
}

/// Holds the last Raft state and snapshot a server saved.
///
/// Clones share one store. On a simulated crash the tester gives the restarted server a
/// [`copy`](Persister::copy), so whatever the old instance writes afterwards is lost.
#[derive(Clone, Default)]
pub struct Persister {
    saved: Arc<Mutex<Saved>>,
}

impl Persister {
    pub fn new() -> Persister {
        Persister::default()
    }

    /// A new, independent persister holding the same Raft state and snapshot.
    pub fn copy(&self) -> Persister {
        let s = self.saved.lock();
        Persister {
            saved: Arc::new(Mutex::new(Saved {
                raft_state: s.raft_state.clone(),
                snapshot: s.snapshot.clone(),
            })),
        }
    }

    pub fn read_raft_state(&self) -> Vec<u8> {
        self.saved.lock().raft_state.as_ref().clone()
    }

    pub fn raft_state_size(&self) -> usize {
        self.saved.lock().raft_state.len()
    }

    /// Replaces both the Raft state and the snapshot, atomically. `snapshot = None` clears the
    /// snapshot.
    pub fn save(&self, raft_state: Vec<u8>, snapshot: Option<Vec<u8>>) {
        let mut s = self.saved.lock();
        s.raft_state = Arc::new(raft_state);
        s.snapshot = Arc::new(snapshot.unwrap_or_default());
    }

    /// Replaces the Raft state and keeps the current snapshot (no copy of it is made).
    pub fn save_raft_state(&self, raft_state: Vec<u8>) {
        self.saved.lock().raft_state = Arc::new(raft_state);
    }

    pub fn read_snapshot(&self) -> Vec<u8> {
        self.saved.lock().snapshot.as_ref().clone()
    }

    pub fn snapshot_size(&self) -> usize {
        self.saved.lock().snapshot.len()
    }
}
