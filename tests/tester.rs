//! The Go labs' `tester1/tester_test.go`, ported, plus the group semantics the later labs rely
//! on: partitions, `disconnect_all`, and the persister's copy-on-crash.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use raftkv::kvapi::{GetArgs, GetReply, KvErr};
use raftkv::labrpc::{ClientEnd, RpcError, Service};
use raftkv::tester::{Config, GRP0, IService, Persister, StartFn, Tgid};

/// The Go test's `Server`: `Get` returns how many Gets it has served as the version.
#[derive(Default)]
struct TestServer {
    count: Mutex<u64>,
    killed: AtomicBool,
}

impl IService for TestServer {
    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
    }

    fn rpc_service(self: Arc<Self>) -> Option<Service> {
        Some(Service::new("Server").method("Get", move |_args: GetArgs| {
            let mut count = self.count.lock();
            *count += 1;
            GetReply {
                value: String::new(),
                version: *count,
                err: KvErr::Ok,
            }
        }))
    }
}

/// Records the servers a test's `StartFn` made, so the test can look inside them.
#[derive(Default)]
struct Started {
    servers: Mutex<Vec<Arc<TestServer>>>,
}

fn test_server_start(started: &Arc<Started>) -> StartFn {
    let started = started.clone();
    Arc::new(
        move |_ends: Vec<ClientEnd>, _gid: Tgid, _srv: usize, _p: Persister| {
            let s = Arc::new(TestServer::default());
            started.servers.lock().push(s.clone());
            vec![s as Arc<dyn IService>]
        },
    )
}

fn get(cfg: &Config, clnt: &raftkv::tester::Clnt) -> Result<GetReply, RpcError> {
    let args = GetArgs {
        key: "k".to_string(),
    };
    let r = clnt.call("server-0-0", "Server.Get", &args);
    cfg.op();
    r
}

#[test]
fn basic() {
    let started = Arc::new(Started::default());
    let cfg = Config::new(1, true, test_server_start(&started));
    cfg.begin("Test: basic tester");
    let clnt = cfg.clnts().make_client();
    for want in 1..=3 {
        let reply = get(&cfg, &clnt).expect("Server.Get failed");
        let count = *started.servers.lock()[0].count.lock();
        assert_eq!(reply.version, count, "version is not the server's counter");
        assert_eq!(reply.version, want);
    }
    cfg.end();
}

#[test]
fn shutdown_server() {
    let started = Arc::new(Started::default());
    let cfg = Config::new(1, true, test_server_start(&started));
    cfg.begin("Test: shutdown server");
    let clnt = cfg.clnts().make_client();
    get(&cfg, &clnt).expect("Server.Get before shutdown failed");

    cfg.group(GRP0).shutdown();
    let server = started.servers.lock()[0].clone();
    assert!(
        server.killed.load(Ordering::SeqCst),
        "shutdown did not kill the service"
    );
    assert!(cfg.group(GRP0).services(0).is_empty());
    let r = get(&cfg, &clnt);
    assert_eq!(r, Err(RpcError::NoReply), "RPC to a shut-down server");
    cfg.end();
}

/// Peer `srv` answers `Echo.Echo(x)` with `(srv, x)`; the test keeps the ends each peer got.
#[derive(Default)]
struct EchoPeers {
    ends: Mutex<HashMap<usize, Vec<ClientEnd>>>,
    persisters: Mutex<HashMap<usize, Persister>>,
}

struct Echo {
    srv: usize,
}

impl IService for Echo {
    fn kill(&self) {}

    fn rpc_service(self: Arc<Self>) -> Option<Service> {
        Some(Service::new("Echo").method("Echo", move |x: u64| (self.srv, x)))
    }
}

fn echo_config(n: usize) -> (Arc<Config>, Arc<EchoPeers>) {
    let peers = Arc::new(EchoPeers::default());
    let p = peers.clone();
    let start: StartFn = Arc::new(move |ends: Vec<ClientEnd>, _gid, srv, persister| {
        p.ends.lock().insert(srv, ends);
        p.persisters.lock().insert(srv, persister);
        vec![Arc::new(Echo { srv }) as Arc<dyn IService>]
    });
    (Config::new(n, true, start), peers)
}

impl EchoPeers {
    /// Whether peer `from` reaches peer `to` through the end `from` was started with.
    fn reaches(&self, from: usize, to: usize) -> bool {
        let end = self.ends.lock()[&from][to].clone();
        match end.call::<_, (usize, u64)>("Echo.Echo", &7u64) {
            Ok(reply) => {
                assert_eq!(reply, (to, 7), "end {from}->{to} reached the wrong server");
                true
            }
            Err(RpcError::NoReply) => false,
            Err(e) => panic!("{from}->{to}: {e}"),
        }
    }
}

