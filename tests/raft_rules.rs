//! Each rule of the Raft paper (Ongaro & Ousterhout, 2014, Figure 2 and §5) reproduced as one
//! exact schedule: the network's script decides what happens to the messages that matter
//! (hold, release in order, drop, duplicate, crash the receiver before it answers), and the
//! test checks the rule at the moment it could be broken. Where a rule is about one peer's
//! answer, the test talks to that peer itself (`inject_end`), as another peer would, while the
//! script keeps the real peers from talking to each other.
//!
//! Every test here has a broken variant it exists to catch: `scripts/rule-variants/` holds
//! them as patches and `scripts/rule-variants.sh` shows each test failing on its own.
//! Peers are numbered from 0; the paper's S1..S5 are peers 0..4.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use raftkv::labrpc::ClientEnd;
use raftkv::labrpc::script::{Rule, RuleId};
use raftkv::raft::log::Entry;
use raftkv::raft::{
    AppendEntriesArgs, AppendEntriesReply, InstallSnapshotArgs, InstallSnapshotReply, RaftOptions,
    RequestVoteArgs, RequestVoteReply,
};
use raftkv::tester::raft::{Delivered, SyncGate, Test, TestCmd};
use raftkv::tester::{GRP0, server_name};

const SECOND: Duration = Duration::from_secs(1);

fn name(i: usize) -> String {
    server_name(GRP0, i)
}

fn names(peers: impl IntoIterator<Item = usize>) -> Vec<String> {
    peers.into_iter().map(name).collect()
}

/// Drops the RequestVotes (and pre-votes) of every peer but `candidate`: only it can win.
fn only_candidate(n: usize, candidate: usize) -> Rule {
    Rule::request("Raft.RequestVote")
        .from_any(&names((0..n).filter(|&p| p != candidate)))
        .drop_it()
}

/// Drops every request between the peers: each hears only what the test sends it.
fn isolate_all(n: usize) -> Rule {
    Rule::any_request().from_any(&names(0..n)).drop_it()
}

fn entry(term: u64, cmd: i64) -> Entry {
    Entry {
        term,
        command: TestCmd::Int(cmd).encode(),
    }
}

fn append(
    t: &Test,
    end: &ClientEnd,
    term: u64,
    leader: usize,
    prev: (u64, u64),
    entries: Vec<Entry>,
    leader_commit: u64,
) -> AppendEntriesReply {
    let args = AppendEntriesArgs {
        term,
        leader,
        prev_log_index: prev.0,
        prev_log_term: prev.1,
        entries,
        leader_commit,
    };
    match end.call("Raft.AppendEntries", &args) {
        Ok(r) => r,
        Err(e) => t.fatal(&format!("AppendEntries {args:?}: {e}")),
    }
}

fn vote(
    t: &Test,
    end: &ClientEnd,
    term: u64,
    candidate: usize,
    last: (u64, u64),
) -> RequestVoteReply {
    let args = RequestVoteArgs {
        term,
        candidate,
        last_log_index: last.0,
        last_log_term: last.1,
        pre_vote: false,
    };
    match end.call("Raft.RequestVote", &args) {
        Ok(r) => r,
        Err(e) => t.fatal(&format!("RequestVote {args:?}: {e}")),
    }
}

fn term_at(t: &Test, peer: usize, index: u64) -> Option<u64> {
    t.raft(peer).and_then(|r| r.term_at(index))
}

/// Figure 8 (a) and (b): S1 leads, gets index 2 only to S2 and crashes; S5 is elected by S3,
/// S4 and itself and puts a different entry at index 2, which no one else gets. Returns the
/// terms of (a) and (b) and the rules still in force (only S5 campaigns, S5 sends nothing),
/// which the next step removes once its own are in place. Leaves S1 and S5 down.
fn figure_8_a_b(t: &Test) -> (u64, u64, Vec<RuleId>) {
    let s = t.script();
    // (a) Only S1 may campaign; it leads and commits index 1 everywhere.
    let s1_only = s.add(only_candidate(5, 0));
    let t1 = t.wait_leader(0, 10 * SECOND);
    t.one(TestCmd::Int(101), 5, false);
    // S1 appends index 2; it reaches S2 only.
    let cut = s.add(
        Rule::request("Raft.AppendEntries")
            .from(&name(0))
            .to_any(&names([2, 3, 4]))
            .drop_it(),
    );
    let (index, _, ok) = t
        .raft(0)
        .expect("S1 runs")
        .start(TestCmd::Int(102).encode());
    assert!(ok && index == 2, "S1 should append at index 2, got {index}");
    if !t.wait_until(5 * SECOND, || {
        term_at(t, 1, 2) == Some(t1) && t.persisted(0).1.term_at(2) == Some(t1)
    }) {
        t.fatal("S2 did not get index 2 from S1, or S1 did not persist it");
    }
    // (b) S1 crashes. Only S5 may campaign; S3 and S4 elect it (S2's log is more
    // up-to-date, §5.4.1). S5 appends its own entry at index 2, and keeps it to itself.
    let s5_only = s.add(only_candidate(5, 4));
    let s5_silent = s.add(Rule::request("Raft.AppendEntries").from(&name(4)).drop_it());
    t.shutdown_server(0);
    s.remove(s1_only);
    s.remove(cut);
    let t2 = t.wait_leader(4, 10 * SECOND);
    assert!(t2 > t1);
    let (index, _, ok) = t
        .raft(4)
        .expect("S5 runs")
        .start(TestCmd::Int(103).encode());
    assert!(ok && index == 2, "S5 should append at index 2, got {index}");
    // `start` leaves S5's own sync to its syncer: S5 crashes once the entry is on its disk.
    if !t.wait_until(5 * SECOND, || t.persisted(4).1.term_at(2) == Some(t2)) {
        t.fatal("S5 did not persist its own entry at index 2 within 5 s");
    }
    t.shutdown_server(4);
    (t1, t2, vec![s5_only, s5_silent])
}

