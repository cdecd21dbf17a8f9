//! The node's state machine: the versioned store plus the exactly-once session table, both in
//! every snapshot. What goes through the Raft log is a batch of [`Request`]s (`Vec<Request>`,
//! one log entry for whatever the node's clients sent while the previous entry was on its
//! way); a request is the commands one client pipelined, tagged `(client, seq)` when it
//! writes. Each request of a batch is applied, and deduplicated, on its own.
//!
//! Keys and values are binary on the wire and `String`s in [`VersionedStore`]: each byte is
//! stored as the char of the same number (Latin-1), which is lossless and leaves ASCII as is.

use std::fmt;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::kvapi::{GetArgs, KvErr, PutArgs, VersionedStore};
use crate::kvraft::rsm::StateMachine;
use crate::labcodec;
use crate::session::{Applied, SessionSnapshot, SessionTable};

const LOG: &str = "node::machine";

/// Sessions the table keeps: well above the client slots every node has open at once.
pub const MAX_SESSIONS: usize = 100_000;

/// One KV command as it goes through the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCmd {
    Get(Vec<u8>),
    Set(Vec<u8>, Vec<u8>),
    Del(Vec<Vec<u8>>),
    Exists(Vec<Vec<u8>>),
    Incr(Vec<u8>),
    MGet(Vec<Vec<u8>>),
    VGet(Vec<u8>),
    VSet {
        key: Vec<u8>,
        value: Vec<u8>,
        version: u64,
    },
    /// The number of keys (`DBSIZE`).
    DbSize,
}

impl KvCmd {
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            KvCmd::Set(..) | KvCmd::Del(_) | KvCmd::Incr(_) | KvCmd::VSet { .. }
        )
    }

    /// Roughly the bytes it takes in a log entry (keys and values).
    pub fn approx_bytes(&self) -> usize {
        let keys = |ks: &[Vec<u8>]| ks.iter().map(|k| k.len() + 1).sum::<usize>();
        8 + match self {
            KvCmd::Get(k) | KvCmd::Incr(k) | KvCmd::VGet(k) => k.len(),
            KvCmd::Set(k, v)
            | KvCmd::VSet {
                key: k, value: v, ..
            } => k.len() + v.len(),
            KvCmd::Del(ks) | KvCmd::Exists(ks) | KvCmd::MGet(ks) => keys(ks),
            KvCmd::DbSize => 0,
        }
    }
}

/// One command's result, turned into a RESP reply by the front end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOut {
    Ok,
    Null,
    Bulk(Vec<u8>),
    Int(i64),
    Array(Vec<KvOut>),
    Versioned(Vec<u8>, u64),
    ErrVersion,
    ErrNoKey,
    /// A command error (INCR of a non-integer, say), in Redis's wording.
    Err(String),
}

/// What a node submits: `client == 0` marks a read-only batch, which needs no session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub client: u64,
    pub seq: u64,
    pub cmds: Vec<KvCmd>,
}

impl Request {
    /// Whether it only reads (it then needs no session, and may be served by a ReadIndex).
    pub fn read_only(&self) -> bool {
        self.client == 0
    }

    pub fn approx_bytes(&self) -> usize {
        16 + self.cmds.iter().map(KvCmd::approx_bytes).sum::<usize>()
    }
}

/// What executing a [`Request`] gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// One result per command (a duplicate gets the first execution's results).
    Done(Vec<KvOut>),
    /// The client's session may have been evicted: the request was not executed.
    Expired,
    /// Older than the client's last request: not executed.
    Stale,
    /// The log entry did not decode (never expected: this node encoded it).
    Bad(String),
}

/// The state a snapshot carries: the store's entries sorted by key, the sessions, and the
/// number of requests applied. Written from references ([`MachineSnapshotRef`]) into one
/// buffer, so a snapshot costs the state's size once more in memory, not twice.
#[derive(Deserialize)]
struct MachineSnapshot {
    store: Vec<(String, (String, u64))>,
    sessions: SessionSnapshot<Vec<KvOut>>,
    applied: u64,
}

/// A [`MachineSnapshot`] read only to check it: each store entry is decoded and dropped at
/// once, so checking a snapshot of any size holds one entry and the sessions.
#[derive(Deserialize)]
struct MachineSnapshotCheck {
    #[serde(deserialize_with = "skim_entries")]
    _store: (),
    sessions: SessionSnapshot<Vec<KvOut>>,
    _applied: u64,
}

