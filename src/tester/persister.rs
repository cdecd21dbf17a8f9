//! The persister: where a server keeps its Raft state and snapshot across crashes.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::raft::log::{Entry, Log};
use crate::raft::persist::{decode_lab_state, encode_lab_state};
use crate::raft::{HardState, Restored, Storage, StorageError};

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

/// The Raft [`Storage`] on a [`Persister`], writing the labs' format (term, vote and the whole
/// log as one value, the snapshot beside it), so the sizes the tests check are those of the
/// Go labs' persister. It keeps a copy of the log and re-encodes it on every `sync` that
/// follows a change: the cost grows with the log, as the labs' `persist()` does.
pub struct PersisterStorage {
    persister: Persister,
    mirror: Mutex<Mirror>,
}

struct Mirror {
    hs: HardState,
    log: Log,
    snapshot: Option<Vec<u8>>,
    /// Changed since the last sync.
    dirty: bool,
    /// Whether `snapshot` changed since the last sync.
    snapshot_dirty: bool,
}

impl PersisterStorage {
    pub fn new(persister: Persister) -> PersisterStorage {
        PersisterStorage {
            persister,
            mirror: Mutex::new(Mirror {
                hs: HardState::default(),
                log: Log::default(),
                snapshot: None,
                dirty: false,
                snapshot_dirty: false,
            }),
        }
    }
}

impl From<Persister> for Box<dyn Storage> {
    fn from(p: Persister) -> Box<dyn Storage> {
        Box::new(PersisterStorage::new(p))
    }
}

impl Storage for PersisterStorage {
    fn restore(&self) -> Result<Restored, StorageError> {
        let (hs, log) = decode_lab_state(&self.persister.read_raft_state()).map_err(|e| {
            StorageError::Corrupt {
                path: "persister raft state".to_string(),
                offset: 0,
                reason: e.to_string(),
            }
        })?;
        let snapshot = self.persister.read_snapshot();
        let mut m = self.mirror.lock();
        m.hs = hs;
        m.log = log.clone();
        Ok(Restored {
            hard_state: hs,
            log,
            snapshot,
        })
    }

    fn set_hard_state(&self, hs: HardState) -> Result<(), StorageError> {
        let mut m = self.mirror.lock();
        m.hs = hs;
        m.dirty = true;
        Ok(())
    }

    fn append(&self, first: u64, entries: &[Entry]) -> Result<(), StorageError> {
        let mut m = self.mirror.lock();
        if first != m.log.last_index() + 1 {
            return Err(StorageError::Invalid {
                reason: format!("append at {first} after last {}", m.log.last_index()),
            });
        }
        for e in entries {
            m.log.append(e.clone());
        }
        m.dirty = true;
        Ok(())
    }

    fn truncate_after(&self, index: u64) -> Result<(), StorageError> {
        let mut m = self.mirror.lock();
        if index < m.log.base_index() {
            return Err(StorageError::Invalid {
                reason: format!("truncate after {index} below base {}", m.log.base_index()),
            });
        }
        m.log.truncate_after(index);
        m.dirty = true;
        Ok(())
    }

    fn save_snapshot(&self, index: u64, term: u64, data: &[u8]) -> Result<(), StorageError> {
        let mut m = self.mirror.lock();
        if m.log.term_at(index) == Some(term) {
            m.log.compact_to(index);
        } else {
            m.log.reset_to(index, term);
        }
        m.snapshot = Some(data.to_vec());
        m.dirty = true;
        m.snapshot_dirty = true;
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        let mut m = self.mirror.lock();
        if !m.dirty {
            return Ok(());
        }
        let bytes = encode_lab_state(m.hs, &m.log).map_err(|e| StorageError::Io {
            path: "persister raft state".to_string(),
            op: "encode",
            reason: e.to_string(),
        })?;
        // Under the mirror lock, so two syncs cannot save out of order.
        if m.snapshot_dirty {
            self.persister.save(bytes, m.snapshot.take());
        } else {
            self.persister.save_raft_state(bytes);
        }
        m.dirty = false;
        m.snapshot_dirty = false;
        Ok(())
    }

    fn state_size(&self) -> usize {
        self.persister.raft_state_size()
    }
}
