//! Membership changes on a real cluster (issue 20; Raft dissertation §4): `raftkv member
//! list|add|remove` against real `raftkv serve` processes on loopback. A node whose disk was
//! lost is replaced by a brand-new node; a removed leader steps down; a removed node left
//! running disrupts nothing; one change at a time; the new configuration survives a restart
//! of the whole cluster. Every process is killed and every file removed when a test ends
//! (the process kit, `tests/kit`).
//!
//! Nodes are numbered from 0 in the kit, so node `i` has id `i + 1`: the id is what
//! `raftkv member` takes and prints.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use crate::kit;

use kit::{Cluster, EXE, TempDir, voters};

/// How long a cluster may take to elect a leader, or a command to succeed after a fault.
const PATIENCE: Duration = Duration::from_secs(30);

/// Three founding nodes (ids 1..=3) started, and two spare slots (ids 4 and 5) that start
/// without `--bootstrap` and wait to be added.
fn cluster(what: &str) -> Cluster {
    let mut cluster = Cluster::start_new_with_spares(&format!("membership-{what}"), 3, 2);
    cluster.patience = PATIENCE;
    cluster
}

/// The ids of `nodes`, sorted (as `member list` prints them).
fn ids(nodes: &[usize]) -> Vec<usize> {
    let mut ids: Vec<usize> = nodes.iter().map(|i| i + 1).collect();
    ids.sort_unstable();
    ids
}