/// Rules of Figure 8 (c).
struct StepC {
    term: u64,
    s1_only: RuleId,
    rules: Vec<RuleId>,
    hold: Option<RuleId>,
}

/// Figure 8 (c): S1 restarts and is elected (S5 is down); it replicates its term-`t1` entry at
/// index 2 to S3, so that entry is on a majority (S1, S2, S3).
fn figure_8_c(t: &Test, t1: u64, old: Vec<RuleId>, hold_own_term: bool) -> StepC {
    let s = t.script();
    let s1_only = s.add(only_candidate(5, 0));
    let s4_cut = s.add(
        Rule::request("Raft.AppendEntries")
            .from(&name(0))
            .to(&name(3))
            .drop_it(),
    );
    for r in old {
        s.remove(r);
    }
    t.g().start_server(0);
    t.g().connect(0, &[0, 1, 2, 3]);
    let mut hold = None;
    if hold_own_term {
        // S1's first entry of its own term (what the rsm's term-start entry would be): held
        // wherever it goes, so the earlier-term entry sits on a majority alone.
        hold = Some(
            s.add(
                Rule::request("Raft.AppendEntries")
                    .from(&name(0))
                    .when("carries index 3", |a: &AppendEntriesArgs| {
                        a.prev_log_index < 3 && a.prev_log_index + a.entries.len() as u64 >= 3
                    })
                    .hold(),
            ),
        );
    }
    let term = t.wait_leader(0, 10 * SECOND);
    if !t.wait_until(5 * SECOND, || term_at(t, 2, 2) == Some(t1)) {
        t.fatal("S3 did not get index 2 from S1");
    }
    StepC {
        term,
        s1_only,
        rules: vec![s4_cut],
        hold,
    }
}

/// Figure 8 (d)/(e) start: S1 crashes, only S5 may campaign, S5 restarts.
fn crash_s1_restart_s5(t: &Test, c: &StepC) {
    let s = t.script();
    s.add(only_candidate(5, 4));
    t.shutdown_server(0);
    s.remove(c.s1_only);
    for &r in &c.rules {
        s.remove(r);
    }
    t.g().start_server(4);
    t.g().connect(4, &[1, 2, 3, 4]);
}

/// No peer has applied `index`.
fn check_not_committed(t: &Test, index: u64, why: &str) {
    for p in 0..t.n() {
        if let Some(c) = t.applied_at(p, index) {
            t.fatal(&format!("peer {p} applied index {index} ({c:?}): {why}"));
        }
    }
}

#[test]
fn leader_commits_only_current_term_entries_by_counting_figure_8() {
    let t = Test::new_scripted(5, false, |_| {});
    t.begin(
        "Rule §5.4.2: a leader commits by counting replicas only entries of its term (Figure 8)",
    );
    let (t1, t2, old) = figure_8_a_b(&t);
    let c = figure_8_c(&t, t1, old, false);
    let t3 = c.term;
    // S1 has heard S3's acknowledgement many times over (one heartbeat per 100 ms).
    thread::sleep(Duration::from_millis(500));
    check_not_committed(
        &t,
        2,
        &format!(
            "S1 (leader in term {t3}) committed the term-{t1} entry at index 2 because a \
             majority stores it; S5 (term {t2}) can still be elected and overwrite it (§5.4.2)"
        ),
    );
    // (d) S1 crashes; S5 comes back and is elected by S2, S3 and S4 (its last term t2 beats
    // their t1), overwrites index 2 everywhere and commits it with an entry of its term.
    crash_s1_restart_s5(&t, &c);
    let t4 = t.wait_leader(4, 10 * SECOND);
    assert!(t4 > t3);
    t.one(TestCmd::Int(104), 4, true);
    let (n, cmd) = t.n_committed(2);
    assert_eq!(
        (n, cmd),
        (4, Some(TestCmd::Int(103))),
        "Figure 8 (d): S5's entry at index 2 should be committed on S2..S5"
    );
    t.end();
}

#[test]
fn leader_commits_earlier_term_entry_only_with_its_own_figure_8_delayed_term_start() {
    let t = Test::new_scripted(5, false, |_| {});
    t.begin("Rule §5.4.2: Figure 8 with the leader's first entry of its term held back");
    let (t1, _t2, old) = figure_8_a_b(&t);
    let c = figure_8_c(&t, t1, old, true);
    let t3 = c.term;
    // S1 appends the first entry of its term only now, after index 2 reached S3: the window
    // in which only counting replicas could commit index 2 is open, and stays open while
    // that entry is held.
    let (index, _, ok) = t
        .raft(0)
        .expect("S1 runs")
        .start(TestCmd::Int(105).encode());
    assert!(ok && index == 3, "S1 should append at index 3, got {index}");
    let s = t.script();
    let held = match s.wait_held(2, 5 * SECOND) {
        Some(h) => h,
        None => t.fatal("S1's entry at index 3 was not sent to S2 and S3"),
    };
    thread::sleep(Duration::from_millis(300));
    check_not_committed(
        &t,
        2,
        &format!("S1 (term {t3}) committed index 2 (term {t1}) before any entry of its own term"),
    );
    // (e) The held entry reaches S2 and S3: index 3 commits, and index 2 with it.
    if let Some(h) = c.hold {
        s.remove(h);
    }
    for h in s.held().into_iter().chain(held) {
        s.release(h.id);
    }
    if !t.wait_until(5 * SECOND, || t.n_committed(3).0 >= 3) {
        t.fatal("index 3 did not commit once released");
    }
    assert_eq!(t.n_committed(2).1, Some(TestCmd::Int(102)));
    // S5 can no longer be elected: S2 and S3 hold a term-t3 entry it lacks (§5.4.1).
    crash_s1_restart_s5(&t, &c);
    thread::sleep(2 * SECOND);
    if t.raft(4).is_some_and(|r| r.get_state().1) {
        t.fatal("Figure 8 (e): S5 was elected without index 3, a committed entry");
    }
    t.end();
}

