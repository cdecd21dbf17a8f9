//! The persister: where a server keeps its Raft state and snapshot across crashes.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::labcodec;
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
/// Go labs' persister. It keeps the log's entries already encoded, each appended once: a
/// `sync` encodes only the small header and copies the rest, under the mirror lock that Raft's
/// own storage calls also take (re-encoding the whole log there held that lock, and with it a
/// peer whose mutex-holding thread called in, for as long as encoding took).
pub struct PersisterStorage {
    persister: Persister,
    mirror: Mutex<Mirror>,
}

struct Mirror {
    hs: HardState,
    log: Log,
    /// The labs' encoding of each entry of `log`, concatenated ...
    encoded: Vec<u8>,
    /// ... and where each one starts in `encoded`.
    starts: Vec<usize>,
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
                encoded: Vec::new(),
                starts: Vec::new(),
                snapshot: None,
                dirty: false,
                snapshot_dirty: false,
            }),
        }
    }
}

impl Mirror {
    fn encode_entries(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        for e in entries {
            let bytes = labcodec::encode(e).map_err(|e| StorageError::Io {
                path: "persister raft state".to_string(),
                op: "encode",
                reason: e.to_string(),
            })?;
            self.starts.push(self.encoded.len());
            self.encoded.extend_from_slice(&bytes);
        }
        Ok(())
    }

    /// Keeps the encodings of the first `keep` entries.
    fn keep_first(&mut self, keep: usize) {
        if keep < self.starts.len() {
            self.encoded.truncate(self.starts[keep]);
            self.starts.truncate(keep);
        }
    }

    /// Drops the encodings of the first `drop` entries.
    fn drop_first(&mut self, drop: usize) {
        let drop = drop.min(self.starts.len());
        let cut = self.starts.get(drop).copied().unwrap_or(self.encoded.len());
        self.encoded.drain(..cut);
        self.starts.drain(..drop);
        for s in &mut self.starts {
            *s -= cut;
        }
    }

    /// The labs' format of the whole state: the fields of [`encode_lab_state`]'s value in
    /// order (bincode writes a struct as its fields, a `Vec` as its length and elements),
    /// then the entries' encodings.
    fn lab_state(&self) -> Result<Vec<u8>, StorageError> {
        let header = (
            self.hs.term,
            self.hs.voted_for,
            self.log.base_index(),
            self.log.base_term(),
            self.starts.len() as u64,
        );
        let mut bytes = labcodec::encode(&header).map_err(|e| StorageError::Io {
            path: "persister raft state".to_string(),
            op: "encode",
            reason: e.to_string(),
        })?;
        bytes.extend_from_slice(&self.encoded);
        Ok(bytes)
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
        m.encoded.clear();
        m.starts.clear();
        m.encode_entries(log.entries_from(log.base_index() + 1))?;
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
        m.encode_entries(entries)?;
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
        let keep = (index - m.log.base_index()) as usize;
        m.log.truncate_after(index);
        m.keep_first(keep);
        m.dirty = true;
        Ok(())
    }

    fn save_snapshot(&self, index: u64, term: u64, data: &[u8]) -> Result<(), StorageError> {
        let mut m = self.mirror.lock();
        if m.log.term_at(index) == Some(term) {
            let drop = index.saturating_sub(m.log.base_index()) as usize;
            m.log.compact_to(index);
            m.drop_first(drop);
        } else {
            m.log.reset_to(index, term);
            m.encoded.clear();
            m.starts.clear();
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
        let bytes = m.lab_state()?;
        debug_assert_eq!(
            Some(&bytes),
            encode_lab_state(m.hs, &m.log).ok().as_ref(),
            "persister: the incremental encoding differs from the labs' format"
        );
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
