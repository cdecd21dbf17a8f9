//! The persister: where a server keeps its Raft state and snapshot across crashes.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::labcodec;
use crate::raft::log::{Entry, Log};
use crate::raft::persist::{decode_lab_state, encode_lab_state};
use crate::raft::{HardState, Restored, Storage, StorageError};

#[derive(Default)]
struct Saved {
    raft_state: RaftState,
    snapshot: Arc<Vec<u8>>,
}

/// A saved Raft state: bytes as given, or the labs' format of a [`PersisterStorage`]'s state
/// kept as its header plus a range of shared, already encoded entries, so that saving after an
/// append copies nothing and a crash copy shares what it can.
#[derive(Clone)]
enum RaftState {
    Bytes(Arc<Vec<u8>>),
    Lab {
        header: Arc<Vec<u8>>,
        entries: EntryRange,
    },
}

impl Default for RaftState {
    fn default() -> RaftState {
        RaftState::Bytes(Arc::default())
    }
}

impl RaftState {
    fn len(&self) -> usize {
        match self {
            RaftState::Bytes(b) => b.len(),
            RaftState::Lab { header, entries } => header.len() + entries.bytes,
        }
    }

    fn to_vec(&self) -> Vec<u8> {
        match self {
            RaftState::Bytes(b) => b.as_ref().clone(),
            RaftState::Lab { header, entries } => {
                let mut v = Vec::with_capacity(header.len() + entries.bytes);
                v.extend_from_slice(header);
                let store = entries.store.lock();
                v.extend_from_slice(store.slice(entries.from, entries.to));
                v
            }
        }
    }
}

/// The labs' encodings of log entries, one after another. Only ever appended to: an entry's
/// bytes never change once written, so a saved state may refer to a range of them while the
/// storage goes on appending. A storage that must drop entries from the end starts a new one.
#[derive(Default)]
struct EncodedEntries {
    bytes: Vec<u8>,
    /// Where each entry ends in `bytes` (entry `i` spans `ends[i-1]..ends[i]`).
    ends: Vec<usize>,
}

impl EncodedEntries {
    fn len(&self) -> usize {
        self.ends.len()
    }

    fn start_of(&self, i: usize) -> usize {
        if i == 0 { 0 } else { self.ends[i - 1] }
    }

    /// The encodings of entries `from..to`, concatenated.
    fn slice(&self, from: usize, to: usize) -> &[u8] {
        &self.bytes[self.start_of(from)..self.start_of(to)]
    }

    fn push(&mut self, encoded: &[u8]) {
        self.bytes.extend_from_slice(encoded);
        self.ends.push(self.bytes.len());
    }

    /// A new store holding a copy of entries `from..to`.
    fn copy_range(&self, from: usize, to: usize) -> EncodedEntries {
        let base = self.start_of(from);
        EncodedEntries {
            bytes: self.slice(from, to).to_vec(),
            ends: self.ends[from..to].iter().map(|e| e - base).collect(),
        }
    }
}

/// Entries `from..to` of a shared store, and their encoded size.
#[derive(Clone)]
struct EntryRange {
    store: Arc<Mutex<EncodedEntries>>,
    from: usize,
    to: usize,
    bytes: usize,
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
                // Shares encoded entries, which are never changed in place.
                raft_state: s.raft_state.clone(),
                snapshot: s.snapshot.clone(),
            })),
        }
    }

    pub fn read_raft_state(&self) -> Vec<u8> {
        let state = self.saved.lock().raft_state.clone();
        state.to_vec()
    }

    pub fn raft_state_size(&self) -> usize {
        self.saved.lock().raft_state.len()
    }

    /// Replaces both the Raft state and the snapshot, atomically. `snapshot = None` clears the
    /// snapshot.
    pub fn save(&self, raft_state: Vec<u8>, snapshot: Option<Vec<u8>>) {
        self.save_state(
            RaftState::Bytes(Arc::new(raft_state)),
            Some(snapshot.unwrap_or_default()),
        );
    }

    /// Replaces the Raft state and keeps the current snapshot (no copy of it is made).
    pub fn save_raft_state(&self, raft_state: Vec<u8>) {
        self.save_state(RaftState::Bytes(Arc::new(raft_state)), None);
    }

    /// Replaces the Raft state, and the snapshot if one is given.
    fn save_state(&self, raft_state: RaftState, snapshot: Option<Vec<u8>>) {
        let mut s = self.saved.lock();
        s.raft_state = raft_state;
        if let Some(snap) = snapshot {
            s.snapshot = Arc::new(snap);
        }
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
/// Go labs' persister. Each entry is encoded once, when appended, into a store the saved
/// states share: a `sync` encodes only the small header and hands the persister the range of
/// entries it covers, so its cost does not grow with the log. (Copying the whole encoded log
/// on every sync was 15% of a KV benchmark's time, and grew with the log.)
pub struct PersisterStorage {
    persister: Persister,
    mirror: Mutex<Mirror>,
}

/// A compacted prefix this many entries long, and longer than what is left, is dropped from
/// the store (by moving to a new one), so its memory is freed in amortized constant time.
const COMPACT_STORE_AFTER: usize = 4096;

struct Mirror {
    hs: HardState,
    log: Log,
    /// The encodings of the log's entries are `store[from..from + entries]`.
    store: Arc<Mutex<EncodedEntries>>,
    from: usize,
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
                store: Arc::default(),
                from: 0,
                snapshot: None,
                dirty: false,
                snapshot_dirty: false,
            }),
        }
    }
}

