//! `raftkv`: a linearizable key/value store on Raft that speaks Redis's protocol. This file is
//! the command line's top only (the commands and their help pages); each command's options and
//! its work are in the library: `raftkv::proc::{serve, local, member}`, `raftkv::chaos::cli`.
//!
//! Exit status: 0 after a clean stop (or a linearizable chaos run), 1 when a node cannot
//! start or stops on an error (or a chaos run that is not linearizable), 2 for a bad command
//! line (clap's usage errors), 130 for an interrupted chaos run.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand};
use raftkv::chaos::cli::ChaosArgs;
use raftkv::proc::local::LocalArgs;
use raftkv::proc::member::MemberArgs;
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
    local: LocalArgs,
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
    Local(LocalArgs),
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
    Serve(ServeArgs),
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
    Chaos(ChaosArgs),
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
    Member(MemberArgs),
}

/// A usage error found after parsing: clap's message and exit status 2.
fn usage_error(kind: ErrorKind, msg: String) -> ! {
    Cli::command().error(kind, msg).exit()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Cmd::Local(cli.local)) {
        Cmd::Local(args) => {
            raftkv::logging::init("local", None);
            raftkv::proc::local::run(args)
        }
        Cmd::Serve(args) => {
            if let Err(e) = args.check() {
                usage_error(ErrorKind::ValueValidation, e);
            }
            raftkv::logging::init(&format!("node{}", args.id), None);
            raftkv::proc::serve::run(args)
        }
        Cmd::Chaos(args) => {
            // Hidden: the nodes run with the deliberate bug RAFTKV_NODE_FAULT names (proves
            // the checker can fail).
            let node_fault = raftkv::node::NodeFault::from_env()
                .unwrap_or_else(|e| usage_error(ErrorKind::InvalidValue, e));
            raftkv::logging::init("chaos", None);
            raftkv::chaos::cli::run_from_cli(args, node_fault)
        }
        Cmd::Member(args) => {
            if let Err(e) = args.action.words() {
                usage_error(ErrorKind::ValueValidation, e);
            }
            raftkv::proc::member::run(args)
        }
    }
}
