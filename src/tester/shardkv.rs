//! The tester's side of Lab 5, in the shape of the Go labs' `shardkv1/test.go`: group 0 is
//! one Lab 2 KV server holding the configurations; shard groups of [`NSRV`] replicas are
//! started, joined, left, shut down and restarted; controllers are made, cut off and
//! replaced; clerks record their Gets and Puts for the linearizability check.
//!
//! Every controller the harness makes is killed at cleanup, which ends the requests of the
//! clerks routing through it; the threads a test leaves running (the Gets of
//! [`ShardKvTest::check_shutdown_sharding`]) are joined then.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam::channel::{self, RecvTimeoutError};
use parking_lot::Mutex;
use rand::Rng;

use crate::kvapi::KvClerk;
use crate::kvapi::{CallError, GetArgs, PutArgs};
use crate::labrpc::{ClientEnd, IService, Service};
use crate::rsm::RsmError;
use crate::shardkv::shardcfg::{GID1, ShardConfig};
use crate::shardkv::shardgrp::ShardGrpServer;
use crate::shardkv::shardgrp::rpc::{
    DeleteShardArgs, DeleteShardReply, FreezeShardArgs, FreezeShardReply, InstallShardArgs,
    InstallShardReply,
};
use crate::shardkv::{Clerk, CtrlerError, ShardCtrler, ShardGrpService, ShardTransport};
use crate::tester::kvtest::{ClerkFactory, KvTest, TestClerk};
use crate::tester::{
    Clnt, Config, GRP0, Persister, RaftSvc, StartFn, Tgid, call_error, server_name,
};

/// Group 0: the Lab 2 server the controller keeps configurations in.
pub const CONTROLER: Tgid = 0;
/// Servers per shard group.
pub const NSRV: usize = 3;
/// Time between group changes.
pub const INTERGRPDELAY: Duration = Duration::from_millis(200);

// ------------------------------------------------------------ labrpc adapters

/// A shard-group replica's receiving side on labrpc: the `KVServer` service with `Get`, `Put`,
/// `FreezeShard`, `InstallShard` and `DeleteShard`.
pub fn shard_grp_service(svc: Arc<dyn ShardGrpService>) -> Service {
    let (g, p, f, i) = (svc.clone(), svc.clone(), svc.clone(), svc.clone());
    Service::new("KVServer")
        .method("Get", move |a: GetArgs| g.get(a))
        .method("Put", move |a: PutArgs| p.put(a))
        .method("FreezeShard", move |a: FreezeShardArgs| f.freeze_shard(a))
        .method("InstallShard", move |a: InstallShardArgs| {
            i.install_shard(a)
        })
        .method("DeleteShard", move |a: DeleteShardArgs| svc.delete_shard(a))
}

/// A shard-group replica as a tester service: killing it kills its Raft peer and rsm reader.
pub struct ShardGrpSvc(pub Arc<ShardGrpServer>);

impl IService for ShardGrpSvc {
    fn kill(&self) {
        self.0.kill();
    }

    fn rpc_service(self: Arc<Self>) -> Option<Service> {
        Some(shard_grp_service(self.0.clone()))
    }
}

/// The clerks' and controllers' sending side on labrpc: a test client, with the ends the
/// tests cut off. (`Get`/`Put` are `KvTransport for Clnt`.)
impl ShardTransport for Clnt {
    fn freeze_shard(
        &self,
        server: &str,
        args: &FreezeShardArgs,
    ) -> Result<FreezeShardReply, CallError> {
        self.call(server, "KVServer.FreezeShard", args)
            .map_err(|e| call_error(server, e))
    }

    fn install_shard(
        &self,
        server: &str,
        args: &InstallShardArgs,
    ) -> Result<InstallShardReply, CallError> {
        self.call(server, "KVServer.InstallShard", args)
            .map_err(|e| call_error(server, e))
    }

    fn delete_shard(
        &self,
        server: &str,
        args: &DeleteShardArgs,
    ) -> Result<DeleteShardReply, CallError> {
        self.call(server, "KVServer.DeleteShard", args)
            .map_err(|e| call_error(server, e))
    }
}

/// A started replica: the server, and what the tester runs and kills for it.
pub type StartedShardGrpServer = (Arc<ShardGrpServer>, Vec<Arc<dyn IService>>);

