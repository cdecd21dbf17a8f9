//! `raftkv chaos`: a Jepsen-style run against a real local cluster. It starts `raftkv serve`
//! processes with a fault-injecting proxy on every peer link ([`cluster`]), runs concurrent
//! RESP clients on a small key set recording every call and return ([`client`]), injects
//! faults chosen by a seeded RNG ([`nemesis`]: `kill -9` and restart, `SIGSTOP`/`SIGCONT`,
//! partitions), heals everything, reads every key once more, and checks the whole history
//! with the linearizability checker ([`crate::porcupine`], the KV model).
//!
//! ```text
//!  driver thread: nemesis + status line ──► ChaosCluster (children, proxies)
//!  chaos-client-<i> threads ──RESP──► node client ports
//!  end: recover all → stop clients → final reads → porcupine → ChaosReport
//! ```
//!
//! [`run`] is the whole run; the tests call it, and the binary through [`cli`].

pub mod cli;
pub mod client;
pub mod cluster;
pub mod history;
pub mod nemesis;

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::porcupine::kv::{KvInput, KvModel, KvOutput};
use crate::porcupine::{self, CheckOptions, CheckResult, Operation};
pub use client::Record;
pub use cluster::{ChaosCluster, ClusterError, ClusterOptions};
pub use nemesis::FaultKind;

const LOG: &str = "chaos";

/// What a node stopped by a full disk (a file-size limit) says its cause is.
const DISK_FULL_CAUSE: &str = "File too large";

/// How long the healed cluster has to answer the final reads.
const RECOVERY_PATIENCE: Duration = Duration::from_secs(20);
/// How often the driver looks at the cluster and the clock.
const TICK: Duration = Duration::from_millis(100);

/// Where the live status line goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusLine {
    /// Nothing (tests).
    Off,
    /// Rewritten in place (a terminal).
    Tty,
    /// A line every 5 s (a log, CI).
    Lines,
}

/// What a chaos run does.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// The `raftkv` executable the nodes run.
    pub exe: PathBuf,
    pub nodes: usize,
    pub clients: usize,
    /// Keys the clients share (few, so that operations conflict).
    pub keys: usize,
    /// How long clients run under faults.
    pub duration: Duration,
    /// Seeds the faults and the clients' choices.
    pub seed: u64,
    /// The run keeps its data in `dir/run-<seed>-<pid>`, removed after a clean pass.
    pub dir: PathBuf,
    /// Inject faults (off: the same clients on a healthy cluster).
    pub faults: bool,
    /// The kinds of fault to choose from (empty: every kind, [`FaultKind::ALL`]).
    pub fault_kinds: Vec<FaultKind>,
    /// A deliberate bug the nodes run with, to prove the checker can fail.
    pub node_fault: Option<crate::node::NodeFault>,
    /// The checker gives up (verdict unknown) after this long.
    pub check_timeout: Duration,
    pub status: StatusLine,
    /// Where to write the recorded history as JSON lines (`docs/chaos-history.md`), if anywhere.
    pub history: Option<PathBuf>,
}

impl ChaosOptions {
    /// The defaults of `raftkv chaos` for the executable `exe`.
    pub fn new(exe: PathBuf) -> ChaosOptions {
        ChaosOptions {
            exe,
            nodes: 3,
            clients: 8,
            keys: 5,
            duration: Duration::from_secs(30),
            seed: 1,
            dir: std::env::temp_dir().join("raftkv-chaos"),
            faults: true,
            fault_kinds: Vec::new(),
            node_fault: None,
            check_timeout: Duration::from_secs(120),
            status: StatusLine::Off,
            history: None,
        }
    }
}

/// The checker's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// With the HTML page that shows where linearization got stuck (if it could be written).
    NotLinearizable {
        html: Option<PathBuf>,
    },
    /// The checker ran out of time.
    Unknown,
}

