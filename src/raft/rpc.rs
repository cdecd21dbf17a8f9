//! The messages Raft peers exchange (Raft §5, Figure 2; §7 for InstallSnapshot).

use serde::{Deserialize, Serialize};

use super::log::Entry;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestVoteArgs {
    pub term: u64,
    pub candidate: usize,
    pub last_log_index: u64,
    pub last_log_term: u64,
    /// A pre-vote (Raft dissertation §9.6): "would you vote for me at `term`?" The voter
    /// changes nothing, and says no while it hears from a leader.
    pub pre_vote: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestVoteReply {
    pub term: u64,
    pub vote_granted: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppendEntriesArgs {
    pub term: u64,
    pub leader: usize,
    pub prev_log_index: u64,
    pub prev_log_term: u64,
    pub entries: Vec<Entry>,
    pub leader_commit: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppendEntriesReply {
    pub term: u64,
    pub success: bool,
    /// On a mismatch: the term of the follower's conflicting entry (`None` if its log is too
    /// short), and the first index the leader should try next. Lets the leader skip a whole
    /// term per round trip instead of one entry.
    pub conflict_term: Option<u64>,
    pub conflict_index: u64,
    /// On success: the last index the follower holds as the leader sent it, durably: what
    /// the leader may count it for. Below `held_index` while the follower's storage has not
    /// yet made the rest durable (an answer that queued nothing waits for no sync).
    pub match_index: u64,
    /// On success: the last index the follower's log now holds as the leader sent it,
    /// durable or not, which the leader need not send again. Below the end of the entries
    /// sent when the follower took only part of them (its log is at the limit the service
    /// set, see `Raft::set_log_limit`).
    pub held_index: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstallSnapshotArgs {
    pub term: u64,
    pub leader: usize,
    pub last_included_index: u64,
    pub last_included_term: u64,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstallSnapshotReply {
    pub term: u64,
}

/// One piece of a snapshot streamed to a follower (Raft Figure 13's `offset` and `done`),
/// used by transports that cannot carry a whole snapshot in one message
/// ([`RaftTransport::snapshot_chunk_bytes`](super::RaftTransport::snapshot_chunk_bytes)).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstallSnapshotChunkArgs {
    pub term: u64,
    pub leader: usize,
    pub last_included_index: u64,
    pub last_included_term: u64,
    /// Where `data` starts in the snapshot.
    pub offset: u64,
    /// The snapshot's whole length.
    pub total: u64,
    /// CRC32C of the whole snapshot (checked by the receiver on the last piece).
    pub crc: u32,
    pub data: Vec<u8>,
    /// The last piece.
    pub done: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstallSnapshotChunkReply {
    pub term: u64,
    /// The offset the follower wants next (0: start over).
    pub next_offset: u64,
    /// The follower holds the snapshot (installed now, or already covered by its log).
    pub done: bool,
}
