//! The versioned key/value map behind every KV service (Lab 2's server, Lab 4's replicated
//! state machine): the versioned-Put rules must be the same everywhere, so they live here once.

use std::collections::HashMap;

use parking_lot::Mutex;

use super::{GetArgs, GetReply, KvErr, PutArgs, PutReply, Tversion};
use crate::labcodec::{self, CodecError};

/// key → (value, version). No per-client state.
#[derive(Default)]
pub struct VersionedStore {
    data: Mutex<HashMap<String, (String, Tversion)>>,
}

impl VersionedStore {
    pub fn new() -> VersionedStore {
        VersionedStore::default()
    }

    /// The value and version of a key; `ErrNoKey` if it does not exist.
    pub fn get(&self, args: &GetArgs) -> GetReply {
        match self.data.lock().get(&args.key) {
            Some((value, version)) => GetReply {
                value: value.clone(),
                version: *version,
                err: KvErr::Ok,
            },
            None => GetReply {
                value: String::new(),
                version: 0,
                err: KvErr::NoKey,
            },
        }
    }

    /// Installs the value if the versions match (version 0 creates a missing key), bumping the
    /// version; `ErrVersion` on a mismatch, `ErrNoKey` for version > 0 of a missing key.
    pub fn put(&self, args: PutArgs) -> PutReply {
        let mut data = self.data.lock();
        let err = match data.get_mut(&args.key) {
            Some((value, version)) if *version == args.version => {
                *value = args.value;
                *version += 1;
                KvErr::Ok
            }
            Some(_) => KvErr::Version,
            None if args.version == 0 => {
                data.insert(args.key, (args.value, 1));
                KvErr::Ok
            }
            None => KvErr::NoKey,
        };
        PutReply { err }
    }

    /// Installs `value` whatever the key's version (Redis's `SET`); returns the new version.
    pub fn set(&self, key: String, value: String) -> Tversion {
        let mut data = self.data.lock();
        let slot = data.entry(key).or_insert((String::new(), 0));
        slot.0 = value;
        slot.1 += 1;
        slot.1
    }

    /// Removes a key; whether it existed. A key created again starts at version 1.
    pub fn delete(&self, key: &str) -> bool {
        self.data.lock().remove(key).is_some()
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.data.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.lock().is_empty()
    }

    /// The whole map, encoded with keys sorted, so equal maps give equal bytes.
    pub fn encode(&self) -> Vec<u8> {
        let data = self.data.lock();
        let mut entries: Vec<(&String, &(String, Tversion))> = data.iter().collect();
        entries.sort();
        // Strings and integers always encode.
        labcodec::encode(&entries).unwrap_or_default()
    }

    /// Runs `f` on every entry, sorted by key, under the lock: a caller that serializes the
    /// map within a larger value does so without an intermediate copy.
    pub fn with_sorted<R>(&self, f: impl FnOnce(&[(&String, &(String, Tversion))]) -> R) -> R {
        let data = self.data.lock();
        let mut entries: Vec<(&String, &(String, Tversion))> = data.iter().collect();
        entries.sort();
        f(&entries)
    }

    /// Replaces the map by `entries` (as [`with_sorted`](Self::with_sorted) showed them).
    pub fn replace(&self, entries: Vec<(String, (String, Tversion))>) {
        let map: HashMap<String, (String, Tversion)> = entries.into_iter().collect();
        *self.data.lock() = map;
    }

    /// Replaces the map by one [`encode`](Self::encode)d earlier; unchanged on bad bytes.
    pub fn restore(&self, bytes: &[u8]) -> Result<(), CodecError> {
        let entries: Vec<(String, (String, Tversion))> = labcodec::decode(bytes)?;
        *self.data.lock() = entries.into_iter().collect();
        Ok(())
    }
}
