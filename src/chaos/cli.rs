//! `raftkv chaos`'s command line: its options ([`ChaosArgs`], parsed by clap) and the run as
//! a command ([`run_from_cli`]): a header, a live status line, the report and an exit code.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::{ChaosError, ChaosOptions, FaultKind, StatusLine};
use crate::node::NodeFault;

/// `raftkv chaos`'s options (the help texts are the doc comments: one paragraph each).
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// How long faults are injected.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub clients: usize,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(3..=9))]
    pub nodes: usize,
    /// Keys the clients share.
    #[arg(long, default_value_t = 5, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub keys: usize,
    /// The seed of every fault decision (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where runs keep their data (default: the temp directory's raftkv-chaos).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// How long the linearizability check may take.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub check_timeout: Duration,
    /// Write the recorded history to FILE as JSON lines (docs/chaos-history.md).
    #[arg(long, value_name = "FILE")]
    pub history: Option<PathBuf>,
    /// Only these faults, comma-separated: kill-leader, kill-follower, pause-leader,
    /// pause-follower, isolate-leader, split-minority, disk-full-follower, replace-follower
    /// (default: all).
    // Fully qualified: one value that parses into the whole list, not a repeated flag.
    #[arg(long, value_name = "LIST", value_parser = FaultKind::parse_list)]
    pub faults: Option<::std::vec::Vec<FaultKind>>,
}

/// `30s`, `2m`, `500ms`, or plain seconds; above 0 and at most 24 h.
fn parse_duration(value: &str) -> Result<Duration, String> {
    let bad = || format!("'{value}' is not a duration like 30s, 2m or 500ms");
    let (digits, unit) = match value.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => value.split_at(at),
        None => (value, "s"),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    if d.is_zero() || d > Duration::from_secs(24 * 3600) {
        return Err(format!("must be above 0 and at most 24h, not '{value}'"));
    }
    Ok(d)
}

/// `raftkv chaos` once its options are parsed, the nodes to run with `node_fault` (a
/// deliberate bug, to prove the checker can fail): catches SIGINT/SIGTERM, prints the run's
/// header, a live status line and the report; the process's exit code (0 linearizable, 1 not
/// or the run failed, 130 interrupted).
pub fn run_from_cli(args: ChaosArgs, node_fault: Option<NodeFault>) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("raftkv chaos: cannot find my own executable: {e}");
            return ExitCode::from(1);
        }
    };
    let mut opts = ChaosOptions::new(exe);
    opts.duration = args.duration;
    opts.check_timeout = args.check_timeout;
    opts.clients = args.clients;
    opts.nodes = args.nodes;
    opts.keys = args.keys;
    opts.seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    if let Some(dir) = args.dir {
        opts.dir = dir;
    }
    opts.history = args.history;
    if let Some(kinds) = args.faults {
        opts.fault_kinds = kinds;
    }
    opts.node_fault = node_fault;
    if let Err(e) = crate::signal::catch_stop_signals() {
        eprintln!("raftkv chaos: cannot catch SIGINT/SIGTERM: {e}");
        return ExitCode::from(1);
    }
    opts.status = if std::io::stdout().is_terminal() {
        StatusLine::Tty
    } else {
        StatusLine::Lines
    };
    if let Some(fault) = opts.node_fault {
        println!("raftkv chaos: the nodes run with the deliberate fault {fault:?}");
    }
    println!(
        "raftkv chaos: {} nodes, {} clients, {} keys, {}s, seed {} (Ctrl-C stops)",
        opts.nodes,
        opts.clients,
        opts.keys,
        opts.duration.as_secs_f64(),
        opts.seed
    );
    match super::run(&opts) {
        Ok(report) => {
            println!("{report}");
            ExitCode::from(if report.passed() { 0 } else { 1 })
        }
        Err(ChaosError::Interrupted(signal)) => {
            eprintln!("raftkv chaos: interrupted by {signal}; every node stopped");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("raftkv chaos: {e}");
            ExitCode::from(1)
        }
    }
}
