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
use crate::resp::server::RespOptions;

const LOG: &str = "raftkv";

/// How often the status file is rewritten and the stop conditions checked.
pub const STATUS_PERIOD: Duration = Duration::from_millis(250);

/// `raftkv serve`'s command line (the help texts are the doc comments: one paragraph each).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// This node's id in --peers.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub id: usize,
    /// Every node's peer address: 1=HOST:PORT,2=HOST:PORT,…
    // Fully qualified: one value that parses into the whole list, not a repeated flag.
    #[arg(long, value_parser = parse_peers)]
    pub peers: ::std::vec::Vec<String>,
    /// Where Redis clients connect (HOST:PORT).
    #[arg(long)]
    pub client: String,
    /// The node's data directory.
    #[arg(long)]
    pub data: PathBuf,
    /// The cluster's peer secret: the same file on every node, at least 16 bytes, mode 0600.
    /// Every peer connection starts with a handshake proving both ends hold it (it
    /// authenticates; it does not encrypt). `raftkv local` creates DIR/peer-secret.
    #[arg(long, value_name = "FILE")]
    pub peer_secret_file: PathBuf,
    /// The cluster this node belongs to (8-64 characters of 0-9 a-z A-Z - _): a --data of
    /// another cluster is refused, and a node on an empty --data joins only this cluster.
    #[arg(long, value_name = "ID", value_parser = parse_cluster_id)]
    pub cluster: Option<String>,
    /// Found a new cluster with this id (the same on every founding node; first start only).
    #[arg(long, value_name = "ID", value_parser = parse_cluster_id)]
    pub bootstrap: Option<String>,
    /// Stop when standard input closes (how `local` and the tests tie a node's life to theirs).
    #[arg(long)]
    pub stop_on_stdin_eof: bool,
    /// Clients must AUTH with the password in FILE (its first line). Without it, --client
    /// must be a loopback address (protected mode).
    #[arg(long, value_name = "FILE")]
    pub requirepass_file: Option<PathBuf>,
    /// Client connections at once; more get Redis's "max number of clients reached".
    #[arg(long, default_value_t = 10_000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub maxclients: usize,
    /// Close a client silent this many seconds (0: never), as Redis's `timeout`.
    #[arg(long, value_name = "SECS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=31_536_000))]
    pub timeout: u64,
    /// Close a client that sent part of a command and completed none for this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub partial_frame_timeout: u64,
    /// Bytes of partly received commands held for all clients together; past it the client
    /// holding the most is closed.
    #[arg(long, value_name = "BYTES", default_value_t = 256 << 20, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range((1 << 20)..=(1 << 40)))]
    pub maxmemory_clients: usize,
    /// The largest snapshot this node writes or takes from a peer (give every node the same):
    /// a larger one streamed to it is refused before anything is written.
    #[arg(long, value_name = "BYTES", default_value_t = crate::storage::DEFAULT_MAX_SNAPSHOT_BYTES, value_parser = clap::value_parser!(u64).range((1 << 20)..))]
    pub max_snapshot_bytes: u64,
    /// A snapshot streamed to this node is refused (or its transfer abandoned) if taking it
    /// would leave less than this free on the data directory's filesystem.
    #[arg(long, value_name = "BYTES", default_value_t = crate::storage::DEFAULT_MIN_FREE_BYTES)]
    pub min_free_disk: u64,
}

impl ServeArgs {
    /// What clap cannot check alone: `--id` names a node of `--peers`.
    pub fn check(&self) -> Result<(), String> {
        if self.id > self.peers.len() {
            return Err(format!("--id {} is not in --peers", self.id));
        }
        Ok(())
    }

    /// The file log's limits (`--max-snapshot-bytes`, `--min-free-disk`).
    fn storage_options(&self) -> crate::storage::FileLogOptions {
        crate::storage::FileLogOptions {
            max_snapshot_bytes: self.max_snapshot_bytes,
            min_free_bytes: self.min_free_disk,
            ..crate::storage::FileLogOptions::default()
        }
    }

    /// The client port's limits and timeouts (the password is read from its file later).
    fn client_options(&self) -> RespOptions {
        RespOptions {
            max_clients: self.maxclients,
            idle_timeout: Duration::from_secs(self.timeout),
            partial_frame_timeout: Duration::from_secs(self.partial_frame_timeout),
            max_input_bytes: self.maxmemory_clients,
            ..RespOptions::default()
        }
    }
}

/// `--peers`: `1=HOST:PORT,2=HOST:PORT,…`, numbered from 1 without gaps; the addresses, node
/// 1 first.
fn parse_peers(value: &str) -> Result<Vec<String>, String> {
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
    Ok(peers.into_iter().map(|(_, a)| a).collect())
}

fn parse_cluster_id(value: &str) -> Result<String, String> {
    crate::node::identity::valid_cluster_id(value).map_err(|e| e.to_string())?;
    Ok(value.to_string())
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
    let mut clients = args.client_options();
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
    let storage = match open_storage(&raft_dir, args.storage_options()) {
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
