//! The replicated state machine's rules (Lab 4), each reproduced as one exact schedule on the
//! network's script: a submitter hears only its own op's result, a read is answered only once
//! the leader has confirmed it still leads (ReadIndex, Raft thesis §6.4), and a retried,
//! duplicated and reordered request takes effect once. Each test's broken variant is in
//! `scripts/rule-variants/` (run `scripts/rule-variants.sh rsm_rules`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use raftkv::kvapi::{GetArgs, KvErr, KvTransport, PutArgs};
use raftkv::labrpc::script::Rule;
use raftkv::tester::kvraft::{CounterRep, CounterReq, KvRaftParams, KvRaftTest, RsmTest};
use raftkv::tester::{GRP0, server_name};

const SECOND: Duration = Duration::from_secs(1);

fn name(i: usize) -> String {
    server_name(GRP0, i)
}

/// Drops the RequestVotes (and pre-votes) of every peer but `candidate`.
fn only_candidate(candidate: usize) -> Rule {
    let others: Vec<String> = (0..3).filter(|&p| p != candidate).map(name).collect();
    Rule::request("Raft.RequestVote")
        .from_any(&others)
        .drop_it()
}

fn wait_leader(ts: &RsmTest, i: usize) -> u64 {
    let t0 = Instant::now();
    loop {
        if let Some(s) = ts.srv(i) {
            let (term, leader) = s.rsm.raft().get_state();
            if leader {
                return term;
            }
        }
        if t0.elapsed() > 10 * SECOND {
            ts.fatal(&format!("peer {i} did not become leader"));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn wait_for(ts: &RsmTest, what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        if t0.elapsed() > 10 * SECOND {
            ts.fatal(&format!("timed out waiting for {what}"));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn submitter_answered_only_with_its_own_ops_result() {
    let first = Arc::new(AtomicU64::new(0));
    let f = first.clone();
    let ts = RsmTest::new_scripted(None, move |s| {
        f.store(s.add(only_candidate(0)), Ordering::SeqCst);
    });
    ts.begin("Rule rsm: a submitter whose index another op took gets ErrWrongLeader, never that op's result");
    let s = ts.cfg.net().script();
    wait_leader(&ts, 0);
    assert_eq!(ts.one_inc(), 1);
    ts.check_counter(1, 3);
    // Leader 0 is cut off (its AppendEntries are lost) and takes a Null at index 3 and an
    // Inc at index 4, which can never commit.
    let cut = s.add(Rule::request("Raft.AppendEntries").from(&name(0)).drop_it());
    let srv0 = ts.srv(0).expect("peer 0 runs");
    let raft0 = srv0.rsm.raft();
    let (s0, r0) = (srv0.clone(), raft0.clone());
    let null = thread::spawn(move || s0.submit(CounterReq::Null));
    wait_for(&ts, "the Null at index 3", || r0.term_at(3).is_some());
    let s0 = srv0.clone();
    let inc = thread::spawn(move || s0.submit(CounterReq::Inc));
    wait_for(&ts, "the Inc at index 4", || raft0.term_at(4).is_some());
    // Peer 1 is elected by 2; peer 0 hears nothing of it yet.
    s.add(only_candidate(1));
    s.remove(first.load(Ordering::SeqCst));
    let hold = s.add(
        Rule::request("Raft.AppendEntries")
            .from(&name(1))
            .to(&name(0))
            .hold(),
    );
    wait_leader(&ts, 1);
    // Its term-start entry takes index 3 and a client's Inc index 4.
    let srv1 = ts.srv(1).expect("peer 1 runs");
    assert_eq!(srv1.submit(CounterReq::Inc), Some(CounterRep::Inc { n: 2 }));
    // Now peer 0 hears from the new leader, in order: its indexes 3 and 4 are replaced and
    // committed.
    s.remove(hold);
    for h in s.held() {
        s.release(h.id);
    }
    s.remove(cut);
    let null = null.join().expect("the Null's submitter");
    let inc = inc.join().expect("the Inc's submitter");
    if inc.is_some() || null.is_some() {
        ts.fatal(&format!(
            "peer 0's submitters were answered {null:?} (Null at 3) and {inc:?} (Inc at 4), \
             though the new leader's ops took both indexes: each must get ErrWrongLeader"
        ));
    }
    ts.check_counter(2, 3);
    ts.end();
}

#[test]
fn read_answered_only_after_leader_confirmed_it_leads() {
    let first = Arc::new(AtomicU64::new(0));
    let f = first.clone();
    let ts = RsmTest::new_scripted(None, move |s| {
        f.store(s.add(only_candidate(0)), Ordering::SeqCst);
    });
    ts.begin("Rule ReadIndex: a read is answered only once a majority confirmed the leader");
    let s = ts.cfg.net().script();
    wait_leader(&ts, 0);
    assert_eq!(ts.one_inc(), 1);
    ts.check_counter(1, 3);
    // Leader 0 is partitioned: everything it sends is held.
    let held_rule = s.add(Rule::request("Raft.AppendEntries").from(&name(0)).hold());
    let holding = Arc::new(AtomicBool::new(true));
    let srv0 = ts.srv(0).expect("peer 0 runs");
    let h = holding.clone();
    let read = thread::spawn(move || {
        let r = srv0.rsm.read_barrier();
        // What a Get answered now would see, and whether any peer could have answered.
        (r, srv0.counter(), h.load(Ordering::SeqCst))
    });
    // Peer 1 is elected by 2 and commits an Inc the old leader never sees.
    s.add(only_candidate(1));
    s.remove(first.load(Ordering::SeqCst));
    wait_leader(&ts, 1);
    let srv1 = ts.srv(1).expect("peer 1 runs");
    assert_eq!(srv1.submit(CounterReq::Inc), Some(CounterRep::Inc { n: 2 }));
    // The old leader's calls are let through only now.
    holding.store(false, Ordering::SeqCst);
    s.remove(held_rule);
    for h in s.held() {
        s.release(h.id);
    }
    let (r, seen, while_held) = read.join().expect("the reader");
    if r.is_ok() && (while_held || seen < 2) {
        ts.fatal(&format!(
            "peer 0 vouched for a read (it would answer counter = {seen}) while {}; the \
             new leader had committed counter = 2",
            if while_held {
                "every AppendEntries it sent was held (no peer had confirmed it)"
            } else {
                "it was deposed"
            }
        ));
    }
    ts.end();
}

#[test]
fn request_takes_effect_once_when_retried_duplicated_and_reordered() {
    let t = KvRaftTest::new(KvRaftParams {
        part: "rules",
        nclients: 1,
        nservers: 3,
        reliable: true,
        crash: false,
        partitions: false,
        maxraftstate: None,
        randomkeys: false,
    });
    let s = t.cfg().net().script();
    let clnt = t.cfg().clnts().make_client();
    let leader = loop {
        if let Some(l) = t.leader() {
            break l;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let srv = name(leader);
    let put = |value: &str, version| {
        let args = PutArgs {
            key: "k".to_string(),
            value: value.to_string(),
            version,
        };
        clnt.put(&srv, &args).map(|r| r.err)
    };
    // Put "a" at version 0 is applied but its answer is lost; the client retries it.
    s.add(Rule::reply("KVServer.Put").from(&srv).first(1).drop_it());
    let first = put("a", 0);
    assert!(
        first.is_err(),
        "the first answer should have been lost: {first:?}"
    );
    let retry = loop {
        match put("a", 0) {
            Ok(e) => break e,
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    };
    assert_eq!(retry, KvErr::Version, "the retried Put ran again");
    // Put "b" at version 1 is delivered, and a copy of it is delayed in the network.
    s.add(
        Rule::request("KVServer.Put")
            .to(&srv)
            .first(1)
            .duplicate_later(),
    );
    assert_eq!(put("b", 1), Ok(KvErr::Ok));
    let copy = s.wait_held(1, 5 * SECOND).expect("a held copy")[0].clone();
    // Put "c" at version 2; then the stale copy of "b" arrives, after it.
    assert_eq!(put("c", 2), Ok(KvErr::Ok));
    assert!(s.release(copy.id), "the copy was not delivered");
    let got = clnt
        .get(
            &srv,
            &GetArgs {
                key: "k".to_string(),
            },
        )
        .expect("a Get from the leader");
    if (got.value.as_str(), got.version) != ("c", 3) {
        t.fatal(&format!(
            "after Puts a (retried), b (duplicated, the copy late) and c, k = {:?} at version \
             {}; each Put takes effect once: want \"c\" at version 3",
            got.value, got.version
        ));
    }
    t.ts.end();
}
