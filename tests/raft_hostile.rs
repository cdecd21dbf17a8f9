//! Raft receivers against messages no peer could have sent (issue 19): terms and indexes at
//! and beyond the largest a peer takes, and entries or snapshots the service refuses. Each is
//! handed straight to a peer's `RaftHandler` in a running lab cluster; the cluster must keep
//! its leader, its terms and its data, and go on committing.

use std::sync::Arc;

use raftkv::raft::log::Entry;
use raftkv::raft::{
    AppendEntriesArgs, HardState, InstallSnapshotArgs, MAX_INDEX, MAX_TERM, MAX_TERM_JUMP,
    RequestVoteArgs, Storage, StorageError, Validator,
};
use raftkv::storage::{FileLog, FileLogOptions};
use raftkv::tester::raft::{Test, TestCmd};

/// Every term and index a forged message might carry at the edge.
fn hostile_terms(current: u64) -> Vec<u64> {
    vec![
        u64::MAX,
        u64::MAX - 1,
        MAX_TERM + 1,
        current + MAX_TERM_JUMP + 1,
    ]
}

/// Terms, leader and commands are what they were: the cluster noticed nothing.
fn assert_undisturbed(ts: &Test, leader: usize, term: u64) {
    let now = ts.check_one_leader();
    assert_eq!(now, leader, "the leader changed");
    assert_eq!(ts.check_terms(), term, "the term changed");
}

#[test]
fn forged_request_votes_at_max_term_3a() {
    let ts = Test::new(3, true, false);
    ts.begin("Test (3A): RequestVote at the largest terms changes nothing");
    ts.one(101i64, 3, false);
    let leader = ts.check_one_leader();
    let term = ts.check_terms();
    for i in 0..3 {
        let h = ts.raft(i).expect("running").handler();
        for t in hostile_terms(term) {
            for pre_vote in [true, false] {
                let args = RequestVoteArgs {
                    term: t,
                    candidate: (i + 1) % 3,
                    last_log_index: u64::MAX,
                    last_log_term: t,
                    pre_vote,
                };
                assert!(h.request_vote(args).is_none(), "peer {i} answered term {t}");
            }
        }
        // In range but with a last log index or term no log can hold.
        for (index, log_term) in [(u64::MAX, term), (MAX_INDEX + 1, term), (5, term + 1)] {
            let args = RequestVoteArgs {
                term,
                candidate: (i + 1) % 3,
                last_log_index: index,
                last_log_term: log_term,
                pre_vote: false,
            };
            assert!(h.request_vote(args).is_none(), "peer {i} answered");
        }
    }
    assert_undisturbed(&ts, leader, term);
    ts.one(102i64, 3, false);
    assert_undisturbed(&ts, leader, term);
    ts.end();
}

#[test]
fn forged_append_entries_at_max_index_3b() {
    let ts = Test::new(3, true, false);
    ts.begin("Test (3B): AppendEntries at the largest terms and indexes changes nothing");
    let index = ts.one(201i64, 3, false);
    let leader = ts.check_one_leader();
    let term = ts.check_terms();
    let entry = |t| Entry {
        term: t,
        command: TestCmd::Int(666).encode(),
    };
    for i in (0..3).filter(|&i| i != leader) {
        let h = ts.raft(i).expect("running").handler();
        let mut forged = Vec::new();
        for t in hostile_terms(term) {
            forged.push((t, index, term, vec![entry(t)], index));
        }
        forged.extend([
            (term, u64::MAX, term, vec![], 0),
            (term, u64::MAX - 1, term, vec![entry(term); 3], 0),
            (term, MAX_INDEX, term, vec![entry(term)], 0),
            (term, index, term, vec![], u64::MAX),
            (term, index, term, vec![], MAX_INDEX + 1),
            (term, index, term + 1, vec![], index),
            (term, index, term, vec![entry(term + 1)], index),
        ]);
        for (t, prev, prev_term, entries, commit) in forged {
            let args = AppendEntriesArgs {
                term: t,
                leader,
                prev_log_index: prev,
                prev_log_term: prev_term,
                entries,
                leader_commit: commit,
            };
            assert!(
                h.append_entries(args).is_none(),
                "peer {i} took AppendEntries t{t} prev {prev} commit {commit}"
            );
        }
        // At the edge but in range, from the real leader's number in its term: a mismatch,
        // answered, nothing taken.
        let args = AppendEntriesArgs {
            term,
            leader,
            prev_log_index: MAX_INDEX,
            prev_log_term: term,
            entries: vec![],
            leader_commit: MAX_INDEX,
        };
        let reply = h.append_entries(args).expect("an answer");
        assert!(!reply.success);
        assert_eq!(reply.conflict_index, index + 1);
    }
    assert_undisturbed(&ts, leader, term);
    ts.one(202i64, 3, false);
    assert_undisturbed(&ts, leader, term);
    ts.end();
}

