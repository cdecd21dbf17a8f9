//! The Raft log, indexed from 1, whose prefix up to `base_index` has been replaced by a
//! snapshot. Index `base_index` itself is kept as a sentinel with term `base_term`, so that
//! `term_at(base_index)` answers the consistency check for the entry just after the snapshot.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub term: u64,
    /// The service's command, opaque to Raft.
    pub command: Vec<u8>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Log {
    /// The last index covered by the snapshot (0: none).
    base_index: u64,
    base_term: u64,
    /// `entries[i]` is at index `base_index + 1 + i`.
    entries: Vec<Entry>,
}

impl Log {
    /// A log whose snapshot ends at (`base_index`, `base_term`), holding `entries` after it.
    pub fn from_parts(base_index: u64, base_term: u64, entries: Vec<Entry>) -> Log {
        Log {
            base_index,
            base_term,
            entries,
        }
    }

    pub fn base_index(&self) -> u64 {
        self.base_index
    }

    pub fn base_term(&self) -> u64 {
        self.base_term
    }

    pub fn last_index(&self) -> u64 {
        self.base_index + self.entries.len() as u64
    }

    pub fn last_term(&self) -> u64 {
        self.entries.last().map_or(self.base_term, |e| e.term)
    }

    /// The term of the entry at `index`, if the log still knows it.
    pub fn term_at(&self, index: u64) -> Option<u64> {
        if index == self.base_index {
            Some(self.base_term)
        } else {
            self.entry(index).map(|e| e.term)
        }
    }

    pub fn entry(&self, index: u64) -> Option<&Entry> {
        if index <= self.base_index {
            return None;
        }
        self.entries.get((index - self.base_index - 1) as usize)
    }

    /// Entries from `index` to the end (empty if `index` is past the end).
    pub fn entries_from(&self, index: u64) -> &[Entry] {
        debug_assert!(
            index > self.base_index,
            "entries_from({index}) at or below base {}",
            self.base_index
        );
        let start = (index.saturating_sub(self.base_index + 1) as usize).min(self.entries.len());
        &self.entries[start..]
    }

    /// Entries in `from..=to` (clipped to what the log holds).
    pub fn slice(&self, from: u64, to: u64) -> &[Entry] {
        let lo = (from.max(self.base_index + 1) - self.base_index - 1) as usize;
        let hi = (to.min(self.last_index()).saturating_sub(self.base_index)) as usize;
        if lo >= hi { &[] } else { &self.entries[lo..hi] }
    }

    pub fn append(&mut self, entry: Entry) -> u64 {
        self.entries.push(entry);
        self.last_index()
    }

    /// Drops every entry after `index`.
    pub fn truncate_after(&mut self, index: u64) {
        debug_assert!(index >= self.base_index);
        self.entries.truncate((index - self.base_index) as usize);
    }

    /// The first index holding an entry of `term`, searching back from `from`.
    pub fn first_index_of_term(&self, term: u64, from: u64) -> u64 {
        let mut i = from;
        while i > self.base_index + 1 && self.term_at(i - 1) == Some(term) {
            i -= 1;
        }
        i
    }

    /// The last index holding an entry of `term`, if any.
    pub fn last_index_of_term(&self, term: u64) -> Option<u64> {
        let pos = self.entries.iter().rposition(|e| e.term == term)?;
        Some(self.base_index + 1 + pos as u64)
    }

    /// Discards entries through `index` (which the log holds), keeping the rest.
    pub fn compact_to(&mut self, index: u64) {
        let Some(term) = self.term_at(index) else {
            return;
        };
        let drop = (index - self.base_index) as usize;
        // A fresh vector so the discarded entries' memory is freed.
        self.entries = self.entries[drop..].to_vec();
        self.base_index = index;
        self.base_term = term;
    }

    /// Replaces the whole log by a snapshot ending at (`index`, `term`).
    pub fn reset_to(&mut self, index: u64, term: u64) {
        self.entries = Vec::new();
        self.base_index = index;
        self.base_term = term;
    }
}
