//! A local cluster of `raftkv serve` processes whose every peer link runs through a
//! [`Proxy`] owned by this process, so that any node can be killed, paused or cut off.
//!
//! Node `i` reaches node `j` through `proxies[i][j]` (one proxy per directed link): node `i`'s
//! `--peers` list names its own peer port for itself and the proxy addresses for the others.
//! Cutting both directed links between two nodes separates them completely (forwarded client
//! requests travel the same links as Raft's messages).
//!
//! Every child is started by the process kit's [`ServeSpec`]: in its own process group (a
//! Ctrl-C at the terminal reaches only the driver, which then stops them) and with
//! `--stop-on-stdin-eof` (a driver that dies without cleaning up still takes its nodes with
//! it); it is signalled only through its [`NodeProcess`], never once reaped. [`ChaosCluster`]'s
//! drop kills and reaps every child, also while a panic unwinds.

use std::fmt;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::net::proxy::{LinkMode, Proxy};
use crate::node::{FAULT_ENV, NodeFault};
use crate::proc::ports::{PortLease, cluster_ports};
use crate::proc::{NodeProcess, NodeStatusFile, ServeSpec};
use crate::signal::Signal;

const LOG: &str = "chaos::cluster";

/// Bytes a "full" disk still takes in the file being appended (see
/// [`ChaosCluster::fill_disk`]): a few entries' worth, so the node stops within moments of
/// taking writes.
const DISK_ROOM_LEFT: u64 = 16 << 10;

/// How long a fresh cluster may take to elect its first leader.
pub const START_PATIENCE: Duration = Duration::from_secs(20);
/// How long a membership command may take (an add waits for its learner to catch up).
pub const MEMBER_PATIENCE: Duration = Duration::from_secs(60);

/// Why the cluster could not start or be driven.
#[derive(Debug)]
pub enum ClusterError {
    /// A port, a proxy or the run directory could not be set up.
    Setup { what: String, reason: String },
    /// A `raftkv serve` process could not be spawned.
    Spawn { node: usize, reason: String },
    /// A node exited during start-up; `log` is the end of its standard error.
    Exited {
        node: usize,
        status: String,
        log: String,
    },
    /// No node became leader in time.
    NoLeader { waited: Duration },
    /// A signal could not be delivered.
    Signal { node: usize, reason: String },
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::Setup { what, reason } => write!(f, "cannot set up {what}: {reason}"),
            ClusterError::Spawn { node, reason } => {
                write!(f, "cannot start node {node}: {reason}")
            }
            ClusterError::Exited { node, status, log } => {
                write!(f, "node {node} exited ({status})")?;
                if !log.is_empty() {
                    write!(f, "; its last words:\n{log}")?;
                }
                Ok(())
            }
            ClusterError::NoLeader { waited } => {
                write!(f, "no node became leader within {waited:?}")
            }
            ClusterError::Signal { node, reason } => {
                write!(f, "cannot signal node {node}: {reason}")
            }
        }
    }
}

impl std::error::Error for ClusterError {}

/// What the driver did to a node, so it knows how to bring it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Running,
    Paused,
    Killed,
}

/// How to start a [`ChaosCluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The `raftkv` executable.
    pub exe: PathBuf,
    pub nodes: usize,
    /// Where the nodes keep their data (`node-<i>/`) and logs (`node-<i>.log`); created.
    pub dir: PathBuf,
    /// A deliberate bug every node runs with (see [`NodeFault`]).
    pub fault: Option<NodeFault>,
    /// `RUST_LOG` for the nodes (their stderr goes to `node-<i>.log`).
    pub node_log: Option<String>,
}

struct NodeProc {
    child: Option<NodeProcess>,
    state: NodeState,
}

/// The processes, the proxies and the addresses of one local cluster.
pub struct ChaosCluster {
    opts: ClusterOptions,
    peer_ports: Vec<u16>,
    client_ports: Vec<u16>,
    /// The claim on every port above and the proxies', held while the cluster lives: no other
    /// local cluster takes a port while its node is down.
    _ports: PortLease,
    /// `proxies[i][j]`: node `i`'s link to node `j` (`None` on the diagonal).
    proxies: Vec<Vec<Option<Proxy>>>,
    nodes: Vec<NodeProc>,
    /// The cluster id: `--cluster` on every start, `--bootstrap` on each node's first.
    cluster_id: String,
    founded: Vec<bool>,
}