/// Starts replica `me` of shard group `gid` on the tester's network: the server and its Raft
/// peer, in that kill order. `maxraftstate`: snapshot when the persisted Raft state reaches
/// it; `None` never. An error if the persisted snapshot cannot be restored.
pub fn start_server_shard_grp(
    ends: Vec<ClientEnd>,
    gid: Tgid,
    me: usize,
    persister: Persister,
    maxraftstate: Option<usize>,
) -> Result<StartedShardGrpServer, RsmError> {
    let srv = ShardGrpServer::new(ends, gid, me, persister, maxraftstate)?;
    let raft = srv.rsm().raft();
    let services: Vec<Arc<dyn IService>> =
        vec![Arc::new(ShardGrpSvc(srv.clone())), Arc::new(RaftSvc(raft))];
    Ok((srv, services))
}

// ------------------------------------------------------------ the test setup

/// The live replicas of every shard group, to find a group's leader.
type Replicas = Arc<Mutex<HashMap<(Tgid, usize), Arc<ShardGrpServer>>>>;
/// Every controller made, to be killed at cleanup.
type Ctrlers = Arc<Mutex<Vec<Arc<ShardCtrler>>>>;

fn new_ctrler(cfg: &Config, ctrlers: &Ctrlers) -> (Arc<ShardCtrler>, Arc<Clnt>) {
    let clnt = cfg.clnts().make_client();
    let sck = Arc::new(ShardCtrler::new(clnt.clone(), server_name(GRP0, 0)));
    ctrlers.lock().push(sck.clone());
    (sck, clnt)
}

/// A Lab 5 test.
pub struct ShardKvTest {
    pub ts: Arc<KvTest>,
    /// Whether a cut-off controller is reconnected (5C) or never comes back (5B).
    partition: bool,
    start_fn: StartFn,
    sck: Mutex<Option<Arc<ShardCtrler>>>,
    ngid: Mutex<Tgid>,
    ctrlers: Ctrlers,
    replicas: Replicas,
    /// Threads the test leaves running, joined at cleanup.
    leaked: Mutex<Vec<JoinHandle<()>>>,
    cleaned: AtomicBool,
}

/// `maxraftstate`: `None` never snapshots (Go's -1).
pub fn make_test_max_raft(
    part: &str,
    reliable: bool,
    partition: bool,
    maxraftstate: Option<usize>,
) -> Arc<ShardKvTest> {
    let replicas: Replicas = Arc::new(Mutex::new(HashMap::new()));
    let start_fn: StartFn = {
        let replicas = replicas.clone();
        Arc::new(
            move |ends: Vec<ClientEnd>, gid: Tgid, i: usize, persister: Persister| {
                let (srv, services) = start_server_shard_grp(ends, gid, i, persister, maxraftstate)
                    .unwrap_or_else(|e| {
                        panic!("tester: cannot start server {i} of group {gid}: {e}")
                    });
                replicas.lock().insert((gid, i), srv);
                services
            },
        )
    };
    let cfg = Config::new(1, reliable, Arc::new(super::kvsrv::start_kv_server));
    let ctrlers: Ctrlers = Arc::new(Mutex::new(Vec::new()));
    // Each shardkv clerk has its own client and its own controller (with another client).
    let maker = Arc::new(ClerkFactory::new(cfg.clone(), {
        let (cfg, ctrlers) = (cfg.clone(), ctrlers.clone());
        move |clnt: &Arc<Clnt>| {
            let (sck, _) = new_ctrler(&cfg, &ctrlers);
            Arc::new(Clerk::new(clnt.clone(), sck)) as Arc<dyn KvClerk>
        }
    }));
    let ts = Arc::new(KvTest::new(cfg, false, maker));
    ts.cfg.begin(part);
    Arc::new(ShardKvTest {
        ts,
        partition,
        start_fn,
        sck: Mutex::new(None),
        ngid: Mutex::new(GID1 + 1),
        ctrlers,
        replicas,
        leaked: Mutex::new(Vec::new()),
        cleaned: AtomicBool::new(false),
    })
}

pub fn make_test(part: &str, reliable: bool) -> Arc<ShardKvTest> {
    make_test_max_raft(part, reliable, false, None)
}

/// A 5C test: cut-off controllers are reconnected.
pub fn make_test_leases(part: &str, reliable: bool) -> Arc<ShardKvTest> {
    make_test_max_raft(part, reliable, true, None)
}

impl ShardKvTest {
    pub fn cfg(&self) -> &Arc<Config> {
        &self.ts.cfg
    }

    pub fn fatal(&self, msg: &str) -> ! {
        self.ts.fatal(msg)
    }

    pub fn make_clerk(&self) -> TestClerk {
        self.ts.make_clerk()
    }