/// Decodes the store's entries one at a time, keeping none.
fn skim_entries<'de, D: serde::Deserializer<'de>>(d: D) -> Result<(), D::Error> {
    struct Entries;
    impl<'de> serde::de::Visitor<'de> for Entries {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a sequence of store entries")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element::<(String, (String, u64))>()?.is_some() {}
            Ok(())
        }
    }
    d.deserialize_seq(Entries)
}

/// [`MachineSnapshot`] by reference; encodes alike.
#[derive(Serialize)]
struct MachineSnapshotRef<'a> {
    store: &'a [(&'a String, &'a (String, u64))],
    sessions: SessionSnapshot<Vec<KvOut>>,
    applied: u64,
}

/// Why a snapshot could not be restored.
#[derive(Debug)]
pub struct SnapshotError(String);

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node snapshot: {}", self.0)
    }
}

impl std::error::Error for SnapshotError {}

struct Inner {
    sessions: SessionTable<Vec<KvOut>>,
    /// Requests executed so far (the same count on every replica: it is a function of the
    /// log): the session table's "index".
    applied: u64,
}

/// The KV state machine the rsm runs on every node.
pub struct KvMachine {
    store: VersionedStore,
    inner: Mutex<Inner>,
}

impl Default for KvMachine {
    fn default() -> Self {
        KvMachine::new()
    }
}

/// Bytes → a string of the chars with those numbers.
pub fn to_latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

/// The inverse of [`to_latin1`]; every char of such a string is below 256.
pub fn from_latin1(s: &str) -> Vec<u8> {
    s.chars().map(|c| c as u32 as u8).collect()
}

impl KvMachine {
    pub fn new() -> KvMachine {
        KvMachine {
            store: VersionedStore::new(),
            inner: Mutex::new(Inner {
                sessions: SessionTable::new(MAX_SESSIONS),
                applied: 0,
            }),
        }
    }

    /// Requests applied so far.
    pub fn applied(&self) -> u64 {
        self.inner.lock().applied
    }

    /// Keys held.
    pub fn keys(&self) -> usize {
        self.store.len()
    }

    /// Runs read-only commands on this replica's state as it is now, without the log: not
    /// linearizable by itself (a follower, or a deposed leader, may be behind). [`read`]
    /// calls it after a ReadIndex; only the deliberate fault
    /// [`crate::node::NodeFault::LocalReads`] calls it without one, to prove that the chaos
    /// checker catches stale reads.
    ///
    /// [`read`]: KvMachine::read
    pub fn read_local(&self, cmds: &[KvCmd]) -> Vec<KvOut> {
        debug_assert!(
            !cmds.iter().any(KvCmd::is_write),
            "read_local given a write"
        );
        let _inner = self.inner.lock();
        cmds.iter().map(|c| self.execute(c)).collect()
    }

    fn get(&self, key: &[u8]) -> Option<(Vec<u8>, u64)> {
        let reply = self.store.get(&GetArgs {
            key: to_latin1(key),
        });
        (reply.err == KvErr::Ok).then(|| (from_latin1(&reply.value), reply.version))
    }

    fn execute(&self, cmd: &KvCmd) -> KvOut {
        match cmd {
            KvCmd::Get(key) => self.get(key).map_or(KvOut::Null, |(v, _)| KvOut::Bulk(v)),
            KvCmd::Set(key, value) => {
                self.store.set(to_latin1(key), to_latin1(value));
                KvOut::Ok
            }
            KvCmd::Del(keys) => {
                let removed = keys
                    .iter()
                    .filter(|k| self.store.delete(&to_latin1(k)))
                    .count();
                KvOut::Int(removed as i64)
            }
            KvCmd::Exists(keys) => {
                KvOut::Int(keys.iter().filter(|k| self.get(k).is_some()).count() as i64)
            }
            KvCmd::Incr(key) => {
                let current = match self.get(key) {
                    None => 0,
                    Some((v, _)) => match std::str::from_utf8(&v).ok().and_then(|s| {
                        // Redis refuses a leading '+' or spaces too.
                        if s.starts_with('+') || s.trim() != s {
                            None
                        } else {
                            s.parse::<i64>().ok()
                        }
                    }) {
                        Some(n) => n,
                        None => return KvOut::Err(crate::resp::command::NOT_AN_INTEGER.into()),
                    },
                };
                match current.checked_add(1) {
                    Some(n) => {
                        self.store.set(to_latin1(key), n.to_string());
                        KvOut::Int(n)
                    }
                    None => KvOut::Err("ERR increment or decrement would overflow".into()),
                }
            }
            KvCmd::MGet(keys) => KvOut::Array(
                keys.iter()
                    .map(|k| self.get(k).map_or(KvOut::Null, |(v, _)| KvOut::Bulk(v)))
                    .collect(),
            ),
            KvCmd::DbSize => KvOut::Int(self.store.len() as i64),
            KvCmd::VGet(key) => self
                .get(key)
                .map_or(KvOut::Null, |(v, version)| KvOut::Versioned(v, version)),
            KvCmd::VSet {
                key,
                value,
                version,
            } => {
                let reply = self.store.put(PutArgs {
                    key: to_latin1(key),
                    value: to_latin1(value),
                    version: *version,
                });
                match reply.err {
                    KvErr::Ok => KvOut::Ok,
                    KvErr::NoKey => KvOut::ErrNoKey,
                    _ => KvOut::ErrVersion,
                }
            }
        }
    }

