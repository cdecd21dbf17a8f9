//! The tester's side of Lab 3, in the shape of the Go labs' `raft1/test.go` and `server.go`:
//! a test service per peer that consumes the apply channel and checks what it gets, and the
//! checks the Raft tests are written in (`one`, `check_one_leader`, `n_committed`, `wait`...).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam::channel;
use parking_lot::Mutex;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::labcodec;
use crate::labrpc::script::Script;
use crate::labrpc::{ClientEnd, Network, Service};
use crate::raft::{ApplyMsg, Raft, RaftOptions, Storage};
use crate::tester::{Config, GRP0, IService, Persister, RaftRpcService, ServerGrp, StartFn, Tgid};

/// The tester allows a second for an election.
pub const ELECTION_TIMEOUT: Duration = Duration::from_millis(1000);
/// The tester service snapshots every this many entries.
pub const SNAPSHOT_INTERVAL: u64 = 10;
/// The most persisted Raft state the snapshot tests tolerate.
pub const MAX_LOG_SIZE: usize = 2000;

/// Environment variable naming a deliberate fault in the harness's view of Raft, so a test
/// can show that a check fails when it should. `skip-reapply`: a restarted peer's apply
/// stream skips what the peer applied before its crash, as a Raft that does not re-apply its
/// log after a restart would. `no-compaction`: the snapshotting service's snapshots never
/// reach Raft, as a Raft that ignores `snapshot()` would (its log is never trimmed).
pub const FAULT_ENV: &str = "RAFTKV_HARNESS_FAULT";

fn harness_fault(name: &str) -> bool {
    std::env::var(FAULT_ENV).is_ok_and(|v| v == name)
}

/// The labs' persister as each peer's storage.
fn persister_storage() -> OpenStorage {
    Arc::new(|_i: usize, persister: Persister| {
        let data = persister.read_snapshot();
        (persister.into(), data, None)
    })
}

/// The test's configuration, for the appliers (they start before it exists).
type CfgCell = Arc<OnceLock<Weak<Config>>>;

/// A command in the Raft tests: an integer or a string, compared by value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TestCmd {
    Int(i64),
    Str(String),
}

impl TestCmd {
    pub fn encode(&self) -> Vec<u8> {
        labcodec::encode(self).unwrap_or_default()
    }
}

impl From<i64> for TestCmd {
    fn from(v: i64) -> Self {
        TestCmd::Int(v)
    }
}

impl From<String> for TestCmd {
    fn from(v: String) -> Self {
        TestCmd::Str(v)
    }
}

/// A random non-negative command value, like Go's `rand.Int()`.
pub fn rand_cmd() -> TestCmd {
    TestCmd::Int(rand::thread_rng().gen_range(0..i64::MAX))
}

/// What every peer's service has applied, as the tester saw it.
#[derive(Default)]
struct Applied {
    /// `logs[i][index]`: the command peer `i` applied at `index`.
    logs: Vec<HashMap<u64, TestCmd>>,
    max_index: u64,
    /// The first error peer `i`'s apply stream showed.
    errors: Vec<Option<String>>,
    /// Everything peer `i`'s service was handed since its last start, in order.
    history: Vec<Vec<Delivered>>,
}

/// One thing a peer's service was handed, as the rule tests look at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    Command(u64),
    Snapshot(u64),
}

impl Applied {
    /// Records that peer `i` applied `cmd` at `index`; an error if another peer applied
    /// something else there.
    fn check_and_record(&mut self, i: usize, index: u64, cmd: TestCmd) -> Result<(), String> {
        for (j, log) in self.logs.iter().enumerate() {
            if let Some(old) = log.get(&index)
                && *old != cmd
            {
                return Err(format!(
                    "commit index={index} server={i} {cmd:?} != server={j} {old:?}"
                ));
            }
        }
        self.logs[i].insert(index, cmd);
        self.max_index = self.max_index.max(index);
        Ok(())
    }
}

/// The snapshot the tester service makes: the index and every command through it.
#[derive(Serialize, Deserialize)]
struct TestSnapshot {
    last_included_index: u64,
    log: Vec<Option<TestCmd>>,
}

/// The tester's service for one peer: runs the Raft and checks its apply stream.
pub struct RfSrv {
    me: usize,
    raft: Mutex<Option<Arc<Raft>>>,
    applier: Mutex<Option<JoinHandle<()>>>,
    /// The file log a crash closes (file-backed tests only).
    closer: Option<Arc<file::ClosableLog>>,
}

