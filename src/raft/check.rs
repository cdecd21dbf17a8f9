//! What a peer accepts from another before it changes anything: bounds on every term and
//! index a message carries, and the service's check of the commands and snapshots it would
//! persist (a [`Validator`]). A message that fails is refused whole — no reply, nothing
//! persisted, no term adopted — and logged naming the peer it claims to come from.
//!
//! Terms and indexes stay at or below [`MAX_TERM`] and [`MAX_INDEX`] (2^63 − 1): one election
//! a millisecond would take 292 million years to get there, so a message above is garbage,
//! and the arithmetic below (`term + 1`, `prev + entries`, `index + 1`) can never wrap.

use std::fmt;
use std::io::Read;

use super::rpc::{
    AppendEntriesArgs, InstallSnapshotArgs, InstallSnapshotChunkArgs, RequestVoteArgs,
};

/// The highest term a peer takes from a message (or reaches itself).
pub const MAX_TERM: u64 = i64::MAX as u64;
/// The highest log index a peer takes from a message.
pub const MAX_INDEX: u64 = i64::MAX as u64;
/// The most a message may move a peer's term forward. With pre-vote a cut-off peer does not
/// raise its term, and 2^32 elections take 136 years at one a second: a bigger jump is
/// garbage, and refusing it keeps a forged message from carrying a cluster near [`MAX_TERM`].
pub const MAX_TERM_JUMP: u64 = 1 << 32;

/// The service's view of what Raft would persist: a command in an AppendEntries, the data of
/// an InstallSnapshot. Raft treats commands as opaque bytes; the service, which will execute
/// them, says whether they are its own. Given to Raft with
/// [`Raft::set_validator`](super::Raft::set_validator); without one everything passes (the
/// labs' tests send opaque commands).
pub trait Validator: Send + Sync {
    /// Whether `command` is one the service can execute.
    fn check_entry(&self, command: &[u8]) -> Result<(), String>;
    /// Whether `data` is a snapshot the service can restore.
    fn check_snapshot(&self, data: &[u8]) -> Result<(), String>;
    /// [`check_snapshot`](Validator::check_snapshot) of the `len` bytes `data` yields, read
    /// once front to back: how a snapshot streamed in pieces is checked, from the file it was
    /// assembled in. A service whose check walks its encoding as it reads keeps memory to
    /// what it retains, not the snapshot's size (which can be hundreds of MB, beside the live
    /// state). The default reads it whole and calls `check_snapshot`.
    fn check_snapshot_stream(&self, data: &mut dyn Read, len: u64) -> Result<(), String> {
        let mut bytes = Vec::new();
        data.take(len)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read the snapshot: {e}"))?;
        if bytes.len() as u64 != len {
            return Err(format!("{} of {len} bytes", bytes.len()));
        }
        self.check_snapshot(&bytes)
    }
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A term field above [`MAX_TERM`].
    Term { field: &'static str, value: u64 },
    /// An index field (or the index an entry would get) above [`MAX_INDEX`].
    Index { field: &'static str, value: u64 },
    /// The sender claims a peer number outside the cluster, or this peer's own.
    Sender { claimed: usize, peers: usize },
    /// The message's term is more than [`MAX_TERM_JUMP`] ahead of this peer's.
    TermJump { term: u64, current: u64 },
    /// A term in the message is above the message's own term (no leader or candidate can
    /// hold such an entry).
    TermAhead {
        field: &'static str,
        value: u64,
        term: u64,
    },
    /// The service cannot execute the entry at `index`.
    Entry { index: u64, reason: String },
    /// The service cannot restore the snapshot.
    Snapshot { reason: String },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Term { field, value } => {
                write!(f, "{field} {value} is above the largest term {MAX_TERM}")
            }
            Refusal::Index { field, value } => {
                write!(f, "{field} {value} is above the largest index {MAX_INDEX}")
            }
            Refusal::Sender { claimed, peers } => {
                write!(f, "sender {claimed} is not another peer of {peers}")
            }
            Refusal::TermJump { term, current } => write!(
                f,
                "term {term} is more than {MAX_TERM_JUMP} ahead of ours ({current})"
            ),
            Refusal::TermAhead { field, value, term } => {
                write!(f, "{field} {value} is above the message's term {term}")
            }
            Refusal::Entry { index, reason } => {
                write!(f, "the entry at {index} is not the service's: {reason}")
            }
            Refusal::Snapshot { reason } => {
                write!(f, "the snapshot is not the service's: {reason}")
            }
        }
    }
}

fn term(field: &'static str, value: u64) -> Result<(), Refusal> {
    if value > MAX_TERM {
        return Err(Refusal::Term { field, value });
    }
    Ok(())
}

fn index(field: &'static str, value: u64) -> Result<(), Refusal> {
    if value > MAX_INDEX {
        return Err(Refusal::Index { field, value });
    }
    Ok(())
}

fn not_ahead(field: &'static str, value: u64, msg_term: u64) -> Result<(), Refusal> {
    if value > msg_term {
        return Err(Refusal::TermAhead {
            field,
            value,
            term: msg_term,
        });
    }
    Ok(())
}

/// Checked under the state lock, against the peer's current term.
pub(super) fn term_jump(term: u64, current: u64) -> Result<(), Refusal> {
    if term.saturating_sub(current) > MAX_TERM_JUMP {
        return Err(Refusal::TermJump { term, current });
    }
    Ok(())
}

