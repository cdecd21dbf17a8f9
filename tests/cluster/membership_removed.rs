//! A node removed from the cluster while it was down (so it never received the entry that
//! removed it) learns it was removed once it is back (issue 20, Raft dissertation §4.2.3):
//! the members it dials answer that their committed configuration leaves it out, it stops
//! campaigning, says so in one log line and in its status file (`"member": "removed"`), and
//! the cluster's leader and term are untouched. Every process is killed and every file
//! removed when the test ends (`tests/kit`).

use crate::kit;

use std::collections::BTreeMap;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use kit::{Cluster, EXE, PATIENCE};

/// `raftkv member --node <node via's client address> ARGS…`: exit code, stdout, stderr.
fn member(cluster: &Cluster, via: usize, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(EXE)
        .arg("member")
        .arg("--node")
        .arg(format!("127.0.0.1:{}", cluster.client_ports[via]))
        .args(args)
        .output()
        .expect("run raftkv member");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What the removed node logs when it learns it (its one line).
const REMOVED_LINE: &str = "removed from the cluster: node";
/// What its Raft logs (at debug) each time it campaigns.
const CAMPAIGN_LINE: &str = "pre-candidate";

#[test]
fn node_removed_while_down_learns_it_and_stops_campaigning() {
    let mut cluster = Cluster::start_new("removed-down", 3);
    let leader = cluster.leader();
    let gone = (leader + 1) % 3;
    let mut acked = BTreeMap::new();
    cluster.write_keys(leader, "a", 20, &mut acked);
    cluster.kill9(gone);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (code, out, err) = member(&cluster, leader, &["remove", &(gone + 1).to_string()]);
        if code == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "member remove {} failed for {PATIENCE:?}: {out}{err}",
            gone + 1
        );
        thread::sleep(Duration::from_millis(200));
    }
    cluster.write_keys(leader, "b", 20, &mut acked);
    let term = cluster.status(leader).expect("the leader's status").term;

    // Back, on its old directory: its configuration still counts it a voter.
    cluster.start_with(gone, |c| {
        c.env("RUST_LOG", "warn,raft::election=debug");
    });
    let started = Instant::now();
    while cluster.status(gone).is_none_or(|s| s.member != "removed") {
        assert!(
            started.elapsed() < PATIENCE,
            "node {} never learned it was removed: status {:?}; stderr:\n{}",
            gone + 1,
            cluster.status(gone).map(|s| (s.term, s.member)),
            cluster.stderr(gone)
        );
        thread::sleep(Duration::from_millis(50));
    }
    println!(
        "node {} learned it was removed {:?} after it started",
        gone + 1,
        started.elapsed()
    );
    let said = cluster.stderr(gone);
    assert_eq!(
        said.matches(REMOVED_LINE).count(),
        1,
        "one line says it:\n{said}"
    );
    // From then on it does not campaign: no pre-vote over several election timeouts (at most
    // 0.7 s each), while the others take writes. Its campaigns are the only way it could
    // disturb them (nobody sends it anything any more), so that is what is checked; the
    // others keep their leader and term unless a real election among the two of them moved
    // it (a loaded machine can starve one past CheckQuorum's 0.7 s), which is said.
    let said_before = said.len();
    let removed_term = cluster.status(gone).expect("its status").term;
    let until = Instant::now() + Duration::from_secs(4);
    let mut moved = None;
    while Instant::now() < until {
        cluster.write_keys(leader, "c", 5, &mut acked);
        let s = cluster.status(leader).expect("the leader's status");
        if !(s.leader && s.term == term) && moved.is_none() {
            moved = Some((s.leader, s.term));
        }
        thread::sleep(Duration::from_millis(100));
    }
    let logs = || -> String {
        (0..3)
            .map(|i| format!("--- node {} ---\n{}", i + 1, cluster.stderr(i)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let after = cluster.stderr(gone)[said_before..].to_string();
    assert!(
        !after.contains(CAMPAIGN_LINE),
        "node {} still campaigns after it learned it was removed:\n{}",
        gone + 1,
        logs()
    );
    assert_eq!(
        cluster.status(gone).expect("its status").term,
        removed_term,
        "the removed node's term moved"
    );
    if let Some((leads, now)) = moved {
        println!(
            "a real election among the others meanwhile: node {} leads {leads}, term {term} -> {now}",
            leader + 1
        );
    }
    let s = cluster.status(gone).expect("the removed node's status");
    assert!(!s.leader && s.member == "removed", "{s:?}");
    assert!(cluster.alive(gone), "the removed node keeps running");
    for i in (0..3).filter(|&i| i != gone) {
        cluster.check_keys(i, &acked);
    }
}