/// Opens peer `i`'s storage from what the tester kept for it: the storage, the snapshot the
/// service restores from, and (file-backed tests) the log its crash closes.
type OpenStorage = Arc<
    dyn Fn(usize, Persister) -> (Box<dyn Storage>, Vec<u8>, Option<Arc<file::ClosableLog>>)
        + Send
        + Sync,
>;

impl RfSrv {
    #[allow(clippy::too_many_arguments)]
    fn start(
        me: usize,
        ends: Vec<ClientEnd>,
        storage: Box<dyn Storage>,
        snapshot_data: Vec<u8>,
        closer: Option<Arc<file::ClosableLog>>,
        snapshot: bool,
        options: RaftOptions,
        applied: Arc<Mutex<Applied>>,
        cfg: CfgCell,
    ) -> Arc<RfSrv> {
        let (tx, rx) = channel::bounded::<ApplyMsg>(0);
        let mut last_applied = 0;
        // As in Go, a (re)started peer's applied log starts empty: it must apply again from
        // index 1, or from its snapshot, and the order check sees whether it does.
        let skip_through = {
            let mut a = applied.lock();
            let before = a.logs[me].keys().max().copied().unwrap_or(0);
            a.logs[me].clear();
            a.history[me].clear();
            if harness_fault("skip-reapply") {
                before
            } else {
                0
            }
        };
        if snapshot {
            let data = snapshot_data;
            if !data.is_empty() {
                match ingest_snapshot(&applied, me, &data, None) {
                    Ok(i) => last_applied = i,
                    Err(e) => applied.lock().errors[me] = Some(e),
                }
            }
        }
        let raft = match Raft::with_options(ends, me, storage, tx, options) {
            Ok(r) => Arc::new(r),
            Err(e) => panic!("tester: cannot start raft-{me}: {e}"),
        };
        let srv = Arc::new(RfSrv {
            me,
            raft: Mutex::new(Some(raft.clone())),
            applier: Mutex::new(None),
            closer,
        });
        let weak_raft = Arc::downgrade(&raft);
        let handle = thread::Builder::new()
            .name(format!("tester-applier-{me}"))
            .spawn(move || {
                let mut last_applied = last_applied;
                // Everything Raft delivers is checked, up to the close of the channel: a
                // killed Raft delivers nothing once kill() has returned.
                for m in rx {
                    if let ApplyMsg::Command { index, .. } = &m
                        && *index <= skip_through
                    {
                        continue; // the skip-reapply fault
                    }
                    applied.lock().history[me].push(match &m {
                        ApplyMsg::Command { index, .. } => Delivered::Command(*index),
                        ApplyMsg::Snapshot { index, .. } => Delivered::Snapshot(*index),
                    });
                    let r = if snapshot {
                        apply_snap(&applied, me, m, &mut last_applied, &weak_raft)
                    } else {
                        apply_plain(&applied, me, m)
                    };
                    if let Err(e) = r {
                        applied.lock().errors[me].get_or_insert(e.clone());
                        // Go's applier calls log.Fatalf: the run fails at once.
                        let msg = format!("apply error at server {me}: {e}");
                        log::error!(target: "tester", "{msg}");
                        match cfg.get().and_then(Weak::upgrade) {
                            Some(cfg) => cfg.fail_process(&msg),
                            None => {
                                eprintln!("Fatal: {msg}");
                                std::process::exit(1);
                            }
                        }
                    }
                }
            })
            .expect("tester: cannot start an applier thread");
        *srv.applier.lock() = Some(handle);
        srv
    }

    pub fn raft(&self) -> Option<Arc<Raft>> {
        self.raft.lock().clone()
    }
}

fn apply_plain(applied: &Mutex<Applied>, me: usize, m: ApplyMsg) -> Result<(), String> {
    let ApplyMsg::Command { index, command, .. } = m else {
        return Err(format!("server {me}: snapshot delivered without snapshots"));
    };
    let cmd: TestCmd = labcodec::decode(&command).map_err(|e| e.to_string())?;
    let mut a = applied.lock();
    a.check_and_record(me, index, cmd)?;
    if index > 1 && !a.logs[me].contains_key(&(index - 1)) {
        return Err(format!("server {me} apply out of order {index}"));
    }
    Ok(())
}

