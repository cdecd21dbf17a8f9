//! The KV test harness shared by Labs 2, 4 and 5 (the Go labs' `kvtest1`): recorded Gets and
//! Puts, the linearizability check of the recorded history, and the client helpers the tests
//! are written in (`one_put`, `check_put_concurrent`, `spawn_clients_and_wait`, `partitioner`,
//! `spread_puts`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, TryRecvError};
use parking_lot::Mutex;
use rand::Rng;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Clnt, Config, Tgid};
use crate::kvapi::KvClerk;
use crate::kvapi::{KvErr, Tversion};
use crate::labcodec;
use crate::porcupine::kv::{KvInput, KvModel, KvOutput};
use crate::porcupine::{self, CheckResult, Operation};

/// The tester generously allows solutions to complete elections in one second.
pub const ELECTION_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the checker may take before the history is assumed fine.
pub const LINEARIZABILITY_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// `n` random letters.
pub fn rand_value(n: usize) -> String {
    super::random_chars(n, b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
}

/// `k0` .. `k{n-1}`.
pub fn make_keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("k{i}")).collect()
}

/// A clerk and the test client it talks through (so a test can cut it off).
#[derive(Clone)]
pub struct TestClerk {
    pub ck: Arc<dyn KvClerk>,
    pub clnt: Arc<Clnt>,
}

/// Makes and deletes the clerks of one lab's KV service.
pub trait ClerkMaker: Send + Sync {
    fn make_clerk(&self) -> TestClerk;
    fn delete_clerk(&self, ck: &TestClerk);
}

/// A lab's [`ClerkMaker`]: each clerk gets a fresh client of `cfg`, which `make` builds the
/// lab's clerk on; deleting the clerk deletes the client.
pub struct ClerkFactory<F> {
    cfg: Arc<Config>,
    make: F,
}

impl<F: Fn(&Arc<Clnt>) -> Arc<dyn KvClerk> + Send + Sync> ClerkFactory<F> {
    pub fn new(cfg: Arc<Config>, make: F) -> ClerkFactory<F> {
        ClerkFactory { cfg, make }
    }
}

impl<F: Fn(&Arc<Clnt>) -> Arc<dyn KvClerk> + Send + Sync> ClerkMaker for ClerkFactory<F> {
    fn make_clerk(&self) -> TestClerk {
        let clnt = self.cfg.clnts().make_client();
        TestClerk {
            ck: (self.make)(&clnt),
            clnt,
        }
    }

    fn delete_clerk(&self, ck: &TestClerk) {
        self.cfg.clnts().delete_client(&ck.clnt);
    }
}

/// What one client's Puts came to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClntRes {
    pub nok: usize,
    pub nmaybe: usize,
}

/// A value the tests store: who wrote it at which version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EntryV {
    pub id: usize,
    pub v: Tversion,
}

/// A value the tests store: who wrote it and a counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EntryN {
    pub id: usize,
    pub n: usize,
}

/// A test's clerks' Puts and how many of them came back `ErrMaybe`; of those that
/// [`KvTest::one_put`] checked with its next Get, how many had taken effect (the harmful
/// kind on a reliable network), had not, or cannot be told (the key had moved past them).
#[derive(Debug, Default)]
struct PutCount {
    puts: AtomicUsize,
    maybes: AtomicUsize,
    maybe_took: AtomicUsize,
    maybe_not: AtomicUsize,
    maybe_unknown: AtomicUsize,
}

/// A clerk whose Puts the test counts ([`KvTest::counted`]); otherwise the clerk itself.
struct CountingClerk {
    inner: Arc<dyn KvClerk>,
    count: Arc<PutCount>,
}

impl KvClerk for CountingClerk {
    fn get(&self, key: &str) -> (String, Tversion, KvErr) {
        self.inner.get(key)
    }

    fn put(&self, key: &str, value: &str, version: Tversion) -> KvErr {
        let err = self.inner.put(key, value, version);
        self.count.puts.fetch_add(1, Ordering::Relaxed);
        if err == KvErr::Maybe {
            self.count.maybes.fetch_add(1, Ordering::Relaxed);
        }
        err
    }
}

/// Extra words for the ErrMaybe line a test prints when it ends.
pub type EndNote = Box<dyn Fn() -> String + Send + Sync>;

/// One KV test: its configuration, its clerks and the history of what they did.
pub struct KvTest {
    pub cfg: Arc<Config>,
    mck: Arc<dyn ClerkMaker>,
    randomkeys: bool,
    history: Mutex<Vec<Operation<KvInput, KvOutput>>>,
    t0: Instant,
    put_count: Arc<PutCount>,
    end_note: Mutex<Option<EndNote>>,
}

