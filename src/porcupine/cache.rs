//! The search's memory: which operations are linearized (a bitset with an incrementally
//! maintained hash), and the set of (linearized set, state) configurations already explored.
//!
//! Two search paths that reach the same set of linearized operations and the same model state
//! have the same future, so the second one can be pruned (Lowe's memoisation, as porcupine does).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use super::model::Model;

/// Memory for remembered configurations per partition (their bitsets dominate), beyond which
/// new ones are no longer remembered. The search stays correct without them (the cache only
/// prunes) but may repeat work; this bounds what a pathological history can take before its
/// timeout fires.
const MAX_CACHE_BITSET_BYTES: usize = 256 << 20;
/// And a cap on their number, for tiny bitsets.
const MAX_CACHED_CONFIGURATIONS: usize = 1 << 22;

/// A fixed-size set of operation indices whose hash is kept up to date on every change
/// (Zobrist hashing: the XOR of a pseudo-random key per member), so hashing a configuration
/// costs O(1) instead of O(operations / 64).
#[derive(Clone, Debug)]
pub(crate) struct Bitset {
    words: Vec<u64>,
    hash: u64,
}

impl Bitset {
    pub fn new(len: usize) -> Self {
        Bitset {
            words: vec![0; len.div_ceil(64)],
            hash: 0,
        }
    }

    pub fn insert(&mut self, index: usize) {
        debug_assert!(!self.contains(index), "op {index} linearized twice");
        self.words[index / 64] |= 1 << (index % 64);
        self.hash ^= member_key(index);
    }

    pub fn remove(&mut self, index: usize) {
        debug_assert!(
            self.contains(index),
            "op {index} removed but not linearized"
        );
        self.words[index / 64] &= !(1 << (index % 64));
        self.hash ^= member_key(index);
    }

    pub fn contains(&self, index: usize) -> bool {
        self.words[index / 64] & (1 << (index % 64)) != 0
    }
}

/// splitmix64's finaliser: a cheap bijection that spreads consecutive integers over 64 bits.
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn member_key(index: usize) -> u64 {
    mix64(index as u64)
}

/// A fast non-cryptographic hasher for model states (multiply-rotate over 8-byte words). The
/// histories are ours, not an attacker's, so SipHash's DoS resistance buys nothing here.
#[derive(Default)]
struct StateHasher(u64);

impl StateHasher {
    fn add_word(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for StateHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add_word(u64::from_le_bytes(chunk.try_into().expect("8-byte chunk")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut padded = [0u8; 8];
            padded[..rest.len()].copy_from_slice(rest);
            self.add_word(u64::from_le_bytes(padded));
        }
    }

    fn write_u8(&mut self, value: u8) {
        self.add_word(u64::from(value));
    }

    fn write_u32(&mut self, value: u32) {
        self.add_word(u64::from(value));
    }

    fn write_u64(&mut self, value: u64) {
        self.add_word(value);
    }

    fn write_usize(&mut self, value: usize) {
        self.add_word(value as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The map's keys are already well-mixed 64-bit hashes: pass them through.
#[derive(Default)]
struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn write(&mut self, _bytes: &[u8]) {
        unreachable!("the configuration cache is keyed by u64 only");
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The set of explored (linearized set, state) configurations.
///
/// Built for millions of entries without an allocation each: states are interned (a partition
/// has few distinct states, and each is stored once), configurations are chained per hash
/// bucket through indices, and all their bitsets live end to end in one vector.
pub(crate) struct ConfigurationCache<S> {
    /// Hash of (bitset, state id) -> the most recently added configuration with that hash.
    newest_with_hash: HashMap<u64, u32, BuildHasherDefault<PassThroughHasher>>,
    configurations: Vec<ConfigurationLink>,
    /// Configuration `i`'s bitset is `bitset_words[i * words_per_bitset..][..words_per_bitset]`.
    bitset_words: Vec<u64>,
    words_per_bitset: usize,
    max_configurations: usize,
    states: Vec<S>,
    /// State hash -> ids of the interned states with that hash.
    state_ids_by_hash: HashMap<u64, Vec<u32>, BuildHasherDefault<PassThroughHasher>>,
    full_logged: bool,
}

#[derive(Clone, Copy)]
struct ConfigurationLink {
    state_id: u32,
    /// The previous configuration with the same hash, or `u32::MAX`.
    older_same_hash: u32,
}

impl<S: Clone + Hash> ConfigurationCache<S> {
    pub fn new(operations: usize) -> Self {
        let words_per_bitset = operations.div_ceil(64);
        ConfigurationCache {
            newest_with_hash: HashMap::default(),
            configurations: Vec::new(),
            bitset_words: Vec::new(),
            words_per_bitset,
            max_configurations: (MAX_CACHE_BITSET_BYTES / 8 / words_per_bitset.max(1))
                .min(MAX_CACHED_CONFIGURATIONS),
            states: Vec::new(),
            state_ids_by_hash: HashMap::default(),
            full_logged: false,
        }
    }

    /// The id of `state` (a state the model calls equal to it, if one was interned before).
    fn intern<M: Model<State = S>>(&mut self, model: &M, state: &S) -> u32 {
        let mut hasher = StateHasher::default();
        state.hash(&mut hasher);
        let ids = self
            .state_ids_by_hash
            .entry(mix64(hasher.finish()))
            .or_default();
        if let Some(&id) = ids
            .iter()
            .find(|&&id| model.equal(&self.states[id as usize], state))
        {
            return id;
        }
        let id = self.states.len() as u32;
        self.states.push(state.clone());
        ids.push(id);
        id
    }

    /// Records (`linearized`, `state`) and returns true if it was not explored before.
    pub fn insert_if_new<M: Model<State = S>>(
        &mut self,
        model: &M,
        linearized: &Bitset,
        state: &S,
    ) -> bool {
        debug_assert_eq!(linearized.words.len(), self.words_per_bitset);
        let state_id = self.intern(model, state);
        let key = mix64(linearized.hash ^ u64::from(state_id).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let newest = self.newest_with_hash.get(&key).copied().unwrap_or(u32::MAX);
        let mut candidate = newest;
        while candidate != u32::MAX {
            let link = self.configurations[candidate as usize];
            let start = candidate as usize * self.words_per_bitset;
            if link.state_id == state_id
                && self.bitset_words[start..start + self.words_per_bitset] == linearized.words[..]
            {
                return false;
            }
            candidate = link.older_same_hash;
        }
        if self.configurations.len() >= self.max_configurations {
            if !self.full_logged {
                log::warn!(
                    "porcupine: {} configurations cached; exploring further ones without \
                     remembering them",
                    self.max_configurations
                );
                self.full_logged = true;
            }
            return true;
        }
        let id = self.configurations.len() as u32;
        self.configurations.push(ConfigurationLink {
            state_id,
            older_same_hash: newest,
        });
        self.bitset_words.extend_from_slice(&linearized.words);
        self.newest_with_hash.insert(key, id);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitset_hash_depends_only_on_members() {
        let mut a = Bitset::new(130);
        let mut b = Bitset::new(130);
        a.insert(3);
        a.insert(129);
        b.insert(129);
        b.insert(70);
        b.insert(3);
        b.remove(70);
        assert_eq!(a.hash, b.hash);
        assert_eq!(a.words, b.words);
        assert!(a.contains(129) && !a.contains(70));
    }
}