fn apply_snap(
    applied: &Mutex<Applied>,
    me: usize,
    m: ApplyMsg,
    last_applied: &mut u64,
    raft: &std::sync::Weak<Raft>,
) -> Result<(), String> {
    match m {
        ApplyMsg::Snapshot { index, data, .. } => {
            *last_applied = ingest_snapshot(applied, me, &data, Some(index))?;
            Ok(())
        }
        ApplyMsg::Command { index, command, .. } => {
            if index != *last_applied + 1 {
                return Err(format!(
                    "server {me} apply out of order, expected index {}, got {index}",
                    *last_applied + 1
                ));
            }
            let cmd: TestCmd = labcodec::decode(&command).map_err(|e| e.to_string())?;
            let snap = {
                let mut a = applied.lock();
                a.check_and_record(me, index, cmd)?;
                *last_applied = index;
                if (index + 1) % SNAPSHOT_INTERVAL == 0 {
                    let log = (0..=index).map(|j| a.logs[me].get(&j).cloned()).collect();
                    Some(TestSnapshot {
                        last_included_index: index,
                        log,
                    })
                } else {
                    None
                }
            };
            if let Some(s) = snap.filter(|_| !harness_fault("no-compaction")) {
                let bytes = labcodec::encode(&s).map_err(|e| e.to_string())?;
                // Called from the thread draining the apply channel, as a service would.
                if let Some(r) = raft.upgrade() {
                    r.snapshot(index, bytes);
                }
            }
            Ok(())
        }
    }
}

/// Replaces peer `me`'s applied log by a snapshot's; returns its last index.
fn ingest_snapshot(
    applied: &Mutex<Applied>,
    me: usize,
    data: &[u8],
    index: Option<u64>,
) -> Result<u64, String> {
    let s: TestSnapshot =
        labcodec::decode(data).map_err(|e| format!("server {me}: bad snapshot: {e}"))?;
    if let Some(i) = index
        && i != s.last_included_index
    {
        return Err(format!(
            "server {me} snapshot index {i} but snapshot holds {}",
            s.last_included_index
        ));
    }
    let mut a = applied.lock();
    let log: HashMap<u64, TestCmd> = s
        .log
        .into_iter()
        .enumerate()
        .filter_map(|(j, c)| c.map(|c| (j as u64, c)))
        .collect();
    for (&j, c) in &log {
        a.max_index = a.max_index.max(j);
        let _ = c;
    }
    a.logs[me] = log;
    Ok(s.last_included_index)
}

impl IService for RfSrv {
    fn kill(&self) {
        let raft = self.raft.lock().take();
        if let Some(r) = raft {
            r.kill(); // closes the apply channel, which ends the applier below
        }
        if let Some(c) = &self.closer {
            c.close(); // a crash: the process lets go of its files
        }
        if let Some(h) = self.applier.lock().take()
            && let Err(e) = h.join()
            && !thread::panicking()
        {
            panic!(
                "tester: the applier of server {} failed: {}",
                self.me,
                crate::tester::panic_message(&*e)
            );
        }
        log::debug!(target: "tester", "server {} killed", self.me);
    }

    fn rpc_service(self: Arc<Self>) -> Option<Service> {
        self.raft().map(|r| r.rpc_service())
    }
}

/// One Raft test: a group of peers on a network with long delays, and the checks.
pub struct Test {
    pub cfg: Arc<Config>,
    n: usize,
    srvs: Arc<Mutex<Vec<Option<Arc<RfSrv>>>>>,
    applied: Arc<Mutex<Applied>>,
    finished: AtomicBool,
    gates: Vec<Arc<SyncGate>>,
}

/// A test's hold on one peer's `Storage::sync`: while held, a sync waits (its caller holds
/// no Raft lock); `crash` fails the waiting syncs and every later one without passing them to
/// the storage, as a process killed before its fsync never makes those writes durable. A
/// restart of the peer opens the gate again.
#[derive(Default)]
pub struct SyncGate {
    state: Mutex<GateState>,
    cv: parking_lot::Condvar,
}

#[derive(Default)]
struct GateState {
    held: bool,
    crashed: bool,
    waiting: usize,
}

impl SyncGate {
    /// Syncs from now on wait.
    pub fn hold(&self) {
        self.state.lock().held = true;
    }

    /// Waiting syncs go on, and later ones do not wait.
    pub fn open(&self) {
        self.state.lock().held = false;
        self.cv.notify_all();
    }

    /// The peer crashes before its syncs: waiting and later ones fail, writing nothing.
    pub fn crash(&self) {
        self.state.lock().crashed = true;
        self.cv.notify_all();
    }

