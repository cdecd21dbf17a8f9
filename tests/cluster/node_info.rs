//! What a node says about itself over the client port (`INFO raft`), on a real cluster: every
//! node, follower or leader, names the same leader and every member's peer address.

use crate::kit;

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use kit::{Cluster, PATIENCE};

/// `INFO raft` of node `i`, as field → value.
fn info_raft(cluster: &Cluster, i: usize) -> BTreeMap<String, String> {
    let text: String = cluster.retry(i, "INFO raft", |c| redis::cmd("INFO").arg("raft").query(c));
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn info_raft_names_the_leader_and_every_members_address_on_every_node() {
    let cluster = Cluster::start_new("info-raft", 3);
    let leader = cluster.leader();
    // A write commits in the leader's term, so every node has heard from it.
    cluster.set(leader, "k", "v");
    let expected_members: Vec<String> = (0..3)
        .map(|i| format!("{}={}", i + 1, cluster.peer_addr(i)))
        .collect();
    let deadline = Instant::now() + PATIENCE;
    for i in 0..3 {
        loop {
            let info = info_raft(&cluster, i);
            let role = if i == leader { "leader" } else { "follower" };
            let settled = info.get("role").map(String::as_str) == Some(role)
                && info.get("leader") == Some(&(leader + 1).to_string());
            if settled {
                assert_eq!(info["node_id"], (i + 1).to_string());
                assert_eq!(
                    info["members"],
                    expected_members.join(","),
                    "node {}'s members",
                    i + 1
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} (expected {role}, leader {}) says {info:?}",
                i + 1,
                leader + 1
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}