    /// The controller of [`setup_kv_service`](Self::setup_kv_service).
    pub fn shard_ctrler(&self) -> Arc<ShardCtrler> {
        match &*self.sck.lock() {
            Some(s) => s.clone(),
            None => self.fatal("no controller: setup_kv_service was not called"),
        }
    }

    /// A new controller with a new client.
    pub fn make_shard_ctrler(&self) -> Arc<ShardCtrler> {
        self.make_shard_ctrler_clnt().0
    }

    /// A new controller and the client it calls through, so the test can cut it off.
    pub fn make_shard_ctrler_clnt(&self) -> (Arc<ShardCtrler>, Arc<Clnt>) {
        new_ctrler(&self.ts.cfg, &self.ctrlers)
    }

    pub fn new_gid(&self) -> Tgid {
        let mut n = self.ngid.lock();
        let gid = *n;
        *n += 1;
        gid
    }

    pub fn groups(&self, n: usize) -> Vec<Tgid> {
        (0..n).map(|_| self.new_gid()).collect()
    }

    pub fn start_fn(&self) -> StartFn {
        self.start_fn.clone()
    }

    /// Starts group [`GID1`] and stores the first configuration: every shard on it.
    pub fn setup_kv_service(&self) -> Tgid {
        let sck = self.make_shard_ctrler();
        *self.sck.lock() = Some(sck.clone());
        self.cfg().make_group_start(GID1, NSRV, self.start_fn());
        let mut scfg = ShardConfig::new();
        let names = self.cfg().group(GID1).srv_names();
        if let Err(e) = scfg.join_balance(&BTreeMap::from([(GID1, names)])) {
            self.fatal(&format!("setup: {e}"));
        }
        self.ok(sck.init_config(&scfg));
        GID1
    }

    /// `r`'s value; `None` if the controller was killed; a corrupt configuration fails the test.
    fn ok<T>(&self, r: Result<T, CtrlerError>) -> Option<T> {
        match r {
            Ok(t) => Some(t),
            Err(CtrlerError::Killed) => None,
            Err(e) => self.fatal(&format!("controller: {e}")),
        }
    }

    /// The current configuration as `sck` reads it; `None` if `sck` was killed.
    pub fn query(&self, sck: &ShardCtrler) -> Option<ShardConfig> {
        self.ok(sck.query())
    }

    /// Whether `gid` serves a shard; `None` if `sck` was killed.
    pub fn check_member(&self, sck: &ShardCtrler, gid: Tgid) -> Option<bool> {
        self.query(sck).map(|c| c.is_member(gid))
    }

    /// Asks `sck` to add group `gid` with servers `srvs`.
    pub fn join(&self, sck: &ShardCtrler, gid: Tgid, srvs: Vec<String>) {
        let Some(mut cfg) = self.query(sck) else {
            return;
        };
        if let Err(e) = cfg.join_balance(&BTreeMap::from([(gid, srvs)])) {
            self.fatal(&format!("join: group {gid} is already present ({e})"));
        }
        self.ok(sck.change_config_to(&cfg));
    }

    /// Starts and joins each group, 200 ms apart; `false` as soon as one is not a member
    /// afterwards (another controller's change won).
    pub fn join_groups(&self, sck: &ShardCtrler, gids: &[Tgid]) -> bool {
        for &gid in gids {
            self.cfg().make_group_start(gid, NSRV, self.start_fn());
            self.join(sck, gid, self.cfg().group(gid).srv_names());
            if self.check_member(sck, gid) != Some(true) {
                return false;
            }
            thread::sleep(INTERGRPDELAY);
        }
        true
    }

    /// Asks `sck` to remove group `gid`.
    pub fn leave(&self, sck: &ShardCtrler, gid: Tgid) {
        let Some(mut cfg) = self.query(sck) else {
            return;
        };
        if let Err(e) = cfg.leave_balance(&[gid]) {
            self.fatal(&format!("leave: group {gid} is already not present ({e})"));
        }
        self.ok(sck.change_config_to(&cfg));
    }

    /// Removes and shuts down each group, 200 ms apart; `false` as soon as one is still a
    /// member afterwards.
    pub fn leave_groups(&self, sck: &ShardCtrler, gids: &[Tgid]) -> bool {
        for &gid in gids {
            self.leave(sck, gid);
            if self.check_member(sck, gid) != Some(false) {
                return false;
            }
            self.cfg().exit_group(gid);
            thread::sleep(INTERGRPDELAY);
        }
        true
    }

