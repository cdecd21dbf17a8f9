//! The node's state machine: the KV map ([`KvMap`], binary keys and values) plus the
//! exactly-once session table, both in every snapshot. What goes through the Raft log is a
//! batch of [`Request`]s (`Vec<Request>`, one log entry for whatever the node's clients sent
//! while the previous entry was on its way); a request is the commands one client pipelined,
//! tagged `(client, seq)` when it writes. Each request of a batch is applied, and
//! deduplicated, on its own.

use std::fmt;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::kvapi::KvMap;
use crate::kvapi::kv::{KvEntry, KvEntryRef};
pub use crate::kvapi::{KvCmd, KvOut};
use crate::labcodec;
use crate::rsm::{RestoreError, StateMachine};
use crate::session::{Applied, SessionSnapshot, SessionTable};

const LOG: &str = "node::machine";

/// Sessions the table keeps: well above the client slots every node has open at once.
pub const MAX_SESSIONS: usize = 100_000;

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

/// What a snapshot starts with: no encoding of the older format (whose first byte is a
/// length's varint, never 0xff) starts so.
const SNAPSHOT_TAG: [u8; 2] = [0xff, 2];

/// The state a snapshot carries after [`SNAPSHOT_TAG`]: the map's entries sorted by key, the
/// sessions, and the number of requests applied. Written from references
/// ([`MachineSnapshotRef`]) into one buffer, so a snapshot costs the state's size once more
/// in memory, not twice.
#[derive(Deserialize)]
struct MachineSnapshot {
    store: Vec<KvEntry>,
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

/// [`MachineSnapshotCheck`] of the first format: each key and value must be Latin-1.
#[derive(Deserialize)]
struct MachineSnapshotCheckV1 {
    #[serde(deserialize_with = "skim_entries_v1")]
    _store: (),
    sessions: SessionSnapshot<Vec<KvOut>>,
    _applied: u64,
}

/// A visitor that decodes a sequence's `E`s one at a time, checks each with its function
/// and keeps none.
struct Skim<E>(fn(E) -> Result<(), &'static str>);

impl<'de, E: Deserialize<'de>> serde::de::Visitor<'de> for Skim<E> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence of store entries")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(entry) = seq.next_element::<E>()? {
            (self.0)(entry).map_err(serde::de::Error::custom)?;
        }
        Ok(())
    }
}

fn skim_entries<'de, D: serde::Deserializer<'de>>(d: D) -> Result<(), D::Error> {
    d.deserialize_seq(Skim::<KvEntry>(|_| Ok(())))
}

fn skim_entries_v1<'de, D: serde::Deserializer<'de>>(d: D) -> Result<(), D::Error> {
    d.deserialize_seq(Skim::<(String, (String, u64))>(|(k, (v, _))| {
        match (from_latin1(k), from_latin1(v)) {
            (Some(_), Some(_)) => Ok(()),
            _ => Err("a key or value of the first snapshot format is not Latin-1"),
        }
    }))
}

/// [`MachineSnapshot`] by reference; encodes alike.
#[derive(Serialize)]
struct MachineSnapshotRef<'a> {
    store: &'a [KvEntryRef<'a>],
    sessions: SessionSnapshot<Vec<KvOut>>,
    applied: u64,
}

/// A snapshot of the first format (no tag): keys and values as strings of the chars with
/// the bytes' numbers (Latin-1). Still read, so a data directory written before the map held
/// bytes restores unchanged.
#[derive(Deserialize)]
struct MachineSnapshotV1 {
    store: Vec<(String, (String, u64))>,
    sessions: SessionSnapshot<Vec<KvOut>>,
    applied: u64,
}

/// The bytes of a Latin-1 string of the first snapshot format; `None` if a char is above 255.
fn from_latin1(s: String) -> Option<Vec<u8>> {
    s.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect()
}

impl MachineSnapshot {
    fn decode(data: &[u8]) -> Result<MachineSnapshot, String> {
        if let Some(rest) = data.strip_prefix(&SNAPSHOT_TAG) {
            return labcodec::decode(rest).map_err(|e| format!("not a node snapshot: {e}"));
        }
        let v1: MachineSnapshotV1 =
            labcodec::decode(data).map_err(|e| format!("not a node snapshot: {e}"))?;
        let store = v1
            .store
            .into_iter()
            .map(|(k, (v, version))| Some((from_latin1(k)?, (from_latin1(v)?, version))))
            .collect::<Option<Vec<KvEntry>>>()
            .ok_or("a key or value of the first snapshot format is not Latin-1")?;
        Ok(MachineSnapshot {
            store,
            sessions: v1.sessions,
            applied: v1.applied,
        })
    }
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
    kv: KvMap,
    sessions: SessionTable<Vec<KvOut>>,
    /// Requests executed so far (the same count on every replica: it is a function of the
    /// log): the session table's "index".
    applied: u64,
}

/// The KV state machine the rsm runs on every node.
pub struct KvMachine {
    inner: Mutex<Inner>,
}

impl Default for KvMachine {
    fn default() -> Self {
        KvMachine::new()
    }
}

