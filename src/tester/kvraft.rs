//! The tester's side of Lab 4, in the shape of the Go labs' `kvraft1/rsm/test.go`,
//! `rsm/server.go` and `kvraft1/test.go`:
//!
//! - [`RsmTest`]: three peers each running an [`Rsm`] over a counter service that understands
//!   `Inc` and `Null` (and must never execute `Dec`), with `one_inc`, `check_counter`, ...
//! - [`KvRaftTest`]: a group of KV replicas, clerks to all or some of them, on a
//!   [`KvTest`] that records the history.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::kvapi::KvClerk;
use crate::kvraft::Clerk;
use crate::kvraft::KvServer;
use crate::labcodec;
use crate::labrpc::ClientEnd;
use crate::raft::Raft;
use crate::rsm::{GiveUps, RestoreError, Rsm, RsmError, StateMachine};
use crate::tester::Clnt;
use crate::tester::kvtest::{ClerkFactory, KvTest, TestClerk};
pub use crate::tester::raft::FAULT_ENV;
use crate::tester::{Config, GRP0, IService, KvSvc, Persister, RaftSvc, ServerGrp, StartFn, Tgid};

// ---------------------------------------------------------------- rsm

/// Peers in an rsm test.
pub const NSRV: usize = 3;
/// Seconds `one_partition` keeps trying.
pub const NSEC: u64 = 10;

/// The counter service's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CounterReq {
    /// Increment the counter; the reply carries the new value.
    Inc,
    /// Do nothing.
    Null,
    /// Never to be executed: only ever submitted to a leader cut off from everyone.
    Dec,
}

/// The counter service's replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CounterRep {
    Inc { n: i64 },
    Null,
}

/// Whether the deliberate harness fault `name` is on (see [`FAULT_ENV`]). The rsm tests'
/// faults: `minority-ok` turns a Dec Submit that failed into an OK reply (an rsm that answers
/// for an op it never committed); `replica-lag` keeps the first instance of server 2 from
/// showing the Incs it executes (a replica whose state silently lags until a restart
/// replays its log).
fn harness_fault(name: &str) -> bool {
    std::env::var(FAULT_ENV).is_ok_and(|v| v == name)
}

/// The state machine of the rsm tests: one counter.
pub struct Counter {
    me: usize,
    n: Mutex<i64>,
    /// With the `replica-lag` fault: Incs executed but not shown by [`RsmSrv::counter`].
    hidden: Option<Mutex<i64>>,
    /// The first thing that went wrong (Go's `log.Fatalf` in `DoOp`); the test fails on it.
    fatal: Arc<Mutex<Option<String>>>,
}

impl Counter {
    fn do_op(&self, req: CounterReq) -> CounterRep {
        match req {
            CounterReq::Inc => {
                let mut n = self.n.lock();
                *n += 1;
                if let Some(h) = &self.hidden {
                    *h.lock() += 1;
                }
                CounterRep::Inc { n: *n }
            }
            CounterReq::Null => CounterRep::Null,
            other => {
                let msg = format!(
                    "DoOp should execute only Inc and Null; server {} got {other:?}",
                    self.me
                );
                log::error!(target: "tester", "{msg}");
                self.fatal.lock().get_or_insert(msg);
                CounterRep::Null
            }
        }
    }
}

impl StateMachine for Counter {
    type Op = CounterReq;
    type Reply = CounterRep;

    fn apply(&self, ops: Vec<CounterReq>) -> Vec<CounterRep> {
        ops.into_iter().map(|op| self.do_op(op)).collect()
    }

    fn snapshot(&self) -> Vec<u8> {
        labcodec::encode(&*self.n.lock()).unwrap_or_default()
    }

    fn restore(&self, data: &[u8]) -> Result<(), RestoreError> {
        match labcodec::decode::<i64>(data) {
            Ok(n) => {
                *self.n.lock() = n;
                Ok(())
            }
            Err(e) => {
                self.fatal
                    .lock()
                    .get_or_insert(format!("server {}: bad snapshot: {e}", self.me));
                Err(e.into())
            }
        }
    }
}

/// One rsm test peer: the counter and the rsm over it.
pub struct RsmSrv {
    counter: Arc<Counter>,
    pub rsm: Rsm<Counter>,
}