impl KvTest {
    pub fn new(cfg: Arc<Config>, randomkeys: bool, mck: Arc<dyn ClerkMaker>) -> KvTest {
        KvTest {
            cfg,
            mck,
            randomkeys,
            history: Mutex::new(Vec::new()),
            t0: Instant::now(),
            put_count: Arc::new(PutCount::default()),
            end_note: Mutex::new(None),
        }
    }

    /// A clerk of the lab's service, its Puts counted for the ErrMaybe line.
    pub fn make_clerk(&self) -> TestClerk {
        self.counted(self.mck.make_clerk())
    }

    /// `ck` with its Puts counted for the ErrMaybe line (for clerks made outside
    /// [`make_clerk`](Self::make_clerk)).
    pub fn counted(&self, ck: TestClerk) -> TestClerk {
        TestClerk {
            ck: Arc::new(CountingClerk {
                inner: ck.ck,
                count: self.put_count.clone(),
            }),
            clnt: ck.clnt,
        }
    }

    /// Adds `note()` to the ErrMaybe line printed when the test ends.
    pub fn set_end_note(&self, note: EndNote) {
        *self.end_note.lock() = Some(note);
    }

    /// The line every KV test prints when it ends, passed or not: how many of its clerks'
    /// Puts came back `ErrMaybe` (`docs/errmaybe.md`).
    fn maybe_line(&self) -> String {
        let c = &self.put_count;
        let ld = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        let note = self
            .end_note
            .lock()
            .as_ref()
            .map(|f| f())
            .unwrap_or_default();
        format!(
            "  ... ErrMaybe {} of {} Puts (next Get: {} had taken effect, {} had not, {} unknown){note}",
            ld(&c.maybes),
            ld(&c.puts),
            ld(&c.maybe_took),
            ld(&c.maybe_not),
            ld(&c.maybe_unknown)
        )
    }

    pub fn delete_clerk(&self, ck: &TestClerk) {
        self.mck.delete_clerk(ck)
    }

    pub fn fatal(&self, msg: &str) -> ! {
        self.cfg.fatal(msg)
    }

    fn now_ns(&self) -> i64 {
        self.t0.elapsed().as_nanos() as i64
    }

    /// A Get recorded in the history, as client `cli`.
    pub fn get(&self, ck: &dyn KvClerk, key: &str, cli: usize) -> (String, Tversion, KvErr) {
        let call = self.now_ns();
        let (value, version, err) = ck.get(key);
        let ret = self.now_ns();
        self.cfg.op();
        self.history.lock().push(Operation {
            client_id: cli,
            input: KvInput::get(key),
            call,
            output: KvOutput::got(value.clone(), version, err),
            return_time: ret,
        });
        (value, version, err)
    }

    /// A Put recorded in the history, as client `cli`.
    pub fn put(
        &self,
        ck: &dyn KvClerk,
        key: &str,
        value: &str,
        version: Tversion,
        cli: usize,
    ) -> KvErr {
        let call = self.now_ns();
        let err = ck.put(key, value, version);
        let ret = self.now_ns();
        self.cfg.op();
        self.history.lock().push(Operation {
            client_id: cli,
            input: KvInput::put(key, value, version),
            call,
            output: KvOutput::put(err),
            return_time: ret,
        });
        err
    }

    /// Checks the recorded history with the default one-second budget.
    pub fn check_porcupine(&self) {
        self.check_porcupine_t(LINEARIZABILITY_CHECK_TIMEOUT)
    }

    /// Checks the recorded history. Not linearizable: writes the visualization and fails.
    /// Undecided within `timeout`: says so and passes, as the Go tester does.
    pub fn check_porcupine_t(&self, timeout: Duration) {
        let history = self.history.lock().clone();
        let (res, info) = porcupine::check_operations_verbose(&KvModel, &history, Some(timeout));
        match res {
            CheckResult::Ok => {}
            CheckResult::Unknown => {
                println!("info: linearizability check timed out, assuming history is ok");
            }
            CheckResult::Illegal => {
                let path = visualization_path();
                match porcupine::visualize_to_file(&KvModel, &info, &path) {
                    Ok(()) => println!("info: wrote visualization to {}", path.display()),
                    Err(e) => println!("info: failed to write visualization: {e}"),
                }
                self.fatal(&format!(
                    "history is not linearizable (visualization: {})",
                    path.display()
                ));
            }
        }
    }

    /// Puts until it takes, bumping the version on `ErrVersion`/`ErrMaybe`; returns the
    /// version after it.
    pub fn put_at_least_once(
        &self,
        ck: &dyn KvClerk,
        key: &str,
        value: &str,
        mut ver: Tversion,
        me: usize,
    ) -> Tversion {
        loop {
            let err = self.put(ck, key, value, ver, me);
            match err {
                KvErr::Ok => {
                    ver += 1;
                    break;
                }
                KvErr::Maybe | KvErr::Version => ver += 1,
                other if ver != 0 => {
                    self.fatal(&format!("put {key:?} v{ver}: wrong error {other}"))
                }
                _ => {}
            }
        }
        ver
    }

