//! The KV commands of the cluster's client port, one vocabulary from the RESP parser to the
//! log and back: [`KvCmd`] (what `resp` parses, what a node's log entry carries), [`KvOut`]
//! (what executing one gives, what `resp` encodes), and [`KvMap`], the one executor: a plain
//! in-memory map with binary keys and values, each with its lab version. The node's state
//! machine, the RESP example and the RESP tests all run commands through it.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::Tversion;

/// Redis's text for a value that is not an integer (also what INCR on such a value answers).
pub const NOT_AN_INTEGER: &str = "ERR value is not an integer or out of range";

/// One KV command. Keys and values are binary. The variants' order is the log format of a
/// node (an entry's commands are encoded by it): add new ones at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCmd {
    Get(Vec<u8>),
    Set {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Del(Vec<Vec<u8>>),
    Exists(Vec<Vec<u8>>),
    Incr(Vec<u8>),
    MGet(Vec<Vec<u8>>),
    VGet(Vec<u8>),
    /// The lab's versioned Put: installs the value only if `version` is the key's current
    /// version (0 creates a missing key).
    VSet {
        key: Vec<u8>,
        value: Vec<u8>,
        version: Tversion,
    },
    /// How many keys the store holds (`DBSIZE`).
    DbSize,
}

impl KvCmd {
    /// Whether the command changes the store (and so must be applied exactly once).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            KvCmd::Set { .. } | KvCmd::Del(_) | KvCmd::Incr(_) | KvCmd::VSet { .. }
        )
    }

    /// Roughly the bytes it takes in a log entry (keys and values).
    pub fn approx_bytes(&self) -> usize {
        let keys = |ks: &[Vec<u8>]| ks.iter().map(|k| k.len() + 1).sum::<usize>();
        8 + match self {
            KvCmd::Get(k) | KvCmd::Incr(k) | KvCmd::VGet(k) => k.len(),
            KvCmd::Set { key, value } | KvCmd::VSet { key, value, .. } => key.len() + value.len(),
            KvCmd::Del(ks) | KvCmd::Exists(ks) | KvCmd::MGet(ks) => keys(ks),
            KvCmd::DbSize => 0,
        }
    }
}

/// One command's result. The variants' order is part of a node's snapshot format (the
/// session table keeps the last results of each client): add new ones at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOut {
    Ok,
    Null,
    Bulk(Vec<u8>),
    Int(i64),
    Array(Vec<KvOut>),
    /// `VGET` of a present key: value and version.
    Versioned(Vec<u8>, Tversion),
    ErrVersion,
    ErrNoKey,
    /// A command error (INCR of a non-integer, say), in Redis's wording.
    Err(String),
}

/// An entry of a [`KvMap`]: key, then value and version.
pub type KvEntry = (Vec<u8>, (Vec<u8>, Tversion));
/// An entry of a [`KvMap`] by reference, as [`KvMap::sorted`] lists it.
pub type KvEntryRef<'a> = (&'a Vec<u8>, &'a (Vec<u8>, Tversion));

/// The executor of [`KvCmd`]s: key → (value, version). Not synchronized: its owner holds it
/// under whatever lock makes a batch of commands atomic.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KvMap {
    map: HashMap<Vec<u8>, (Vec<u8>, Tversion)>,
}