impl RsmSrv {
    pub fn counter(&self) -> i64 {
        let hidden = self.counter.hidden.as_ref().map_or(0, |h| *h.lock());
        *self.counter.n.lock() - hidden
    }

    /// Submits one counter request.
    pub fn submit(&self, req: CounterReq) -> Option<CounterRep> {
        match self.rsm.submit(req) {
            Ok(rep) => Some(rep),
            Err(_) if req == CounterReq::Dec && harness_fault("minority-ok") => {
                Some(CounterRep::Null)
            }
            Err(_) => None,
        }
    }
}

/// An rsm test: [`NSRV`] peers on a reliable network.
pub struct RsmTest {
    pub cfg: Arc<Config>,
    /// The current instance of each peer; replaced on restart, kept after a shutdown (as in
    /// Go, where a dead peer's rsm still takes Submits and answers WrongLeader).
    srvs: Arc<Mutex<Vec<Option<Arc<RsmSrv>>>>>,
    leader: Mutex<usize>,
    fatal: Arc<Mutex<Option<String>>>,
}

impl RsmTest {
    /// `maxraftstate`: `None` never snapshots.
    pub fn new(maxraftstate: Option<usize>) -> Arc<RsmTest> {
        RsmTest::new_scripted(maxraftstate, |_| {})
    }

    /// [`RsmTest::new`] with the network's script prepared by `setup` before any peer starts
    /// (the rule tests, which decide exactly what happens to chosen messages).
    pub fn new_scripted(
        maxraftstate: Option<usize>,
        setup: impl FnOnce(&crate::labrpc::script::Script),
    ) -> Arc<RsmTest> {
        let srvs: Arc<Mutex<Vec<Option<Arc<RsmSrv>>>>> = Arc::new(Mutex::new(vec![None; NSRV]));
        let fatal = Arc::new(Mutex::new(None));
        let start_fn: StartFn = {
            let srvs = srvs.clone();
            let fatal = fatal.clone();
            Arc::new(
                move |ends: Vec<ClientEnd>, _gid: Tgid, i: usize, persister: Persister| {
                    let first_instance = srvs.lock()[i].is_none();
                    let counter = Arc::new(Counter {
                        me: i,
                        n: Mutex::new(0),
                        hidden: (i == 2 && first_instance && harness_fault("replica-lag"))
                            .then(|| Mutex::new(0)),
                        fatal: fatal.clone(),
                    });
                    let rsm = Rsm::new(ends, i, persister, maxraftstate, counter.clone())
                        .unwrap_or_else(|e| panic!("tester: cannot start server {i}: {e}"));
                    let raft = rsm.raft();
                    srvs.lock()[i] = Some(Arc::new(RsmSrv { counter, rsm }));
                    // Only the Raft is the tester's to kill, as in Go.
                    vec![Arc::new(RaftSvc(raft)) as Arc<dyn IService>]
                },
            )
        };
        let cfg = Config::new_with(NSRV, true, start_fn, |net| setup(&net.script()));
        Arc::new(RsmTest {
            cfg,
            srvs,
            leader: Mutex::new(0),
            fatal,
        })
    }

    pub fn g(&self) -> Arc<ServerGrp> {
        self.cfg.group(GRP0)
    }

    pub fn begin(&self, desc: &str) {
        self.cfg.begin(desc);
    }

    pub fn end(&self) {
        self.check_fatal();
        self.cfg.end();
    }

    pub fn fatal(&self, msg: &str) -> ! {
        self.cfg.fatal(msg)
    }

    fn check_fatal(&self) {
        let f = self.fatal.lock().clone();
        if let Some(msg) = f {
            self.fatal(&msg);
        }
    }

    pub fn srv(&self, i: usize) -> Option<Arc<RsmSrv>> {
        self.srvs.lock()[i].clone()
    }

