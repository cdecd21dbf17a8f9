//! The shard-move rules (Lab 5), each reproduced as one exact schedule on the network's
//! script: a group refuses a move tagged with an older configuration number (delivered late
//! and duplicated), a frozen shard takes no Put, an Install of a shard already owned changes
//! nothing, and configurations advance one at a time when two controllers race. Each test's
//! broken variant is in `scripts/rule-variants/` (`scripts/rule-variants.sh shard_rules`).

use std::collections::{BTreeMap, BTreeSet};
use std::thread;
use std::time::{Duration, Instant};

use raftkv::kvapi::{GetArgs, KvErr, KvTransport, PutArgs};
use raftkv::labrpc::script::{Held, Rule};
use raftkv::shardkv::shardcfg::{ShardConfig, key2shard};
use raftkv::shardkv::shardctrler::{CURRENT_KEY, NEXT_KEY};
use raftkv::shardkv::shardgrp::rpc::{DeleteShardArgs, FreezeShardArgs, InstallShardArgs};
use raftkv::shardkv::{Change, ShardTransport};
use raftkv::tester::shardkv::{NSRV, ShardKvTest, make_test};
use raftkv::tester::{Clnt, GRP0, Tgid, server_name};

const SECOND: Duration = Duration::from_secs(1);
const NSHARDS: usize = 12;

/// One key in each shard, `k<i>`, in shard order.
fn key_per_shard() -> Vec<String> {
    let mut keys = vec![String::new(); NSHARDS];
    let mut found = 0;
    for i in 0.. {
        let k = format!("k{i}");
        let s = key2shard(&k);
        if keys[s].is_empty() {
            keys[s] = k;
            found += 1;
            if found == NSHARDS {
                break;
            }
        }
    }
    keys
}

/// Puts `value` at `version` under every key through a shardkv clerk.
fn put_all(t: &ShardKvTest, keys: &[String], value: &str, version: u64) {
    let ck = t.make_clerk();
    for k in keys {
        let err = ck.ck.put(k, &format!("{value}-{k}"), version);
        if err != KvErr::Ok {
            t.fatal(&format!("Put {k} at version {version}: {err:?}"));
        }
    }
}

/// Every key holds `value` at `version`.
fn check_all(t: &ShardKvTest, keys: &[String], value: &str, version: u64) {
    let ck = t.make_clerk();
    for k in keys {
        let (v, ver, err) = ck.ck.get(k);
        if (err, v.as_str(), ver) != (KvErr::Ok, format!("{value}-{k}").as_str(), version) {
            t.fatal(&format!(
                "Get {k} (shard {}): {err:?} {v:?} at version {ver}; want {value}-{k} at \
                 version {version}",
                key2shard(k)
            ));
        }
    }
}