#[test]
fn all_peers_connected_after_start() {
    let (cfg, peers) = echo_config(3);
    for i in 0..3 {
        for j in 0..3 {
            assert!(peers.reaches(i, j), "{i} cannot reach {j}");
        }
    }
    assert_eq!(cfg.group(GRP0).get_connected(), vec![true; 3]);
}

#[test]
fn make_partition_3_and_5() {
    let (cfg, _) = echo_config(3);
    let g = cfg.group(GRP0);
    for leader in 0..3 {
        let (p1, p2) = g.make_partition(leader);
        let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        assert_eq!(p1, others, "n=3, leader {leader}: majority");
        assert_eq!(p2, vec![leader], "n=3, leader {leader}: minority");
    }
    let (cfg, _) = echo_config(5);
    let g = cfg.group(GRP0);
    assert_eq!(g.make_partition(0), (vec![1, 2, 3], vec![4, 0]));
    assert_eq!(g.make_partition(2), (vec![0, 1, 3], vec![4, 2]));
    assert_eq!(g.make_partition(4), (vec![0, 1, 2], vec![3, 4]));
}

#[test]
fn partition_cuts_between_halves_only() {
    let (cfg, peers) = echo_config(5);
    let g = cfg.group(GRP0);
    let (p1, p2) = g.make_partition(2);
    g.partition(&p1, &p2);
    assert_eq!(
        g.get_connected(),
        vec![true; 5],
        "every server marked connected"
    );
    for i in 0..5 {
        for j in 0..5 {
            let same_side = p1.contains(&i) == p1.contains(&j);
            assert_eq!(
                peers.reaches(i, j),
                same_side,
                "{i}->{j} with partition {p1:?} | {p2:?}"
            );
        }
    }
    g.connect_all();
    for i in 0..5 {
        for j in 0..5 {
            assert!(peers.reaches(i, j), "{i}->{j} after connect_all");
        }
    }
}

#[test]
fn disconnect_all_cuts_peers_not_clients() {
    let (cfg, peers) = echo_config(3);
    let g = cfg.group(GRP0);
    g.disconnect_all(1);
    assert_eq!(g.get_connected(), vec![true, false, true]);

    // A client's own ends are not the peers' ends: it still reaches server 1.
    let clnt = cfg.clnts().make_client();
    let reply: (usize, u64) = clnt.call(&g.srv_name(1), "Echo.Echo", &3u64).unwrap();
    assert_eq!(reply, (1, 3));

    for i in 0..3 {
        for j in 0..3 {
            let cut = i == 1 || j == 1;
            assert_eq!(peers.reaches(i, j), !cut, "{i}->{j} with 1 disconnected");
        }
    }

    g.connect_one(1);
    for i in 0..3 {
        assert!(
            peers.reaches(i, 1) && peers.reaches(1, i),
            "{i}<->1 reconnected"
        );
    }
}

#[test]
fn persister_copy_on_crash() {
    let (cfg, peers) = echo_config(1);
    let g = cfg.group(GRP0);
    let old = peers.persisters.lock()[&0].clone();
    old.save(b"state-1".to_vec(), Some(b"snap-1".to_vec()));
    assert_eq!(g.log_size(), 7);
    assert_eq!(g.snapshot_size(), 6);

    g.shutdown_server(0);
    // The killed instance keeps writing to its own persister: lost.
    old.save(b"state-2-lost".to_vec(), None);
    assert_eq!(g.persister(0).read_raft_state(), b"state-1");

    g.start_server(0);
    g.connect_one(0);
    let new = peers.persisters.lock()[&0].clone();
    assert_eq!(
        new.read_raft_state(),
        b"state-1",
        "restart sees the last saved state"
    );
    assert_eq!(new.read_snapshot(), b"snap-1");

    // The restarted instance's writes are what the group sees; the old object is separate.
    new.save_raft_state(b"state-3".to_vec());
    assert_eq!(g.persister(0).read_raft_state(), b"state-3");
    assert_eq!(g.persister(0).read_snapshot(), b"snap-1");
    assert_eq!(old.read_raft_state(), b"state-2-lost");

    // The restarted server answers on fresh ends.
    assert!(peers.reaches(0, 0));
}

/// A failed check in a helper thread fails the test that joins it, with the same message.
#[test]
fn join_helper_fails_with_the_helpers_message() {
    let h = std::thread::spawn(|| -> () { panic!("check failed in a helper: {}", 42) });
    let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        raftkv::tester::join_helper(h)
    }))
    .expect_err("join_helper returned although its thread panicked");
    assert_eq!(
        raftkv::tester::panic_message(&*e),
        "check failed in a helper: 42"
    );
}

