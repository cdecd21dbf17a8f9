//! What a replicated service gives the rsm: a typed state machine, and the envelope the rsm
//! puts around its ops and snapshots in the Raft log.

use std::io::Read;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::labcodec;
use crate::raft::Validator;

/// An error a state machine gives for a snapshot it cannot restore.
pub type RestoreError = Box<dyn std::error::Error + Send + Sync>;

/// What the replicated service executes (the Go labs' `StateMachine`: `DoOp`, `Snapshot`,
/// `Restore`), typed: an [`Op`](Self::Op) travels through the Raft log, encoded once by the
/// submitter and decoded once by each peer's reader; a [`Reply`](Self::Reply) goes from the
/// reader to the submitter in the same process and is never encoded.
pub trait StateMachine: Send + Sync + 'static {
    /// A request as it travels through the log.
    type Op: Serialize + DeserializeOwned + Send + 'static;
    /// What executing an op answers.
    type Reply: Send + 'static;

    /// Executes committed ops, in log order, and returns one reply per op, in the same order.
    /// Called on every peer with the runs of entries the reader finds committed together.
    fn apply(&self, ops: Vec<Self::Op>) -> Vec<Self::Reply>;
    /// The whole state, for a snapshot.
    fn snapshot(&self) -> Vec<u8>;
    /// Replaces the whole state by a snapshot's. An error (a snapshot the service cannot
    /// read) stops the replica: going on would apply later entries to the wrong state.
    fn restore(&self, data: &[u8]) -> Result<(), RestoreError>;
    /// Whether the service wants a snapshot now although the log is not yet long enough
    /// (e.g. it just dropped much of its state, which the persisted snapshot still holds).
    /// Asked after each run of applied ops; only honoured when snapshots are on.
    fn wants_snapshot(&self) -> bool {
        false
    }
    /// Whether `op` (which decoded) is one this machine can execute. Raft asks, through the
    /// rsm's validator, before a follower persists an entry from its leader: an entry that
    /// does not decode or fails here is refused, so garbage never reaches the log. The
    /// default takes every op that decodes.
    fn check_op(&self, _op: &Self::Op) -> Result<(), String> {
        Ok(())
    }
    /// Whether `data` is a state [`restore`](Self::restore) would take; asked before an
    /// InstallSnapshot is persisted. The default takes every state.
    fn check_snapshot(&self, _data: &[u8]) -> Result<(), String> {
        Ok(())
    }
    /// [`check_snapshot`](Self::check_snapshot) of the `len` bytes read from `data` (a
    /// snapshot streamed from the leader, read back from its file). The default reads them
    /// whole; a machine whose state is large walks its encoding instead.
    fn check_snapshot_stream(&self, data: &mut dyn Read, len: u64) -> Result<(), String> {
        let mut bytes = Vec::new();
        data.take(len)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read the snapshot: {e}"))?;
        self.check_snapshot(&bytes)
    }
}

/// What goes into the Raft log, as read back (borrowing the op's bytes).
#[derive(Deserialize)]
pub(super) enum LogOp<'a> {
    /// A service op, encoded, and an id unique to this submission, so the submitter can tell
    /// its op from another leader's op at the same index.
    Request {
        id: u64,
        #[serde(borrow)]
        op: &'a [u8],
    },
    /// Appended by each new leader of a term (Raft §8): once it commits, every entry of
    /// earlier terms still in the log has committed too, so a request whose leader was
    /// deposed learns its fate at once instead of waiting for the next client.
    TermStart,
}

/// [`LogOp`] as written; encodes alike.
#[derive(Serialize)]
pub(super) enum LogOpRef<'a> {
    Request { id: u64, op: &'a [u8] },
    TermStart,
}

/// A log entry's op, decoded: `None` for a term start.
pub(super) fn decode_entry<O: DeserializeOwned>(
    command: &[u8],
) -> Result<Option<(u64, O)>, labcodec::CodecError> {
    match labcodec::decode_borrowed::<LogOp>(command)? {
        LogOp::Request { id, op } => Ok(Some((id, labcodec::decode(op)?))),
        LogOp::TermStart => Ok(None),
    }
}

