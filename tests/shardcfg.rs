//! Lab 5 shard configurations: the Go labs' `shardcfg_test.go` (`TestBasic`), and checks of
//! the rebalance the tests and the controller depend on.

use std::collections::BTreeMap;

use raftkv::shardkv::shardcfg::{CfgError, GID1, NSHARDS, ShardConfig, key2shard};
use raftkv::tester::Tgid;

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn check(cfg: &ShardConfig, groups: &[Tgid]) {
    if let Err(e) = cfg.check_config(groups) {
        panic!("{e}: {cfg}");
    }
}

#[test]
fn basic() {
    const GID2: Tgid = 2;
    let mut cfg = ShardConfig::new();
    check(&cfg, &[]);

    cfg.join_balance(&BTreeMap::from([(GID1, names(&["x", "y", "z"]))]))
        .unwrap();
    check(&cfg, &[GID1]);

    cfg.join_balance(&BTreeMap::from([(GID2, names(&["a", "b", "c"]))]))
        .unwrap();
    check(&cfg, &[GID1, GID2]);

    let sa1 = &cfg.groups[&GID1];
    assert_eq!(
        sa1,
        &names(&["x", "y", "z"]),
        "wrong servers for gid {GID1}"
    );
    let sa2 = &cfg.groups[&GID2];
    assert_eq!(
        sa2,
        &names(&["a", "b", "c"]),
        "wrong servers for gid {GID2}"
    );

    cfg.leave_balance(&[GID1]).unwrap();
    check(&cfg, &[GID2]);

    cfg.leave_balance(&[GID2]).unwrap();
    check(&cfg, &[]);
}

/// FNV-1a 32-bit known answers (the hash of "" is the offset basis, 2166136261 % 12 = 9).
#[test]
fn key2shard_is_fnv1a_mod_12() {
    assert_eq!(key2shard(""), (2_166_136_261u32 % 12) as usize);
    // FNV-1a("a") = 0xe40c292c.
    assert_eq!(key2shard("a"), (0xe40c_292cu32 % 12) as usize);
    // FNV-1a("foobar") = 0xbf9cf968.
    assert_eq!(key2shard("foobar"), (0xbf9c_f968u32 % 12) as usize);
    let mut seen = [false; NSHARDS];
    for i in 0..60 {
        seen[key2shard(&format!("k{i}"))] = true;
    }
    assert!(
        seen.iter().all(|&s| s),
        "60 keys should cover every shard: {seen:?}"
    );
}

/// The lab's rebalance, step by step: the second group takes the lowest-numbered shards.
#[test]
fn rebalance_known_answer() {
    let mut cfg = ShardConfig::new();
    cfg.join_balance(&BTreeMap::from([(1, names(&["a"]))]))
        .unwrap();
    assert_eq!(cfg.shards, [1; NSHARDS]);
    assert_eq!(cfg.num, 1);
    cfg.join_balance(&BTreeMap::from([(2, names(&["b"]))]))
        .unwrap();
    assert_eq!(cfg.shards, [2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1]);
    cfg.join_balance(&BTreeMap::from([(3, names(&["c"]))]))
        .unwrap();
    // Group 3 takes from the most loaded (ties: lowest gid) the lowest-numbered shard each time.
    assert_eq!(cfg.shards, [3, 3, 2, 2, 2, 2, 3, 3, 1, 1, 1, 1]);
    cfg.leave_balance(&[2]).unwrap();
    // Group 2's shards go, in order, to the least loaded (ties: lowest gid).
    assert_eq!(cfg.shards, [3, 3, 1, 3, 1, 3, 3, 3, 1, 1, 1, 1]);
    assert_eq!(cfg.num, 4);
}

/// Balanced within one shard and minimal moves after every join and leave of up to 13 groups.
#[test]
fn rebalance_balanced_minimal_deterministic() {
    let mut cfg = ShardConfig::new();
    let mut present: Vec<Tgid> = Vec::new();
    let mut ops: Vec<(bool, Tgid)> = (1..=13).map(|g| (true, g)).collect();
    ops.extend([(false, 3), (false, 1), (true, 20), (false, 13), (false, 2)]);
    ops.extend((4..=12).map(|g| (false, g)));
    ops.push((false, 20));
    for (join, gid) in ops {
        let before = cfg.clone();
        if join {
            cfg.join_balance(&BTreeMap::from([(gid, vec![format!("s{gid}")])]))
                .unwrap();
            present.push(gid);
        } else {
            cfg.leave_balance(&[gid]).unwrap();
            present.retain(|&g| g != gid);
        }
        check(&cfg, &present);
        // Deterministic: the same change from the same configuration gives the same result.
        let mut again = before.clone();
        if join {
            again
                .join_balance(&BTreeMap::from([(gid, vec![format!("s{gid}")])]))
                .unwrap();
        } else {
            again.leave_balance(&[gid]).unwrap();
        }
        assert_eq!(again, cfg);
        // Minimal: a join moves only what the new group needs (at most ceil(12/n) shards);
        // a leave moves only the leaving group's shards.
        let moved = (0..NSHARDS)
            .filter(|&s| before.shards[s] != cfg.shards[s])
            .count();
        let n = present.len().max(1);
        if join && before.groups.is_empty() {
            assert_eq!(moved, NSHARDS);
        } else if join {
            assert!(
                moved <= NSHARDS.div_ceil(n),
                "join of {gid} moved {moved} shards"
            );
            assert!(
                (0..NSHARDS).all(|s| before.shards[s] == cfg.shards[s] || cfg.shards[s] == gid)
            );
        } else {
            let owned = before.shards.iter().filter(|&&g| g == gid).count();
            assert_eq!(
                moved, owned,
                "leave of {gid} moved {moved} shards, owned {owned}"
            );
        }
    }
    assert_eq!(cfg.shards, [0; NSHARDS]);
}

#[test]
fn string_form_round_trips_and_rejects_garbage() {
    let mut cfg = ShardConfig::new();
    cfg.join_balance(&BTreeMap::from([(GID1, names(&["x", "y"]))]))
        .unwrap();
    let s = cfg.to_string();
    assert!(s.starts_with("{\"Num\":1,\"Shards\":[1,1,"), "{s}");
    assert!(s.ends_with("\"Groups\":{\"1\":[\"x\",\"y\"]}}"), "{s}");
    assert_eq!(ShardConfig::from_string(&s).unwrap(), cfg);
    assert!(matches!(
        ShardConfig::from_string("{\"Num\":1"),
        Err(CfgError::Parse(_))
    ));
    assert!(matches!(
        ShardConfig::from_string("{\"Num\":1,\"Shards\":[1],\"Groups\":{}}"),
        Err(CfgError::Parse(_))
    ));
}

#[test]
fn join_and_leave_refuse_bad_changes() {
    let mut cfg = ShardConfig::new();
    cfg.join_balance(&BTreeMap::from([(1, names(&["a", "b"]))]))
        .unwrap();
    let before = cfg.clone();
    assert_eq!(
        cfg.join_balance(&BTreeMap::from([(1, names(&["c"]))])),
        Err(CfgError::ReJoin(1))
    );
    assert!(matches!(
        cfg.join_balance(&BTreeMap::from([(2, names(&["b"]))])),
        Err(CfgError::ServerInTwoGroups {
            gid: 2,
            other: 1,
            ..
        })
    ));
    assert_eq!(cfg.join(&BTreeMap::new()), Err(CfgError::NoChange));
    assert_eq!(cfg.leave_balance(&[7]), Err(CfgError::NotPresent(7)));
    assert_eq!(cfg, before, "a refused change must change nothing");
}