/// `member add` of the spare node `i` under its id, at its own addresses.
fn add_args(cluster: &Cluster, i: usize) -> Vec<String> {
    vec![
        "add".into(),
        (i + 1).to_string(),
        cluster.peer_addr(i),
        cluster.client_addr(i),
    ]
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Waits up to [`PATIENCE`] until `member list` on `via` shows node `i` as a learner (an add
/// in progress has put it in the configuration and waits for it to catch up).
fn wait_learner(cluster: &Cluster, via: usize, i: usize) {
    let deadline = Instant::now() + PATIENCE;
    while !cluster
        .members(&[via])
        .iter()
        .any(|(id, role, _)| *id == i + 1 && role == "learner")
    {
        assert!(
            Instant::now() < deadline,
            "node {} never became a learner",
            i + 1
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// A follower's `raft/` directory is lost: it refuses to start; `member remove` takes it out
/// and `member add` brings in a brand-new node (new id, new ports, empty directory), which
/// catches up as a learner and becomes a voter: three voters again, no acknowledged write
/// lost. Then the old leader is killed and the two others still serve every key; the whole
/// cluster restarted keeps the new configuration.
#[test]
fn lost_disk_node_is_replaced_by_a_new_member_and_nothing_is_lost() {
    let mut cluster = cluster("replace");
    let leader = cluster.leader();
    let lost = (leader + 1) % 3;
    let other = (0..3).find(|&i| i != leader && i != lost).expect("3 nodes");
    let mut acked = BTreeMap::new();
    cluster.write_keys(leader, "a", 200, &mut acked);
    // The follower's identity records its progress within a second.
    thread::sleep(Duration::from_millis(1500));
    cluster.kill9(lost);
    fs::remove_dir_all(cluster.data(lost).join("raft")).expect("wipe raft/");
    cluster.start(lost);
    let status = cluster.wait_exit(lost, Duration::from_secs(15));
    assert_eq!(status.code(), Some(1));
    assert!(
        cluster.stderr(lost).contains("lost state"),
        "{}",
        cluster.stderr(lost)
    );

    let (code, out, err) = cluster.member(&[other, leader], &["remove", &(lost + 1).to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        voters(&cluster.members(&[leader, other])),
        ids(&[leader, other])
    );
    cluster.write_keys(other, "b", 50, &mut acked);

    // The new node: id 4, its own ports, an empty directory, no --bootstrap.
    let new = 3;
    cluster.start(new);
    cluster.wait_member_role(new, "waiting to be added");
    let (code, out, err) = cluster.member(&[leader, other], &strs(&add_args(&cluster, new)));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("node 4 added"), "{out}");
    let list = cluster.members(&[leader, other, new]);
    let expect = ids(&[leader, other, new]);
    assert_eq!(voters(&list), expect, "{list:?}");
    cluster.wait_member_role(new, "voter");
    cluster.write_keys(new, "c", 20, &mut acked);
    cluster.check_keys(new, &acked);

    // Without the old leader, node 4 and the other elect a leader holding every key.
    cluster.kill9(leader);
    cluster.write_keys(new, "d", 20, &mut acked);
    cluster.check_keys(new, &acked);
    cluster.check_keys(other, &acked);

    // The whole cluster restarted (the lost node's leftovers stay stopped) keeps it.
    cluster.kill9(new);
    cluster.kill9(other);
    for i in [leader, other, new] {
        cluster.start(i);
    }
    let new_leader = cluster.leader_among(&[leader, other, new]);
    cluster.check_keys(new_leader, &acked);
    cluster.write_keys(new_leader, "e", 10, &mut acked);
    for i in [leader, other, new] {
        cluster.check_keys(i, &acked);
    }
    assert_eq!(voters(&cluster.members(&[new_leader])), expect);
}

/// The leader removes itself: once the removal commits it steps down, its status says it was
/// removed, and the other two elect a leader that serves every acknowledged key.
#[test]
fn removed_leader_steps_down_and_the_rest_elect_a_leader() {
    let cluster = cluster("leader");
    let leader = cluster.leader();
    let rest: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let mut acked = BTreeMap::new();
    cluster.write_keys(leader, "a", 50, &mut acked);
    let (code, out, err) = cluster.member(&[leader], &["remove", &(leader + 1).to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    cluster.wait_member_role(leader, "removed");
    let deadline = Instant::now() + PATIENCE;
    while cluster.status(leader).is_none_or(|s| s.leader) {
        assert!(
            Instant::now() < deadline,
            "node {} still leads after its removal",
            leader + 1
        );
        thread::sleep(Duration::from_millis(50));
    }
    let new_leader = cluster.leader_among(&rest);
    assert_ne!(new_leader, leader);
    cluster.write_keys(new_leader, "b", 50, &mut acked);
    for &i in &rest {
        cluster.check_keys(i, &acked);
    }
    assert_eq!(voters(&cluster.members(&rest)), ids(&rest));
    // The removed node still runs, and never leads again.
    for _ in 0..20 {
        assert!(
            cluster
                .status(leader)
                .is_some_and(|s| !s.leader && s.member == "removed")
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// A removed follower left running (campaigning, since it may never learn the change
/// committed) changes nothing: the leader and the term of the rest stay as they were over
/// several seconds, and every write succeeds.
///
/// The two members left also run CheckQuorum: on a loaded machine the leader can step down
/// because its one follower was silent for a moment, and the term then moves with no help
/// from the removed node. Such a window (the leader's log names the CheckQuorum step-down
/// and the member it did not hear from) proves nothing either way, so it is observed again,
/// five windows at most; anything else that takes leadership or moves the term fails.
#[test]
fn removed_node_left_running_does_not_disrupt() {
    const QUORUM_STEP_DOWN: &str = "stepping down (CheckQuorum)";
    const WINDOWS: usize = 5;
    let mut cluster = Cluster::start_new_with("membership-disrupt", 3, |_, command| {
        command.env("RUST_LOG", "raft::election=warn");
    });
    cluster.patience = PATIENCE;
    let leader = cluster.leader();
    let removed = (leader + 1) % 3;
    let mut acked = BTreeMap::new();
    cluster.write_keys(leader, "a", 20, &mut acked);
    let (code, out, err) = cluster.member(&[leader], &["remove", &(removed + 1).to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    let members: Vec<usize> = (0..3).filter(|&i| i != removed).collect();
    let mut k = 0;
    let mut windows = 0;
    loop {
        windows += 1;
        let leader = cluster.leader_among(&members);
        let step_downs_before = cluster.stderr(leader).matches(QUORUM_STEP_DOWN).count();
        let term = cluster.status(leader).expect("leader's status").term;
        let until = Instant::now() + Duration::from_secs(6);
        let mut disturbed = None;
        while Instant::now() < until && disturbed.is_none() {
            cluster.write_keys(leader, &format!("b{k}-"), 1, &mut acked);
            k += 1;
            let s = cluster.status(leader).expect("leader's status");
            if !s.leader || s.term != term {
                disturbed = Some(s);
            }
            thread::sleep(Duration::from_millis(50));
        }
        let Some(s) = disturbed else {
            break;
        };
        let log = cluster.stderr(leader);
        let quorum_lost = log.matches(QUORUM_STEP_DOWN).count() > step_downs_before;
        assert!(
            quorum_lost && windows < WINDOWS,
            "node {} (leader in term {term}) now says leader={} term={}, with {}; node {} was removed. Its log:\n{log}",
            leader + 1,
            s.leader,
            s.term,
            if quorum_lost {
                format!("a CheckQuorum step-down in each of the {WINDOWS} windows")
            } else {
                "no CheckQuorum step-down: the removed node disrupted it".to_string()
            },
            removed + 1
        );
        eprintln!(
            "window {windows}: node {} stepped down for CheckQuorum (a loaded machine); observing again",
            leader + 1
        );
    }
    eprintln!(
        "{k} writes during the check; node {} says {:?}",
        removed + 1,
        cluster.status(removed).map(|s| (s.term, s.member))
    );
    for i in members {
        cluster.check_keys(i, &acked);
    }
}

/// One change at a time: while `member add` waits for its learner to catch up (the new node
/// is not started yet), a second change is refused with an error naming the one under way;
/// once the node starts, the add completes.
#[test]
fn second_change_while_one_is_under_way_is_refused() {
    let mut cluster = cluster("pending");
    let leader = cluster.leader();
    let follower = (leader + 1) % 3;
    let mut acked = BTreeMap::new();
    cluster.write_keys(leader, "a", 20, &mut acked);
    let (new, next) = (3, 4);
    let add = cluster.member_spawn(&[leader], &strs(&add_args(&cluster, new)));
    // The learner is in the configuration (the add now waits for it to catch up).
    wait_learner(&cluster, leader, new);
    let (code, out, err) = cluster.member(&[leader], &["remove", &(follower + 1).to_string()]);
    assert_eq!(code, 1, "a second change was accepted: {out}{err}");
    assert!(
        err.contains("one change at a time") && err.contains("add 4"),
        "{err}"
    );
    let (code, _, err) = cluster.member(&[leader], &strs(&add_args(&cluster, next)));
    assert_eq!(code, 1);
    assert!(err.contains("one change at a time"), "{err}");
    cluster.start(new);
    let (code, out, err) = add.finish(kit::MEMBER_LIMIT);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(voters(&cluster.members(&[leader])), vec![1, 2, 3, 4]);
    // Now free again: a change goes through.
    let (code, out, err) = cluster.member(&[leader], &["remove", "4"]);
    assert_eq!(code, 0, "{out}{err}");
    cluster.write_keys(leader, "b", 20, &mut acked);
    cluster.check_keys(follower, &acked);
}

/// An add cut short: while `member add` waits for its learner to catch up (the new node is
/// not started yet), the leader running it is paused until the others elect a leader, then
/// continued. The deposed leader hands the command back as a node that does not lead, and
/// `raftkv member` sends the same add to the new leader, which finds the learner and
/// finishes the add once the node starts: one command, exit 0, four voters, no write lost.
/// The same add again is reported done; the same id at other addresses is refused.
#[test]
fn an_add_cut_short_by_a_leader_change_is_finished_by_the_new_leader() {
    use raftkv::signal::Signal;
    let mut cluster = cluster("cutshort");
    let old = cluster.leader();
    let old_term = cluster.status(old).expect("the leader's status").term;
    let mut acked = BTreeMap::new();
    cluster.write_keys(old, "a", 20, &mut acked);
    let new_node = 3;
    let add = cluster.member_spawn(&[old], &strs(&add_args(&cluster, new_node)));
    wait_learner(&cluster, old, new_node);
    let pause = |cluster: &mut Cluster, signal: Signal| {
        cluster.children[old]
            .as_mut()
            .expect("the old leader runs")
            .signal(signal)
            .expect("signal the old leader");
    };
    pause(&mut cluster, Signal::Stop);
    // Node 4 is not started: of the slots, only the three founders can lead.
    let new_leader = cluster.leader_after(old, old_term, PATIENCE);
    pause(&mut cluster, Signal::Cont);
    cluster.start(new_node);
    let (code, out, err) = add.finish(PATIENCE * 2);
    assert_eq!(
        code,
        0,
        "the add cut short by node {}'s pause (node {} leads now) did not finish: {out}{err}",
        old + 1,
        new_leader + 1
    );
    assert!(out.contains("node 4 added"), "{out}{err}");
    cluster.wait_member_role(new_node, "voter");
    let list = cluster.members(&[new_leader]);
    assert_eq!(voters(&list), vec![1, 2, 3, 4], "{list:?}");
    let leader = cluster.leader();
    cluster.write_keys(leader, "b", 20, &mut acked);
    for i in [0, 1, 2, new_node] {
        cluster.check_keys(i, &acked);
    }
    // The same add again: done already. The same id at other addresses: refused.
    let (code, out, err) = cluster.member(&[leader], &strs(&add_args(&cluster, new_node)));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("already a voter"), "{out}{err}");
    let elsewhere = ["add", "4", "127.0.0.1:1", &cluster.client_addr(new_node)];
    let (code, out, err) = cluster.member(&[leader], &elsewhere);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("node 4 is already a member"), "{err}");
}

/// Usage errors exit 2 and name what is wrong; an unknown node id is refused naming it.
#[test]
fn member_usage_errors_and_unknown_ids() {
    let cluster = cluster("usage");
    let leader = cluster.leader();
    let (code, _, err) = cluster.member(&[leader], &["add", "4", "nocolon", "127.0.0.1:1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nocolon"), "{err}");
    let (code, _, err) = cluster.member(&[leader], &["remove", "0"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = cluster.member(&[leader], &["frobnicate"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = cluster.member(&[leader], &["remove", "9"]);
    assert_eq!(code, 1);
    assert!(err.contains("node 9 is not a member"), "{err}");
    let (code, _, err) = cluster.member(&[leader], &["add", "2", "127.0.0.1:1", "127.0.0.1:2"]);
    assert_eq!(code, 1);
    assert!(err.contains("node 2 is already a member"), "{err}");
    let list = cluster.members(&[leader]);
    assert_eq!(voters(&list), vec![1, 2, 3], "{list:?}");
}

/// `raftkv chaos` with only the "replace follower" fault: followers are removed, wiped and
/// added back while clients run; the history stays linearizable and every node comes back.
#[test]
fn chaos_replace_follower_stays_linearizable() {
    let dir = TempDir::new("membership-chaos");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    eprintln!("chaos seed {seed}");
    let mut opts = raftkv::chaos::ChaosOptions::new(PathBuf::from(EXE));
    opts.dir = dir.path().to_path_buf();
    opts.seed = seed;
    opts.duration = Duration::from_secs(20);
    opts.clients = 6;
    opts.fault_kinds = vec![raftkv::chaos::FaultKind::ReplaceFollower];
    let report = raftkv::chaos::run(&opts).unwrap_or_else(|e| panic!("chaos seed {seed}: {e}"));
    assert!(report.passed(), "{report}");
    let replaced = report
        .faults
        .get(&raftkv::chaos::FaultKind::ReplaceFollower)
        .copied()
        .unwrap_or(0);
    assert!(replaced >= 1, "no follower replaced:\n{report}");
    assert!(report.ops > 100, "too few operations:\n{report}");
}

#[test]
fn raft_refuses_a_second_change_while_one_is_uncommitted() {
    use raftkv::raft::{
        ChangeError, ConfChange, Configuration, Member, MembershipHost, OnReply, Raft, RaftOptions,
        RaftTransport,
    };
    use std::sync::Arc;

    /// Sends nothing (every callback dropped): peer 1 never answers.
    struct Silent {
        host: Option<Arc<Host>>,
    }
    struct Host {
        saved: parking_lot::Mutex<Option<(u64, Configuration)>>,
        initial: Configuration,
    }
    impl MembershipHost for Host {
        fn load(&self) -> Result<(u64, Configuration), String> {
            Ok(self
                .saved
                .lock()
                .clone()
                .unwrap_or((0, self.initial.clone())))
        }
        fn save(&self, index: u64, config: &Configuration) -> Result<(), String> {
            *self.saved.lock() = Some((index, config.clone()));
            Ok(())
        }
        fn changed(&self, _config: &Configuration) {}
    }
    impl RaftTransport for Silent {
        fn len(&self) -> usize {
            raftkv::raft::membership::MAX_PEERS
        }
        fn request_vote(
            &self,
            _: usize,
            _: raftkv::raft::RequestVoteArgs,
            _: OnReply<raftkv::raft::RequestVoteReply>,
        ) {
        }
        fn append_entries(
            &self,
            _: usize,
            _: raftkv::raft::AppendEntriesArgs,
            _: OnReply<raftkv::raft::AppendEntriesReply>,
        ) {
        }
        fn install_snapshot(
            &self,
            _: usize,
            _: raftkv::raft::InstallSnapshotArgs,
            _: OnReply<raftkv::raft::InstallSnapshotReply>,
        ) {
        }
        fn membership(&self) -> Option<&dyn MembershipHost> {
            self.host.as_deref().map(|h| h as &dyn MembershipHost)
        }
    }

    let dir = TempDir::new("membership-raft");
    let host = Arc::new(Host {
        saved: parking_lot::Mutex::new(None),
        initial: Configuration {
            members: vec![Member {
                peer: 0,
                voter: true,
                addr: String::new(),
                client_addr: String::new(),
            }],
        },
    });
    let start = |host: Option<Arc<Host>>| {
        let storage = raftkv::storage::FileLog::open(
            dir.path().join("raft"),
            raftkv::storage::FileLogOptions::default(),
        )
        .expect("open the log");
        let (tx, rx) = crossbeam::channel::unbounded();
        let raft = Raft::with_options(
            Box::new(Silent { host }) as Box<dyn RaftTransport>,
            0,
            Box::new(storage) as Box<dyn raftkv::raft::Storage>,
            tx,
            RaftOptions::default(),
        )
        .expect("start");
        (raft, rx)
    };
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + PATIENCE;
        while !f() {
            assert!(Instant::now() < deadline, "{what} within {PATIENCE:?}");
            thread::sleep(Duration::from_millis(10));
        }
    };
    let (raft, rx) = start(Some(host.clone()));
    wait("leader alone", &|| raft.get_state().1);
    // Its first entry records the founding configuration; committed alone.
    wait("the founding configuration committed", &|| {
        raft.membership()
            .is_some_and(|s| s.index > 0 && s.committed)
    });
    let learner = ConfChange::AddLearner {
        peer: 1,
        addr: "127.0.0.1:1".into(),
        client_addr: "127.0.0.1:2".into(),
    };
    let (added, _) = raft.change_membership(&learner).expect("add a learner");
    // A learner does not count: it commits with the leader alone.
    wait("the learner committed", &|| raft.progress().0 >= added);
    let (promoted, _) = raft
        .change_membership(&ConfChange::Promote { peer: 1 })
        .expect("promote");
    let s = raft.membership().expect("membership on");
    assert_eq!(s.index, promoted, "in effect once appended");
    assert!(!s.committed && s.config.is_voter(1));
    thread::sleep(Duration::from_millis(300));
    assert!(
        raft.progress().0 < promoted,
        "committed without the new voter"
    );
    assert_eq!(
        raft.change_membership(&ConfChange::Remove { peer: 1 }),
        Err(ChangeError::Pending { index: promoted })
    );
    // No configuration entry reached the apply channel undistinguished.
    while let Ok(msg) = rx.try_recv() {
        if let raftkv::raft::ApplyMsg::Command { command, .. } = msg {
            assert!(raftkv::raft::membership::is_config_entry(&command));
        }
    }
    raft.kill();
    drop(raft);
    // Restarted: the uncommitted configuration is read back from the log; peer 1 is a voter
    // it cannot reach, so it cannot win an election alone.
    let (raft, _rx) = start(Some(host.clone()));
    let s = raft.membership().expect("membership on");
    assert_eq!(s.index, promoted);
    assert!(s.config.is_voter(1));
    thread::sleep(Duration::from_secs(2));
    assert!(
        !raft.get_state().1,
        "elected without a majority of its configuration"
    );
    raft.kill();
    drop(raft);
    // Without a host: the labs' fixed peer set.
    let (raft, _rx) = start(None);
    assert!(raft.membership().is_none());
    assert_eq!(
        raft.change_membership(&ConfChange::Remove { peer: 1 }),
        Err(ChangeError::Disabled)
    );
    raft.kill();
}

/// A brand-new node added to a cluster whose log was compacted (about 12 MiB written with
/// 1 MiB values, past the 8 MiB snapshot threshold) gets the snapshot streamed in pieces
/// with the configuration as of it: it becomes a voter that knows every member, serves every
/// key, and after a restart (its configuration then read back from its membership file and
/// log) still does.
/// A brand-new node added to a cluster whose log was compacted (about 12 MiB written with
/// 1 MiB values, past the 8 MiB snapshot threshold) gets the snapshot streamed in pieces
/// with the configuration as of it: it becomes a voter that knows every member, serves every
/// key, and after a restart (its configuration then read back from its membership file and
/// log) still does.
#[test]
fn new_member_catches_up_from_a_snapshot_and_keeps_the_configuration() {
    let mut cluster = cluster("snapshot");
    let leader = cluster.leader();
    let value = "v".repeat(1 << 20);
    let mut acked = BTreeMap::new();
    for k in 0..12 {
        let key = format!("big{k}");
        let reply: String = cluster.retry(leader, "SET big", |c| {
            redis::cmd("SET").arg(&key).arg(&value).query(c)
        });
        assert_eq!(reply, "OK");
        acked.insert(key, value.clone());
    }
    cluster.write_keys(leader, "s", 50, &mut acked);
    // The leader has snapshotted: its file is there.
    let deadline = Instant::now() + PATIENCE;
    while !cluster.data(leader).join("raft").join("snapshot").exists() {
        assert!(
            Instant::now() < deadline,
            "node {} never snapshotted",
            leader + 1
        );
        thread::sleep(Duration::from_millis(100));
    }
    let new = 3;
    cluster.start(new);
    let (code, out, err) = cluster.member(&[leader], &strs(&add_args(&cluster, new)));
    assert_eq!(code, 0, "{out}{err}");
    cluster.wait_member_role(new, "voter");
    assert!(
        cluster.data(new).join("membership").exists(),
        "node 4 got no configuration with its snapshot"
    );
    cluster.check_keys(new, &acked);
    cluster.kill9(new);
    cluster.start(new);
    cluster.wait_member_role(new, "voter");
    // With a founding follower down, a majority of the four voters needs node 4.
    let down: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    cluster.kill9(down[0]);
    cluster.write_keys(new, "t", 10, &mut acked);
    cluster.check_keys(new, &acked);
    cluster.check_keys(leader, &acked);
}