/// What a run saw.
#[derive(Debug, Clone)]
pub struct ChaosReport {
    pub seed: u64,
    pub nodes: usize,
    pub clients: usize,
    pub keys: usize,
    /// How long the clients ran.
    pub elapsed: Duration,
    /// Operations in the history (definite answers and unknown writes).
    pub ops: usize,
    /// Writes whose outcome is unknown (recorded as possibly applied).
    pub unknown_writes: usize,
    /// Of those, how many a later read of their value showed had taken effect by then
    /// ([`history::bound_unknown_writes`]).
    pub bounded_writes: usize,
    /// Reads that got no answer (left out of the history).
    pub failed_reads: u64,
    /// Latency of the operations with a definite answer.
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub faults: BTreeMap<FaultKind, usize>,
    /// Nodes that exited although nobody killed them (each restarted).
    pub crashes: Vec<String>,
    /// Nodes that stopped as a fault should make them (a full disk), with the cause they
    /// gave; not crashes.
    pub expected_stops: Vec<String>,
    /// Every key could be read once everything was healed.
    pub recovered: bool,
    /// Nodes that had not applied what the others had within [`RECOVERY_PATIENCE`] of the
    /// final reads (a node restarted after a fault that did not catch up).
    pub lagging: Vec<String>,
    pub verdict: Verdict,
    pub check_time: Duration,
    /// The run's directory (node data and logs); kept unless the run passed.
    pub run_dir: PathBuf,
    pub kept: bool,
}

impl ChaosReport {
    /// Linearizable, no node crashed, the cluster recovered.
    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Linearizable
            && self.crashes.is_empty()
            && self.recovered
            && self.lagging.is_empty()
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1e3)
}

impl fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        writeln!(
            f,
            "raftkv chaos: {} nodes, {} clients, {} keys, {:.1}s, seed {}",
            self.nodes, self.clients, self.keys, secs, self.seed
        )?;
        writeln!(
            f,
            "ops:      {} ({:.0}/s); {} writes of unknown outcome ({} seen by a later read), {} reads unanswered",
            self.ops,
            self.ops as f64 / secs,
            self.unknown_writes,
            self.bounded_writes,
            self.failed_reads
        )?;
        writeln!(
            f,
            "latency:  p50 {}  p99 {}  max {}",
            ms(self.p50),
            ms(self.p99),
            ms(self.max)
        )?;
        let total: usize = self.faults.values().sum();
        let kinds: Vec<String> = self
            .faults
            .iter()
            .map(|(kind, count)| format!("{kind} {count}"))
            .collect();
        writeln!(
            f,
            "faults:   {total}{}{}",
            if kinds.is_empty() { "" } else { ": " },
            kinds.join(", ")
        )?;
        for crash in &self.crashes {
            writeln!(f, "crash:    {crash}")?;
        }
        for stop in &self.expected_stops {
            writeln!(f, "stopped:  {stop}")?;
        }
        for node in &self.lagging {
            writeln!(f, "behind:   {node} after {RECOVERY_PATIENCE:?}")?;
        }
        if !self.recovered {
            writeln!(
                f,
                "recovery: some key could not be read within {RECOVERY_PATIENCE:?} after healing"
            )?;
        }
        let check = format!("(checked in {:.1}s)", self.check_time.as_secs_f64());
        match &self.verdict {
            Verdict::Linearizable => write!(f, "verdict:  linearizable {check}")?,
            Verdict::NotLinearizable { html: Some(path) } => write!(
                f,
                "verdict:  NOT linearizable {check}; see {}",
                path.display()
            )?,
            Verdict::NotLinearizable { html: None } => {
                write!(f, "verdict:  NOT linearizable {check}")?
            }
            Verdict::Unknown => {
                write!(f, "verdict:  unknown: the checker ran out of time {check}")?
            }
        }
        if self.kept {
            write!(f, "\nnode data and logs: {}", self.run_dir.display())?;
        }
        Ok(())
    }
}