#[test]
fn election_restriction_vote_only_for_up_to_date_log() {
    let t = Test::new_scripted(3, false, |s| {
        s.add(isolate_all(3));
    });
    t.begin("Rule §5.4.1: a vote only for a candidate whose log is at least as up-to-date");
    let end = t.inject_end(1);
    // Peer 1's log: index 1 of term 1, index 2 of term 2.
    let r = append(&t, &end, 2, 0, (0, 0), vec![entry(1, 1), entry(2, 2)], 0);
    assert!(r.success);
    // A longer log whose last term is older is less up-to-date.
    let r = vote(&t, &end, 3, 2, (5, 1));
    assert!(
        !r.vote_granted,
        "voted for a log ending (5, t1) against its own (2, t2)"
    );
    // The same last term, but shorter.
    let r = vote(&t, &end, 4, 2, (1, 2));
    assert!(
        !r.vote_granted,
        "voted for a log ending (1, t2) against its own (2, t2)"
    );
    // Equal logs: granted.
    let r = vote(&t, &end, 5, 2, (2, 2));
    assert!(
        r.vote_granted,
        "refused a candidate whose log equals its own"
    );
    // A newer last term wins even when shorter.
    let r = vote(&t, &end, 6, 0, (1, 3));
    assert!(
        r.vote_granted,
        "refused a log ending (1, t3) against its own (2, t2)"
    );
    t.end();
}

#[test]
fn vote_survives_a_crash_term_and_voted_for_persisted_before_reply() {
    let t = Test::new_scripted(3, false, |s| {
        s.add(isolate_all(3));
    });
    t.begin("Rule Figure 2: currentTerm and votedFor are persisted before the vote is given");
    let s = t.script();
    let end = t.inject_end(1);
    let r = append(&t, &end, 1, 0, (0, 0), vec![entry(1, 1)], 0);
    assert!(r.success);
    // Peer 1 learns term 2 from a candidate it refuses (its log is behind), so its next vote
    // in term 2 changes only votedFor.
    let r = vote(&t, &end, 2, 2, (0, 0));
    assert!(!r.vote_granted && r.term == 2);
    // Candidate 0 asks in term 2; peer 1 grants, and crashes right after deciding, before
    // the answer leaves.
    let g = t.g();
    s.add(
        Rule::reply("Raft.RequestVote")
            .from(&name(1))
            .to("tester")
            .first(1)
            .crash(move || g.shutdown_server(1)),
    );
    let args = RequestVoteArgs {
        term: 2,
        candidate: 0,
        last_log_index: 1,
        last_log_term: 1,
        pre_vote: false,
    };
    let lost: Result<RequestVoteReply, _> = end.call("Raft.RequestVote", &args);
    assert!(
        lost.is_err(),
        "the vote's answer should have been lost with the crash"
    );
    let (hs, _) = t.persisted(1);
    t.g().start_server(1);
    t.g().connect(1, &[0, 1, 2]);
    let end = t.inject_end(1);
    // Candidate 2, now up-to-date, asks in the same term: the restarted peer remembers its
    // vote for 0 and refuses.
    let r = vote(&t, &end, 2, 2, (1, 1));
    if r.vote_granted {
        t.fatal(&format!(
            "peer 1 voted twice in term 2 (for 0 before its crash, for 2 after): it had \
             persisted term {} votedFor {:?} when it granted the first",
            hs.term, hs.voted_for
        ));
    }
    assert_eq!((hs.term, hs.voted_for), (2, Some(0)));
    t.end();
}

#[test]
fn follower_never_truncates_matching_entries_on_stale_append_entries() {
    let t = Test::new_scripted(3, false, |s| {
        s.add(only_candidate(3, 0));
    });
    t.begin("Rule Figure 2 (AppendEntries 3): truncate only on a conflict, never on a stale, reordered call");
    let s = t.script();
    let term = t.wait_leader(0, 10 * SECOND);
    t.one(TestCmd::Int(1), 3, false);
    // The first AppendEntries carrying index 2 to peer 1 is held back.
    s.add(
        Rule::request("Raft.AppendEntries")
            .from(&name(0))
            .to(&name(1))
            .when("carries index 2", |a: &AppendEntriesArgs| {
                a.prev_log_index < 2 && a.prev_log_index + a.entries.len() as u64 >= 2
            })
            .first(1)
            .hold(),
    );
    let leader = t.raft(0).expect("leader runs");
    leader.start(TestCmd::Int(2).encode());
    let held = match s.wait_held(1, 5 * SECOND) {
        Some(h) => h,
        None => t.fatal("the AppendEntries carrying index 2 was not sent"),
    };
    leader.start(TestCmd::Int(3).encode());
    // A later AppendEntries brings indexes 2 and 3 to peer 1.
    if !t.wait_until(5 * SECOND, || term_at(&t, 1, 3) == Some(term)) {
        t.fatal("peer 1 did not get index 3");
    }
    // Now the stale call arrives: its entries all match what peer 1 holds.
    assert!(s.release(held[0].id), "the held call was not delivered");
    if term_at(&t, 1, 3) != Some(term) {
        t.fatal("peer 1 dropped index 3 on a stale AppendEntries whose entries all matched");
    }
    t.one(TestCmd::Int(4), 3, false);
    assert_eq!(t.n_committed(3), (3, Some(TestCmd::Int(3))));
    t.end();
}