/// How many times a cluster picks its ports when one is taken before its proxy binds it.
const PORT_ATTEMPTS: usize = 5;

/// The last `max` bytes of a file, as text (empty if it cannot be read).
fn tail(path: &Path, max: usize) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..])
        .trim_end()
        .to_string()
}

impl ChaosCluster {
    /// Starts the proxies and the nodes, and waits until one node leads.
    pub fn start(opts: ClusterOptions) -> Result<ChaosCluster, ClusterError> {
        let n = opts.nodes;
        let setup = |what: &str, e: io::Error| ClusterError::Setup {
            what: what.to_string(),
            reason: e.to_string(),
        };
        fs::create_dir_all(&opts.dir)
            .map_err(|e| setup(&format!("the directory {}", opts.dir.display()), e))?;
        crate::node::secret::create_secret(&opts.dir.join(crate::node::secret::SECRET_FILE))
            .map_err(|e| setup("the peer secret", std::io::Error::other(e)))?;
        // Every port at once, so they all differ: each node's peer and client port, then one
        // per directed link for its proxy. A port is free when picked but released before its
        // proxy binds it; one taken meanwhile (by any process) costs a new pick, a bounded
        // number of times.
        let mut attempt = 0;
        let (ports, proxies) = loop {
            attempt += 1;
            match Self::ports_and_proxies(n) {
                Ok(set) => break set,
                Err((what, e))
                    if e.kind() == io::ErrorKind::AddrInUse && attempt < PORT_ATTEMPTS =>
                {
                    log::warn!(target: LOG, "{what}: {e}; picking the ports again (attempt {attempt} of {PORT_ATTEMPTS})");
                }
                Err((what, e)) => return Err(setup(&what, e)),
            }
        };
        let mut cluster = ChaosCluster {
            opts,
            peer_ports: ports[..n].to_vec(),
            client_ports: ports[n..2 * n].to_vec(),
            _ports: ports,
            proxies,
            nodes: (0..n)
                .map(|_| NodeProc {
                    child: None,
                    state: NodeState::Killed,
                })
                .collect(),
            cluster_id: crate::node::identity::random_cluster_id(),
            founded: vec![false; n],
        };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        cluster.wait_for_leader(START_PATIENCE)?;
        Ok(cluster)
    }

    /// Picks the ports and starts one proxy per directed link: (the ports: the peer ports,
    /// then the client ports, then the links'; the proxies), or what failed.
    #[allow(clippy::type_complexity)]
    fn ports_and_proxies(
        n: usize,
    ) -> Result<(PortLease, Vec<Vec<Option<Proxy>>>), (String, io::Error)> {
        let ports = cluster_ports(2 * n + n * (n - 1)).map_err(|e| ("the ports".to_string(), e))?;
        let peer_ports = &ports[..n];
        let mut link_ports = ports[2 * n..].iter();
        let mut proxies = Vec::new();
        for i in 0..n {
            let mut row = Vec::new();
            for (j, &target_port) in peer_ports.iter().enumerate() {
                if i == j {
                    row.push(None);
                    continue;
                }
                let listen: SocketAddr =
                    ([127, 0, 0, 1], *link_ports.next().expect("a port per link")).into();
                let target: SocketAddr = ([127, 0, 0, 1], target_port).into();
                let proxy =
                    Proxy::start(&format!("chaos-link{}to{}", i + 1, j + 1), listen, target)
                        .map_err(|e| (format!("the proxy {}->{} on {listen}", i + 1, j + 1), e))?;
                row.push(Some(proxy));
            }
            proxies.push(row);
        }
        Ok((ports, proxies))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn dir(&self) -> &Path {
        &self.opts.dir
    }

    /// Where Redis clients reach node `i` (0-based).
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        ([127, 0, 0, 1], self.client_ports[i]).into()
    }

    fn data(&self, i: usize) -> PathBuf {
        self.opts.dir.join(format!("node-{}", i + 1))
    }

