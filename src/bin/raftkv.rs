//! `raftkv`: a linearizable key/value store on Raft that speaks Redis's protocol. This file is
//! the command line only; the work is in the library (`raftkv::proc` for `serve` and `local`,
//! `raftkv::chaos` for `chaos`).
//!
//! Exit status: 0 after a clean stop (or a linearizable chaos run), 1 when a node cannot
//! start or stops on an error (or a chaos run that is not linearizable), 2 for a bad command
//! line (clap's usage errors), 130 for an interrupted chaos run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};
use raftkv::proc::local::LocalArgs;
use raftkv::proc::serve::ServeArgs;

/// Every help page starts with a `usage:` line, then the options, then the details.
const HELP: &str = "{about-with-newline}\nusage: {usage}\n\n{all-args}{after-help}";

/// raftkv: a linearizable key/value store on Raft, spoken to with any Redis client.
#[derive(Parser)]
#[command(name = "raftkv", help_template = HELP, args_conflicts_with_subcommands = true)]
#[command(
    after_help = "With no command, `raftkv` runs `raftkv local`. `raftkv <command> --help` \
                  shows a command's options.\nLogs go to stderr when RUST_LOG is set \
                  (`info`, or per target: `warn,raft::election=debug`)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    local: LocalOpts,
}

#[derive(Subcommand)]
enum Cmd {
    /// A cluster of N local processes (the default command).
    #[command(help_template = HELP)]
    #[command(
        after_help = "Node i's Redis port is P+i-1 and its peer port P+1000+i-1; its \
        data lives in DIR/node-i. Prints where to connect and one live status line. Ctrl-C \
        stops every node; starting again with the same DIR finds the data where it was."
    )]
    Local(LocalOpts),
    /// One node of a cluster.
    #[command(help_template = HELP)]
    #[command(
        after_help = "Every node must be given the same --peers list (each node's peer \
        port). The Raft log, snapshots, the node's identity and its status file live in --data. \
        A new cluster: give every founding node the same --bootstrap ID on its first start \
        only. A node started on an empty --data without it waits for a leader of its cluster, \
        catches up, and only then votes (how a node whose disk was lost rejoins). A --data of \
        another cluster or node is refused. SIGINT and SIGTERM stop the node cleanly."
    )]
    Serve(ServeOpts),
    /// Break a local cluster on purpose and check what clients saw.
    #[command(help_template = HELP)]
    #[command(
        after_help = "Starts a local cluster (every peer link through a fault-injecting \
        proxy), runs C clients on K shared keys (VGET and VSET), and injects faults chosen \
        from the seed: kill -9 and restart, SIGSTOP/SIGCONT pauses, partitions (links cut or \
        blackholed), a follower's disk filling up, a follower replaced (member remove, wiped, \
        member add). Then it heals everything, reads every key and checks the history for \
        linearizability. Node data and logs go to DIR/run-<seed>-<pid>, removed after a run \
        that passes. Durations: 30s, 2m, 500ms, or plain seconds.\nExit status: 0 \
        linearizable, 1 not (or unknown, a crash, no recovery, no start), 2 bad command line, \
        130 interrupted."
    )]
    Chaos(ChaosOpts),
    /// List, add or remove the members of a running cluster.
    #[command(help_template = HELP)]
    #[command(
        after_help = "Sent to the client port of the nodes given with --node (the first that \
        leads runs it; a follower points to the leader). `add` joins the new node as a \
        non-voting learner, waits until it has caught up with the leader, then makes it a \
        voter; start the new node first (`raftkv serve` with its new --id, an empty --data, \
        --cluster and no --bootstrap). `remove` takes a node out (the leader itself steps \
        down once its removal commits); stop the removed node afterwards. One change at a \
        time.\nExit status: 0 done, 1 refused or no leader answered, 2 bad command line."
    )]
    Member(MemberOpts),
}

#[derive(Args)]
struct MemberOpts {
    /// Client addresses (HOST:PORT) of nodes to ask, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    node: Vec<String>,
    /// The client password's file, if the nodes require one.
    #[arg(long, value_name = "FILE")]
    requirepass_file: Option<PathBuf>,
    #[command(subcommand)]
    action: MemberCmd,
}

#[derive(Subcommand)]
enum MemberCmd {
    /// Each member: id, voter or learner, peer and client address, match index.
    List,
    /// Add node ID, which its peers reach at PEER_ADDR (`-`: at each node's own --peers
    /// entry for ID) and clients at CLIENT_ADDR.
    Add {
        #[arg(value_parser = clap::value_parser!(u64).range(1..=64))]
        id: u64,
        peer_addr: String,
        client_addr: String,
    },
    /// Remove node ID.
    Remove {
        #[arg(value_parser = clap::value_parser!(u64).range(1..=64))]
        id: u64,
    },
}