/// Why a run did not get to a verdict.
#[derive(Debug)]
pub enum ChaosError {
    /// Bad options.
    Options(String),
    /// The cluster could not start.
    Start(ClusterError),
    /// A fault could not be injected or undone.
    Cluster(ClusterError),
    /// A stop signal arrived (the cluster has been stopped).
    Interrupted(&'static str),
    /// The history file could not be written.
    History { path: PathBuf, reason: String },
}

impl fmt::Display for ChaosError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChaosError::Options(e) => f.write_str(e),
            ChaosError::Start(e) => write!(f, "the cluster could not start: {e}"),
            ChaosError::Cluster(e) => write!(f, "{e}"),
            ChaosError::Interrupted(signal) => write!(f, "interrupted by {signal}"),
            ChaosError::History { path, reason } => {
                write!(
                    f,
                    "cannot write the history to {}: {reason}",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for ChaosError {}

impl From<ClusterError> for ChaosError {
    fn from(e: ClusterError) -> Self {
        ChaosError::Cluster(e)
    }
}

/// Sets the clients' stop flag when dropped, so that a panic in the driver does not leave
/// the scope waiting for clients that never stop.
struct StopClients<'a>(&'a client::Shared);

impl Drop for StopClients<'_> {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::SeqCst);
    }
}

/// What the fault loop hands back.
struct Phase {
    faults: BTreeMap<FaultKind, usize>,
    exits: Exits,
}

/// Nodes that exited although the driver did not kill them, sorted into crashes and the
/// stops a "disk full" fault is meant to cause. Watched during the run and after it, until
/// the report: a node whose disk filled can stop after the fault was lifted (it hit the
/// limit, and its status loop had not yet seen the storage fail), even after the run ended.
#[derive(Default)]
struct Exits {
    /// Nodes a "disk full" fault limited and that have not stopped since.
    disk_filled: std::collections::BTreeSet<usize>,
    crashes: Vec<String>,
    expected_stops: Vec<String>,
}

impl Exits {
    /// Reaps every node that exited, records why, and starts it again unless a fault in
    /// force holds it down (`held`).
    fn reap(&mut self, cluster: &mut ChaosCluster, held: &[usize]) -> Result<(), ClusterError> {
        for (node, exit) in cluster.exited() {
            let cause = cluster.stop_cause(node);
            if self.disk_filled.contains(&node)
                && let Some(cause) = cause.as_deref().filter(|c| c.contains(DISK_FULL_CAUSE))
            {
                self.disk_filled.remove(&node);
                let what = format!("node {} (disk full): {cause}", node + 1);
                log::info!(target: LOG, "{what}");
                self.expected_stops.push(what);
            } else {
                let what = match cause {
                    Some(cause) => format!("node {} exited on its own ({exit}): {cause}", node + 1),
                    None => format!("node {} exited on its own ({exit})", node + 1),
                };
                log::error!(target: LOG, "{what}; its log: {}", cluster.log_path(node).display());
                self.crashes.push(what);
            }
            // Keep the run going with the node back.
            if !held.contains(&node) {
                cluster.restart(node)?;
            }
        }
        Ok(())
    }
}

