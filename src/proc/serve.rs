//! `raftkv serve`: one node as a process. It checks that its data directory belongs to it and
//! to its cluster (the identity, see [`crate::node::identity`]), opens the file log, starts the
//! [`Node`] (which refuses Raft state below the identity's high-water mark), and then, every
//! 250 ms, rewrites its status file, records the high-water mark, and checks whether it should
//! stop: a replica that stopped (exit 1, the cause in the status file and on stderr), standard
//! input closed with `--stop-on-stdin-eof`, or SIGINT/SIGTERM (exit 0 after a clean
//! shutdown).

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::status::NodeStatusFile;
use crate::node::identity::IDENTITY_FILE;
use crate::node::{ClusterIdentity, Node, NodeConfig};
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
    /// The cluster's peer secret (see [`node::secret`](crate::node::secret)).
    pub peer_secret_file: PathBuf,
    /// `--bootstrap`: found a new cluster with this id.
    pub bootstrap: Option<String>,
    /// `--cluster`: the cluster this node must belong to.
    pub cluster: Option<String>,
    pub stop_on_stdin_eof: bool,
    /// The client password's file (`--requirepass-file`).
    pub requirepass_file: Option<PathBuf>,
    /// The client port's limits and timeouts (the password is read from the file).
    pub clients: crate::resp::server::RespOptions,
    /// The file log's limits (`--max-snapshot-bytes`, `--min-free-disk`).
    pub storage: crate::storage::FileLogOptions,
}

/// The durable storage of a node's Raft state in `dir`.
fn open_storage(
    dir: &Path,
    opts: crate::storage::FileLogOptions,
) -> Result<Box<dyn Storage>, StorageError> {
    let storage = crate::storage::FileLog::open(dir, opts)?;
    // Raft reads the snapshot from the file when it needs it, rather than holding it.
    storage.keep_snapshot_on_disk();
    Ok(Box::new(storage))
}

/// Runs the node until it is told to stop; the process's exit code.
pub fn run(args: ServeArgs) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("raftkv serve: node {}: {msg}", args.id);
        ExitCode::from(1)
    };
    crate::node::files::private_umask();
    // Before any write: a file-size limit then stops the node with the file named, as a
    // full disk does, rather than killing it with SIGXFSZ.
    if let Err(e) = crate::signal::ignore_file_size_signal() {
        return fail(format!("cannot ignore SIGXFSZ: {e}"));
    }
    if let Err(e) = fs::create_dir_all(&args.data) {
        return fail(format!("cannot create {}: {e}", args.data.display()));
    }
    if let Err(e) = crate::node::files::make_private(&args.data) {
        return fail(format!("cannot make {} private: {e}", args.data.display()));
    }
    let mut clients = args.clients.clone();
    if let Some(file) = &args.requirepass_file {
        match crate::resp::auth::Password::from_file(file) {
            Ok(p) => clients.password = Some(p),
            Err(e) => return fail(e.to_string()),
        }
    }
    match crate::node::files::raise_open_files_limit() {
        Ok(limit) if limit < clients.max_clients as u64 + 128 => {
            log::warn!(target: LOG, "node {}: only {limit} open files allowed; fewer than --maxclients {} connections will be accepted", args.id, clients.max_clients);
        }
        Ok(_) => {}
        Err(e) => {
            log::warn!(target: LOG, "node {}: cannot raise the open files limit: {e}", args.id)
        }
    }
    let raft_dir = args.data.join("raft");
    let had_identity = args.data.join(IDENTITY_FILE).exists();
    let raft_missing = !raft_dir.exists();
    if args.bootstrap.is_some() && !had_identity {
        // The Raft directory before the identity: an identity never exists without one.
        if let Err(e) = fs::create_dir_all(&raft_dir) {
            return fail(format!("cannot create {}: {e}", raft_dir.display()));
        }
    }
    let peer_secret = match crate::node::secret::read_secret(&args.peer_secret_file) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    // The identity before the storage: a directory of another cluster or node is refused
    // before anything in it is opened (recovery may cut a torn tail).
    let identity = match ClusterIdentity::open(
        &args.data,
        args.id,
        &args.peers,
        args.bootstrap.as_deref(),
        args.cluster.as_deref(),
    ) {
        Ok(i) => Arc::new(i),
        Err(e) => return fail(e.to_string()),
    };
    if had_identity && raft_missing {
        return fail(format!(
            "lost state: {} is missing but {} says this node is a member of cluster {}; it must not vote or serve without its log; to replace the node, remove {} entirely and start it again without --bootstrap: it rejoins, catches up from the leader and only then votes",
            raft_dir.display(),
            args.data.join(IDENTITY_FILE).display(),
            identity.cluster_id().unwrap_or_default(),
            args.data.display()
        ));
    }
    let storage = match open_storage(&raft_dir, args.storage.clone()) {
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
        clients,
        max_raft_state: Some(crate::node::DEFAULT_MAX_RAFT_STATE),
        fault,
        peer_secret,
        // The peer lists differ between nodes (a proxy may stand for a peer, a node added
        // later lists more), so the handshake names no size; the secret authenticates, and
        // every Raft message carries the cluster's own id (the identity).
        cluster_id: "raftkv".to_string(),
        identity,
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
        let mut file = NodeStatusFile {
            term: status.term,
            leader: status.leader,
            applied: status.applied,
            commands: status.commands,
            keys: status.keys,
            client: node
                .client_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            member: status.member.to_string(),
            stopped: None,
        };
        // A failed write or fsync of the identity stops the node as the log's would.
        let stopped = node
            .stopped()
            .or_else(|| node.record_progress().err().map(|e| e.to_string()));
        if let Some(why) = stopped {
            node.shutdown();
            file.leader = false;
            file.stopped = Some(why.clone());
            if let Err(e) = file.write_last(&status_path) {
                log::warn!(target: LOG, "cannot write {}: {e}", status_path.display());
            }
            return fail(format!("stopped: {why}"));
        }
        if let Err(e) = file.write(&status_path) {
            log::warn!(target: LOG, "cannot write {}: {e}", status_path.display());
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