#[test]
fn follower_commit_index_is_min_of_leader_commit_and_last_new_entry() {
    let t = Test::new_scripted(3, false, |s| {
        s.add(isolate_all(3));
    });
    t.begin(
        "Rule Figure 2 (AppendEntries 5): commitIndex = min(leaderCommit, index of last new entry)",
    );
    let end = t.inject_end(1);
    // Term 1's leader gave peer 1 indexes 1..3 and committed only 1.
    let r = append(
        &t,
        &end,
        1,
        0,
        (0, 0),
        vec![entry(1, 11), entry(1, 12), entry(1, 13)],
        1,
    );
    assert!(r.success);
    if !t.wait_until(2 * SECOND, || t.applied_at(1, 1).is_some()) {
        t.fatal("peer 1 did not apply index 1");
    }
    // Term 2's leader has committed through 3 with different entries at 2 and 3. Its first
    // heartbeat matches at index 1 and carries nothing: only index 1 is known to match.
    let r = append(&t, &end, 2, 2, (1, 1), vec![], 3);
    assert!(r.success);
    thread::sleep(Duration::from_millis(200));
    if let Some(c) = t.applied_at(1, 2) {
        t.fatal(&format!(
            "peer 1 applied its stale index 2 ({c:?}) on a heartbeat whose last new entry is 1"
        ));
    }
    // The leader's entries replace the stale ones and commit.
    let r = append(&t, &end, 2, 2, (1, 1), vec![entry(2, 22), entry(2, 23)], 3);
    assert!(r.success);
    if !t.wait_until(2 * SECOND, || t.applied_at(1, 3).is_some()) {
        t.fatal("peer 1 did not apply index 3");
    }
    assert_eq!(t.applied_at(1, 2), Some(TestCmd::Int(22)));
    assert_eq!(t.applied_at(1, 3), Some(TestCmd::Int(23)));
    t.end();
}

#[test]
fn reply_with_higher_term_deposes_the_leader() {
    let t = Test::new_scripted(3, false, |s| {
        s.add(only_candidate(3, 0));
    });
    t.begin("Rule §5.1: a leader that sees a higher term in a reply steps down");
    let term = t.wait_leader(0, 10 * SECOND);
    // Peer 1 moves to term + 5 (a candidate the test speaks for asks it).
    let end = t.inject_end(1);
    let r = vote(&t, &end, term + 5, 2, (0, 0));
    assert_eq!(r.term, term + 5);
    // The leader's next heartbeat to peer 1 is answered with term + 5.
    let deposed = t.wait_until(SECOND, || {
        t.raft(0).is_some_and(|r| r.get_state().0 >= term + 5)
    });
    if !deposed {
        let (now, leads) = t.raft(0).map(|r| r.get_state()).unwrap_or_default();
        t.fatal(&format!(
            "peer 0 is at term {now} (leader: {leads}) a second after peer 1 answered its \
             heartbeats with term {}",
            term + 5
        ));
    }
    t.end();
}

/// §5.2 measured over a quiet minute: with a working leader and nothing to do, no follower
/// stands for election and the heartbeats are the only traffic.
///
/// A minute is over eighty of the longest election timeouts (700 ms), so a follower that does
/// not reset its timer on AppendEntries stands for election dozens of times in it, each time
/// sending its 2 (pre-)vote requests (396 in all measured with pre-vote, 240 without, the
/// term moving from 1 to 121), against at most 4 requests allowed in all (a follower
/// starved of CPU for most of an election timeout may stand twice). A minute also shows what a
/// few seconds cannot: an election that comes rarely (a timeout drawn too close to the
/// heartbeat interval, a heartbeat that skips a beat). The two tests (pre-vote on and off)
/// run side by side, so the suite pays the minute once.
const QUIET_PERIOD: Duration = Duration::from_secs(60);

fn election_timer_quiet_period(t: &Test, pre_vote: bool) {
    let s = t.script();
    let leader = t.check_one_leader();
    let term = t.raft(leader).expect("leader runs").get_state().0;
    let votes = s.add(Rule::request("Raft.RequestVote").pass());
    let appends = s.add(Rule::request("Raft.AppendEntries").pass());
    let quiet = QUIET_PERIOD;
    thread::sleep(quiet);
    let (v, a) = (s.matched(votes), s.matched(appends));
    let now = t.raft(leader).expect("leader runs").get_state();
    // With pre-vote a timed-out follower cannot move the term, so the leader keeps it.
    // Without, the one timeout a starved follower may have deposes the leader: that is
    // allowed, the count of vote requests is what tells a timer that is never reset.
    if v > 4 || (pre_vote && now != (term, true)) {
        t.fatal(&format!(
            "pre-vote {}: in a quiet {quiet:?} with a working leader: {v} RequestVote/pre-vote \
             calls, leader {leader} now at {now:?} (was term {term})",
            if pre_vote { "on" } else { "off" }
        ));
    }
    // Heartbeats only: at most 10 a second to each of the 2 followers.
    let most = 2 * 10 * quiet.as_secs() + 4;
    assert!(
        a <= most,
        "{a} AppendEntries in {quiet:?} (at most {most} heartbeats)"
    );
    println!("  quiet {quiet:?}: {v} vote requests, {a} AppendEntries, term {term} -> {now:?}");
}

#[test]
fn follower_resets_election_timer_on_current_leaders_append_entries_pre_vote_on() {
    let t = Test::new_scripted(3, false, |_| {});
    t.begin("Rule §5.2: a follower that hears from the current leader does not stand for election (pre-vote on)");
    election_timer_quiet_period(&t, true);
    t.end();
}

#[test]
fn follower_resets_election_timer_on_current_leaders_append_entries_pre_vote_off() {
    let options = RaftOptions {
        pre_vote: false,
        ..RaftOptions::default()
    };
    let t = Test::new_scripted_with(3, false, options, |_| {});
    t.begin("Rule §5.2: a follower that hears from the current leader does not stand for election (pre-vote off)");
    election_timer_quiet_period(&t, false);
    t.end();
}