/// The log entry of op `id`.
pub(super) fn encode_entry<O: Serialize>(id: u64, op: &O) -> Result<Vec<u8>, labcodec::CodecError> {
    let op = labcodec::encode(op)?;
    labcodec::encode(&LogOpRef::Request { id, op: &op })
}

/// What the rsm hands Raft as a snapshot: the service's state and the index it reflects, so
/// a restarted peer knows where it is. Read borrowing the state from the snapshot's bytes, and
/// written by [`encode_snapshot`], so a large state is never copied.
#[derive(Deserialize)]
pub(super) struct RsmSnapshot<'a> {
    pub(super) index: u64,
    #[serde(borrow)]
    pub(super) state: &'a [u8],
}

/// The encoding of `RsmSnapshot { index, state }`: that of `(index, state.len())` followed
/// by the state's bytes, built in the state's own buffer.
pub(super) fn encode_snapshot(
    index: u64,
    mut state: Vec<u8>,
) -> Result<Vec<u8>, labcodec::CodecError> {
    let head = labcodec::encode(&(index, state.len() as u64))?;
    state.splice(0..0, head);
    Ok(state)
}

/// What the rsm gives Raft to check the leader's entries and snapshots: the log format's
/// envelope and, inside it, the state machine's own check.
pub(super) struct RsmValidator<M: StateMachine + ?Sized> {
    pub(super) sm: Arc<M>,
}

impl<M: StateMachine + ?Sized> Validator for RsmValidator<M> {
    fn check_entry(&self, command: &[u8]) -> Result<(), String> {
        match decode_entry::<M::Op>(command).map_err(|e| e.to_string())? {
            Some((_, op)) => self.sm.check_op(&op),
            None => Ok(()),
        }
    }

    fn check_snapshot(&self, data: &[u8]) -> Result<(), String> {
        let snap = labcodec::decode_borrowed::<RsmSnapshot>(data).map_err(|e| e.to_string())?;
        self.sm.check_snapshot(snap.state)
    }

    /// The envelope's head (index, state length) from the stream, then the state machine's
    /// check of the rest: the state is never held here.
    fn check_snapshot_stream(&self, data: &mut dyn Read, len: u64) -> Result<(), String> {
        let ((_index, state_len), head) =
            labcodec::decode_prefix_from::<(u64, u64)>(data, len).map_err(|e| e.to_string())?;
        if head.checked_add(state_len) != Some(len) {
            return Err(format!(
                "the state claims {state_len} bytes, the snapshot holds {}",
                len - head
            ));
        }
        self.sm.check_snapshot_stream(data, state_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entry format is the one the node's data directories hold: `Request { id, req }`
    /// with the op's encoding as a byte string.
    #[test]
    fn entries_round_trip_and_keep_the_byte_string_envelope() {
        #[derive(Serialize, Deserialize)]
        enum Old {
            Request { id: u64, req: Vec<u8> },
            TermStart,
        }
        let op = (7u32, "k".to_string());
        let entry = encode_entry(42, &op).unwrap();
        let old = labcodec::encode(&Old::Request {
            id: 42,
            req: labcodec::encode(&op).unwrap(),
        })
        .unwrap();
        assert_eq!(entry, old);
        assert_eq!(
            decode_entry::<(u32, String)>(&entry).unwrap(),
            Some((42, op))
        );
        let term_start = labcodec::encode(&LogOpRef::TermStart).unwrap();
        assert_eq!(term_start, labcodec::encode(&Old::TermStart).unwrap());
        assert_eq!(decode_entry::<(u32, String)>(&term_start).unwrap(), None);
        assert!(decode_entry::<(u32, String)>(&[0xff, 0xff]).is_err());
    }

    #[test]
    fn snapshot_envelope_round_trips() {
        let data = encode_snapshot(9, b"state".to_vec()).unwrap();
        let snap = labcodec::decode_borrowed::<RsmSnapshot>(&data).unwrap();
        assert_eq!((snap.index, snap.state), (9, &b"state"[..]));
    }
}
