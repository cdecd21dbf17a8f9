//! A test's configuration: the network, the server groups, the clients, and the begin/end
//! lines with time, RPC and operation counts.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::clients::Clnts;
use super::group::{GRP0, ServerGrp, StartFn, Tgid};
use crate::labrpc::Network;

/// The most a test may take, as in the Go tester.
pub const TEST_TIME_LIMIT: Duration = Duration::from_secs(120);

struct Begun {
    t0: Instant,
    rpcs0: usize,
    desc: String,
}

pub struct Config {
    net: Network,
    clnts: Clnts,
    groups: Mutex<HashMap<Tgid, Arc<ServerGrp>>>,
    start: Instant,
    begun: Mutex<Option<Begun>>,
    ops: AtomicUsize,
    cleaned: AtomicBool,
}

impl Config {
    /// A network with group [`GRP0`] of `n` servers started and connected, then made reliable
    /// or not (in that order, as the Go tester does).
    pub fn new(n: usize, reliable: bool, start_fn: StartFn) -> Arc<Config> {
        Config::new_with(n, reliable, start_fn, |_| {})
    }

    /// [`Config::new`], with `before_start` run on the network before any server starts (a
    /// test that scripts the network from the first message).
    pub fn new_with(
        n: usize,
        reliable: bool,
        start_fn: StartFn,
        before_start: impl FnOnce(&Network),
    ) -> Arc<Config> {
        super::logging::init();
        let net = Network::new();
        log::info!(target: "tester", "network seed {} (set {}={} to replay)", net.seed(), crate::labrpc::SEED_ENV, net.seed());
        let cfg = Arc::new(Config {
            clnts: Clnts::new(net.clone()),
            net,
            groups: Mutex::new(HashMap::new()),
            start: Instant::now(),
            begun: Mutex::new(None),
            ops: AtomicUsize::new(0),
            cleaned: AtomicBool::new(false),
        });
        before_start(&cfg.net);
        cfg.make_group_start(GRP0, n, start_fn);
        cfg.net.set_reliable(reliable);
        cfg
    }

    pub fn net(&self) -> &Network {
        &self.net
    }

    pub fn clnts(&self) -> &Clnts {
        &self.clnts
    }

    pub fn set_reliable(&self, yes: bool) {
        self.net.set_reliable(yes);
    }

    pub fn is_reliable(&self) -> bool {
        self.net.is_reliable()
    }

    pub fn set_long_reordering(&self, yes: bool) {
        self.net.set_long_reordering(yes);
    }

    pub fn set_long_delays(&self, yes: bool) {
        self.net.set_long_delays(yes);
    }

    /// Group `gid`. Panics if there is none: that is a bug in the test.
    pub fn group(&self, gid: Tgid) -> Arc<ServerGrp> {
        match self.groups.lock().get(&gid) {
            Some(g) => g.clone(),
            None => panic!("test uses group {gid}, which was never started"),
        }
    }

    /// Makes group `gid` of `nsrv` servers, starts and connects them.
    pub fn make_group_start(&self, gid: Tgid, nsrv: usize, start_fn: StartFn) {
        let g = Arc::new(ServerGrp::new(self.net.clone(), gid, nsrv, start_fn));
        self.groups.lock().insert(gid, g.clone());
        g.start_servers();
    }

    /// Shuts group `gid` down and forgets it.
    pub fn exit_group(&self, gid: Tgid) {
        let g = self.groups.lock().remove(&gid);
        if let Some(g) = g {
            g.shutdown();
        }
    }

    pub fn rpc_total(&self) -> usize {
        self.net.total_count()
    }

    pub fn bytes_total(&self) -> u64 {
        self.net.total_bytes()
    }

    /// Prints the test's description and starts counting time, RPCs and operations.
    pub fn begin(&self, desc: &str) {
        let net = if self.is_reliable() {
            "reliable"
        } else {
            "unreliable"
        };
        println!("{desc} ({net} network)...");
        *self.begun.lock() = Some(Begun {
            t0: Instant::now(),
            rpcs0: self.rpc_total(),
            desc: desc.to_string(),
        });
        self.ops.store(0, Ordering::Relaxed);
    }

    /// Counts one client operation.
    pub fn op(&self) {
        self.ops.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ops(&self) -> usize {
        self.ops.load(Ordering::Relaxed)
    }

    /// Checks the time limit and prints the "Passed" line.
    pub fn end(&self) {
        self.check_timeout();
        let begun = self.begun.lock();
        let (elapsed, rpcs) = match &*begun {
            Some(b) => (b.t0.elapsed(), self.rpc_total() - b.rpcs0),
            None => (self.start.elapsed(), self.rpc_total()),
        };
        let npeers = self.groups.lock().get(&GRP0).map_or(0, |g| g.n());
        println!(
            "  ... Passed --  time {:4.1}s #peers {} #RPCs {:5} #Ops {:4}",
            elapsed.as_secs_f64(),
            npeers,
            rpcs,
            self.ops()
        );
    }

    /// Fails the test if it has run longer than [`TEST_TIME_LIMIT`].
    pub fn check_timeout(&self) {
        if !std::thread::panicking() && self.start.elapsed() > TEST_TIME_LIMIT {
            self.fatal("test took longer than 120 seconds");
        }
    }

    /// Fails the test with `msg`, naming the test and the network seed.
    pub fn fatal(&self, msg: &str) -> ! {
        panic!("{}", self.fatal_message(msg));
    }

    /// Fails the whole test process at once, as Go's `log.Fatalf` does in the tester's apply
    /// checkers: for a check that fails on a thread no test thread joins. The message goes
    /// straight to stderr (past the test's output capture), then the process exits with 1.
    pub fn fail_process(&self, msg: &str) -> ! {
        use std::io::Write;
        let text = format!("{}\n", self.fatal_message(msg));
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
        std::process::exit(1);
    }

    fn fatal_message(&self, msg: &str) -> String {
        let desc = self
            .begun
            .lock()
            .as_ref()
            .map(|b| b.desc.clone())
            .unwrap_or_default();
        format!(
            "Fatal: {msg}\n  test: {desc}\n  network seed: {seed} (replay with {env}={seed})",
            seed = self.net.seed(),
            env = crate::labrpc::SEED_ENV
        )
    }

    /// Kills every server, deletes every client and shuts the network down. Idempotent.
    pub fn cleanup(&self) {
        if self.cleaned.swap(true, Ordering::SeqCst) {
            return;
        }
        self.clnts.cleanup();
        let groups: Vec<Arc<ServerGrp>> = self.groups.lock().values().cloned().collect();
        for g in groups {
            g.kill_all();
        }
        self.net.cleanup();
    }
}

impl Drop for Config {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "  network seed {} (replay with {}={})",
                self.net.seed(),
                crate::labrpc::SEED_ENV,
                self.net.seed()
            );
        }
        self.cleanup();
    }
}