#[test]
fn leader_counts_a_late_append_entries_reply_only_for_what_its_call_carried() {
    let t = Test::new_scripted(3, false, |s| {
        s.add(only_candidate(3, 0));
    });
    t.begin("Rule Figure 2 (leaders, AppendEntries success): matchIndex from what the answered call carried, however late the answer");
    let s = t.script();
    let term = t.wait_leader(0, 10 * SECOND);
    t.one(TestCmd::Int(1), 3, false);
    // Peer 2 hears nothing more. The answer to the leader's next AppendEntries to peer 1
    // (a heartbeat through index 1) is held on its way back, and peer 1 hears nothing more.
    s.add(
        Rule::request("Raft.AppendEntries")
            .from(&name(0))
            .to(&name(2))
            .drop_it(),
    );
    s.add(
        Rule::reply("Raft.AppendEntries")
            .from(&name(1))
            .to(&name(0))
            .first(1)
            .hold(),
    );
    let late = match s.wait_held(1, 5 * SECOND) {
        Some(h) => h[0].clone(),
        None => t.fatal("the leader sent peer 1 no AppendEntries"),
    };
    s.add(
        Rule::request("Raft.AppendEntries")
            .from(&name(0))
            .to(&name(1))
            .drop_it(),
    );
    let reply: AppendEntriesReply = late.decode().expect("an AppendEntries reply");
    assert!(reply.success && reply.match_index == 1, "{reply:?}");
    // The leader appends index 2, which reaches nobody; then the old answer arrives.
    let (index, _, ok) = t
        .raft(0)
        .expect("leader runs")
        .start(TestCmd::Int(2).encode());
    assert!(ok && index == 2, "leader 0 should append at 2, got {index}");
    assert!(s.release(late.id), "the held reply was not delivered");
    thread::sleep(SECOND);
    if t.raft(0).expect("leader runs").get_state() != (term, true) {
        t.fatal("leader 0 lost its leadership during the test; the check would prove nothing");
    }
    check_not_committed(
        &t,
        2,
        "a late answer to a heartbeat through index 1 counted peer 1 for index 2, which only \
         the leader stores",
    );
    t.end();
}

/// Leader 0 starts `Int(cmd)` with its syncs held from now on, on a thread of its own (so a
/// `start` that waited for its own sync, which it must not, would not hang the test);
/// returns once the leader's sync of the entry (its syncer's) waits at the gate.
fn start_with_leader_sync_held(
    t: &Test,
    gate: &SyncGate,
    cmd: i64,
) -> thread::JoinHandle<(u64, u64, bool)> {
    gate.hold();
    let leader = t.raft(0).expect("leader runs");
    let starter = thread::Builder::new()
        .name("test-start".to_string())
        .spawn(move || leader.start(TestCmd::Int(cmd).encode()))
        .expect("a thread");
    if !gate.wait_blocked(5 * SECOND) {
        t.fatal("the leader did not sync its new entry");
    }
    starter
}

/// Leader 0 crashes before its held sync, which then writes nothing; its `start` must have
/// appended at `index`. The peer is shut down.
fn crash_leader_before_its_sync(
    t: &Test,
    gate: &SyncGate,
    starter: thread::JoinHandle<(u64, u64, bool)>,
    index: u64,
) {
    gate.crash();
    let (got, _, ok) = match starter.join() {
        Ok(r) => r,
        Err(_) => t.fatal("Raft::start panicked"),
    };
    assert!(
        ok && got == index,
        "leader 0 should have appended at {index}, got {got}"
    );
    t.shutdown_server(0);
}

/// Raft dissertation §10.2.1: the leader may send AppendEntries before its own write of the
/// entries, but counts itself in the majority only for entries it has made durable. The
/// crash point: the leader's sync is held, one follower stores the new entry, the leader
/// crashes before its sync. Nothing may have been committed (acknowledged) with it, since the
/// restarted leader and the third peer, a majority, know nothing of it and reuse its index.
#[test]
fn leader_counts_itself_only_for_entries_it_has_made_durable_crash_before_its_sync() {
    let t = Test::new_scripted_gated(3, |s| {
        s.add(only_candidate(3, 0));
    });
    t.begin("Rule §10.2.1: the leader writes its log in parallel with replication, and counts itself only for what it made durable (crash before its sync)");
    let s = t.script();
    let term = t.wait_leader(0, 10 * SECOND);
    t.one(TestCmd::Int(1), 3, false);
    // Peer 2 hears nothing from the leader; the leader's own syncs wait.
    let cut2 = s.add(
        Rule::request("Raft.AppendEntries")
            .from(&name(0))
            .to(&name(2))
            .drop_it(),
    );
    let gate = t.sync_gate(0);
    let starter = start_with_leader_sync_held(&t, &gate, 2);
    // The AppendEntries left before the leader's own write: peer 1 stores index 2.
    if !t.wait_until(5 * SECOND, || term_at(&t, 1, 2) == Some(term)) {
        t.fatal("peer 1 did not get index 2 while the leader's sync waited: the leader does not send before its own write");
    }
    // Heartbeats would carry a commit of index 2 to peer 1 within this time.
    thread::sleep(SECOND);
    let acked = (0..3).find_map(|p| t.applied_at(p, 2).map(|c| (p, c)));
    // The leader crashes before its sync: index 2 never reaches its disk.
    crash_leader_before_its_sync(&t, &gate, starter, 2);
    // Peer 1, the only one to hold index 2, is cut off; the leader restarts and, with peer
    // 2's vote, leads again and commits another command at index 2.
    s.remove(cut2);
    s.add(Rule::any_request().from(&name(1)).drop_it());
    s.add(Rule::any_request().to(&name(1)).drop_it());
    t.restart(0);
    let term2 = t.wait_leader(0, 10 * SECOND);
    assert!(term2 > term);
    let i = t.one(TestCmd::Int(3), 2, true);
    if let Some((p, c)) = acked {
        t.fatal(&format!(
            "index 2 ({c:?}) was committed (peer {p} applied it) while only peer 1 and the \
             leader's unsynced log held it; the leader crashed before its sync and peers 0 and \
             2 then committed Int(3) at index {i}: an acknowledged write is lost"
        ));
    }
    assert_eq!(i, 2, "the new leader's command should take index 2");
    t.end();
}