    /// The replica of `gid` that believes it leads, if any (Go's `rsm.Leader`).
    pub fn leader(&self, gid: Tgid) -> Option<usize> {
        let replicas = self.replicas.lock();
        (0..NSRV).find(|&i| {
            replicas.get(&(gid, i)).is_some_and(|s| {
                let raft = s.rsm().raft();
                !raft.killed() && raft.get_state().1
            })
        })
    }

    /// Crashes the leader of `gid` for good; returns which replica it was.
    pub fn disconnect_clnt_from_leader(&self, gid: Tgid) -> usize {
        let Some(l) = self.leader(gid) else {
            self.fatal(&format!("no leader in group {gid}"));
        };
        self.cfg().group(gid).shutdown_server(l);
        l
    }

    /// Shuts group `down` down and checks that some keys become unavailable (the data really
    /// is sharded) while every Get that completes returns the right value; then restarts it.
    /// The Gets still waiting are left running, as in Go; they finish once their shard is
    /// served again, or at cleanup.
    pub fn check_shutdown_sharding(&self, down: Tgid, ka: &[String], va: &[String]) {
        const NSEC: Duration = Duration::from_secs(2);
        self.cfg().group(down).shutdown();
        let n = ka.len();
        let (tx, rx) = channel::unbounded::<String>();
        let done = Arc::new(AtomicBool::new(false));
        for i in 0..n {
            let ck1 = self.make_clerk();
            let (key, want) = (ka[i].clone(), va[i].clone());
            let (tx, done) = (tx.clone(), done.clone());
            let h = thread::Builder::new()
                .name(format!("shutdown-get-{i}"))
                .spawn(move || {
                    let (v, _, _) = ck1.ck.get(&key);
                    if done.load(Ordering::SeqCst) {
                        return;
                    }
                    let msg = if v != want {
                        format!("Get({key}): expected:\n{want}\nreceived:\n{v}")
                    } else {
                        String::new()
                    };
                    // The test stops listening once it has counted: nobody needs this then.
                    let _ = tx.send(msg);
                })
                .expect("cannot start a Get thread");
            self.leaked.lock().push(h);
        }
        let mut ndone = 0;
        loop {
            match rx.recv_timeout(NSEC) {
                Ok(err) => {
                    if !err.is_empty() {
                        self.fatal(&err);
                    }
                    ndone += 1;
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    done.store(true, Ordering::SeqCst);
                    break;
                }
            }
        }
        if ndone >= n {
            self.fatal(&format!(
                "expected less than {n} completions with shard {down} down"
            ));
        }
        self.cfg().group(down).start_servers();
    }