#[derive(Args)]
struct LocalOpts {
    /// Nodes to run.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    nodes: u64,
    /// Where the nodes keep their data.
    #[arg(long, default_value = "./raftkv-data")]
    dir: PathBuf,
    /// Node 1's Redis port (P).
    #[arg(long, default_value_t = 7001, value_parser = clap::value_parser!(u16).range(1..=64000))]
    port: u16,
    /// Clients must AUTH with the password in FILE (its first line).
    #[arg(long, value_name = "FILE", conflicts_with = "auth")]
    requirepass_file: Option<PathBuf>,
    /// Clients must AUTH with the password in DIR/requirepass (created, mode 0600, with a
    /// random password if it does not exist).
    #[arg(long)]
    auth: bool,
}

#[derive(Args)]
struct ServeOpts {
    /// This node's id in --peers.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    id: u64,
    /// Every node's peer address: 1=HOST:PORT,2=HOST:PORT,…
    #[arg(long, value_parser = parse_peers)]
    peers: Peers,
    /// Where Redis clients connect (HOST:PORT).
    #[arg(long)]
    client: String,
    /// The node's data directory.
    #[arg(long)]
    data: PathBuf,
    /// The cluster's peer secret: the same file on every node, at least 16 bytes, mode 0600.
    /// Every peer connection starts with a handshake proving both ends hold it (it
    /// authenticates; it does not encrypt). `raftkv local` creates DIR/peer-secret.
    #[arg(long, value_name = "FILE")]
    peer_secret_file: PathBuf,
    /// The cluster this node belongs to (8-64 characters of 0-9 a-z A-Z - _): a --data of
    /// another cluster is refused, and a node on an empty --data joins only this cluster.
    #[arg(long, value_name = "ID", value_parser = parse_cluster_id)]
    cluster: Option<String>,
    /// Found a new cluster with this id (the same on every founding node; first start only).
    #[arg(long, value_name = "ID", value_parser = parse_cluster_id)]
    bootstrap: Option<String>,
    /// Stop when standard input closes (how `local` and the tests tie a node's life to theirs).
    #[arg(long)]
    stop_on_stdin_eof: bool,
    /// Clients must AUTH with the password in FILE (its first line). Without it, --client
    /// must be a loopback address (protected mode).
    #[arg(long, value_name = "FILE")]
    requirepass_file: Option<PathBuf>,
    /// Client connections at once; more get Redis's "max number of clients reached".
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    maxclients: u64,
    /// Close a client silent this many seconds (0: never), as Redis's `timeout`.
    #[arg(long, value_name = "SECS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=31_536_000))]
    timeout: u64,
    /// Close a client that sent part of a command and completed none for this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    partial_frame_timeout: u64,
    /// Bytes of partly received commands held for all clients together; past it the client
    /// holding the most is closed.
    #[arg(long, value_name = "BYTES", default_value_t = 256 << 20, value_parser = clap::value_parser!(u64).range((1 << 20)..=(1 << 40)))]
    maxmemory_clients: u64,
    /// The largest snapshot this node writes or takes from a peer (give every node the same):
    /// a larger one streamed to it is refused before anything is written.
    #[arg(long, value_name = "BYTES", default_value_t = raftkv::storage::DEFAULT_MAX_SNAPSHOT_BYTES, value_parser = clap::value_parser!(u64).range((1 << 20)..))]
    max_snapshot_bytes: u64,
    /// A snapshot streamed to this node is refused (or its transfer abandoned) if taking it
    /// would leave less than this free on the data directory's filesystem.
    #[arg(long, value_name = "BYTES", default_value_t = raftkv::storage::DEFAULT_MIN_FREE_BYTES)]
    min_free_disk: u64,
}

#[derive(Args)]
struct ChaosOpts {
    /// How long faults are injected.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    clients: u64,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=9))]
    nodes: u64,
    /// Keys the clients share.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    keys: u64,
    /// The seed of every fault decision (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Where runs keep their data (default: the temp directory's raftkv-chaos).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// How long the linearizability check may take.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    check_timeout: Duration,
    /// Write the recorded history to FILE as JSON lines (docs/chaos-history.md).
    #[arg(long, value_name = "FILE")]
    history: Option<PathBuf>,
    /// Only these faults, comma-separated: kill-leader, kill-follower, pause-leader,
    /// pause-follower, isolate-leader, split-minority, disk-full-follower, replace-follower
    /// (default: all).
    #[arg(long, value_name = "LIST")]
    faults: Option<String>,
}

/// The `--peers` list, node 1 first.
#[derive(Clone)]
struct Peers(Vec<String>);