/// Dissertation §10.2.1, the other half: an entry both followers made durable is committed
/// without the leader's own copy, so the leader delivers it (and its service answers) while
/// its own sync still waits: the leader's fsync is not on the path of a reply, and `start`
/// returns without waiting for it either. What the peer
/// reports as durably held (`Raft::durable_progress`, which the node records as its
/// high-water mark) still counts only what its own sync covered: the leader crashes before
/// that sync, restarts with a log that lacks the entry, and must find no less than it
/// reported. The cluster then goes on, the entry kept at its index on every peer.
#[test]
fn leader_delivers_what_its_followers_made_durable_before_its_own_sync_and_reports_only_its_own() {
    let mut candidate_rule = None;
    let t = Test::new_scripted_gated(3, |s| {
        candidate_rule = Some(s.add(only_candidate(3, 0)));
    });
    t.begin("Rule §10.2.1: the leader delivers what a majority without it made durable, before its own sync, and reports only its own durable state");
    let s = t.script();
    let term = t.wait_leader(0, 10 * SECOND);
    t.one(TestCmd::Int(1), 3, false);
    let gate = t.sync_gate(0);
    let starter = start_with_leader_sync_held(&t, &gate, 2);
    // `start` itself does not wait for that sync (the peer's syncer runs it), so a proposer
    // may propose again at once.
    if !t.wait_until(2 * SECOND, || starter.is_finished()) {
        t.fatal(
            "Raft::start on leader 0 did not return within 2 s while its own sync waited: a \
             proposer waits for the leader's fsync",
        );
    }
    if !t.wait_until(5 * SECOND, || t.applied_at(0, 2).is_some()) {
        t.fatal(&format!(
            "leader 0 did not deliver index 2 within 5 s of both followers storing it (peer 1 \
             holds term {:?}, peer 2 term {:?} at index 2) while its own sync waited: a reply \
             waits for the leader's own fsync",
            term_at(&t, 1, 2),
            term_at(&t, 2, 2)
        ));
    }
    if t.raft(0).expect("leader runs").get_state() != (term, true) {
        t.fatal("leader 0 lost its leadership during the test; the check would prove nothing");
    }
    let reported = t.raft(0).expect("leader runs").durable_progress();
    // The leader crashes before its sync: index 2 never reaches its disk.
    crash_leader_before_its_sync(&t, &gate, starter, 2);
    t.restart(0);
    let restored = t.raft(0).expect("peer 0 restarted").restored_extent();
    if restored.0 < reported.0 || restored.1 < reported.1 {
        t.fatal(&format!(
            "peer 0 reported term {} and index {} durably held before it crashed, but restarted \
             with term {} and a log through {}: it reported entries its own sync never covered",
            reported.0, reported.1, restored.0, restored.1
        ));
    }
    // Peers 1 and 2 hold index 2; either may lead now, and peer 0 gets it again.
    s.remove(candidate_rule.expect("the rule was added"));
    let i = t.one(TestCmd::Int(3), 3, true);
    assert_eq!(i, 3, "index 2 is committed, so Int(3) should take index 3");
    if !t.wait_until(5 * SECOND, || t.applied_at(0, 2) == Some(TestCmd::Int(2))) {
        t.fatal(&format!(
            "restarted peer 0 applied {:?} at index 2, not Int(2)",
            t.applied_at(0, 2)
        ));
    }
    t.end();
}