    /// A recorded Get that must return exactly `value` at `version`.
    pub fn check_get(&self, ck: &dyn KvClerk, key: &str, value: &str, version: Tversion) {
        let (val, ver, err) = self.get(ck, key, 0);
        if err != KvErr::Ok || val != value || ver != version {
            self.fatal(&format!(
                "check_get {key:?}: expected ({value:?}, {version}, OK), got ({val:?}, {ver}, {err})"
            ));
        }
    }

    /// After concurrent Puts: the key's version is the number of Puts that succeeded (reliable)
    /// or at most those that succeeded or maybe did.
    pub fn check_put_concurrent(
        &self,
        ck: &dyn KvClerk,
        key: &str,
        rs: &[ClntRes],
        res: &mut ClntRes,
        reliable: bool,
    ) {
        let (_, ver0): (EntryV, Tversion) = self.get_json(ck, key, u32::MAX as usize);
        for r in rs {
            res.nok += r.nok;
            res.nmaybe += r.nmaybe;
        }
        if reliable {
            if ver0 as usize != res.nok {
                self.fatal(&format!(
                    "Reliable: Wrong number of puts: server {ver0} clnts {res:?}"
                ));
            }
        } else if ver0 as usize > res.nok + res.nmaybe {
            self.fatal(&format!(
                "Unreliable: Wrong number of puts: server {ver0} clnts {res:?}"
            ));
        }
    }