    /// Node `i`'s standard error.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.opts.dir.join(format!("node-{}.log", i + 1))
    }

    pub fn state(&self, i: usize) -> NodeState {
        self.nodes[i].state
    }

    /// The process id of node `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(NodeProcess::pid)
    }

    fn spawn(&mut self, i: usize) -> Result<(), ClusterError> {
        debug_assert!(self.nodes[i].child.is_none(), "node {} already runs", i + 1);
        let peers: Vec<String> = (0..self.len())
            .map(|j| {
                let addr = match &self.proxies[i][j] {
                    Some(proxy) => proxy.local_addr(),
                    None => ([127, 0, 0, 1], self.peer_ports[i]).into(),
                };
                addr.to_string()
            })
            .collect();
        let spec = self.spec(i, peers);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .map_err(|e| ClusterError::Spawn {
                node: i + 1,
                reason: format!("{}: {e}", self.log_path(i).display()),
            })?;
        let mut command = spec.command();
        command
            .stdout(Stdio::null())
            .stderr(log)
            .env_remove(FAULT_ENV);
        match &self.opts.node_log {
            Some(level) => command.env("RUST_LOG", level),
            None => command.env_remove("RUST_LOG"),
        };
        if self.opts.fault == Some(NodeFault::LocalReads) {
            command.env(FAULT_ENV, "local-reads");
        }
        let child = spec.spawn(&mut command).map_err(|e| ClusterError::Spawn {
            node: i + 1,
            reason: format!("{}: {e}", self.opts.exe.display()),
        })?;
        log::info!(target: LOG, "node {} started (pid {})", i + 1, child.pid());
        self.founded[i] = true;
        self.nodes[i] = NodeProc {
            child: Some(child),
            state: NodeState::Running,
        };
        Ok(())
    }

    /// How node `i` is started, dialling its peers at `peers`.
    fn spec(&self, i: usize, peers: Vec<String>) -> ServeSpec {
        ServeSpec {
            exe: self.opts.exe.clone(),
            id: i + 1,
            peers,
            client: self.client_addr(i).to_string(),
            data: self.data(i),
            peer_secret: self.opts.dir.join(crate::node::secret::SECRET_FILE),
            cluster: Some(self.cluster_id.clone()),
            bootstrap: !self.founded[i],
        }
    }

    /// Node `i`'s status file, if it runs and has written one.
    pub fn view(&self, i: usize) -> Option<NodeStatusFile> {
        self.nodes[i].child.as_ref()?;
        NodeStatusFile::read(&NodeStatusFile::path(&self.data(i)))
    }

    /// The running (not paused) node that claims to lead in the highest term.
    pub fn leader(&self) -> Option<usize> {
        crate::proc::leader_of(
            (0..self.len())
                .filter(|&i| self.nodes[i].state == NodeState::Running)
                .map(|i| (i, self.view(i))),
        )
    }

    /// The nodes that have not applied as many requests as the most advanced one (or give no
    /// status), each said as "node N applied A of M requests"; empty when all are level.
    pub fn behind(&self) -> Vec<String> {
        let applied: Vec<Option<u64>> = (0..self.len())
            .map(|i| self.view(i).map(|v| v.applied))
            .collect();
        let most = applied.iter().flatten().copied().max().unwrap_or(0);
        applied
            .iter()
            .enumerate()
            .filter(|(_, a)| a.is_none_or(|a| a < most))
            .map(|(i, a)| match a {
                Some(a) => format!("node {} applied {a} of {most} requests", i + 1),
                None => format!("node {} has no status (of {most} requests)", i + 1),
            })
            .collect()
    }

    /// Waits until some node leads; a node that exits meanwhile is an error.
    pub fn wait_for_leader(&mut self, patience: Duration) -> Result<usize, ClusterError> {
        let deadline = Instant::now() + patience;
        loop {
            if let Some((node, status)) = self.exited().into_iter().next() {
                return Err(ClusterError::Exited {
                    node: node + 1,
                    status: status.to_string(),
                    log: tail(&self.log_path(node), 2000),
                });
            }
            if let Some(leader) = self.leader() {
                return Ok(leader);
            }
            // On a stop signal the wait ends here (the caller sees the signal too).
            if Instant::now() >= deadline || crate::signal::stop_requested().is_some() {
                return Err(ClusterError::NoLeader { waited: patience });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Nodes that exited although the driver did not kill them (reaped, and then marked
    /// killed, so that [`restart`](Self::restart) brings them back).
    pub fn exited(&mut self) -> Vec<(usize, ExitStatus)> {
        let mut out = Vec::new();
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let Some(child) = node.child.as_mut() else {
                continue;
            };
            if let Some(status) = child.try_exit() {
                log::warn!(target: LOG, "node {} exited on its own ({status})", i + 1);
                node.child = None;
                node.state = NodeState::Killed;
                out.push((i, status));
            }
        }
        out
    }

    /// Runs an operator's membership command (`RAFTKV.MEMBER` and `args`) on whichever node
    /// leads, as `raftkv member` does: a node that does not lead is passed over. Gives up
    /// after [`MEMBER_PATIENCE`] (the error is the last answer), or at once on a stop
    /// signal.
    pub fn member(&self, args: &[&str]) -> Result<String, String> {
        let mut words = vec!["RAFTKV.MEMBER"];
        words.extend_from_slice(args);
        let deadline = Instant::now() + MEMBER_PATIENCE;
        let mut last = String::from("no node answered");
        loop {
            let leader = self.leader();
            let order: Vec<usize> = leader
                .into_iter()
                .chain((0..self.len()).filter(|&i| Some(i) != leader))
                .collect();
            for i in order {
                if self.nodes[i].state != NodeState::Running {
                    continue;
                }
                if let Some(signal) = crate::signal::stop_requested() {
                    return Err(format!("interrupted by {signal}"));
                }
                let reply = super::client::RespConn::connect(self.client_addr(i), MEMBER_PATIENCE)
                    .map_err(|e| e.to_string())
                    .and_then(|mut c| {
                        c.call_while(&words, deadline, || {
                            crate::signal::stop_requested().is_none()
                        })
                        .map_err(|e| e.to_string())
                    });
                match reply {
                    Ok(crate::resp::Reply::Bulk(text)) => {
                        return Ok(String::from_utf8_lossy(&text).into_owned());
                    }
                    Ok(crate::resp::Reply::Error(e)) if e.starts_with("NOTLEADER") => last = e,
                    Ok(crate::resp::Reply::Error(e)) => return Err(format!("node {}: {e}", i + 1)),
                    Ok(other) => return Err(format!("node {}: unexpected {other:?}", i + 1)),
                    Err(e) => last = format!("node {}: {e}", i + 1),
                }
            }
            if Instant::now() >= deadline {
                return Err(last);
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `kill -9` node `i`, reap it and remove its data directory (a lost disk); it stays
    /// killed until [`restart`](Self::restart), which starts it on an empty directory (it
    /// then waits to be added).
    pub fn wipe(&mut self, i: usize) -> Result<(), ClusterError> {
        self.kill9(i);
        match fs::remove_dir_all(self.data(i)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ClusterError::Setup {
                what: format!("wipe {}", self.data(i).display()),
                reason: e.to_string(),
            }),
        }
    }

    /// `kill -9` node `i` and reap it.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill9();
            log::info!(target: LOG, "node {} killed", i + 1);
        }
        self.nodes[i].state = NodeState::Killed;
    }

    /// Starts a killed node again on its data.
    pub fn restart(&mut self, i: usize) -> Result<(), ClusterError> {
        if self.nodes[i].child.is_none() {
            self.spawn(i)?;
        }
        Ok(())
    }

    /// Signals node `i` through its process handle (never a pid it no longer owns).
    fn signal(&mut self, i: usize, sig: Signal) -> Result<(), ClusterError> {
        let Some(child) = self.nodes[i].child.as_mut() else {
            return Ok(());
        };
        if !child.alive() {
            // Exited on its own: nothing to signal; `exited` reports it and the run restarts it.
            log::warn!(target: LOG, "node {} has exited; {sig:?} not sent", i + 1);
            return Ok(());
        }
        child.signal(sig).map_err(|e| ClusterError::Signal {
            node: i + 1,
            reason: e.to_string(),
        })
    }

    /// Node `i`'s disk fills: from now on no file of it may grow more than a few KiB past
    /// the newest log segment's size now (a soft `RLIMIT_FSIZE` set on the running process),
    /// so its next appends fail as on a full disk and it stops naming the cause. Returns
    /// the limit.
    pub fn fill_disk(&mut self, i: usize) -> Result<u64, ClusterError> {
        let segment = fs::read_dir(self.data(i).join("raft"))
            .map(|dir| {
                dir.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("log-"))
                    .max_by_key(|e| e.file_name())
                    .and_then(|e| e.metadata().ok())
                    .map_or(0, |m| m.len())
            })
            .unwrap_or(0);
        let limit = segment + DISK_ROOM_LEFT;
        if let Some(child) = self.nodes[i].child.as_mut() {
            child
                .limit_file_size(Some(limit))
                .map_err(|e| ClusterError::Signal {
                    node: i + 1,
                    reason: format!("cannot limit its file size: {e}"),
                })?;
            log::info!(target: LOG, "node {}: disk full (no file past {limit} bytes)", i + 1);
        }
        Ok(limit)
    }

    /// Space is freed on node `i`'s disk: a node still running loses its limit; one that
    /// stopped is started again.
    pub fn free_disk(&mut self, i: usize) -> Result<(), ClusterError> {
        if let Some(child) = self.nodes[i].child.as_mut()
            && child.limit_file_size(None).is_ok()
        {
            log::info!(target: LOG, "node {}: disk space freed", i + 1);
            return Ok(());
        }
        self.restart(i)
    }

    /// Why node `i` stopped, as its last status file says (`None` if it does not say).
    pub fn stop_cause(&self, i: usize) -> Option<String> {
        NodeStatusFile::read(&NodeStatusFile::path(&self.data(i)))?.stopped
    }

    /// `SIGSTOP`: node `i` freezes with its sockets open.
    pub fn pause(&mut self, i: usize) -> Result<(), ClusterError> {
        self.switch(i, NodeState::Running, Signal::Stop, NodeState::Paused)
    }

    /// `SIGCONT` after [`pause`](Self::pause).
    pub fn resume(&mut self, i: usize) -> Result<(), ClusterError> {
        self.switch(i, NodeState::Paused, Signal::Cont, NodeState::Running)
    }

    /// Sends node `i` `signal` and records it as `to`, if it is `from` (else nothing).
    fn switch(
        &mut self,
        i: usize,
        from: NodeState,
        signal: Signal,
        to: NodeState,
    ) -> Result<(), ClusterError> {
        if self.nodes[i].state == from {
            self.signal(i, signal)?;
            self.nodes[i].state = to;
            log::info!(target: LOG, "node {}: {signal:?}, now {to:?}", i + 1);
        }
        Ok(())
    }

    /// Separates the nodes in `side` from the others: every link between the two sides,
    /// both ways, is put in `mode` (cut or blackhole); links within a side forward.
    pub fn partition(&self, side: &[usize], mode: LinkMode) {
        for (i, row) in self.proxies.iter().enumerate() {
            for (j, proxy) in row.iter().enumerate() {
                if let Some(proxy) = proxy {
                    let across = side.contains(&i) != side.contains(&j);
                    proxy.set_mode(if across { mode } else { LinkMode::Forward });
                }
            }
        }
        log::info!(target: LOG, "partition {side:?} | rest ({mode:?})");
    }

    /// Every link forwards again.
    pub fn heal(&self) {
        for proxy in self.proxies.iter().flatten().flatten() {
            if proxy.mode() != LinkMode::Forward {
                proxy.heal();
            }
        }
    }

    /// Heals every link, resumes every paused node and restarts every killed one.
    pub fn recover_all(&mut self) -> Result<(), ClusterError> {
        self.heal();
        for i in 0..self.len() {
            match self.nodes[i].state {
                NodeState::Paused => self.resume(i)?,
                NodeState::Killed => self.restart(i)?,
                NodeState::Running => {}
            }
        }
        Ok(())
    }

    /// Kills and reaps every node and stops the proxies. Idempotent; also run on drop.
    pub fn shutdown(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill9(i);
        }
        for row in &mut self.proxies {
            for proxy in row.iter_mut() {
                if let Some(proxy) = proxy.take() {
                    proxy.shutdown();
                }
            }
        }
    }
}

impl Drop for ChaosCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}