    /// Waits up to `timeout` until at least one sync waits at the gate.
    pub fn wait_blocked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        while st.waiting == 0 {
            if self.cv.wait_until(&mut st, deadline).timed_out() {
                return st.waiting > 0;
            }
        }
        true
    }

    fn reset(&self) {
        let mut st = self.state.lock();
        st.held = false;
        st.crashed = false;
        self.cv.notify_all();
    }

    /// Whether the sync may go to the storage (false: the peer crashed first).
    fn pass(&self) -> bool {
        let mut st = self.state.lock();
        st.waiting += 1;
        self.cv.notify_all();
        while st.held && !st.crashed {
            self.cv.wait(&mut st);
        }
        st.waiting -= 1;
        !st.crashed
    }
}

/// A storage whose syncs pass a [`SyncGate`].
struct GatedStorage {
    inner: Box<dyn Storage>,
    gate: Arc<SyncGate>,
}

impl Storage for GatedStorage {
    fn restore(&self) -> Result<crate::raft::Restored, crate::raft::StorageError> {
        self.inner.restore()
    }
    fn set_hard_state(&self, hs: crate::raft::HardState) -> Result<(), crate::raft::StorageError> {
        self.inner.set_hard_state(hs)
    }
    fn append(
        &self,
        first: u64,
        entries: &[crate::raft::log::Entry],
    ) -> Result<(), crate::raft::StorageError> {
        self.inner.append(first, entries)
    }
    fn truncate_after(&self, index: u64) -> Result<(), crate::raft::StorageError> {
        self.inner.truncate_after(index)
    }
    fn save_snapshot(
        &self,
        index: u64,
        term: u64,
        data: &[u8],
    ) -> Result<(), crate::raft::StorageError> {
        self.inner.save_snapshot(index, term, data)
    }
    fn sync(&self) -> Result<(), crate::raft::StorageError> {
        if !self.gate.pass() {
            return Err(crate::raft::StorageError::Io {
                path: "(test sync gate)".to_string(),
                op: "sync",
                reason: "the peer crashed before this sync".to_string(),
            });
        }
        self.inner.sync()
    }
    fn state_size(&self) -> usize {
        self.inner.state_size()
    }
    fn save_snapshot_shared(
        &self,
        index: u64,
        term: u64,
        data: Arc<Vec<u8>>,
    ) -> Result<(), crate::raft::StorageError> {
        self.inner.save_snapshot_shared(index, term, data)
    }
    fn snapshot_source(&self) -> Option<Arc<dyn crate::raft::storage::SnapshotSource>> {
        self.inner.snapshot_source()
    }
    fn write_snapshot(
        &self,
        index: u64,
        term: u64,
        data: &[u8],
    ) -> Result<Option<Arc<dyn crate::raft::storage::SnapshotSource>>, crate::raft::StorageError>
    {
        self.inner.write_snapshot(index, term, data)
    }
    fn save_written_snapshot(
        &self,
        snapshot: &Arc<dyn crate::raft::storage::SnapshotSource>,
    ) -> Result<(), crate::raft::StorageError> {
        self.inner.save_written_snapshot(snapshot)
    }
    fn discard_written_snapshot(&self, snapshot: &Arc<dyn crate::raft::storage::SnapshotSource>) {
        self.inner.discard_written_snapshot(snapshot)
    }
}

impl Test {
    /// `n` peers, reliable or not, with the snapshotting tester service or not.
    pub fn new(n: usize, reliable: bool, snapshot: bool) -> Test {
        Test::with_storage(
            n,
            reliable,
            snapshot,
            RaftOptions::default(),
            persister_storage(),
            |_| {},
        )
    }

    /// `n` peers on a reliable network whose script `setup` prepares before any peer
    /// starts: the rule tests, which decide exactly what happens to chosen messages.
    pub fn new_scripted(n: usize, snapshot: bool, setup: impl FnOnce(&Script)) -> Test {
        Test::new_scripted_with(n, snapshot, RaftOptions::default(), setup)
    }

    /// [`Test::new_scripted`] with each peer's storage behind a [`SyncGate`] (see
    /// [`Test::sync_gate`]): a test can hold a peer's syncs, and crash it while one waits.
    pub fn new_scripted_gated(n: usize, setup: impl FnOnce(&Script)) -> Test {
        Test::new_scripted_gated_with(n, RaftOptions::default(), setup)
    }

    /// [`Test::new_scripted_gated`] with every peer's Raft started with `options`.
    pub fn new_scripted_gated_with(
        n: usize,
        options: RaftOptions,
        setup: impl FnOnce(&Script),
    ) -> Test {
        let gates: Vec<Arc<SyncGate>> = (0..n).map(|_| Arc::new(SyncGate::default())).collect();
        let g = gates.clone();
        let open: OpenStorage = Arc::new(move |i: usize, persister: Persister| {
            let data = persister.read_snapshot();
            g[i].reset();
            let inner: Box<dyn Storage> = persister.into();
            let storage = GatedStorage {
                inner,
                gate: g[i].clone(),
            };
            (Box::new(storage) as Box<dyn Storage>, data, None)
        });
        let mut t = Test::with_storage(n, true, false, options, open, |net| setup(&net.script()));
        t.gates = gates;
        t
    }