impl KvMap {
    pub fn new() -> KvMap {
        KvMap::default()
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn value(&self, key: &[u8]) -> KvOut {
        self.map
            .get(key)
            .map_or(KvOut::Null, |(v, _)| KvOut::Bulk(v.clone()))
    }

    /// Installs `value` whatever the key's version (Redis's `SET`), bumping the version.
    fn set(&mut self, key: &[u8], value: Vec<u8>) {
        match self.map.get_mut(key) {
            Some((v, version)) => {
                *v = value;
                *version += 1;
            }
            None => {
                self.map.insert(key.to_vec(), (value, 1));
            }
        }
    }

    /// Runs one command; a read leaves the map as it is.
    pub fn execute(&mut self, cmd: &KvCmd) -> KvOut {
        match cmd {
            KvCmd::Get(key) => self.value(key),
            KvCmd::Set { key, value } => {
                self.set(key, value.clone());
                KvOut::Ok
            }
            KvCmd::Del(keys) => {
                // A key created again starts at version 1.
                let removed = keys
                    .iter()
                    .filter(|k| self.map.remove(k.as_slice()).is_some())
                    .count();
                KvOut::Int(removed as i64)
            }
            // A key named twice counts twice, as in Redis.
            KvCmd::Exists(keys) => KvOut::Int(
                keys.iter()
                    .filter(|k| self.map.contains_key(k.as_slice()))
                    .count() as i64,
            ),
            KvCmd::Incr(key) => {
                let current = match self.map.get(key.as_slice()) {
                    None => 0,
                    Some((v, _)) => match parse_integer(v) {
                        Some(n) => n,
                        None => return KvOut::Err(NOT_AN_INTEGER.into()),
                    },
                };
                match current.checked_add(1) {
                    Some(n) => {
                        self.set(key, n.to_string().into_bytes());
                        KvOut::Int(n)
                    }
                    None => KvOut::Err("ERR increment or decrement would overflow".into()),
                }
            }
            KvCmd::MGet(keys) => KvOut::Array(keys.iter().map(|k| self.value(k)).collect()),
            KvCmd::VGet(key) => self
                .map
                .get(key.as_slice())
                .map_or(KvOut::Null, |(v, version)| {
                    KvOut::Versioned(v.clone(), *version)
                }),
            KvCmd::VSet {
                key,
                value,
                version,
            } => match self.map.get_mut(key.as_slice()) {
                Some((v, current)) if *current == *version => {
                    *v = value.clone();
                    *current += 1;
                    KvOut::Ok
                }
                Some(_) => KvOut::ErrVersion,
                None if *version == 0 => {
                    self.map.insert(key.clone(), (value.clone(), 1));
                    KvOut::Ok
                }
                None => KvOut::ErrNoKey,
            },
            KvCmd::DbSize => KvOut::Int(self.map.len() as i64),
        }
    }

    /// Every entry, sorted by key (so equal maps encode alike).
    pub fn sorted(&self) -> Vec<KvEntryRef<'_>> {
        let mut entries: Vec<_> = self.map.iter().collect();
        entries.sort();
        entries
    }

    /// The map holding `entries` (as [`sorted`](Self::sorted) listed them).
    pub fn from_entries(entries: Vec<KvEntry>) -> KvMap {
        KvMap {
            map: entries.into_iter().collect(),
        }
    }
}

/// A stored value as INCR reads it: a decimal `i64`, refused (as Redis does) with a leading
/// `+`, spaces, or anything else around the digits.
fn parse_integer(v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?;
    if s.starts_with('+') || s.trim() != s {
        return None;
    }
    s.parse::<i64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn commands_follow_redis_and_the_lab_version_rules() {
        let mut m = KvMap::new();
        assert_eq!(
            m.execute(&KvCmd::Set {
                key: b("k"),
                value: b("v")
            }),
            KvOut::Ok
        );
        assert_eq!(m.execute(&KvCmd::VGet(b("k"))), KvOut::Versioned(b("v"), 1));
        let vset = |version| KvCmd::VSet {
            key: b("k"),
            value: b("w"),
            version,
        };
        assert_eq!(m.execute(&vset(2)), KvOut::ErrVersion);
        assert_eq!(m.execute(&vset(1)), KvOut::Ok);
        assert_eq!(
            m.execute(&KvCmd::VSet {
                key: b("new"),
                value: b("x"),
                version: 3
            }),
            KvOut::ErrNoKey
        );
        assert_eq!(
            m.execute(&KvCmd::Exists(vec![b("k"), b("k"), b("no")])),
            KvOut::Int(2)
        );
        assert_eq!(m.execute(&KvCmd::Incr(b("n"))), KvOut::Int(1));
        assert_eq!(
            m.execute(&KvCmd::Incr(b("k"))),
            KvOut::Err(NOT_AN_INTEGER.into())
        );
        m.execute(&KvCmd::Set {
            key: b("big"),
            value: i64::MAX.to_string().into_bytes(),
        });
        assert!(
            matches!(m.execute(&KvCmd::Incr(b("big"))), KvOut::Err(e) if e.contains("overflow"))
        );
        m.execute(&KvCmd::Set {
            key: b("plus"),
            value: b("+1"),
        });
        assert_eq!(
            m.execute(&KvCmd::Incr(b("plus"))),
            KvOut::Err(NOT_AN_INTEGER.into())
        );
        assert_eq!(m.execute(&KvCmd::Del(vec![b("k"), b("k")])), KvOut::Int(1));
        assert_eq!(m.execute(&KvCmd::DbSize), KvOut::Int(3));
        assert_eq!(
            m.execute(&KvCmd::MGet(vec![b("n"), b("k")])),
            KvOut::Array(vec![KvOut::Bulk(b("1")), KvOut::Null])
        );
    }

    #[test]
    fn binary_keys_and_values_are_kept_as_bytes() {
        let mut m = KvMap::new();
        let key: Vec<u8> = (0..=255).collect();
        let value = vec![0xff, 0, 0x80, b'\r'];
        m.execute(&KvCmd::Set {
            key: key.clone(),
            value: value.clone(),
        });
        let copy = KvMap::from_entries(
            m.sorted()
                .into_iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        );
        assert_eq!(copy, m);
        assert_eq!(copy.clone().execute(&KvCmd::Get(key)), KvOut::Bulk(value));
    }
}