fn leader(t: &ShardKvTest, gid: Tgid) -> String {
    let t0 = Instant::now();
    loop {
        if let Some(i) = t.leader(gid) {
            return server_name(gid, i);
        }
        if t0.elapsed() > 10 * SECOND {
            t.fatal(&format!("group {gid} has no leader"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The group a server name belongs to (`server-<gid>-<i>`).
fn gid_of(server: &str) -> Tgid {
    server
        .split('-')
        .nth(1)
        .and_then(|g| g.parse().ok())
        .expect("a server name")
}

/// Sends a held shard move again, to every server of its group; returns the answers (a
/// server that does not lead says `ErrWrongLeader`).
fn resend(clnt: &Clnt, h: &Held) -> Vec<(String, KvErr)> {
    let gid = gid_of(&h.to);
    (0..NSRV)
        .map(|i| {
            let srv = server_name(gid, i);
            let err = match h.method.as_str() {
                "KVServer.FreezeShard" => clnt
                    .freeze_shard(&srv, &h.decode::<FreezeShardArgs>().expect("freeze"))
                    .map(|r| r.err),
                "KVServer.InstallShard" => clnt
                    .install_shard(&srv, &h.decode::<InstallShardArgs>().expect("install"))
                    .map(|r| r.err),
                "KVServer.DeleteShard" => clnt
                    .delete_shard(&srv, &h.decode::<DeleteShardArgs>().expect("delete"))
                    .map(|r| r.err),
                other => panic!("not a shard move: {other}"),
            };
            (srv, err.unwrap_or(KvErr::WrongLeader))
        })
        .collect()
}

/// Keeps a late copy of every shard move of configuration `num`.
fn copy_moves_of(t: &ShardKvTest, num: u64) {
    let s = t.cfg().net().script();
    s.add(
        Rule::request("KVServer.FreezeShard")
            .when("of the configuration", move |a: &FreezeShardArgs| {
                a.num == num
            })
            .duplicate_later(),
    );
    s.add(
        Rule::request("KVServer.InstallShard")
            .when("of the configuration", move |a: &InstallShardArgs| {
                a.num == num
            })
            .duplicate_later(),
    );
    s.add(
        Rule::request("KVServer.DeleteShard")
            .when("of the configuration", move |a: &DeleteShardArgs| {
                a.num == num
            })
            .duplicate_later(),
    );
}

#[test]
fn group_refuses_shard_moves_of_an_older_configuration_late_and_duplicated() {
    let t = make_test(
        "Rule shards: Freeze, Install and Delete of an older configuration are refused (late, duplicated)",
        true,
    );
    let gid1 = t.setup_kv_service();
    let sck = t.shard_ctrler();
    let keys = key_per_shard();
    put_all(&t, &keys, "a", 0);
    // Configuration 2: group 2 joins; the network keeps a copy of every move.
    copy_moves_of(&t, 2);
    let gid2 = t.new_gid();
    if !t.join_groups(&sck, &[gid2]) {
        t.fatal("group 2 did not join");
    }
    put_all(&t, &keys, "b", 1);
    // Configuration 3: group 2 leaves; its shards move back, tagged 3.
    t.cfg().net().script().clear_rules();
    t.leave(&sck, gid2);
    assert_eq!(t.query(&sck).map(|c| c.num), Some(3));
    put_all(&t, &keys, "c", 2);
    // The copies of configuration 2's moves arrive now, after 3's; then once more each.
    let s = t.cfg().net().script();
    let copies = s.held();
    if copies.is_empty() {
        t.fatal("no shard move of configuration 2 was copied");
    }
    for h in &copies {
        s.release(h.id);
    }
    let clnt = t.cfg().clnts().make_client();
    for h in &copies {
        let answers = resend(&clnt, h);
        if answers.iter().any(|(_, e)| *e == KvErr::Ok)
            || !answers.iter().any(|(_, e)| *e == KvErr::Version)
        {
            t.fatal(&format!(
                "{} of configuration 2 (to group {}), late after configuration 3: answers \
                 {answers:?}; the leader must refuse it with ErrVersion",
                h.method,
                gid_of(&h.to)
            ));
        }
    }
    let _ = gid1;
    check_all(&t, &keys, "c", 3);
    t.end();
}

#[test]
fn frozen_shard_takes_no_put() {
    let t = make_test("Rule shards: a frozen shard takes no Put", true);
    let gid1 = t.setup_kv_service();
    let sck = t.shard_ctrler();
    let keys = key_per_shard();
    put_all(&t, &keys, "a", 0);
    // Every Install is held: the first moved shard stays frozen at group 1.
    let s = t.cfg().net().script();
    let hold = s.add(Rule::request("KVServer.InstallShard").hold());
    let gid2 = t.new_gid();
    t.cfg().make_group_start(gid2, NSRV, t.start_fn());
    let joiner = {
        let (t, sck) = (t.clone(), sck.clone());
        let srvs = t.cfg().group(gid2).srv_names();
        thread::Builder::new()
            .name("join".to_string())
            .spawn(move || t.join(&sck, gid2, srvs))
            .expect("a thread")
    };
    let held = match s.wait_held(1, 10 * SECOND) {
        Some(h) => h,
        None => t.fatal("no InstallShard was sent"),
    };
    let shard = held[0]
        .decode::<InstallShardArgs>()
        .expect("an InstallShard")
        .shard;
    let key = keys[shard].clone();
    // Group 1 froze the shard: it answers neither Put nor Get for it.
    let clnt = t.cfg().clnts().make_client();
    let srv = leader(&t, gid1);
    let put = clnt.put(
        &srv,
        &PutArgs {
            key: key.clone(),
            value: "frozen".to_string(),
            version: 1,
        },
    );
    let get = clnt.get(&srv, &GetArgs { key: key.clone() });
    let put_err = put.map(|r| r.err).unwrap_or(KvErr::WrongLeader);
    let get_err = get.map(|r| r.err).unwrap_or(KvErr::WrongLeader);
    s.remove(hold);
    for h in s.held() {
        s.release(h.id);
    }
    raftkv::tester::join_helper(joiner);
    if put_err != KvErr::WrongGroup || get_err != KvErr::WrongGroup {
        t.fatal(&format!(
            "group 1 answered {put_err:?} to a Put and {get_err:?} to a Get of {key} (shard \
             {shard}) while it was frozen for configuration 2: want ErrWrongGroup"
        ));
    }
    check_all(&t, &keys, "a", 1);
    t.end();
}

#[test]
fn install_of_shard_already_owned_changes_nothing() {
    let t = make_test(
        "Rule shards: a repeated Install of a shard the group owns changes nothing",
        true,
    );
    t.setup_kv_service();
    let sck = t.shard_ctrler();
    let keys = key_per_shard();
    put_all(&t, &keys, "a", 0);
    copy_moves_of(&t, 2);
    let gid2 = t.new_gid();
    if !t.join_groups(&sck, &[gid2]) {
        t.fatal("group 2 did not join");
    }
    let s = t.cfg().net().script();
    s.clear_rules();
    // Group 2 serves its shards and takes Puts.
    put_all(&t, &keys, "b", 1);
    // The copies of configuration 2's Installs arrive now, and once more each.
    let installs: Vec<Held> = s
        .held()
        .into_iter()
        .filter(|h| h.method == "KVServer.InstallShard")
        .collect();
    if installs.is_empty() {
        t.fatal("no InstallShard was copied");
    }
    for h in &installs {
        s.release(h.id);
    }
    let clnt = t.cfg().clnts().make_client();
    for h in &installs {
        let answers = resend(&clnt, h);
        if !answers.iter().any(|(_, e)| *e == KvErr::Ok) {
            t.fatal(&format!(
                "a repeated InstallShard was not acknowledged: {answers:?}"
            ));
        }
    }
    check_all(&t, &keys, "b", 2);
    t.end();
}

#[test]
fn configurations_advance_one_at_a_time_when_two_controllers_race() {
    let t = make_test(
        "Rule shards: two racing controllers make exactly one configuration 2",
        true,
    );
    let gid1 = t.setup_kv_service();
    let keys = key_per_shard();
    put_all(&t, &keys, "a", 0);
    let (gid2, gid3) = (t.new_gid(), t.new_gid());
    for gid in [gid2, gid3] {
        t.cfg().make_group_start(gid, NSRV, t.start_fn());
    }
    let (a, b) = (t.make_shard_ctrler(), t.make_shard_ctrler());
    let cur = t.query(&a).expect("configuration 1");
    let mut cfg_a = cur.clone();
    cfg_a
        .join_balance(&BTreeMap::from([(gid2, t.cfg().group(gid2).srv_names())]))
        .expect("join 2");
    let mut cfg_b = cur.clone();
    cfg_b
        .join_balance(&BTreeMap::from([(gid3, t.cfg().group(gid3).srv_names())]))
        .expect("join 3");
    // A's write of `next` is held in the network while B makes its change.
    let s = t.cfg().net().script();
    let hold = s.add(
        Rule::request("KVServer.Put")
            .to(&server_name(GRP0, 0))
            .when("A's next configuration", move |p: &PutArgs| {
                p.key == NEXT_KEY
                    && ShardConfig::from_string(&p.value).is_ok_and(|c| c.is_member(gid2))
            })
            .first(1)
            .hold(),
    );
    let racer = {
        let (a, cfg_a) = (a.clone(), cfg_a.clone());
        thread::Builder::new()
            .name("ctrler-a".to_string())
            .spawn(move || a.change_config_to(&cfg_a))
            .expect("a thread")
    };
    let held = match s.wait_held(1, 10 * SECOND) {
        Some(h) => h,
        None => t.fatal("controller A did not write next"),
    };
    let done_b = b.change_config_to(&cfg_b);
    assert!(matches!(done_b, Ok(Change::Done)), "B: {done_b:?}");
    s.remove(hold);
    s.release(held[0].id);
    let done_a = raftkv::tester::join_helper(racer);
    // Exactly one configuration 2, B's, current and next alike.
    let clnt = t.cfg().clnts().make_client();
    let stored = |key: &str| -> ShardConfig {
        let r = clnt
            .get(
                &server_name(GRP0, 0),
                &GetArgs {
                    key: key.to_string(),
                },
            )
            .expect("the configuration store answers");
        ShardConfig::from_string(&r.value).expect("a configuration")
    };
    let (current, next) = (stored(CURRENT_KEY), stored(NEXT_KEY));
    if !matches!(done_a, Ok(Change::Superseded)) || current != cfg_b || next != cfg_b {
        t.fatal(&format!(
            "after A (joining {gid2}) and B (joining {gid3}) raced from configuration 1: A \
             {done_a:?}; current {current}; next {next}; want B's configuration 2 as both"
        ));
    }
    let groups: BTreeSet<Tgid> = (0..NSHARDS)
        .filter_map(|sh| current.gid_servers(sh).map(|(g, _)| g))
        .collect();
    assert_eq!(groups, BTreeSet::from([gid1, gid3]));
    check_all(&t, &keys, "a", 1);
    t.end();
}
