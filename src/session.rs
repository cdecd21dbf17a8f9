//! Exactly-once execution for a replicated state machine: per client, the last sequence number
//! applied and its reply, so a request retried after a lost reply or a leader change is
//! answered from the table instead of being applied twice (Raft dissertation §6.3).
//!
//! The table lives inside the state machine: every replica applies the same requests in the
//! same log order, so every decision here is a function of the log alone — no clocks. It
//! travels in snapshots ([`SessionTable::snapshot`], [`SessionTable::restore`]).
//!
//! ## The client's side of the contract
//!
//! A client picks a fresh random 64-bit id per incarnation and numbers its requests 1, 2, 3…;
//! it sends request `n + 1` only once it has an answer for `n` or has given up on `n` (one
//! outstanding request per id — a front end that pipelines uses several ids).
//!
//! ## Decisions ([`SessionTable::check`])
//!
//! | table holds for the client | request `seq` | decision |
//! |---|---|---|
//! | last `l`, reply `r` | `seq > l` | [`Admit::Execute`] |
//! | last `l`, reply `r` | `seq == l` | [`Admit::Duplicate`]`(r)`: answer `r`, apply nothing |
//! | last `l` | `seq < l` | [`Admit::Stale`]: the client has moved on; apply nothing |
//! | nothing, and no session was ever evicted | any | [`Admit::Execute`] (a new session) |
//! | nothing, sessions were evicted | `seq == 1` | [`Admit::Execute`] (a new session) |
//! | nothing, sessions were evicted | `seq > 1` | [`Admit::Expired`]: perhaps evicted; the client must take a new id |
//!
//! ## Bound and eviction
//!
//! At most `max_sessions` sessions. Recording a new client when the table is full evicts the
//! session whose last request was applied at the lowest log index (least recently used, by
//! the log). [`SessionTable::evict_idle`] also drops sessions idle since before a given index.
//! The rule's one gap: a client whose *first* request was applied, and whose session was
//! evicted before its retry of that request arrived, has the retry applied again — it takes
//! `max_sessions` other clients active in between, so size the table well above the number
//! of clients live at once.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

/// One client's last applied request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session<R> {
    pub last_seq: u64,
    pub last_reply: R,
    /// Log index at which `last_seq` was applied.
    pub last_index: u64,
}

/// What to do with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<'a, R> {
    /// Apply it, then [`record`](SessionTable::record) its reply.
    Execute,
    /// Applied before: answer this reply.
    Duplicate(&'a R),
    /// Older than the client's last applied request, which the client has seen.
    Stale { last_seq: u64 },
    /// The client's session may have been evicted: it must retry under a new id.
    Expired,
}

/// The outcome of [`SessionTable::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied<R> {
    /// Applied now.
    Fresh(R),
    /// Applied before; this is the reply it had.
    Duplicate(R),
    Stale {
        last_seq: u64,
    },
    Expired,
}

/// A snapshot that cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionError {
    DuplicateClient { client: u64 },
    TooManySessions { sessions: usize, max: usize },
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::DuplicateClient { client } => {
                write!(f, "session snapshot lists client {client:#x} twice")
            }
            SessionError::TooManySessions { sessions, max } => {
                write!(
                    f,
                    "session snapshot holds {sessions} sessions, above the limit {max}"
                )
            }
        }
    }
}

impl std::error::Error for SessionError {}

/// The table as it goes into a snapshot: sessions sorted by client id, so equal tables give
/// equal bytes on every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSnapshot<R> {
    pub max_sessions: usize,
    pub evictions: u64,
    pub sessions: Vec<(u64, Session<R>)>,
}

/// Per-client last sequence number and reply; see the module documentation.
#[derive(Debug, Clone)]
pub struct SessionTable<R> {
    max_sessions: usize,
    sessions: HashMap<u64, Session<R>>,
    /// (last_index, client) of every session: the least recently used first.
    by_last_index: BTreeSet<(u64, u64)>,
    evictions: u64,
}