/// A follower's answer waits on no sync it did not queue itself, and acknowledges only what
/// is durable (Figure 2: "persist before responding", for what the answer vouches for); a
/// vote it refuses vouches for nothing and is answered at once too. Both followers' syncs
/// are held, as behind the write of a large snapshot of their own, while each holds the
/// leader's index 2 unsynced. With CheckQuorum on, the leader must stay leader
/// for several of its windows, its heartbeats answered and a read confirmed; and no answer
/// may count a follower for index 2, which a crash before their syncs then takes from both:
/// a commit of index 2 would have rested on the leader's copy alone.
#[test]
fn follower_answers_heartbeats_while_its_sync_waits_and_acknowledges_only_durable_entries() {
    let options = RaftOptions {
        check_quorum: true,
        ..RaftOptions::default()
    };
    let t = Test::new_scripted_gated_with(3, options, |s| {
        s.add(only_candidate(3, 0));
    });
    t.begin("Rule Figure 2 / CheckQuorum: a follower answers at once whatever its disk is doing, acknowledging only durable entries (both followers' syncs held)");
    let s = t.script();
    let term = t.wait_leader(0, 10 * SECOND);
    t.one(TestCmd::Int(1), 3, false);
    // Successful answers in this term from each follower, and the highest index any of them
    // acknowledged.
    let answered: Arc<[AtomicUsize; 3]> = Arc::default();
    let acked: Arc<[AtomicU64; 3]> = Arc::default();
    for p in 1..3 {
        let (answered, acked) = (answered.clone(), acked.clone());
        s.add(
            Rule::reply("Raft.AppendEntries")
                .from(&name(p))
                .to(&name(0))
                .when("counts the answers", move |r: &AppendEntriesReply| {
                    if r.success && r.term == term {
                        answered[p].fetch_add(1, Ordering::SeqCst);
                        acked[p].fetch_max(r.match_index, Ordering::SeqCst);
                    }
                    false
                })
                .pass(),
        );
    }
    // From now on both followers' syncs wait.
    let gates = [t.sync_gate(1), t.sync_gate(2)];
    for g in &gates {
        g.hold();
    }
    let (index, _, ok) = t
        .raft(0)
        .expect("leader runs")
        .start(TestCmd::Int(2).encode());
    assert!(ok && index == 2, "leader 0 should append at 2, got {index}");
    for (p, g) in (1..3).zip(&gates) {
        if !g.wait_blocked(5 * SECOND) {
            t.fatal(&format!("peer {p} did not sync index 2"));
        }
        if !t.wait_until(5 * SECOND, || term_at(&t, p, 2) == Some(term)) {
            t.fatal(&format!("peer {p} did not store index 2"));
        }
    }
    let before: Vec<usize> = (0..3).map(|p| answered[p].load(Ordering::SeqCst)).collect();
    // Four CheckQuorum windows (700 ms each) while the syncs stay held.
    let held_from = Instant::now();
    while held_from.elapsed() < 4 * Duration::from_millis(700) {
        if t.raft(0).expect("leader runs").get_state() != (term, true) {
            t.fatal(&format!(
                "leader 0 stepped down {:?} after both followers' syncs were held: their \
                 answers waited on syncs they had not queued for them (heartbeats answered \
                 meanwhile: peer 1 {}, peer 2 {})",
                held_from.elapsed(),
                answered[1].load(Ordering::SeqCst) - before[1],
                answered[2].load(Ordering::SeqCst) - before[2]
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
    for p in 1..3 {
        let n = answered[p].load(Ordering::SeqCst) - before[p];
        // A heartbeat every 100 ms: about 28 in the time, 5 even under heavy load.
        if n < 5 {
            t.fatal(&format!(
                "peer {p} answered {n} AppendEntries in {:?} while its sync was held",
                held_from.elapsed()
            ));
        }
    }
    for p in 1..3 {
        let m = acked[p].load(Ordering::SeqCst);
        if m >= 2 {
            t.fatal(&format!(
                "peer {p} acknowledged index {m} while its sync of index 2 was held: an \
                 answer vouched for an entry not durable"
            ));
        }
    }
    let (commit, _) = t.raft(0).expect("leader runs").progress();
    if commit >= 2 {
        t.fatal(&format!(
            "leader 0 committed through {commit} while index 2 was durable on its own disk \
             only (both followers' syncs held)"
        ));
    }
    check_not_committed(
        &t,
        2,
        "index 2 was durable on the leader's disk only (both followers' syncs held)",
    );
    // A read is confirmed by the same answers: they vouch for the term, not the disk.
    match t.raft(0).expect("leader runs").read_index(5 * SECOND) {
        Ok(1) => {}
        other => t.fatal(&format!(
            "a read on leader 0 while its followers' syncs were held gave {other:?}, not index 1"
        )),
    }
    // A refused vote vouches for nothing either, so it is answered at once too: candidate 2,
    // its log as long as any, asks peer 1 in the term where peer 1 voted for 0.
    let end = t.inject_end(1);
    let args = RequestVoteArgs {
        term,
        candidate: 2,
        last_log_index: 2,
        last_log_term: term,
        pre_vote: false,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let asker = thread::Builder::new()
        .name("test-vote".to_string())
        .spawn(move || {
            let r: Result<RequestVoteReply, _> = end.call("Raft.RequestVote", &args);
            let _ = tx.send(r.map_err(|e| e.to_string()));
        })
        .expect("a thread");
    match rx.recv_timeout(2 * SECOND) {
        Ok(Ok(r)) if !r.vote_granted && r.term == term => {}
        Ok(other) => t.fatal(&format!(
            "peer 1, which voted for 0 in term {term}, answered candidate 2 with {other:?}"
        )),
        Err(_) => t.fatal(
            "peer 1 did not answer within 2 s a RequestVote it refuses, while its sync was \
             held: a refusal waited on a sync it did not need",
        ),
    }
    if asker.join().is_err() {
        t.fatal("the thread asking peer 1 for a vote panicked");
    }
    // Both followers crash before their syncs: index 2 never reached their disks.
    for (p, g) in (1..3).zip(&gates) {
        g.crash();
        t.shutdown_server(p);
    }
    for p in 1..3 {
        t.restart(p);
        if let Some(t2) = term_at(&t, p, 2) {
            t.fatal(&format!(
                "peer {p} restarted with index 2 (t{t2}) though it crashed before syncing it"
            ));
        }
    }
    // The leader goes on with both: index 2 again, then a new command.
    t.one(TestCmd::Int(3), 3, true);
    t.end();
}

/// Checks that a service was handed indexes strictly in order: each command the one after the
/// last, each snapshot past the last.
fn check_in_order(t: &Test, peer: usize, history: &[Delivered]) {
    let mut last: Option<u64> = None;
    for d in history {
        let ok = match (*d, last) {
            (Delivered::Command(i), Some(l)) => i == l + 1,
            (Delivered::Command(_), None) => true,
            (Delivered::Snapshot(i), Some(l)) => i > l,
            (Delivered::Snapshot(_), None) => true,
        };
        if !ok {
            t.fatal(&format!(
                "peer {peer}'s service was handed {d:?} after index {last:?}: {history:?}"
            ));
        }
        last = Some(match *d {
            Delivered::Command(i) | Delivered::Snapshot(i) => i,
        });
    }
}

/// Commits `n` commands through leader 0, each on `expected` peers.
fn commit_many(t: &Test, from: i64, n: i64, expected: usize) {
    for c in from..from + n {
        t.one(TestCmd::Int(c), expected, true);
    }
}

#[test]
fn install_snapshot_older_than_commit_index_is_ignored() {
    let t = Test::new_scripted(3, true, |s| {
        s.add(only_candidate(3, 0));
    });
    t.begin("Rule Figure 13: an InstallSnapshot the follower's commit index has passed changes nothing (late, duplicated)");
    let s = t.script();
    t.wait_leader(0, 10 * SECOND);
    // Peer 2 falls behind while the leader commits and snapshots through index 29.
    let cut = s.add(
        Rule::request("Raft.AppendEntries")
            .from(&name(0))
            .to(&name(2))
            .drop_it(),
    );
    commit_many(&t, 1, 30, 2);
    // It comes back: the leader sends its snapshot, and the network keeps a copy.
    s.remove(cut);
    s.add(
        Rule::request("Raft.InstallSnapshot")
            .from(&name(0))
            .to(&name(2))
            .first(1)
            .duplicate_later(),
    );
    let copy = match s.wait_held(1, 5 * SECOND) {
        Some(h) => h[0].clone(),
        None => t.fatal("the leader sent peer 2 no snapshot"),
    };
    let old: InstallSnapshotArgs = copy.decode().expect("an InstallSnapshot");
    // Peer 2 catches up and goes well past the snapshot.
    commit_many(&t, 31, 15, 3);
    let before = t.apply_history(2);
    // The late copy arrives, then the same snapshot once more.
    assert!(s.release(copy.id), "the late copy was not delivered");
    let end = t.inject_end(2);
    let r: Result<InstallSnapshotReply, _> = end.call("Raft.InstallSnapshot", &old);
    assert!(r.is_ok(), "peer 2 did not answer the duplicate: {r:?}");
    thread::sleep(Duration::from_millis(200));
    let after = t.apply_history(2);
    if after.len() != before.len() || term_at(&t, 2, 45).is_none() {
        t.fatal(&format!(
            "a snapshot through {} delivered after peer 2 committed 45 changed it: service \
             handed {:?} after the late copies; log holds index 45: {}",
            old.last_included_index,
            &after[before.len().min(after.len())..],
            term_at(&t, 2, 45).is_some()
        ));
    }
    check_in_order(&t, 2, &after);
    commit_many(&t, 46, 3, 3);
    check_in_order(&t, 2, &t.apply_history(2));
    t.end();
}

#[test]
fn install_snapshot_newer_than_log_replaces_it_and_service_sees_each_index_once_in_order() {
    let t = Test::new_scripted(3, true, |s| {
        s.add(only_candidate(3, 0));
    });
    t.begin("Rule Figure 13: a newer snapshot replaces the follower's log; its service sees no index twice, none out of order");
    let s = t.script();
    t.wait_leader(0, 10 * SECOND);
    commit_many(&t, 1, 5, 3);
    // Peer 2 falls behind while the leader commits and snapshots through index 29.
    let cut = s.add(
        Rule::request("Raft.AppendEntries")
            .from(&name(0))
            .to(&name(2))
            .drop_it(),
    );
    commit_many(&t, 6, 30, 2);
    s.remove(cut);
    commit_many(&t, 36, 5, 3);
    let history = t.apply_history(2);
    check_in_order(&t, 2, &history);
    if !history.iter().any(|d| matches!(d, Delivered::Snapshot(_))) {
        t.fatal(&format!("peer 2 caught up without a snapshot: {history:?}"));
    }
    // The log before the snapshot is gone.
    if term_at(&t, 2, 10).is_some() {
        t.fatal("peer 2 still holds index 10 after installing a snapshot past it");
    }
    t.end();
}

#[test]
fn persistence_before_every_reply_that_depends_on_it() {
    let violations: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let t = Test::new_scripted(3, false, |_| {});
    t.begin("Rule Figure 2: a reply leaves only once what it vouches for is persisted");
    let s = t.script();
    // An inspecting rule on every reply of every peer: at the moment a reply leaves, the
    // peer's persister must already hold what it acknowledges (it never matches).
    for p in 0..3 {
        let (g, v) = (t.g(), violations.clone());
        s.add(
            Rule::reply("Raft.AppendEntries")
                .from(&name(p))
                .when(
                    "acknowledges entries not persisted",
                    move |r: &AppendEntriesReply| {
                        let state = raftkv::raft::persist::decode_lab_state(
                            &g.persister(p).read_raft_state(),
                        );
                        if let Ok((hs, log)) = state
                            && r.success
                            && (r.match_index > log.last_index() || hs.term < r.term)
                        {
                            v.lock().push(format!(
                                "peer {p} acknowledged through {} in term {} with persisted log \
                             through {} in term {}",
                                r.match_index,
                                r.term,
                                log.last_index(),
                                hs.term
                            ));
                        }
                        false
                    },
                )
                .pass(),
        );
        for q in (0..3).filter(|&q| q != p) {
            // Which terms candidate q asked p about, as a vote and as a pre-vote: a granted
            // reply in term T is a vote if q asked a vote at T, and a pre-vote (which
            // persists nothing) if q asked a pre-vote at T + 1; both at once is ambiguous
            // and not checked.
            let asked: Arc<Mutex<(HashSet<u64>, HashSet<u64>)>> = Arc::default();
            let a = asked.clone();
            s.add(
                Rule::request("Raft.RequestVote")
                    .from(&name(q))
                    .to(&name(p))
                    .when("records the term asked", move |r: &RequestVoteArgs| {
                        let mut a = a.lock();
                        if r.pre_vote {
                            a.1.insert(r.term);
                        } else {
                            a.0.insert(r.term);
                        }
                        false
                    })
                    .pass(),
            );
            let (g, v) = (t.g(), violations.clone());
            s.add(
                Rule::reply("Raft.RequestVote")
                    .from(&name(p))
                    .to(&name(q))
                    .when(
                        "grants a vote not persisted",
                        move |r: &RequestVoteReply| {
                            let vote = {
                                let a = asked.lock();
                                a.0.contains(&r.term) && !a.1.contains(&(r.term + 1))
                            };
                            let state = raftkv::raft::persist::decode_lab_state(
                                &g.persister(p).read_raft_state(),
                            );
                            if let Ok((hs, _)) = state
                                && r.vote_granted
                                && vote
                                && (hs.term != r.term || hs.voted_for != Some(q))
                            {
                                v.lock().push(format!(
                                    "peer {p} granted {q} a vote in term {} with term {} votedFor \
                                 {:?} persisted",
                                    r.term, hs.term, hs.voted_for
                                ));
                            }
                            false
                        },
                    )
                    .pass(),
            );
        }
    }
    let check = || {
        let v = violations.lock().clone();
        if !v.is_empty() {
            t.fatal(&format!(
                "{} replies before persistence, first: {}",
                v.len(),
                v[0]
            ));
        }
    };
    let mut leader = t.check_one_leader();
    commit_many(&t, 1, 5, 3);
    check();
    // A follower crashes and comes back; the leader is cut off and replaced.
    let f = (leader + 1) % 3;
    t.shutdown_server(f);
    commit_many(&t, 6, 3, 2);
    t.restart(f);
    commit_many(&t, 9, 3, 3);
    t.g().disconnect_all(leader);
    let old = leader;
    leader = t.check_one_leader();
    assert_ne!(leader, old);
    commit_many(&t, 12, 3, 2);
    t.g().connect_one(old);
    commit_many(&t, 15, 3, 3);
    check();
    t.end();
}