    /// Runs a controller joining and leaving new groups, shuts group `gid` down so that it
    /// gets stuck mid-change, cuts it off, restarts `gid`, and checks that a new controller
    /// finishes the change. In 5C the old controller then comes back and must not disturb
    /// anything. Afterwards every key must still read as `va`.
    pub fn partition_ctrler(
        self: &Arc<Self>,
        ck: &TestClerk,
        gid: Tgid,
        ka: &[String],
        va: &[String],
    ) {
        const RAND_MS: u64 = 400;
        const NSEC: Duration = Duration::from_secs(1);
        const JOIN: u8 = 1;
        const LEAVE: u8 = 2;

        let (sck, clnt) = self.make_shard_ctrler_clnt();
        self.ok(sck.init_controller());
        let num = match self.query(&self.shard_ctrler()) {
            Some(c) => c.num,
            None => self.fatal("test controller killed"),
        };
        let state = Arc::new(AtomicU8::new(0));
        let ngid = Arc::new(AtomicUsize::new(0));
        let worker = {
            let (ts, sck, state, ngid) = (self.clone(), sck.clone(), state.clone(), ngid.clone());
            thread::Builder::new()
                .name("ctrler-join-leave".to_string())
                .spawn(move || {
                    loop {
                        let g = ts.new_gid();
                        ngid.store(g, Ordering::SeqCst);
                        state.store(JOIN, Ordering::SeqCst);
                        ts.join_groups(&sck, &[g]);
                        if ts.check_member(&sck, g) == Some(true) {
                            state.store(LEAVE, Ordering::SeqCst);
                            ts.leave_groups(&sck, &[g]);
                        } else {
                            // Deposed (or killed).
                            return;
                        }
                    }
                })
                .expect("cannot start the controller thread")
        };

        // Let sck run for a little while.
        thread::sleep(Duration::from_millis(1000));
        let r = rand::thread_rng().gen_range(0..RAND_MS);
        thread::sleep(Duration::from_millis(r));
        self.cfg().group(gid).shutdown();
        // Long enough for sck to get stuck in a join or leave, because gid is down.
        thread::sleep(Duration::from_millis(1000));
        clnt.disconnect_all();
        if self.partition {
            thread::sleep(NSEC);
        }
        self.cfg().group(gid).start_servers();

        // A new controller picks up where sck left off.
        let (sck0, clnt0) = self.make_shard_ctrler_clnt();
        self.ok(sck0.init_controller());
        let cfg = match self.query(&sck0) {
            Some(c) => c,
            None => self.fatal("recovery controller killed"),
        };
        let st = state.load(Ordering::SeqCst);
        let g = ngid.load(Ordering::SeqCst);
        let what = if st == LEAVE { "leave" } else { "join" };
        if cfg.num <= num {
            self.fatal(&format!("didn't recover; expected {} > {num}", cfg.num));
        }
        let present = cfg.is_member(g);
        if (st == JOIN && !present) || (st == LEAVE && present) {
            self.fatal(&format!("didn't recover {g} correctly after {what}"));
        }
        if st == JOIN && present {
            // Clean up after a controller cut off between its join and its leave.
            self.leave_groups(&sck0, &[g]);
        }
        if self.partition {
            // The old controller comes back; it has been superseded and must bail out.
            clnt.connect_all();
            thread::sleep(Duration::from_millis(100));
        }
        for (k, v) in ka.iter().zip(va) {
            self.ts.check_get(ck.ck.as_ref(), k, v, 1);
        }
        self.cfg().clnts().delete_client(&clnt);
        self.cfg().clnts().delete_client(&clnt0);
        // With its client deleted the old controller can do nothing more (in Go it hangs
        // for ever); stop it and its thread.
        sck.kill();
        if worker.join().is_err() {
            self.fatal("the cut-off controller's thread failed");
        }
    }

    /// Four threads each repeatedly make a controller, recover, join a new group and (if it
    /// joined) leave it, for 2 s; then every key must still read as `va`.
    pub fn concur_ctrler(self: &Arc<Self>, ck: &TestClerk, ka: &[String], va: &[String]) {
        const NSEC: Duration = Duration::from_secs(2);
        const N: usize = 4;
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<JoinHandle<()>> = (0..N)
            .map(|i| {
                let (ts, stop) = (self.clone(), stop.clone());
                thread::Builder::new()
                    .name(format!("concur-ctrler-{i}"))
                    .spawn(move || {
                        while !stop.load(Ordering::SeqCst) {
                            let ngid = ts.new_gid();
                            let sck = ts.make_shard_ctrler();
                            ts.ok(sck.init_controller());
                            ts.join_groups(&sck, &[ngid]);
                            if ts.check_member(&sck, ngid) == Some(true) {
                                ts.leave_groups(&sck, &[ngid]);
                            }
                        }
                    })
                    .expect("cannot start a controller thread")
            })
            .collect();
        thread::sleep(NSEC);
        // Each finishes the iteration it is in, as Go's blocking send waits for it to.
        stop.store(true, Ordering::SeqCst);
        for (i, h) in workers.into_iter().enumerate() {
            if h.join().is_err() {
                self.fatal(&format!("controller thread {i} failed"));
            }
        }
        for (k, v) in ka.iter().zip(va) {
            self.ts.check_get(ck.ck.as_ref(), k, v, 1);
        }
    }

    /// The "Passed" line, then [`cleanup`](Self::cleanup).
    pub fn end(&self) {
        self.ts.end();
        self.cleanup();
    }

    /// Kills every controller (ending the requests of the clerks that route through them),
    /// joins the threads the test left running, and shuts everything down. Idempotent.
    pub fn cleanup(&self) {
        if self.cleaned.swap(true, Ordering::SeqCst) {
            return;
        }
        for sck in self.ctrlers.lock().iter() {
            sck.kill();
        }
        let leaked: Vec<JoinHandle<()>> = std::mem::take(&mut *self.leaked.lock());
        let mut failed = 0;
        for h in leaked {
            if h.join().is_err() {
                failed += 1;
            }
        }
        self.ts.cfg.cleanup();
        if failed > 0 && !thread::panicking() {
            self.fatal(&format!("{failed} helper threads failed"));
        }
    }
}

impl Drop for ShardKvTest {
    fn drop(&mut self) {
        self.cleanup();
    }
}