    /// Runs `f` on `nclnt` clients, each with its own clerk, for `t`; then tells each to stop
    /// and collects what they return.
    pub fn spawn_clients_and_wait<F>(
        self: &Arc<Self>,
        nclnt: usize,
        t: Duration,
        f: F,
    ) -> Vec<ClntRes>
    where
        F: Fn(usize, &TestClerk, &Done) -> ClntRes + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        let mut stops = Vec::new();
        let mut handles = Vec::new();
        for cli in 0..nclnt {
            let (tx, rx) = channel::bounded::<()>(0);
            stops.push(tx);
            let ts = self.clone();
            let f = f.clone();
            handles.push(
                thread::Builder::new()
                    .name(format!("test-client-{cli}"))
                    .spawn(move || {
                        let ck = ts.make_clerk();
                        let res = f(cli, &ck, &Done(rx));
                        ts.delete_clerk(&ck);
                        res
                    })
                    .expect("cannot start a client thread"),
            );
        }
        thread::sleep(t);
        // Dropping the sender is the signal: each client notices on its next check.
        drop(stops);
        handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| match h.join() {
                Ok(r) => r,
                Err(e) => self.fatal(&format!("client {i} failed: {}", super::panic_message(&*e))),
            })
            .collect()
    }

    /// A recorded Get whose value is decoded; the Get must succeed.
    pub fn get_json<T: DeserializeOwned>(
        &self,
        ck: &dyn KvClerk,
        key: &str,
        me: usize,
    ) -> (T, Tversion) {
        let (val, ver, err) = self.get(ck, key, me);
        if err != KvErr::Ok {
            self.fatal(&format!("get {key:?}: error {err}"));
        }
        match decode_value(&val) {
            Some(v) => (v, ver),
            None => self.fatal(&format!("get {key:?}: cannot decode value {val:?}")),
        }
    }

    /// A recorded Put of an encoded value.
    pub fn put_json<T: Serialize>(
        &self,
        ck: &dyn KvClerk,
        key: &str,
        value: &T,
        version: Tversion,
        me: usize,
    ) -> KvErr {
        self.put(ck, key, &encode_value(value), version, me)
    }

    /// Puts `EntryV { me, ver }` at version `ver` until the outcome is known; returns the
    /// version seen afterwards and whether the Put surely took.
    pub fn one_put(
        &self,
        me: usize,
        ck: &dyn KvClerk,
        key: &str,
        mut ver: Tversion,
    ) -> (Tversion, bool) {
        loop {
            let err = self.put_json(ck, key, &EntryV { id: me, v: ver }, ver, me);
            if !matches!(err, KvErr::Ok | KvErr::Version | KvErr::Maybe) {
                self.fatal(&format!("Wrong error {err}"));
            }
            let (e, ver0): (EntryV, Tversion) = self.get_json(ck, key, me);
            if err == KvErr::Maybe {
                // The entry names its writer and version, so the Get tells whether this Put
                // took effect, unless another Put has moved the key on since.
                let c = &self.put_count;
                let outcome = if ver0 == ver + 1 && e.id == me && e.v == ver {
                    &c.maybe_took
                } else if ver0 <= ver + 1 {
                    &c.maybe_not
                } else {
                    &c.maybe_unknown
                };
                outcome.fetch_add(1, Ordering::Relaxed);
            }
            if err == KvErr::Ok && ver0 == ver + 1 {
                // My put took.
                if e.id != me || e.v != ver {
                    self.fatal(&format!("Wrong entry {e:?}, expected id {me} v {ver}"));
                }
            }
            ver = ver0;
            if err == KvErr::Ok || err == KvErr::Maybe {
                return (ver, err == KvErr::Ok);
            }
        }
    }

    /// Repeats `one_put` on `keys[0]` (or a random key) until told to stop.
    pub fn one_client_put(
        &self,
        cli: usize,
        ck: &dyn KvClerk,
        keys: &[String],
        done: &Done,
    ) -> ClntRes {
        let mut res = ClntRes::default();
        let mut versions = vec![0 as Tversion; keys.len()];
        let mut rng = rand::thread_rng();
        while !done.is_done() {
            let k = if self.randomkeys {
                rng.gen_range(0..keys.len())
            } else {
                0
            };
            let (ver, ok) = self.one_put(cli, ck, &keys[k], versions[k]);
            versions[k] = ver;
            if ok {
                res.nok += 1;
            } else {
                res.nmaybe += 1;
            }
        }
        res
    }

    /// Unrecorded Puts of `n` keys with random values of `valsz`, each then checked.
    pub fn spread_puts_size(
        &self,
        ck: &dyn KvClerk,
        n: usize,
        valsz: usize,
    ) -> (Vec<String>, Vec<String>) {
        let keys = make_keys(n);
        let values: Vec<String> = (0..n).map(|_| super::randstring(valsz)).collect();
        for (k, v) in keys.iter().zip(&values) {
            // On an unreliable network a retried Put may come back ErrMaybe; the check_get
            // below tells whether it took (Go ignores the outcome altogether).
            let err = ck.put(k, v, 0);
            if !matches!(err, KvErr::Ok | KvErr::Maybe) {
                self.fatal(&format!("put {k:?} failed: {err}"));
            }
        }
        for (k, v) in keys.iter().zip(&values) {
            self.check_get(ck, k, v, 1);
        }
        (keys, values)
    }

    pub fn spread_puts(&self, ck: &dyn KvClerk, n: usize) -> (Vec<String>, Vec<String>) {
        self.spread_puts_size(ck, n, 20)
    }

    /// Repartitions group `gid` at random every election timeout or so until stopped.
    pub fn partitioner(self: &Arc<Self>, gid: Tgid) -> Partitioner {
        let (tx, rx) = channel::bounded::<()>(0);
        let ts = self.clone();
        let handle = thread::Builder::new()
            .name(format!("partitioner-{gid}"))
            .spawn(move || {
                let g = ts.cfg.group(gid);
                let mut rng = rand::thread_rng();
                loop {
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    for i in 0..g.n() {
                        if rng.gen_bool(0.5) {
                            a.push(i);
                        } else {
                            b.push(i);
                        }
                    }
                    g.partition(&a, &b);
                    let pause = ELECTION_TIMEOUT + Duration::from_millis(rng.gen_range(0..200));
                    match rx.recv_timeout(pause) {
                        Err(channel::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            })
            .expect("cannot start the partitioner");
        Partitioner {
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// The "Passed" line and the shutdown of everything.
    pub fn end(&self) {
        self.cfg.end();
    }
}

impl Drop for KvTest {
    fn drop(&mut self) {
        println!("{}", self.maybe_line());
        self.cfg.cleanup();
    }
}

/// A client's signal to stop.
pub struct Done(Receiver<()>);

impl Done {
    pub fn is_done(&self) -> bool {
        !matches!(self.0.try_recv(), Err(TryRecvError::Empty))
    }
}

/// A running [`KvTest::partitioner`]; stops when told or dropped.
pub struct Partitioner {
    stop: Option<channel::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl Partitioner {
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.take();
        if let Some(h) = self.handle.take()
            && let Err(e) = h.join()
            && !thread::panicking()
        {
            panic!("the partitioner failed: {}", super::panic_message(&*e));
        }
    }
}

impl Drop for Partitioner {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Values the tests store as strings: the codec's bytes in hex.
pub fn encode_value<T: Serialize>(v: &T) -> String {
    let bytes = labcodec::encode(v).unwrap_or_default();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn decode_value<T: DeserializeOwned>(s: &str) -> Option<T> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    labcodec::decode(&bytes?).ok()
}

fn visualization_path() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "porcupine-{}-{}.html",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}
