//! `raftkv serve`: one node as a process. It checks that its data directory belongs to it,
//! opens the file log, starts the [`Node`], and then, every 250 ms, rewrites its status file
//! and checks whether it should stop: a replica that stopped (exit 1), standard input closed
//! with `--stop-on-stdin-eof`, or SIGINT/SIGTERM (exit 0 after a clean shutdown).

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use super::status::{NodeStatusFile, write_atomically};
use crate::node::{Node, NodeConfig};
use crate::raft::{Storage, StorageError};

const LOG: &str = "raftkv";

/// How often the status file is rewritten and the stop conditions checked.
pub const STATUS_PERIOD: Duration = Duration::from_millis(250);

/// A node's command line, checked.
#[derive(Debug, Clone)]
pub struct ServeArgs {
    /// 1-based.
    pub id: usize,
    /// Every node's peer address, node 1 first.
    pub peers: Vec<String>,
    pub client: String,
    pub data: PathBuf,
    pub stop_on_stdin_eof: bool,
}

/// The durable storage of a node's Raft state in `dir`.
fn open_storage(dir: &Path) -> Result<Box<dyn Storage>, StorageError> {
    let storage = crate::storage::FileLog::open(dir, crate::storage::FileLogOptions::default())?;
    // Raft reads the snapshot from the file when it needs it, rather than holding it.
    storage.keep_snapshot_on_disk();
    Ok(Box::new(storage))
}

/// The cluster a data directory belongs to: a node started with another id or another peer
/// list would mix two clusters' logs.
fn check_identity(data: &Path, id: usize, peers: &[String]) -> Result<(), String> {
    let path = data.join("cluster");
    let identity = format!("id {id}\npeers {}\n", peers.join(","));
    match fs::read_to_string(&path) {
        Ok(stored) if stored == identity => Ok(()),
        Ok(stored) => Err(format!(
            "{} says this directory holds {}, but the command line says {}; \
             use the same --id and --peers, or another --data",
            path.display(),
            stored.trim().replace('\n', ", "),
            identity.trim().replace('\n', ", ")
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => write_atomically(&path, &identity)
            .map_err(|e| format!("cannot write {}: {e}", path.display())),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Runs the node until it is told to stop; the process's exit code.
pub fn run(args: ServeArgs) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("raftkv serve: node {}: {msg}", args.id);
        ExitCode::from(1)
    };
    if let Err(e) = fs::create_dir_all(&args.data) {
        return fail(format!("cannot create {}: {e}", args.data.display()));
    }
    if let Err(e) = check_identity(&args.data, args.id, &args.peers) {
        return fail(e);
    }
    let storage = match open_storage(&args.data.join("raft")) {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    let fault = match crate::node::NodeFault::from_env() {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    let config = NodeConfig {
        id: args.id,
        peers: args.peers.clone(),
        client_addr: args.client.clone(),
        max_raft_state: Some(crate::node::DEFAULT_MAX_RAFT_STATE),
        fault,
    };
    let mut node = match Node::start(config, storage) {
        Ok(n) => n,
        Err(e) => return fail(e.to_string()),
    };
    let (stop_tx, stop_rx) = crossbeam::channel::bounded::<()>(1);
    if args.stop_on_stdin_eof {
        // Detached on purpose: it blocks in read() until the parent goes away, and the
        // process exits right after it reports.
        let spawned = thread::Builder::new()
            .name("stdin-watch".into())
            .spawn(move || {
                let mut buf = [0u8; 64];
                let mut stdin = io::stdin();
                loop {
                    match stdin.read(&mut buf) {
                        Ok(n) if n > 0 => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        _ => break,
                    }
                }
                let _ = stop_tx.send(());
            });
        if let Err(e) = spawned {
            return fail(format!("cannot start the stdin watcher: {e}"));
        }
    }
    if let Err(e) = crate::signal::catch_stop_signals() {
        return fail(format!("cannot catch SIGINT/SIGTERM: {e}"));
    }
    let status_path = NodeStatusFile::path(&args.data);
    loop {
        let status = node.status();
        let file = NodeStatusFile {
            term: status.term,
            leader: status.leader,
            applied: status.applied,
            commands: status.commands,
            keys: status.keys,
            client: node
                .client_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
        };
        if let Err(e) = file.write(&status_path) {
            log::warn!(target: LOG, "cannot write {}: {e}", status_path.display());
        }
        if let Some(why) = node.stopped() {
            node.shutdown();
            return fail(format!("stopped: {why}"));
        }
        if let Some(signal) = crate::signal::stop_requested() {
            log::info!(target: LOG, "node {}: {signal}; stopping", args.id);
            node.shutdown();
            return ExitCode::SUCCESS;
        }
        if stop_rx.recv_timeout(STATUS_PERIOD).is_ok() {
            log::info!(target: LOG, "node {}: standard input closed; stopping", args.id);
            node.shutdown();
            return ExitCode::SUCCESS;
        }
    }
}
