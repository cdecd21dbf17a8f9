//! What Raft persists (term, vote, log) and how. Always persisted before a reply or a
//! message that depends on it leaves this peer. Raft §5, Figure 2.

use serde::{Deserialize, Serialize};

use super::RaftError;
use super::log::Log;
use super::state::{Core, State};
use crate::labcodec::{self, CodecError};

#[derive(Serialize, Deserialize)]
struct PersistentState {
    term: u64,
    voted_for: Option<usize>,
    log: Log,
}

/// Decodes persisted state; empty means a fresh peer.
pub(super) fn decode_state(
    me: usize,
    bytes: &[u8],
) -> Result<(u64, Option<usize>, Log), RaftError> {
    if bytes.is_empty() {
        return Ok((0, None, Log::default()));
    }
    let ps: PersistentState = labcodec::decode(bytes).map_err(|e| RaftError::CorruptState {
        peer: me,
        reason: e.to_string(),
    })?;
    if ps.log.last_term() > ps.term {
        return Err(RaftError::CorruptState {
            peer: me,
            reason: format!(
                "log holds term {} beyond current term {}",
                ps.log.last_term(),
                ps.term
            ),
        });
    }
    Ok((ps.term, ps.voted_for, ps.log))
}

fn encode_state(st: &State) -> Result<Vec<u8>, CodecError> {
    #[derive(Serialize)]
    struct View<'a> {
        term: u64,
        voted_for: Option<usize>,
        log: &'a Log,
    }
    labcodec::encode(&View {
        term: st.term,
        voted_for: st.voted_for,
        log: &st.log,
    })
}

impl Core {
    /// Saves term, vote and log, keeping the saved snapshot. Nothing is saved once the peer
    /// is dead; a state that cannot be saved kills the peer (it must not go on, or answer,
    /// with state it could not make durable), so callers check `is_dead()` before acting on
    /// what they persisted.
    pub(super) fn persist(&self, st: &State) {
        if self.is_dead() {
            return;
        }
        match encode_state(st) {
            Ok(bytes) => {
                log::trace!(target: "raft::persist", "raft-{} t{}: persist {} bytes, log ({}..={}]", self.me, st.term, bytes.len(), st.log.base_index(), st.log.last_index());
                self.persister.save_raft_state(bytes);
            }
            Err(e) => self.fail_stop(st, &format!("cannot encode state: {e}")),
        }
    }

    /// Saves term, vote, log and the snapshot together (same rules as [`Core::persist`]).
    pub(super) fn persist_with_snapshot(&self, st: &State) {
        if self.is_dead() {
            return;
        }
        match encode_state(st) {
            Ok(bytes) => {
                log::trace!(target: "raft::persist", "raft-{} t{}: persist {} bytes + snapshot {} bytes through {}", self.me, st.term, bytes.len(), st.snapshot.len(), st.log.base_index());
                self.persister.save(bytes, Some(st.snapshot.clone()));
            }
            Err(e) => self.fail_stop(st, &format!("cannot encode state: {e}")),
        }
    }
}