impl KvMachine {
    pub fn new() -> KvMachine {
        KvMachine {
            inner: Mutex::new(Inner {
                kv: KvMap::new(),
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
        self.inner.lock().kv.len()
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
        let mut inner = self.inner.lock();
        cmds.iter().map(|c| inner.kv.execute(c)).collect()
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

    fn run(inner: &mut Inner, req: &Request) -> Outcome {
        inner.applied += 1;
        let index = inner.applied;
        let Inner { kv, sessions, .. } = inner;
        let mut execute = || req.cmds.iter().map(|c| kv.execute(c)).collect::<Vec<_>>();
        if req.client == 0 {
            // Reads only: nothing to deduplicate.
            return Outcome::Done(execute());
        }
        match sessions.apply(req.client, req.seq, index, execute) {
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
    type Op = Vec<Request>;
    type Reply = Vec<Outcome>;

    fn apply(&self, ops: Vec<Vec<Request>>) -> Vec<Vec<Outcome>> {
        let mut inner = self.inner.lock();
        ops.iter()
            .map(|batch| {
                batch
                    .iter()
                    .map(|r| KvMachine::run(&mut inner, r))
                    .collect()
            })
            .collect()
    }

    fn check_snapshot(&self, data: &[u8]) -> Result<(), String> {
        let snap = MachineSnapshot::decode(data)?;
        // The map decoded with the envelope; the sessions must also restore.
        SessionTable::restore(snap.sessions)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn check_snapshot_stream(&self, data: &mut dyn std::io::Read, len: u64) -> Result<(), String> {
        use std::io::Read as _;
        let not_ours = |e: labcodec::CodecError| format!("not a node snapshot: {e}");
        let mut head = [0u8; SNAPSHOT_TAG.len()];
        let n = head.len().min(usize::try_from(len).unwrap_or(usize::MAX));
        data.read_exact(&mut head[..n])
            .map_err(|e| format!("cannot read the snapshot: {e}"))?;
        let sessions = if head[..n] == SNAPSHOT_TAG {
            labcodec::decode_from::<MachineSnapshotCheck>(data, len - n as u64)
                .map_err(not_ours)?
                .sessions
        } else {
            let mut whole = (&head[..n]).chain(data);
            labcodec::decode_from::<MachineSnapshotCheckV1>(&mut whole, len)
                .map_err(not_ours)?
                .sessions
        };
        SessionTable::restore(sessions)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn snapshot(&self) -> Vec<u8> {
        let inner = self.inner.lock();
        let snap = MachineSnapshotRef {
            store: &inner.kv.sorted(),
            sessions: inner.sessions.snapshot(),
            applied: inner.applied,
        };
        // Bytes and integers always encode.
        let mut data = labcodec::encode(&snap).unwrap_or_default();
        data.splice(0..0, SNAPSHOT_TAG);
        data
    }

    /// Replaces the state with the snapshot's. The old state goes first, before the
    /// snapshot is decoded: a replica that installs a second snapshot (a new leader sent
    /// another while it caught up) holds the snapshot's bytes and their decoding, not the old
    /// state too (peak memory about 2 × the state, not 3 ×). Readers wait on the lock meanwhile
    /// rather than see the state half gone; a snapshot that does not decode stops the replica
    /// (the rsm never applies to a state it could not restore).
    fn restore(&self, data: &[u8]) -> Result<(), RestoreError> {
        let mut inner = self.inner.lock();
        drop(std::mem::take(&mut inner.kv));
        let snap = MachineSnapshot::decode(data).map_err(SnapshotError)?;
        let sessions =
            SessionTable::restore(snap.sessions).map_err(|e| SnapshotError(e.to_string()))?;
        inner.kv = KvMap::from_entries(snap.store);
        inner.sessions = sessions;
        inner.applied = snap.applied;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(m: &KvMachine, client: u64, seq: u64, cmds: Vec<KvCmd>) -> Outcome {
        let mut outs = m.apply(vec![vec![Request { client, seq, cmds }]]);
        assert_eq!(outs.len(), 1);
        assert_eq!(outs[0].len(), 1);
        outs.pop().unwrap().pop().unwrap()
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
        let outs = m.apply(vec![batch]).pop().unwrap();
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
        run(
            &m,
            1,
            1,
            vec![KvCmd::Set {
                key: key.clone(),
                value: value.clone(),
            }],
        );
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
                vec![KvCmd::Set {
                    key: vec![k],
                    value: vec![k; 300],
                }],
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

    /// A snapshot of the first format (keys and values as Latin-1 strings, no tag) restores
    /// to the same bytes.
    #[test]
    fn first_format_snapshot_restores_as_bytes() {
        #[derive(Serialize)]
        struct V1 {
            store: Vec<(String, (String, u64))>,
            sessions: SessionSnapshot<Vec<KvOut>>,
            applied: u64,
        }
        let key = vec![b'k', 0xff, 0];
        let value = vec![0x80, b'v'];
        let latin1 = |b: &[u8]| b.iter().map(|&c| c as char).collect::<String>();
        let old = V1 {
            store: vec![(latin1(&key), (latin1(&value), 4))],
            sessions: SessionTable::<Vec<KvOut>>::new(MAX_SESSIONS).snapshot(),
            applied: 9,
        };
        let data = labcodec::encode(&old).unwrap();
        let m = KvMachine::new();
        m.check_snapshot(&data).unwrap();
        m.restore(&data).unwrap();
        assert_eq!(m.applied(), 9);
        assert_eq!(
            run(&m, 0, 0, vec![KvCmd::VGet(key)]),
            Outcome::Done(vec![KvOut::Versioned(value, 4)])
        );
        // Written back in the current format, which restores alike.
        let copy = KvMachine::new();
        copy.restore(&m.snapshot()).unwrap();
        assert_eq!(copy.snapshot(), m.snapshot());
    }

    #[test]
    fn bad_snapshot_is_an_error() {
        let m = KvMachine::new();
        assert!(m.restore(&[1, 2, 3]).is_err());
        assert!(m.check_snapshot(&[1, 2, 3]).is_err());
    }
}