impl<R: Clone> SessionTable<R> {
    pub fn new(max_sessions: usize) -> SessionTable<R> {
        SessionTable {
            max_sessions: max_sessions.max(1),
            sessions: HashMap::new(),
            by_last_index: BTreeSet::new(),
            evictions: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    pub fn max_sessions(&self) -> usize {
        self.max_sessions
    }

    /// Sessions evicted so far (by the bound or by [`evict_idle`](Self::evict_idle)).
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    pub fn session(&self, client: u64) -> Option<&Session<R>> {
        self.sessions.get(&client)
    }

    /// What to do with request `seq` of `client`.
    pub fn check(&self, client: u64, seq: u64) -> Admit<'_, R> {
        match self.sessions.get(&client) {
            Some(s) if seq > s.last_seq => Admit::Execute,
            Some(s) if seq == s.last_seq => Admit::Duplicate(&s.last_reply),
            Some(s) => Admit::Stale {
                last_seq: s.last_seq,
            },
            None if self.evictions > 0 && seq > 1 => Admit::Expired,
            None => Admit::Execute,
        }
    }

    /// Records that request `seq` of `client`, applied at log `index`, answered `reply`.
    /// Returns the client evicted to make room, if any. `index` must not go back.
    pub fn record(&mut self, client: u64, seq: u64, reply: R, index: u64) -> Option<u64> {
        let mut evicted = None;
        if let Some(old) = self.sessions.get(&client) {
            debug_assert!(
                seq > old.last_seq,
                "client {client:#x}: recorded seq {seq} after {}",
                old.last_seq
            );
            self.by_last_index.remove(&(old.last_index, client));
        } else if self.sessions.len() >= self.max_sessions {
            let &(lru_index, lru_client) = self
                .by_last_index
                .first()
                .expect("a full table has sessions");
            debug_assert!(
                lru_index <= index,
                "session index went back: {lru_index} > {index}"
            );
            self.by_last_index.remove(&(lru_index, lru_client));
            self.sessions.remove(&lru_client);
            self.evictions += 1;
            log::debug!(target: "session", "evicted client {lru_client:#x} (last applied at {lru_index}) for client {client:#x} at {index}");
            evicted = Some(lru_client);
        }
        self.by_last_index.insert((index, client));
        self.sessions.insert(
            client,
            Session {
                last_seq: seq,
                last_reply: reply,
                last_index: index,
            },
        );
        evicted
    }

    /// Checks request `seq` of `client` at log `index`, runs `execute` if it is new, records
    /// the reply, and says what happened.
    pub fn apply(
        &mut self,
        client: u64,
        seq: u64,
        index: u64,
        execute: impl FnOnce() -> R,
    ) -> Applied<R> {
        match self.check(client, seq) {
            Admit::Execute => {}
            Admit::Duplicate(reply) => return Applied::Duplicate(reply.clone()),
            Admit::Stale { last_seq } => return Applied::Stale { last_seq },
            Admit::Expired => return Applied::Expired,
        }
        let reply = execute();
        self.record(client, seq, reply.clone(), index);
        Applied::Fresh(reply)
    }

    /// Drops every session whose last request was applied before `index`; returns how many.
    pub fn evict_idle(&mut self, before_index: u64) -> usize {
        let idle: Vec<(u64, u64)> = self
            .by_last_index
            .range(..(before_index, 0))
            .copied()
            .collect();
        for key in &idle {
            self.by_last_index.remove(key);
            self.sessions.remove(&key.1);
        }
        self.evictions += idle.len() as u64;
        idle.len()
    }

    /// The table for a snapshot.
    pub fn snapshot(&self) -> SessionSnapshot<R> {
        let mut sessions: Vec<(u64, Session<R>)> = self
            .sessions
            .iter()
            .map(|(&client, s)| (client, s.clone()))
            .collect();
        sessions.sort_unstable_by_key(|(client, _)| *client);
        SessionSnapshot {
            max_sessions: self.max_sessions,
            evictions: self.evictions,
            sessions,
        }
    }

    /// The table a snapshot holds.
    pub fn restore(snapshot: SessionSnapshot<R>) -> Result<SessionTable<R>, SessionError> {
        let max_sessions = snapshot.max_sessions.max(1);
        if snapshot.sessions.len() > max_sessions {
            return Err(SessionError::TooManySessions {
                sessions: snapshot.sessions.len(),
                max: max_sessions,
            });
        }
        let mut table = SessionTable::new(max_sessions);
        table.evictions = snapshot.evictions;
        for (client, session) in snapshot.sessions {
            table.by_last_index.insert((session.last_index, client));
            if table.sessions.insert(client, session).is_some() {
                return Err(SessionError::DuplicateClient { client });
            }
        }
        Ok(table)
    }
}

impl<R: Clone + PartialEq> PartialEq for SessionTable<R> {
    fn eq(&self, other: &Self) -> bool {
        self.max_sessions == other.max_sessions
            && self.evictions == other.evictions
            && self.sessions == other.sessions
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::labcodec;

    #[test]
    fn duplicates_are_answered_from_the_table() {
        let mut table = SessionTable::new(10);
        let mut counter = 0;
        let mut incr = |table: &mut SessionTable<u64>, seq, index| {
            table.apply(7, seq, index, || {
                counter += 1;
                counter
            })
        };
        assert_eq!(incr(&mut table, 1, 1), Applied::Fresh(1));
        assert_eq!(incr(&mut table, 1, 2), Applied::Duplicate(1));
        assert_eq!(incr(&mut table, 2, 3), Applied::Fresh(2));
        assert_eq!(incr(&mut table, 2, 4), Applied::Duplicate(2));
        assert_eq!(incr(&mut table, 1, 5), Applied::Stale { last_seq: 2 });
        // A gap (request 3 abandoned) is fine; 3 arriving late is stale.
        assert_eq!(incr(&mut table, 4, 6), Applied::Fresh(3));
        assert_eq!(incr(&mut table, 3, 7), Applied::Stale { last_seq: 4 });
        assert_eq!(counter, 3);
        assert_eq!(table.session(7).unwrap().last_index, 6);
    }

    #[test]
    fn full_table_evicts_the_least_recently_applied() {
        let mut table = SessionTable::new(3);
        assert_eq!(table.record(1, 1, "a", 10), None);
        assert_eq!(table.record(2, 1, "b", 11), None);
        assert_eq!(table.record(3, 1, "c", 12), None);
        // Client 1 is used again: client 2 is now the least recent.
        assert_eq!(table.record(1, 2, "a2", 13), None);
        assert_eq!(table.record(4, 1, "d", 14), Some(2));
        assert_eq!(table.len(), 3);
        assert_eq!(table.evictions(), 1);
        assert!(table.session(2).is_none());
        // Client 2 comes back with its next request: it may have been evicted.
        assert_eq!(table.check(2, 2), Admit::Expired);
        // A new client starts at 1.
        assert_eq!(table.check(9, 1), Admit::Execute);
        assert_eq!(table.record(9, 1, "e", 15), Some(3));
        // Before any eviction, an unknown client is a new session whatever its number.
        let fresh: SessionTable<&str> = SessionTable::new(3);
        assert_eq!(fresh.check(5, 40), Admit::Execute);
    }

    #[test]
    fn evict_idle_drops_sessions_older_than_an_index() {
        let mut table = SessionTable::new(10);
        for client in 0..5u64 {
            table.record(client, 1, client, 100 + client);
        }
        assert_eq!(table.evict_idle(103), 3);
        assert_eq!(table.len(), 2);
        assert!(table.session(3).is_some() && table.session(4).is_some());
        assert_eq!(table.check(0, 2), Admit::Expired);
        assert_eq!(table.evict_idle(0), 0);
    }

    #[test]
    fn snapshots_round_trip_through_labcodec() {
        let mut table = SessionTable::new(4);
        for (i, client) in [9u64, 3, 7, 1, 5].into_iter().enumerate() {
            table.record(client, i as u64 + 1, format!("reply {i}"), i as u64 + 1);
        }
        let snapshot = table.snapshot();
        let clients: Vec<u64> = snapshot.sessions.iter().map(|(c, _)| *c).collect();
        assert_eq!(clients, vec![1, 3, 5, 7]);
        let bytes = labcodec::encode(&snapshot).unwrap();
        let restored =
            SessionTable::restore(labcodec::decode::<SessionSnapshot<String>>(&bytes).unwrap())
                .unwrap();
        assert_eq!(restored, table);
        // The eviction order survives: client 3 (index 2) goes next.
        let mut restored = restored;
        assert_eq!(restored.record(11, 1, "x".into(), 6), Some(3));
        // Same table, same bytes.
        let again = labcodec::encode(&table.clone().snapshot()).unwrap();
        assert_eq!(again, bytes);
    }

    #[test]
    fn bad_snapshots_are_errors() {
        let session = Session {
            last_seq: 1,
            last_reply: 0u8,
            last_index: 1,
        };
        let twice = SessionSnapshot {
            max_sessions: 4,
            evictions: 0,
            sessions: vec![(5, session.clone()), (5, session.clone())],
        };
        assert_eq!(
            SessionTable::restore(twice).unwrap_err(),
            SessionError::DuplicateClient { client: 5 }
        );
        let too_many = SessionSnapshot {
            max_sessions: 1,
            evictions: 0,
            sessions: vec![(1, session.clone()), (2, session)],
        };
        assert_eq!(
            SessionTable::restore(too_many).unwrap_err().to_string(),
            "session snapshot holds 2 sessions, above the limit 1"
        );
    }

    /// Clients retrying at random through a log with duplicates: every request is applied at
    /// most once, and each acknowledged one exactly once, as long as no session is evicted
    /// while its client still retries.
    #[test]
    fn random_retries_apply_each_request_once() {
        let mut rng = StdRng::seed_from_u64(0x5e55_1045);
        for round in 0..200 {
            let clients = rng.gen_range(1..8u64);
            let mut table: SessionTable<(u64, u64)> = SessionTable::new(8);
            let mut applied: HashMap<(u64, u64), u32> = HashMap::new();
            let mut next_seq: HashMap<u64, u64> = (0..clients).map(|c| (c, 1)).collect();
            // The "log": each entry a (client, seq), with retries duplicating entries.
            for index in 1..300u64 {
                let client = rng.gen_range(0..clients);
                let seq = next_seq[&client];
                let result = table.apply(client, seq, index, || {
                    *applied.entry((client, seq)).or_default() += 1;
                    (client, seq)
                });
                match result {
                    Applied::Fresh(reply) | Applied::Duplicate(reply) => {
                        assert_eq!(reply, (client, seq), "round {round}");
                        // Acknowledged: most of the time the client moves on.
                        if rng.gen_bool(0.6) {
                            *next_seq.get_mut(&client).unwrap() += 1;
                        }
                    }
                    other => panic!("round {round}: client {client} seq {seq}: {other:?}"),
                }
                // Sometimes a delayed copy of an older request lands in the log.
                if seq > 1 && rng.gen_bool(0.1) {
                    let old = rng.gen_range(1..seq);
                    let late = table.apply(client, old, index, || unreachable!("re-applied"));
                    assert_eq!(late, Applied::Stale { last_seq: seq }, "round {round}");
                }
            }
            assert!(
                applied.values().all(|&n| n == 1),
                "round {round}: {applied:?}"
            );
        }
    }
}