/// The persister adapter keeps the log's entries encoded as they arrive; what it saves must be
/// byte for byte the labs' format of the whole state, through appends, truncations,
/// compactions, snapshot resets and hard-state changes. Saved states share the encoded
/// entries: a crash copy taken at any step must keep reading what was saved then, whatever
/// the storage does afterwards.
#[test]
fn persister_storage_saves_exactly_the_labs_format() {
    use raftkv::raft::log::{Entry, Log};
    use raftkv::raft::persist::encode_lab_state;
    use raftkv::raft::{HardState, Storage};
    use raftkv::tester::PersisterStorage;
    use rand::{Rng, SeedableRng};

    let mut rng = rand::rngs::SmallRng::seed_from_u64(5840);
    let persister = Persister::new();
    let storage = PersisterStorage::new(persister.clone());
    storage.restore().expect("an empty persister restores");
    let mut model = Log::default();
    let mut hs = HardState::default();
    let mut copies = Vec::new();
    for step in 0..12_000 {
        match rng.gen_range(0..10) {
            0..=4 => {
                let n = rng.gen_range(1..5);
                let entries: Vec<Entry> = (0..n)
                    .map(|_| Entry {
                        term: hs.term,
                        command: vec![rng.r#gen(); rng.gen_range(0..300)],
                    })
                    .collect();
                storage
                    .append(model.last_index() + 1, &entries)
                    .expect("append");
                for e in entries {
                    model.append(e);
                }
            }
            5 if model.last_index() > model.base_index() => {
                let index = rng.gen_range(model.base_index()..=model.last_index());
                storage.truncate_after(index).expect("truncate");
                model.truncate_after(index);
            }
            6 if model.last_index() > model.base_index() => {
                let index = rng.gen_range(model.base_index() + 1..=model.last_index());
                let term = model.term_at(index).unwrap();
                storage
                    .save_snapshot(index, term, b"snap")
                    .expect("snapshot");
                model.compact_to(index);
            }
            7 => {
                let index = model.last_index() + rng.gen_range(1..20);
                storage
                    .save_snapshot(index, hs.term, b"ahead")
                    .expect("snapshot");
                model.reset_to(index, hs.term);
            }
            _ => {
                hs.term += 1;
                hs.voted_for = rng.gen_bool(0.5).then(|| rng.gen_range(0..5));
                storage.set_hard_state(hs).expect("hard state");
            }
        }
        storage.sync().expect("sync");
        let want = encode_lab_state(hs, &model).unwrap();
        assert_eq!(
            persister.read_raft_state(),
            want,
            "saved state differs from the labs' format after step {step}"
        );
        assert_eq!(
            persister.raft_state_size(),
            want.len(),
            "size after step {step}"
        );
        if step % 97 == 0 {
            copies.push((step, persister.copy(), want));
        }
    }
    for (step, copy, want) in copies {
        assert_eq!(
            copy.raft_state_size(),
            want.len(),
            "copy of step {step}: size"
        );
        assert_eq!(copy.read_raft_state(), want, "copy of step {step} changed");
    }
}

/// A long run of appends and compactions (the store the adapter keeps its encoded entries in
/// is replaced as the compacted prefix grows): every save, and every crash copy, still reads
/// the labs' format.
#[test]
fn persister_storage_long_log_with_compactions() {
    use raftkv::raft::log::{Entry, Log};
    use raftkv::raft::persist::encode_lab_state;
    use raftkv::raft::{HardState, Storage};
    use raftkv::tester::PersisterStorage;

    let persister = Persister::new();
    let storage = PersisterStorage::new(persister.clone());
    storage.restore().expect("an empty persister restores");
    let mut model = Log::default();
    let hs = HardState {
        term: 3,
        voted_for: Some(1),
    };
    storage.set_hard_state(hs).expect("hard state");
    let mut copies = Vec::new();
    for i in 1..=20_000u64 {
        let e = Entry {
            term: 3,
            command: i.to_le_bytes()[..(i % 8) as usize].to_vec(),
        };
        storage.append(i, std::slice::from_ref(&e)).expect("append");
        model.append(e);
        if i % 10 == 0 {
            storage.save_snapshot(i - 5, 3, b"snap").expect("snapshot");
            model.compact_to(i - 5);
        }
        storage.sync().expect("sync");
        if i % 1000 == 0 {
            let want = encode_lab_state(hs, &model).unwrap();
            assert_eq!(persister.read_raft_state(), want, "after entry {i}");
            copies.push((i, persister.copy(), want));
        }
    }
    // A restarted peer on a copy appends after truncating: the other copies are untouched.
    let (_, last_copy, _) = copies.last().unwrap();
    let restarted = PersisterStorage::new(last_copy.clone());
    let r = restarted.restore().expect("restore");
    restarted
        .truncate_after(r.log.last_index() - 2)
        .expect("truncate");
    restarted
        .append(
            r.log.last_index() - 1,
            &[Entry {
                term: 4,
                command: b"new".to_vec(),
            }],
        )
        .expect("append");
    restarted.sync().expect("sync");
    for (i, copy, want) in copies.iter().take(copies.len() - 1) {
        assert_eq!(
            copy.read_raft_state(),
            *want,
            "copy after entry {i} changed"
        );
    }
}