fn sender(claimed: usize, me: usize, peers: usize) -> Result<(), Refusal> {
    if claimed >= peers || claimed == me {
        return Err(Refusal::Sender { claimed, peers });
    }
    Ok(())
}

pub(super) fn request_vote(a: &RequestVoteArgs, me: usize, peers: usize) -> Result<(), Refusal> {
    sender(a.candidate, me, peers)?;
    term("term", a.term)?;
    index("last_log_index", a.last_log_index)?;
    term("last_log_term", a.last_log_term)?;
    not_ahead("last_log_term", a.last_log_term, a.term)
}

/// Bounds only; the entries' commands are checked by [`entries`].
pub(super) fn append_entries(
    a: &AppendEntriesArgs,
    me: usize,
    peers: usize,
) -> Result<(), Refusal> {
    sender(a.leader, me, peers)?;
    term("term", a.term)?;
    index("prev_log_index", a.prev_log_index)?;
    term("prev_log_term", a.prev_log_term)?;
    not_ahead("prev_log_term", a.prev_log_term, a.term)?;
    index("leader_commit", a.leader_commit)?;
    let last = a.prev_log_index.saturating_add(a.entries.len() as u64);
    index("last entry's index", last)?;
    for e in &a.entries {
        not_ahead("an entry's term", e.term, a.term)?;
    }
    Ok(())
}

/// The service's check of every command in `a` (bounds already checked). With membership
/// on, a configuration entry is Raft's own: it must decode to a sane configuration, and the
/// service never sees it.
pub(super) fn entries(
    a: &AppendEntriesArgs,
    v: &dyn Validator,
    membership: bool,
) -> Result<(), Refusal> {
    for (i, e) in a.entries.iter().enumerate() {
        let index = a.prev_log_index + 1 + i as u64;
        if membership && super::membership::is_config_entry(&e.command) {
            super::membership::Configuration::decode_entry(&e.command)
                .map_err(|reason| Refusal::Entry { index, reason })?;
            continue;
        }
        v.check_entry(&e.command)
            .map_err(|reason| Refusal::Entry { index, reason })?;
    }
    Ok(())
}

/// A validator that takes everything (membership on, no service validator given).
pub(super) struct AcceptAll;

impl Validator for AcceptAll {
    fn check_entry(&self, _command: &[u8]) -> Result<(), String> {
        Ok(())
    }
    fn check_snapshot(&self, _data: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

/// A snapshot message, whole or one piece: what it says of its sender and position.
pub(super) trait SnapshotMessage {
    /// The leader, the message's term, and the snapshot's last included index and term.
    fn header(&self) -> (usize, u64, u64, u64);
}

impl SnapshotMessage for InstallSnapshotArgs {
    fn header(&self) -> (usize, u64, u64, u64) {
        (
            self.leader,
            self.term,
            self.last_included_index,
            self.last_included_term,
        )
    }
}

/// One piece of a streamed snapshot (offsets and lengths are the storage's to check).
impl SnapshotMessage for InstallSnapshotChunkArgs {
    fn header(&self) -> (usize, u64, u64, u64) {
        (
            self.leader,
            self.term,
            self.last_included_index,
            self.last_included_term,
        )
    }
}

/// What a snapshot message, whole or one piece, says of its sender and position.
pub(super) fn snapshot(a: &impl SnapshotMessage, me: usize, peers: usize) -> Result<(), Refusal> {
    let (leader, msg_term, last_index, last_term) = a.header();
    sender(leader, me, peers)?;
    term("term", msg_term)?;
    index("last_included_index", last_index)?;
    term("last_included_term", last_term)?;
    not_ahead("last_included_term", last_term, msg_term)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::log::Entry;

    fn ae(prev: u64, n: usize) -> AppendEntriesArgs {
        AppendEntriesArgs {
            term: 5,
            leader: 1,
            prev_log_index: prev,
            prev_log_term: 1,
            entries: vec![
                Entry {
                    term: 2,
                    command: vec![]
                };
                n
            ],
            leader_commit: 0,
        }
    }

    #[test]
    fn bounds_at_the_edge() {
        assert_eq!(append_entries(&ae(MAX_INDEX - 2, 2), 0, 3), Ok(()));
        assert!(matches!(
            append_entries(&ae(MAX_INDEX - 2, 3), 0, 3),
            Err(Refusal::Index { .. })
        ));
        assert!(matches!(
            append_entries(&ae(u64::MAX, 1), 0, 3),
            Err(Refusal::Index { .. })
        ));
        let mut a = ae(0, 1);
        a.leader = 0;
        assert!(matches!(
            append_entries(&a, 0, 3),
            Err(Refusal::Sender { .. })
        ));
        a.leader = 3;
        assert!(matches!(
            append_entries(&a, 0, 3),
            Err(Refusal::Sender { .. })
        ));
        let mut a = ae(0, 1);
        a.entries[0].term = 6;
        assert!(matches!(
            append_entries(&a, 0, 3),
            Err(Refusal::TermAhead { .. })
        ));
        let v = RequestVoteArgs {
            term: u64::MAX,
            candidate: 2,
            last_log_index: 0,
            last_log_term: 0,
            pre_vote: true,
        };
        assert!(matches!(request_vote(&v, 0, 3), Err(Refusal::Term { .. })));
        let v = RequestVoteArgs {
            term: MAX_TERM,
            ..v
        };
        assert_eq!(request_vote(&v, 0, 3), Ok(()));
    }
}