    /// Runs read-only commands on the state as it is now, without touching the log or the
    /// sessions (the caller made sure, with a ReadIndex, that the state is recent enough).
    /// Atomic with respect to every applied request.
    pub fn read(&self, cmds: &[KvCmd]) -> Outcome {
        if let Some(w) = cmds.iter().find(|c| c.is_write()) {
            return Outcome::Bad(format!("a write in a read-only request: {w:?}"));
        }
        Outcome::Done(self.read_local(cmds))
    }

    fn run(&self, req: &Request) -> Outcome {
        let mut inner = self.inner.lock();
        inner.applied += 1;
        let index = inner.applied;
        let execute = || req.cmds.iter().map(|c| self.execute(c)).collect::<Vec<_>>();
        if req.client == 0 {
            // Reads only: nothing to deduplicate.
            return Outcome::Done(execute());
        }
        match inner.sessions.apply(req.client, req.seq, index, execute) {
            Applied::Fresh(outs) => Outcome::Done(outs),
            Applied::Duplicate(outs) => {
                log::debug!(target: LOG, "client {:#x} seq {}: duplicate, answered from the session table", req.client, req.seq);
                Outcome::Done(outs)
            }
            Applied::Stale { last_seq } => {
                log::warn!(target: LOG, "client {:#x} seq {}: stale (last {last_seq})", req.client, req.seq);
                Outcome::Stale
            }
            Applied::Expired => Outcome::Expired,
        }
    }
}

impl StateMachine for KvMachine {
    /// A log entry is a batch of requests; the reply is one outcome per request.
    fn do_op(&self, req: &[u8]) -> Vec<u8> {
        let outcomes: Vec<Outcome> = match labcodec::decode::<Vec<Request>>(req) {
            Ok(batch) => batch.iter().map(|r| self.run(r)).collect(),
            Err(e) => {
                log::error!(target: LOG, "a log entry does not decode: {e}");
                vec![Outcome::Bad(e.to_string())]
            }
        };
        labcodec::encode(&outcomes).unwrap_or_default()
    }

    fn check_op(&self, req: &[u8]) -> Result<(), String> {
        labcodec::decode::<Vec<Request>>(req)
            .map(|_| ())
            .map_err(|e| format!("not a batch of requests: {e}"))
    }

