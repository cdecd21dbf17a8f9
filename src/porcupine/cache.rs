//! The search's memory: which operations are linearized (a bitset with an incrementally
//! maintained hash), and the set of (linearized set, state) configurations already explored.
//!
//! Two search paths that reach the same set of linearized operations and the same model state
//! have the same future, so the second one can be pruned (Lowe's memoisation, as porcupine does).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use super::model::Model;

/// Explored configurations per partition beyond which new ones are no longer remembered. The
/// search stays correct without them (the cache only prunes) but may repeat work; this bounds
/// the memory a pathological history can take before its timeout fires.
const MAX_CACHED_CONFIGURATIONS: usize = 1 << 21;

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

struct Configuration<S> {
    linearized: Box<[u64]>,
    state: S,
}

/// The set of explored (linearized set, state) configurations.
pub(crate) struct ConfigurationCache<S> {
    buckets: HashMap<u64, Vec<Configuration<S>>, BuildHasherDefault<PassThroughHasher>>,
    len: usize,
    full_logged: bool,
}

impl<S: Clone + Hash> ConfigurationCache<S> {
    pub fn new() -> Self {
        ConfigurationCache {
            buckets: HashMap::default(),
            len: 0,
            full_logged: false,
        }
    }

    /// Records (`linearized`, `state`) and returns true if it was not explored before.
    pub fn insert_if_new<M: Model<State = S>>(
        &mut self,
        model: &M,
        linearized: &Bitset,
        state: &S,
    ) -> bool {
        let mut state_hasher = StateHasher::default();
        state.hash(&mut state_hasher);
        let key = mix64(linearized.hash ^ state_hasher.finish().rotate_left(32));
        let bucket = self.buckets.entry(key).or_default();
        let seen = bucket.iter().any(|config| {
            *config.linearized == linearized.words[..] && model.equal(&config.state, state)
        });
        if seen {
            return false;
        }
        if self.len >= MAX_CACHED_CONFIGURATIONS {
            if !self.full_logged {
                log::warn!(
                    "porcupine: {MAX_CACHED_CONFIGURATIONS} configurations cached; \
                     exploring further ones without remembering them"
                );
                self.full_logged = true;
            }
            return true;
        }
        bucket.push(Configuration {
            linearized: linearized.words.clone().into_boxed_slice(),
            state: state.clone(),
        });
        self.len += 1;
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