fn encode_error(e: labcodec::CodecError) -> StorageError {
    StorageError::Io {
        path: "persister raft state".to_string(),
        op: "encode",
        reason: e.to_string(),
    }
}

impl Mirror {
    /// Entries the log holds after its snapshot.
    fn entries(&self) -> usize {
        (self.log.last_index() - self.log.base_index()) as usize
    }

    /// Store index just past the log's last entry.
    fn to(&self) -> usize {
        self.from + self.entries()
    }

    /// Starts a new store holding only the log's entries.
    fn move_store(&mut self) {
        let fresh = self.store.lock().copy_range(self.from, self.to());
        self.store = Arc::new(Mutex::new(fresh));
        self.from = 0;
    }

    fn encode_entries(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        let mut store = self.store.lock();
        debug_assert_eq!(
            store.len(),
            self.to(),
            "persister: store out of step with the log"
        );
        for e in entries {
            store.push(&labcodec::encode(e).map_err(encode_error)?);
        }
        Ok(())
    }

    /// The labs' format of the whole state: the fields of [`encode_lab_state`]'s value in
    /// order (bincode writes a struct as its fields, a `Vec` as its length and elements),
    /// then the entries' encodings, which the persister keeps by reference.
    fn lab_state(&self) -> Result<RaftState, StorageError> {
        let header = (
            self.hs.term,
            self.hs.voted_for,
            self.log.base_index(),
            self.log.base_term(),
            self.entries() as u64,
        );
        let header = labcodec::encode(&header).map_err(encode_error)?;
        let (from, to) = (self.from, self.to());
        let bytes = {
            let store = self.store.lock();
            store.start_of(to) - store.start_of(from)
        };
        Ok(RaftState::Lab {
            header: Arc::new(header),
            entries: EntryRange {
                store: self.store.clone(),
                from,
                to,
                bytes,
            },
        })
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
        m.log = Log::from_parts(log.base_index(), log.base_term(), Vec::new());
        m.store = Arc::default();
        m.from = 0;
        let entries = log.entries_from(log.base_index() + 1);
        m.encode_entries(entries)?;
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
        if index >= m.log.last_index() {
            return Ok(());
        }
        // Saved states may refer to the entries being dropped: they move to no new store,
        // and the old one stays as it is for them.
        m.log.truncate_after(index);
        m.move_store();
        m.dirty = true;
        Ok(())
    }

    fn save_snapshot(&self, index: u64, term: u64, data: &[u8]) -> Result<(), StorageError> {
        let mut m = self.mirror.lock();
        if m.log.term_at(index) == Some(term) {
            let drop = index.saturating_sub(m.log.base_index()) as usize;
            m.log.compact_to(index);
            m.from += drop;
            if m.from >= COMPACT_STORE_AFTER && m.from > m.entries() {
                m.move_store();
            }
        } else {
            m.log.reset_to(index, term);
            m.store = Arc::default();
            m.from = 0;
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
        let state = m.lab_state()?;
        debug_assert_eq!(
            Some(state.to_vec()),
            encode_lab_state(m.hs, &m.log).ok(),
            "persister: the incremental encoding differs from the labs' format"
        );
        // Under the mirror lock, so two syncs cannot save out of order.
        let snapshot = if m.snapshot_dirty {
            Some(m.snapshot.take().unwrap_or_default())
        } else {
            None
        };
        self.persister.save_state(state, snapshot);
        m.dirty = false;
        m.snapshot_dirty = false;
        Ok(())
    }

    fn state_size(&self) -> usize {
        self.persister.raft_state_size()
    }
}