    /// Tries `req` on the servers in `p` (all if `None`) that are connected, starting at the
    /// last known leader, for up to [`NSEC`] seconds. `None` if no leader executed it.
    pub fn one_partition(&self, p: Option<&[usize]>, req: CounterReq) -> Option<CounterRep> {
        let t0 = Instant::now();
        let g = self.g();
        while t0.elapsed() < Duration::from_secs(NSEC) {
            let first = *self.leader.lock();
            for k in 0..NSRV {
                let i = (first + k) % NSRV;
                if !g.is_connected(i) || p.is_some_and(|p| !p.contains(&i)) {
                    continue;
                }
                let Some(s) = self.srv(i) else { continue };
                if let Some(rep) = s.submit(req) {
                    *self.leader.lock() = i;
                    return Some(rep);
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// One Inc that must succeed; returns the counter it produced.
    pub fn one_inc(&self) -> i64 {
        match self.one_partition(None, CounterReq::Inc) {
            Some(CounterRep::Inc { n }) => n,
            other => self.fatal(&format!("one_inc: no leader executed Inc ({other:?})")),
        }
    }

    /// One Null; `None` if no leader executed it within [`NSEC`] seconds.
    pub fn one_null(&self) -> Option<CounterRep> {
        self.one_partition(None, CounterReq::Null)
    }

    fn count_value(&self, v: i64) -> usize {
        let srvs = self.srvs.lock().clone();
        srvs.iter().flatten().filter(|s| s.counter() == v).count()
    }

    /// Waits (backing off from 10 ms to 1.28 s, 30 polls) for `nsrv` peers to reach `v`.
    pub fn check_counter(&self, v: i64, nsrv: usize) {
        let mut pause = Duration::from_millis(10);
        let mut n = 0;
        for _ in 0..30 {
            n = self.count_value(v);
            if n >= nsrv {
                self.check_fatal();
                return;
            }
            thread::sleep(pause);
            if pause < Duration::from_secs(1) {
                pause *= 2;
            }
        }
        self.check_fatal();
        self.fatal(&format!(
            "check_counter: only {n} servers reached {v}, expected {nsrv}"
        ));
    }

    /// The peer that believes it leads, if any.
    pub fn leader(&self) -> Option<usize> {
        let srvs = self.srvs.lock().clone();
        leader_of(srvs.iter().map(|s| s.as_ref().map(|s| s.rsm.raft())))
    }
}

/// The first live Raft among `rafts` that says it leads (Go's `rsm.Leader`).
fn leader_of(rafts: impl Iterator<Item = Option<Arc<Raft>>>) -> Option<usize> {
    rafts
        .enumerate()
        .find(|(_, r)| r.as_ref().is_some_and(|r| !r.killed() && r.get_state().1))
        .map(|(i, _)| i)
}

// ---------------------------------------------------------------- kvraft

/// Test-only: milliseconds after which every replica's pending submit gives up and answers
/// `ErrWrongLeader` (the timeout design of most Go solutions; `docs/errmaybe.md`). Unset or
/// empty: our design, which waits as long as the replica leads in the op's term.
pub const GIVE_UP_ENV: &str = "RAFTKV_RSM_GIVE_UP_MS";

/// [`GIVE_UP_ENV`], read once per test. A value that is not a number of milliseconds stops
/// the test: measuring the wrong variant silently would be worse.
fn give_up_after_from_env() -> Option<Duration> {
    let v = std::env::var(GIVE_UP_ENV).ok()?;
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    match v.parse::<u64>() {
        Ok(ms) if ms > 0 => Some(Duration::from_millis(ms)),
        _ => panic!("{GIVE_UP_ENV}={v:?}: expected a positive number of milliseconds"),
    }
}

/// Starts KV replica `me` of a group on the simulated network: the KV server and its Raft
/// peer, in that kill order. `maxraftstate`: snapshot when the persisted Raft state reaches
/// it; `None` never.
pub fn start_kv_server(
    ends: Vec<ClientEnd>,
    _gid: Tgid,
    me: usize,
    persister: Persister,
    maxraftstate: Option<usize>,
) -> Result<StartedKvServer, RsmError> {
    let kv = KvServer::new(ends, me, persister, maxraftstate)?;
    let raft = kv.rsm().raft();
    let killer = kv.clone();
    let services: Vec<Arc<dyn IService>> = vec![
        Arc::new(KvSvc::new(kv.clone(), move || killer.kill())),
        Arc::new(RaftSvc(raft)),
    ];
    Ok((kv, services))
}

/// A started replica and its services for the tester, in kill order.
pub type StartedKvServer = (Arc<KvServer>, Vec<Arc<dyn IService>>);

/// The parameters of a kvraft test, as Go's `MakeTest` takes them.
#[derive(Debug, Clone)]
pub struct KvRaftParams {
    pub part: &'static str,
    pub nclients: usize,
    pub nservers: usize,
    pub reliable: bool,
    pub crash: bool,
    pub partitions: bool,
    /// `None` never snapshots (Go's -1).
    pub maxraftstate: Option<usize>,
    pub randomkeys: bool,
}

/// A kvraft test: a group of KV replicas and the recorded-history KV test over them.
pub struct KvRaftTest {
    pub ts: Arc<KvTest>,
    pub p: KvRaftParams,
    srvs: Arc<Mutex<Vec<Option<Arc<KvServer>>>>>,
}

impl KvRaftTest {
    /// Starts the group and, as Go's `MakeTest` does, begins the test with its title.
    pub fn new(p: KvRaftParams) -> KvRaftTest {
        let srvs: Arc<Mutex<Vec<Option<Arc<KvServer>>>>> =
            Arc::new(Mutex::new(vec![None; p.nservers]));
        let give_up_after = give_up_after_from_env();
        let give_ups = Arc::new(GiveUps::default());
        let start_fn: StartFn = {
            let srvs = srvs.clone();
            let maxraftstate = p.maxraftstate;
            let give_ups = give_ups.clone();
            Arc::new(
                move |ends: Vec<ClientEnd>, gid: Tgid, i: usize, persister: Persister| {
                    let (kv, services) = start_kv_server(ends, gid, i, persister, maxraftstate)
                        .unwrap_or_else(|e| panic!("tester: cannot start server {i}: {e}"));
                    // Before the tester registers the services: no submit has run yet.
                    kv.rsm().count_give_ups_in(give_ups.clone());
                    kv.rsm().set_give_up_after(give_up_after);
                    srvs.lock()[i] = Some(kv);
                    services
                },
            )
        };
        let cfg = Config::new(p.nservers, p.reliable, start_fn);
        let servers = cfg.group(GRP0).srv_names();
        let maker = Arc::new(ClerkFactory::new(cfg.clone(), move |clnt: &Arc<Clnt>| {
            Arc::new(Clerk::new(clnt.clone(), servers.clone())) as Arc<dyn KvClerk>
        }));
        let ts = Arc::new(KvTest::new(cfg, p.randomkeys, maker));
        ts.set_end_note(Box::new(move || {
            let (term_change, timeout, index_taken) = give_ups.counts();
            let variant = match give_up_after {
                Some(d) => format!("timeout variant, {} ms", d.as_millis()),
                None => "no timeout".to_string(),
            };
            format!(
                "; rsm gave up on logged ops: {term_change} on a term change, {timeout} timed out, \
                 {index_taken} lost their index ({variant})"
            )
        }));
        let mut title = String::from("Test: ");
        if p.crash {
            title.push_str("restarts, ");
        }
        if p.partitions {
            title.push_str("partitions, ");
        }
        if p.maxraftstate.is_some() {
            title.push_str("snapshots, ");
        }
        if p.randomkeys {
            title.push_str("random keys, ");
        }
        title.push_str(if p.nclients > 1 {
            "many clients"
        } else {
            "one client"
        });
        title.push_str(&format!(" ({})", p.part));
        ts.cfg.begin(&title);
        KvRaftTest { ts, p, srvs }
    }

    pub fn cfg(&self) -> &Arc<Config> {
        &self.ts.cfg
    }

    pub fn g(&self) -> Arc<ServerGrp> {
        self.ts.cfg.group(GRP0)
    }

    pub fn fatal(&self, msg: &str) -> ! {
        self.ts.fatal(msg)
    }

    /// A clerk whose client reaches only the servers in `to`; the clerk still gets every
    /// server's name and must cope with the ones it cannot reach.
    pub fn make_clerk_to(&self, to: &[usize]) -> TestClerk {
        let g = self.g();
        let clnt = self.ts.cfg.clnts().make_client_to(&g.srv_names_to(to));
        self.ts.counted(TestClerk {
            ck: Arc::new(Clerk::new(clnt.clone(), g.srv_names())),
            clnt,
        })
    }

    /// The replica that believes it leads, if any.
    pub fn leader(&self) -> Option<usize> {
        let srvs = self.srvs.lock().clone();
        leader_of(srvs.iter().map(|s| s.as_ref().map(|s| s.rsm().raft())))
    }
}