fn parse_peers(value: &str) -> Result<Peers, String> {
    let mut peers: Vec<(usize, String)> = Vec::new();
    for item in value.split(',') {
        let (id, addr) = item
            .split_once('=')
            .ok_or_else(|| format!("'{item}' is not ID=HOST:PORT"))?;
        let id = id
            .parse::<usize>()
            .ok()
            .filter(|id| (1..=64).contains(id))
            .ok_or_else(|| format!("'{id}' is not a node id from 1 to 64"))?;
        if addr.is_empty() || !addr.contains(':') {
            return Err(format!("node {id}'s address '{addr}' is not HOST:PORT"));
        }
        if peers.iter().any(|(i, _)| *i == id) {
            return Err(format!("node {id} listed twice"));
        }
        peers.push((id, addr.to_string()));
    }
    peers.sort();
    if peers.iter().enumerate().any(|(i, (id, _))| *id != i + 1) {
        return Err("the nodes must be numbered 1, 2, 3, … without gaps".into());
    }
    Ok(Peers(peers.into_iter().map(|(_, a)| a).collect()))
}

fn parse_cluster_id(value: &str) -> Result<String, String> {
    raftkv::node::identity::valid_cluster_id(value).map_err(|e| e.to_string())?;
    Ok(value.to_string())
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

/// A usage error found after parsing: clap's message and exit status 2.
fn usage_error(kind: ErrorKind, msg: String) -> ! {
    Cli::command().error(kind, msg).exit()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Cmd::Local(cli.local)) {
        Cmd::Local(o) => {
            raftkv::logging::init("local", None);
            raftkv::proc::local::run(LocalArgs {
                nodes: o.nodes as usize,
                dir: o.dir,
                port: o.port,
                requirepass_file: o.requirepass_file,
                auth: o.auth,
            })
        }
        Cmd::Serve(o) => {
            if o.id as usize > o.peers.0.len() {
                usage_error(
                    ErrorKind::ValueValidation,
                    format!("--id {} is not in --peers", o.id),
                );
            }
            raftkv::logging::init(&format!("node{}", o.id), None);
            raftkv::proc::serve::run(ServeArgs {
                id: o.id as usize,
                peers: o.peers.0,
                client: o.client,
                data: o.data,
                peer_secret_file: o.peer_secret_file,
                bootstrap: o.bootstrap,
                cluster: o.cluster,
                stop_on_stdin_eof: o.stop_on_stdin_eof,
                requirepass_file: o.requirepass_file,
                clients: raftkv::resp::server::RespOptions {
                    max_clients: o.maxclients as usize,
                    idle_timeout: Duration::from_secs(o.timeout),
                    partial_frame_timeout: Duration::from_secs(o.partial_frame_timeout),
                    max_input_bytes: o.maxmemory_clients as usize,
                    ..raftkv::resp::server::RespOptions::default()
                },
                storage: raftkv::storage::FileLogOptions {
                    max_snapshot_bytes: o.max_snapshot_bytes,
                    min_free_bytes: o.min_free_disk,
                    ..raftkv::storage::FileLogOptions::default()
                },
            })
        }
        Cmd::Chaos(o) => chaos(o),
        Cmd::Member(o) => {
            let command = match o.action {
                MemberCmd::List => vec!["LIST".to_string()],
                MemberCmd::Add {
                    id,
                    peer_addr,
                    client_addr,
                } => {
                    for (what, a) in [("PEER_ADDR", &peer_addr), ("CLIENT_ADDR", &client_addr)] {
                        let dash = what == "PEER_ADDR" && a == "-";
                        if !dash && !a.contains(':') {
                            usage_error(
                                ErrorKind::ValueValidation,
                                format!("{what} '{a}' is not HOST:PORT"),
                            );
                        }
                    }
                    vec!["ADD".to_string(), id.to_string(), peer_addr, client_addr]
                }
                MemberCmd::Remove { id } => vec!["REMOVE".to_string(), id.to_string()],
            };
            raftkv::proc::member::run(raftkv::proc::member::MemberArgs {
                nodes: o.node,
                requirepass_file: o.requirepass_file,
                command,
            })
        }
    }
}

fn chaos(o: ChaosOpts) -> ExitCode {
    // Hidden: the nodes run with the deliberate bug RAFTKV_NODE_FAULT names (proves the
    // checker can fail).
    let node_fault = raftkv::node::NodeFault::from_env()
        .unwrap_or_else(|e| usage_error(ErrorKind::InvalidValue, e));
    raftkv::logging::init("chaos", None);
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("raftkv chaos: cannot find my own executable: {e}");
            return ExitCode::from(1);
        }
    };
    let mut opts = raftkv::chaos::ChaosOptions::new(exe);
    opts.duration = o.duration;
    opts.check_timeout = o.check_timeout;
    opts.clients = o.clients as usize;
    opts.nodes = o.nodes as usize;
    opts.keys = o.keys as usize;
    opts.seed = o.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    if let Some(dir) = o.dir {
        opts.dir = dir;
    }
    opts.history = o.history;
    if let Some(list) = &o.faults {
        opts.fault_kinds = raftkv::chaos::FaultKind::parse_list(list)
            .unwrap_or_else(|e| usage_error(ErrorKind::InvalidValue, e));
    }
    opts.node_fault = node_fault;
    raftkv::chaos::run_from_cli(opts)
}