#[test]
fn forged_install_snapshot_at_max_index_3d() {
    let ts = Test::new(3, true, true);
    ts.begin("Test (3D): InstallSnapshot at the largest terms and indexes changes nothing");
    ts.one(301i64, 3, false);
    let leader = ts.check_one_leader();
    let term = ts.check_terms();
    for i in (0..3).filter(|&i| i != leader) {
        let h = ts.raft(i).expect("running").handler();
        let mut forged = Vec::new();
        for t in hostile_terms(term) {
            forged.push((t, 5, t));
        }
        forged.extend([
            (term, u64::MAX, term),
            (term, MAX_INDEX + 1, term),
            (term, 5, u64::MAX),
            (term, 5, term + 1),
        ]);
        for (t, last_index, last_term) in forged {
            let args = InstallSnapshotArgs {
                term: t,
                leader,
                last_included_index: last_index,
                last_included_term: last_term,
                data: vec![0xff; 16],
            };
            assert!(
                h.install_snapshot(args).is_none(),
                "peer {i} took InstallSnapshot t{t} through {last_index} (t{last_term})"
            );
        }
    }
    assert_undisturbed(&ts, leader, term);
    ts.one(302i64, 3, false);
    assert_undisturbed(&ts, leader, term);
    ts.end();
}

/// Refuses every command that is not a `TestCmd`, and every snapshot starting with 0xff.
struct TestValidator;

impl Validator for TestValidator {
    fn check_entry(&self, command: &[u8]) -> Result<(), String> {
        raftkv::labcodec::decode::<TestCmd>(command)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn check_snapshot(&self, data: &[u8]) -> Result<(), String> {
        match data.first() {
            Some(0xff) => Err("starts with 0xff".into()),
            _ => Ok(()),
        }
    }
}

#[test]
fn validator_refuses_entries_and_snapshots_3d() {
    let ts = Test::new(3, true, true);
    ts.begin("Test (3D): entries and snapshots the service refuses are not taken");
    for i in 0..3 {
        ts.raft(i)
            .expect("running")
            .set_validator(Arc::new(TestValidator));
    }
    let index = ts.one(401i64, 3, false);
    let leader = ts.check_one_leader();
    let term = ts.check_terms();
    for i in (0..3).filter(|&i| i != leader) {
        let raft = ts.raft(i).expect("running");
        let h = raft.handler();
        // A good entry then a garbage one, right after what the follower holds, in the
        // leader's term and under its number: the follower takes neither.
        let args = AppendEntriesArgs {
            term,
            leader,
            prev_log_index: index,
            prev_log_term: term,
            entries: vec![
                Entry {
                    term,
                    command: TestCmd::Int(1).encode(),
                },
                Entry {
                    term,
                    command: vec![0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff, 0xff, 0xff],
                },
            ],
            leader_commit: index,
        };
        assert!(h.append_entries(args).is_none());
        assert_eq!(
            raft.term_at(index + 1),
            None,
            "peer {i} took a refused entry"
        );
        let args = InstallSnapshotArgs {
            term,
            leader,
            last_included_index: index + 10,
            last_included_term: term,
            data: vec![0xff; 64],
        };
        assert!(h.install_snapshot(args).is_none());
        assert_eq!(
            raft.term_at(index + 10),
            None,
            "peer {i} took a refused snapshot"
        );
        assert!(raft.snapshot_data().first() != Some(&0xff));
    }
    assert_undisturbed(&ts, leader, term);
    ts.one(402i64, 3, false);
    assert_undisturbed(&ts, leader, term);
    ts.end();
}

#[test]
fn file_log_refuses_out_of_range_terms_and_indexes() {
    // Removed with everything in it when the test ends, passing or failing.
    let temp = tempfile::Builder::new()
        .prefix("raftkv-hostile-")
        .tempdir()
        .expect("a test directory");
    let dir = temp.path().join("log");
    {
        let log = FileLog::open(&dir, FileLogOptions::default()).expect("open");
        let e = |t| Entry {
            term: t,
            command: vec![1],
        };
        let invalid = |r: Result<(), StorageError>| matches!(r, Err(StorageError::Invalid { .. }));
        assert!(invalid(log.set_hard_state(HardState {
            term: u64::MAX,
            voted_for: None
        })));
        assert!(invalid(log.append(u64::MAX, &[e(1)])));
        assert!(invalid(log.append(MAX_INDEX, &[e(1), e(1)])));
        assert!(invalid(log.append(1, &[e(u64::MAX)])));
        assert!(invalid(log.truncate_after(u64::MAX)));
        assert!(invalid(log.save_snapshot(u64::MAX, 1, b"x")));
        assert!(invalid(log.save_snapshot(1, u64::MAX, b"x")));
        // In range still works, and recovers.
        log.set_hard_state(HardState {
            term: 2,
            voted_for: Some(1),
        })
        .expect("hard state");
        log.append(1, &[e(1), e(2)]).expect("append");
        log.sync().expect("sync");
    }
    let log = FileLog::open(&dir, FileLogOptions::default()).expect("reopen");
    let restored = log.restore().expect("restore");
    assert_eq!(restored.hard_state.term, 2);
    assert_eq!(restored.log.last_index(), 2);
    drop(log);
}