    fn check_snapshot(&self, data: &[u8]) -> Result<(), String> {
        let snap: MachineSnapshot =
            labcodec::decode(data).map_err(|e| format!("not a node snapshot: {e}"))?;
        // The store decoded with the envelope; the sessions must also restore.
        SessionTable::restore(snap.sessions)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn check_snapshot_stream(&self, data: &mut dyn std::io::Read, len: u64) -> Result<(), String> {
        let snap: MachineSnapshotCheck =
            labcodec::decode_from(data, len).map_err(|e| format!("not a node snapshot: {e}"))?;
        SessionTable::restore(snap.sessions)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn snapshot(&self) -> Vec<u8> {
        let inner = self.inner.lock();
        let sessions = inner.sessions.snapshot();
        self.store.with_sorted(|entries| {
            labcodec::encode(&MachineSnapshotRef {
                store: entries,
                sessions,
                applied: inner.applied,
            })
            // Strings and integers always encode.
            .unwrap_or_default()
        })
    }

    fn restore(&self, data: &[u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let snap: MachineSnapshot =
            labcodec::decode(data).map_err(|e| SnapshotError(e.to_string()))?;
        let sessions =
            SessionTable::restore(snap.sessions).map_err(|e| SnapshotError(e.to_string()))?;
        let mut inner = self.inner.lock();
        self.store.replace(snap.store);
        inner.sessions = sessions;
        inner.applied = snap.applied;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(m: &KvMachine, client: u64, seq: u64, cmds: Vec<KvCmd>) -> Outcome {
        let bytes = labcodec::encode(&vec![Request { client, seq, cmds }]).unwrap();
        let mut outs: Vec<Outcome> = labcodec::decode(&m.do_op(&bytes)).unwrap();
        assert_eq!(outs.len(), 1);
        outs.pop().unwrap()
    }

    #[test]
    fn a_batch_applies_each_request_once_and_reads_need_no_log() {
        let m = KvMachine::new();
        let incr = |client, seq| Request {
            client,
            seq,
            cmds: vec![KvCmd::Incr(b"n".to_vec())],
        };
        // The same tag twice in one entry (a retried forward that was batched again) applies
        // once; another client's request in the same entry applies on its own.
        let batch = vec![incr(7, 1), incr(7, 1), incr(9, 1)];
        let outs: Vec<Outcome> =
            labcodec::decode(&m.do_op(&labcodec::encode(&batch).unwrap())).unwrap();
        assert_eq!(
            outs,
            vec![
                Outcome::Done(vec![KvOut::Int(1)]),
                Outcome::Done(vec![KvOut::Int(1)]),
                Outcome::Done(vec![KvOut::Int(2)]),
            ]
        );
        let applied = m.applied();
        assert_eq!(
            m.read(&[KvCmd::Get(b"n".to_vec())]),
            Outcome::Done(vec![KvOut::Bulk(b"2".to_vec())])
        );
        assert_eq!(
            m.applied(),
            applied,
            "a local read is not an applied request"
        );
        assert!(matches!(
            m.read(&[KvCmd::Incr(b"n".to_vec())]),
            Outcome::Bad(_)
        ));
    }

    #[test]
    fn incr_applies_once_per_seq_and_survives_a_snapshot() {
        let m = KvMachine::new();
        let incr = || vec![KvCmd::Incr(b"n".to_vec())];
        assert_eq!(run(&m, 7, 1, incr()), Outcome::Done(vec![KvOut::Int(1)]));
        assert_eq!(run(&m, 7, 1, incr()), Outcome::Done(vec![KvOut::Int(1)]));
        let copy = KvMachine::new();
        copy.restore(&m.snapshot()).unwrap();
        assert_eq!(run(&copy, 7, 1, incr()), Outcome::Done(vec![KvOut::Int(1)]));
        assert_eq!(run(&copy, 7, 2, incr()), Outcome::Done(vec![KvOut::Int(2)]));
        assert_eq!(
            run(&copy, 0, 0, vec![KvCmd::Get(b"n".to_vec())]),
            Outcome::Done(vec![KvOut::Bulk(b"2".to_vec())])
        );
    }

    #[test]
    fn binary_keys_and_values_round_trip() {
        let m = KvMachine::new();
        let key: Vec<u8> = (0..=255).collect();
        let value = vec![0xff, 0, 0x80, b'\r'];
        run(&m, 1, 1, vec![KvCmd::Set(key.clone(), value.clone())]);
        assert_eq!(
            run(&m, 0, 0, vec![KvCmd::VGet(key)]),
            Outcome::Done(vec![KvOut::Versioned(value, 1)])
        );
    }

    /// The streaming check (a snapshot read back from the file it was received in) agrees
    /// with the whole one on a real snapshot, a cut one, one with a byte more, and garbage.
    #[test]
    fn a_snapshot_checked_as_a_stream_is_judged_as_a_whole() {
        let m = KvMachine::new();
        for k in 0..50u8 {
            run(
                &m,
                1,
                u64::from(k) + 1,
                vec![KvCmd::Set(vec![k], vec![k; 300])],
            );
        }
        let good = m.snapshot();
        let mut longer = good.clone();
        longer.push(0);
        let garbage = vec![0xff; 4096];
        let cases: [(&[u8], bool); 4] = [
            (&good, true),
            (&good[..good.len() - 1], false),
            (&longer, false),
            (&garbage, false),
        ];
        for (bytes, ok) in cases {
            let whole = m.check_snapshot(bytes);
            let stream = m.check_snapshot_stream(&mut &bytes[..], bytes.len() as u64);
            assert_eq!(whole.is_ok(), ok, "{whole:?}");
            assert_eq!(stream.is_ok(), ok, "{stream:?}");
        }
    }

    #[test]
    fn bad_entry_and_bad_snapshot_are_errors() {
        let m = KvMachine::new();
        let out: Vec<Outcome> = labcodec::decode(&m.do_op(&[0xff, 0xff, 0xff])).unwrap();
        assert!(matches!(out[..], [Outcome::Bad(_)]));
        assert!(m.restore(&[1, 2, 3]).is_err());
    }
}