/// Runs the clients for `opts.duration` while injecting faults, then recovers the cluster,
/// reads every key and checks the history. Every node is killed and reaped before this
/// returns, whatever the outcome (also on a panic).
pub fn run(opts: &ChaosOptions) -> Result<ChaosReport, ChaosError> {
    if opts.nodes < 3 {
        return Err(ChaosError::Options(format!(
            "a chaos run needs at least 3 nodes, not {}",
            opts.nodes
        )));
    }
    if opts.clients == 0 || opts.keys == 0 {
        return Err(ChaosError::Options(
            "a chaos run needs at least one client and one key".into(),
        ));
    }
    // A history file that cannot be written is found out before the run, not after it.
    if let Some(path) = &opts.history {
        fs::File::create(path).map_err(|e| ChaosError::History {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    }
    let run_dir = opts
        .dir
        .join(format!("run-{}-{}", opts.seed, std::process::id()));
    // A parent this run creates goes again after a clean pass, if nothing else is in it.
    let parent_existed = opts.dir.exists();
    let _ = fs::remove_dir_all(&run_dir);
    let mut cluster = ChaosCluster::start(ClusterOptions {
        exe: opts.exe.clone(),
        nodes: opts.nodes,
        dir: run_dir.clone(),
        fault: opts.node_fault,
        node_log: std::env::var("RAFTKV_CHAOS_NODE_LOG").ok(),
    })
    .map_err(|e| match crate::signal::stop_requested() {
        Some(signal) => ChaosError::Interrupted(signal),
        None => ChaosError::Start(e),
    })?;
    let addrs: Vec<_> = (0..opts.nodes).map(|i| cluster.client_addr(i)).collect();
    let shared = Arc::new(client::Shared::new());
    let mut rng = SmallRng::seed_from_u64(opts.seed);
    let client_seeds: Vec<u64> = (0..opts.clients).map(|_| rng.r#gen()).collect();

    let (phase, mut records) = thread::scope(|scope| -> Result<_, ChaosError> {
        let stop_guard = StopClients(&shared);
        let handles: Vec<_> = (0..opts.clients)
            .map(|id| {
                let spec = client::ClientSpec {
                    id,
                    addrs: addrs.clone(),
                    first: id % opts.nodes,
                    keys: opts.keys,
                    seed: client_seeds[id],
                };
                let shared = &shared;
                thread::Builder::new()
                    .name(format!("chaos-client-{id}"))
                    .spawn_scoped(scope, move || client::run_client(&spec, shared))
                    .expect("spawn a chaos client thread")
            })
            .collect();
        let phase = drive(opts, &mut cluster, &shared, &mut rng);
        // Whatever happened, bring every node back so that blocked clients get answers; or,
        // on a stop signal, stop every node now (a client waiting on one gets its answer).
        let recovered = if matches!(phase, Err(ChaosError::Interrupted(_))) {
            cluster.shutdown();
            Ok(())
        } else {
            cluster.recover_all()
        };
        drop(stop_guard);
        let mut records = Vec::new();
        for handle in handles {
            match handle.join() {
                Ok(r) => records.extend(r),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        let phase = phase?;
        recovered?;
        Ok((phase, records))
    })?;
    let elapsed = shared.start.elapsed();

    // The healed cluster must answer again: one read of every key, recorded too.
    let deadline = Instant::now() + RECOVERY_PATIENCE;
    let mut recovered = true;
    for k in 0..opts.keys {
        match client::final_read(
            opts.clients,
            &addrs,
            &client::key_name(k),
            &shared,
            deadline,
        ) {
            Some(record) => records.push(record),
            None => recovered = false,
        }
    }
    // Every node, those restarted after a fault included, catches up with the others; one
    // that stops meanwhile is sorted and started again as during the run.
    let mut exits = phase.exits;
    let deadline = Instant::now() + RECOVERY_PATIENCE;
    let lagging = loop {
        exits.reap(&mut cluster, &[])?;
        let behind = cluster.behind();
        if behind.is_empty() || Instant::now() >= deadline {
            break behind;
        }
        thread::sleep(TICK);
    };
    exits.reap(&mut cluster, &[])?;
    let Exits {
        crashes,
        expected_stops,
        ..
    } = exits;
    cluster.shutdown();
    drop(cluster);
    if opts.status != StatusLine::Off {
        println!("checking {} operations…", records.len());
    }

    let end = shared.now().saturating_add(1);
    let mut latencies: Vec<Duration> = records
        .iter()
        .filter_map(|r| {
            r.ret
                .map(|ret| Duration::from_nanos((ret - r.call).max(0) as u64))
        })
        .collect();
    latencies.sort_unstable();
    let percentile = |p: f64| -> Duration {
        if latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len());
        latencies[rank - 1]
    };
    let unknown_writes = records.iter().filter(|r| r.ret.is_none()).count();
    if let Some(path) = &opts.history {
        history::write_history(path, &records).map_err(|e| ChaosError::History {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    }
    let checked = check_history(
        &mut records,
        end,
        opts.check_timeout,
        &run_dir.join("history.html"),
    );
    let (verdict, bounded_writes, check_time) =
        (checked.verdict, checked.bounded_writes, checked.check_time);
    let mut report = ChaosReport {
        seed: opts.seed,
        nodes: opts.nodes,
        clients: opts.clients,
        keys: opts.keys,
        elapsed,
        ops: records.len(),
        unknown_writes,
        bounded_writes,
        failed_reads: shared.failed_reads.load(Ordering::Relaxed),
        p50: percentile(0.50),
        p99: percentile(0.99),
        max: latencies.last().copied().unwrap_or_default(),
        faults: phase.faults,
        crashes,
        expected_stops,
        lagging,
        recovered,
        verdict,
        check_time,
        run_dir: run_dir.clone(),
        kept: true,
    };
    if report.passed() && fs::remove_dir_all(&run_dir).is_ok() {
        report.kept = false;
        if !parent_existed {
            // Fails, harmlessly, when another run's directory is there too.
            let _ = fs::remove_dir(&opts.dir);
        }
    }
    Ok(report)
}

/// What [`check_history`] found.
#[derive(Debug, Clone)]
pub struct Checked {
    pub verdict: Verdict,
    /// Unknown writes bounded by a later read of their value.
    pub bounded_writes: usize,
    pub check_time: Duration,
}

/// Checks a recorded history against the KV model: bounds the unknown writes a later read
/// shows took effect ([`history::bound_unknown_writes`]), gives the rest `end` as their
/// return, and runs porcupine within `timeout`. A history that is not linearizable is drawn
/// to `html` (the path is in the verdict if it could be written).
pub fn check_history(records: &mut [Record], end: i64, timeout: Duration, html: &Path) -> Checked {
    let bounded_writes = history::bound_unknown_writes(records);
    let history: Vec<Operation<KvInput, KvOutput>> = records
        .iter()
        .map(|r| Operation {
            client_id: r.client,
            input: r.input.clone(),
            call: r.call,
            output: r.output.clone(),
            return_time: r.ret.unwrap_or(end),
        })
        .collect();
    let check_start = Instant::now();
    let check_opts = CheckOptions {
        timeout: Some(timeout),
        ..CheckOptions::default()
    };
    let (result, _) = porcupine::check_operations_with(&KvModel, &history, &check_opts);
    let verdict = match result {
        CheckResult::Ok => Verdict::Linearizable,
        CheckResult::Unknown => Verdict::Unknown,
        CheckResult::Illegal => {
            let (_, info) = porcupine::check_operations_verbose(&KvModel, &history, Some(timeout));
            let html = match porcupine::visualize_to_file(&KvModel, &info, html) {
                Ok(()) => Some(html.to_path_buf()),
                Err(e) => {
                    log::warn!(target: LOG, "cannot write {}: {e}", html.display());
                    None
                }
            };
            Verdict::NotLinearizable { html }
        }
    };
    Checked {
        verdict,
        bounded_writes,
        check_time: check_start.elapsed(),
    }
}

/// A fault's step that failed after a stop signal was cut short by it (a membership change
/// gives up at once): the run was interrupted, not broken.
fn interrupted_or(e: ClusterError) -> ChaosError {
    match crate::signal::stop_requested() {
        Some(signal) => ChaosError::Interrupted(signal),
        None => e.into(),
    }
}

/// The fault loop, on the driver's thread, until the duration is up or a stop signal.
fn drive(
    opts: &ChaosOptions,
    cluster: &mut ChaosCluster,
    shared: &client::Shared,
    rng: &mut SmallRng,
) -> Result<Phase, ChaosError> {
    let start = Instant::now();
    let end = start + opts.duration;
    let mut faults: BTreeMap<FaultKind, usize> = BTreeMap::new();
    let mut exits = Exits::default();
    let mut active: Option<(nemesis::ActiveFault, Instant)> = None;
    let mut next_fault = start + nemesis::calm(rng);
    let mut deck = nemesis::FaultDeck::new(&opts.fault_kinds);
    let mut status = Status::new(opts.status, opts.duration);
    loop {
        let now = Instant::now();
        if let Some(signal) = crate::signal::stop_requested() {
            status.finish();
            return Err(ChaosError::Interrupted(signal));
        }
        let held = active.as_ref().map_or(&[][..], |(f, _)| &f.nodes[..]);
        exits.reap(cluster, held).map_err(interrupted_or)?;
        if now >= end {
            break;
        }
        match &active {
            Some((fault, until)) if now >= *until => {
                nemesis::recover(cluster, fault).map_err(interrupted_or)?;
                log::info!(target: LOG, "healed: {fault}");
                active = None;
                next_fault = now + nemesis::calm(rng);
            }
            None if opts.faults && now >= next_fault => {
                let kind = deck.draw(rng);
                let fault = nemesis::inject(cluster, cluster.leader(), &[kind], rng)
                    .map_err(interrupted_or)?;
                if fault.kind.stops_its_node() {
                    exits.disk_filled.extend(fault.nodes.iter().copied());
                }
                log::info!(target: LOG, "fault: {fault} for {:?}", fault.hold);
                *faults.entry(fault.kind).or_default() += 1;
                let until = (now + fault.hold).min(end);
                active = Some((fault, until));
            }
            _ => {}
        }
        let fault_text = active.as_ref().map(|(f, _)| f.to_string());
        status.show(now - start, shared.done.load(Ordering::Relaxed), fault_text);
        thread::sleep(TICK);
    }
    if let Some((fault, _)) = active.take() {
        nemesis::recover(cluster, &fault).map_err(interrupted_or)?;
    }
    status.finish();
    Ok(Phase { faults, exits })
}

/// The live status line: elapsed, ops, ops/s, the fault in force.
struct Status {
    style: StatusLine,
    duration: Duration,
    last: Option<(Duration, u64)>,
    rate: f64,
    last_line: Option<Instant>,
}

impl Status {
    fn new(style: StatusLine, duration: Duration) -> Status {
        Status {
            style,
            duration,
            last: None,
            rate: 0.0,
            last_line: None,
        }
    }

    fn show(&mut self, elapsed: Duration, done: u64, fault: Option<String>) {
        if self.style == StatusLine::Off {
            return;
        }
        match self.last {
            Some((at, before)) if elapsed >= at + Duration::from_secs(1) => {
                self.rate = (done - before) as f64 / (elapsed - at).as_secs_f64();
                self.last = Some((elapsed, done));
            }
            Some(_) => {}
            None => self.last = Some((elapsed, done)),
        }
        let line = format!(
            "chaos {:>5.1}s/{}s | ops {done} | {:.0} ops/s | fault: {}",
            elapsed.as_secs_f64(),
            self.duration.as_secs(),
            self.rate,
            fault.as_deref().unwrap_or("none")
        );
        let mut out = io::stdout().lock();
        match self.style {
            StatusLine::Tty => {
                let _ = write!(out, "\r\x1b[2K{line}");
                let _ = out.flush();
            }
            StatusLine::Lines => {
                let now = Instant::now();
                if self
                    .last_line
                    .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(5))
                {
                    let _ = writeln!(out, "{line}");
                    self.last_line = Some(now);
                }
            }
            StatusLine::Off => {}
        }
    }

    fn finish(&mut self) {
        if self.style == StatusLine::Tty {
            println!();
        }
    }
}