    /// Peer `i`'s sync gate (a test made with [`Test::new_scripted_gated`]).
    pub fn sync_gate(&self, i: usize) -> Arc<SyncGate> {
        self.gates[i].clone()
    }

    /// [`Test::new_scripted`] with every peer's Raft started with `options`.
    pub fn new_scripted_with(
        n: usize,
        snapshot: bool,
        options: RaftOptions,
        setup: impl FnOnce(&Script),
    ) -> Test {
        Test::with_storage(n, true, snapshot, options, persister_storage(), |net| {
            setup(&net.script())
        })
    }

    /// [`Test::new`] with the peers' storage opened by `open`.
    fn with_storage(
        n: usize,
        reliable: bool,
        snapshot: bool,
        options: RaftOptions,
        open: OpenStorage,
        before_start: impl FnOnce(&Network),
    ) -> Test {
        let srvs: Arc<Mutex<Vec<Option<Arc<RfSrv>>>>> = Arc::new(Mutex::new(vec![None; n]));
        let applied = Arc::new(Mutex::new(Applied {
            logs: vec![HashMap::new(); n],
            max_index: 0,
            errors: vec![None; n],
            history: vec![Vec::new(); n],
        }));
        let cfg_cell: CfgCell = Arc::new(OnceLock::new());
        let start_fn: StartFn = {
            let srvs = srvs.clone();
            let applied = applied.clone();
            let cfg_cell = cfg_cell.clone();
            Arc::new(
                move |ends: Vec<ClientEnd>, _gid: Tgid, i: usize, persister: Persister| {
                    let (storage, snapshot_data, closer) = open(i, persister);
                    let s = RfSrv::start(
                        i,
                        ends,
                        storage,
                        snapshot_data,
                        closer,
                        snapshot,
                        options,
                        applied.clone(),
                        cfg_cell.clone(),
                    );
                    srvs.lock()[i] = Some(s.clone());
                    vec![s as Arc<dyn IService>]
                },
            )
        };
        let cfg = Config::new_with(n, reliable, start_fn, before_start);
        let _ = cfg_cell.set(Arc::downgrade(&cfg));
        // Calls to disconnected peers take up to 7 s to fail: Raft must not wait for them.
        cfg.set_long_delays(true);
        Test {
            cfg,
            n,
            srvs,
            applied,
            finished: AtomicBool::new(false),
            gates: Vec::new(),
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn g(&self) -> Arc<ServerGrp> {
        self.cfg.group(GRP0)
    }

    pub fn begin(&self, desc: &str) {
        self.cfg.begin(desc);
    }

    /// The largest persisted Raft state in the group, in bytes: what the labs' persisters
    /// hold (Go's `LogSize`), or with the file log what the peers' `FileLog`s keep (hard
    /// state and the entries after the snapshot). A crashed peer's closed log counts 0.
    pub fn log_size(&self) -> usize {
        let files: Vec<Arc<file::ClosableLog>> = self
            .srvs
            .lock()
            .iter()
            .flatten()
            .filter_map(|s| s.closer.clone())
            .collect();
        if files.is_empty() {
            return self.g().log_size();
        }
        files
            .iter()
            .map(|l| Storage::state_size(&**l))
            .max()
            .unwrap_or(0)
    }

    /// The live Raft of peer `i`, if it runs.
    pub fn raft(&self, i: usize) -> Option<Arc<Raft>> {
        self.srvs.lock()[i].as_ref().and_then(|s| s.raft())
    }

    pub fn fatal(&self, msg: &str) -> ! {
        self.cfg.fatal(msg)
    }

    /// Restarts peer `i` from what it persisted and reconnects everybody.
    pub fn restart(&self, i: usize) {
        self.g().start_server(i);
        self.g().connect_all();
    }

    pub fn shutdown_server(&self, i: usize) {
        self.g().shutdown_server(i);
        self.srvs.lock()[i] = None;
    }

    /// Waits for exactly one leader among the connected peers and returns it.
    pub fn check_one_leader(&self) -> usize {
        let mut rng = rand::thread_rng();
        for _ in 0..10 {
            thread::sleep(Duration::from_millis(450 + rng.gen_range(0..100)));
            let mut leaders: HashMap<u64, Vec<usize>> = HashMap::new();
            for (i, term, leader) in self.connected_states() {
                if leader {
                    leaders.entry(term).or_default().push(i);
                }
            }
            let mut last_term = None;
            for (&term, ls) in &leaders {
                if ls.len() > 1 {
                    self.fatal(&format!(
                        "term {term} has {} (>1) leaders: {ls:?}",
                        ls.len()
                    ));
                }
                if last_term.is_none_or(|t| term > t) {
                    last_term = Some(term);
                }
            }
            if let Some(t) = last_term {
                return leaders[&t][0];
            }
        }
        self.fatal("expected one leader, got none")
    }

    /// All connected peers agree on the term; returns it.
    pub fn check_terms(&self) -> u64 {
        let mut term = None;
        for (i, t, _) in self.connected_states() {
            match term {
                None => term = Some(t),
                Some(t0) if t0 != t => self.fatal(&format!(
                    "servers disagree on term ({t0} vs {t} at server {i})"
                )),
                _ => {}
            }
        }
        term.unwrap_or(0)
    }

    /// No connected peer claims to lead.
    pub fn check_no_leader(&self) {
        if let Some((i, ..)) = self.connected_states().find(|&(_, _, leader)| leader) {
            self.fatal(&format!(
                "expected no leader among connected servers, but {i} claims to be leader"
            ));
        }
    }

    /// `(peer, term, leads)` of every connected peer that runs, as `get_state` says.
    fn connected_states(&self) -> impl Iterator<Item = (usize, u64, bool)> + '_ {
        (0..self.n)
            .filter(|&i| self.g().is_connected(i))
            .filter_map(|i| {
                let (term, leader) = self.raft(i)?.get_state();
                Some((i, term, leader))
            })
    }

    fn check_apply_errors(&self) {
        let a = self.applied.lock();
        if let Some((i, e)) = a
            .errors
            .iter()
            .enumerate()
            .find_map(|(i, e)| e.as_ref().map(|e| (i, e)))
        {
            let msg = format!("apply error at server {i}: {e}");
            drop(a);
            self.fatal(&msg);
        }
    }

    /// How many peers applied `index`, and what (all must agree).
    pub fn n_committed(&self, index: u64) -> (usize, Option<TestCmd>) {
        self.check_apply_errors();
        let a = self.applied.lock();
        let mut count = 0;
        let mut cmd: Option<TestCmd> = None;
        for (i, log) in a.logs.iter().enumerate() {
            if let Some(c) = log.get(&index) {
                if let Some(prev) = &cmd
                    && prev != c
                {
                    let msg = format!(
                        "committed values at index {index} do not match ({prev:?} vs {c:?} at server {i})"
                    );
                    drop(a);
                    self.fatal(&msg);
                }
                count += 1;
                cmd = Some(c.clone());
            }
        }
        (count, cmd)
    }

    pub fn check_no_agreement(&self, index: u64) {
        let (n, _) = self.n_committed(index);
        if n > 0 {
            self.fatal(&format!("{n} committed but no majority"));
        }
    }

    /// Gets `cmd` committed by at least `expected` peers and returns its index. With `retry`,
    /// re-proposes it if the leader it went to failed; gives up after 10 s.
    pub fn one(&self, cmd: impl Into<TestCmd>, expected: usize, retry: bool) -> u64 {
        let cmd: TestCmd = cmd.into();
        let bytes = cmd.encode();
        let t0 = Instant::now();
        let mut starts = 0;
        while t0.elapsed() < Duration::from_secs(10) && !self.finished.load(Ordering::SeqCst) {
            let mut index = None;
            for _ in 0..self.n {
                starts = (starts + 1) % self.n;
                if !self.g().is_connected(starts) {
                    continue;
                }
                if let Some(r) = self.raft(starts) {
                    let (i, _, ok) = r.start(bytes.clone());
                    if ok {
                        index = Some(i);
                        break;
                    }
                }
            }
            if let Some(index) = index {
                let t1 = Instant::now();
                while t1.elapsed() < Duration::from_secs(2) {
                    let (nd, c) = self.n_committed(index);
                    if nd > 0 && nd >= expected && c.as_ref() == Some(&cmd) {
                        return index;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                if !retry {
                    self.fatal(&format!("one({cmd:?}) failed to reach agreement"));
                }
            } else {
                thread::sleep(Duration::from_millis(50));
            }
        }
        if self.finished.load(Ordering::SeqCst) {
            return 0;
        }
        self.fatal(&format!("one({cmd:?}) failed to reach agreement"))
    }

    /// Waits for at least `n` peers to commit `index`. Returns `None` if some peer's term
    /// moved past `start_term` (when given) meanwhile.
    pub fn wait(&self, index: u64, n: usize, start_term: Option<u64>) -> Option<TestCmd> {
        let mut to = Duration::from_millis(10);
        for _ in 0..30 {
            let (nd, _) = self.n_committed(index);
            if nd >= n {
                break;
            }
            thread::sleep(to);
            if to < Duration::from_secs(1) {
                to *= 2;
            }
            if let Some(st) = start_term {
                for i in 0..self.n {
                    if let Some(r) = self.raft(i)
                        && r.get_state().0 > st
                    {
                        return None;
                    }
                }
            }
        }
        let (nd, cmd) = self.n_committed(index);
        if nd < n {
            self.fatal(&format!("only {nd} decided for index {index}; wanted {n}"));
        }
        cmd
    }

    /// The network's script (exact control of chosen messages).
    pub fn script(&self) -> Script {
        self.cfg.net().script()
    }

    /// Peer `i`'s name on the network: what the script's rules name senders and receivers by.
    pub fn name(&self, i: usize) -> String {
        self.g().srv_name(i)
    }

    pub fn names(&self, peers: &[usize]) -> Vec<String> {
        self.g().srv_names_to(peers)
    }

    /// A fresh end to peer `i`, labelled `tester` for the script: a test sends peer `i`
    /// messages of its own making through it (as another peer would).
    pub fn inject_end(&self, i: usize) -> ClientEnd {
        let net = self.cfg.net();
        let end = loop {
            if let Some(e) = net.make_end(&crate::tester::randstring(20)) {
                break e;
            }
        };
        net.connect(end.name(), &self.name(i));
        net.set_end_owner(end.name(), "tester");
        net.enable(end.name(), true);
        end
    }

    /// Waits up to `timeout` for peer `i` to lead; returns its term.
    pub fn wait_leader(&self, i: usize, timeout: Duration) -> u64 {
        let t0 = Instant::now();
        loop {
            if let Some(r) = self.raft(i) {
                let (term, leader) = r.get_state();
                if leader {
                    return term;
                }
            }
            if t0.elapsed() > timeout {
                self.fatal(&format!(
                    "peer {i} did not become leader within {timeout:?}"
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` for `cond`; false if it never held.
    pub fn wait_until(&self, timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let t0 = Instant::now();
        while !cond() {
            if t0.elapsed() > timeout {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// What peer `i` has persisted now: term and vote, and its log.
    pub fn persisted(&self, i: usize) -> (crate::raft::HardState, crate::raft::log::Log) {
        match crate::raft::persist::decode_lab_state(&self.g().persister(i).read_raft_state()) {
            Ok(s) => s,
            Err(e) => self.fatal(&format!("peer {i}: persisted state unreadable: {e}")),
        }
    }

    /// The command peer `i`'s service applied at `index` since its last start, if any.
    pub fn applied_at(&self, i: usize, index: u64) -> Option<TestCmd> {
        self.applied.lock().logs[i].get(&index).cloned()
    }

    /// Everything peer `i`'s service was handed since its last start, in order.
    pub fn apply_history(&self, i: usize) -> Vec<Delivered> {
        self.applied.lock().history[i].clone()
    }

    /// RPCs delivered to all peers so far.
    pub fn rpcs(&self) -> usize {
        (0..self.n).map(|i| self.g().rpc_count(i)).sum()
    }

    /// Prints the "Passed" line and shuts everything down.
    pub fn end(&self) {
        self.finished.store(true, Ordering::SeqCst);
        self.check_apply_errors();
        self.cfg.end();
    }
}

impl Drop for Test {
    fn drop(&mut self) {
        self.finished.store(true, Ordering::SeqCst);
        // A test that failed while it held a peer's syncs: let them go, or killing that peer
        // would wait for ever on a thread blocked in one.
        for g in &self.gates {
            g.open();
        }
        self.cfg.cleanup();
    }
}

// ---------------------------------------------------------------- the file log

/// The Raft tests on the crash-safe file log (`tests/raft.rs`' `file::tests::`): the same harness, but
/// each peer keeps its state in `storage::FileLog` in a temporary directory instead of the
/// labs' `Persister`. A crash kills the peer and closes its log; the restarted peer recovers
/// from the files. The persisters stay empty; [`Test::log_size`] reads the file logs.
pub mod file {
    pub use super::*;

    use std::ops::Deref;
    use std::path::{Path, PathBuf};

    use crate::raft::log::Entry;
    use crate::raft::{HardState, Restored, Storage, StorageError};
    use crate::storage::{FileLog, FileLogOptions};

    /// Small segments, so compaction deletes files during a test.
    const SEGMENT_BYTES: u64 = 4096;

    /// A test's data directories, removed when it ends.
    struct Dirs(PathBuf);

    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A peer's file log that its crash closes (releasing the directory lock), whatever
    /// threads still hold the peer's state.
    pub(super) struct ClosableLog {
        log: Mutex<Option<Arc<FileLog>>>,
    }

    impl ClosableLog {
        /// Opens the log in `dir`, waiting up to 5 s for a crashed predecessor's last call to
        /// let go of it.
        fn open(dir: &Path) -> ClosableLog {
            let t0 = Instant::now();
            loop {
                match FileLog::open(
                    dir,
                    FileLogOptions {
                        segment_bytes: SEGMENT_BYTES,
                        ..FileLogOptions::default()
                    },
                ) {
                    Ok(log) => {
                        return ClosableLog {
                            log: Mutex::new(Some(Arc::new(log))),
                        };
                    }
                    Err(StorageError::Locked { .. }) if t0.elapsed() < Duration::from_secs(5) => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("tester: cannot open the file log in {}: {e}", dir.display()),
                }
            }
        }

        pub(super) fn close(&self) {
            self.log.lock().take();
        }

        fn get(&self) -> Result<Arc<FileLog>, StorageError> {
            self.log.lock().clone().ok_or_else(|| StorageError::Failed {
                first: "closed by a crash".to_string(),
            })
        }

        fn snapshot(&self) -> Vec<u8> {
            self.get()
                .map(|l| l.recovered_snapshot())
                .unwrap_or_default()
        }
    }

    impl Storage for ClosableLog {
        fn restore(&self) -> Result<Restored, StorageError> {
            self.get()?.restore()
        }
        fn set_hard_state(&self, hs: HardState) -> Result<(), StorageError> {
            self.get()?.set_hard_state(hs)
        }
        fn append(&self, first: u64, entries: &[Entry]) -> Result<(), StorageError> {
            self.get()?.append(first, entries)
        }
        fn truncate_after(&self, index: u64) -> Result<(), StorageError> {
            self.get()?.truncate_after(index)
        }
        fn save_snapshot(&self, index: u64, term: u64, data: &[u8]) -> Result<(), StorageError> {
            self.get()?.save_snapshot(index, term, data)
        }
        fn sync(&self) -> Result<(), StorageError> {
            self.get()?.sync()
        }
        fn state_size(&self) -> usize {
            self.get().map_or(0, |l| l.state_size())
        }
        fn write_snapshot(
            &self,
            index: u64,
            term: u64,
            data: &[u8],
        ) -> Result<Option<Arc<dyn crate::raft::storage::SnapshotSource>>, StorageError> {
            self.get()?.write_snapshot(index, term, data)
        }
        fn save_written_snapshot(
            &self,
            snapshot: &Arc<dyn crate::raft::storage::SnapshotSource>,
        ) -> Result<(), StorageError> {
            self.get()?.save_written_snapshot(snapshot)
        }
        fn discard_written_snapshot(
            &self,
            snapshot: &Arc<dyn crate::raft::storage::SnapshotSource>,
        ) {
            if let Ok(l) = self.get() {
                l.discard_written_snapshot(snapshot)
            }
        }
    }

    /// A Raft test whose peers keep their state in files.
    pub struct Test {
        inner: super::Test,
        _dirs: Dirs,
    }

    impl Deref for Test {
        type Target = super::Test;
        fn deref(&self) -> &super::Test {
            &self.inner
        }
    }

    impl Test {
        pub fn new(n: usize, reliable: bool, snapshot: bool) -> Test {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let root = std::env::temp_dir().join(format!(
                "raftkv-raft-file-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::SeqCst)
            ));
            let _ = std::fs::remove_dir_all(&root);
            let dirs = root.clone();
            let open: OpenStorage = Arc::new(move |i: usize, _persister: Persister| {
                let log = Arc::new(ClosableLog::open(&dirs.join(format!("server-{i}"))));
                let snap = log.snapshot();
                (Box::new(log.clone()) as Box<dyn Storage>, snap, Some(log))
            });
            Test {
                inner: super::Test::with_storage(
                    n,
                    reliable,
                    snapshot,
                    crate::raft::RaftOptions::default(),
                    open,
                    |_| {},
                ),
                _dirs: Dirs(root),
            }
        }
    }
}
