//! Starting `raftkv serve` as a child process, the one way `raftkv local`, the chaos driver and
//! the cluster tests do it, and signalling it safely.
//!
//! Every node runs in its own process group (so a terminal's Ctrl-C, or any signal sent to the
//! parent's group, never reaches it, and nothing sent to it reaches the parent) and with
//! `--stop-on-stdin-eof` (a parent that dies without cleaning up still takes its nodes with
//! it). A signal goes through the [`NodeProcess`], which checks first that the child has not
//! been reaped: a reaped child's pid may already belong to another process.

use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::status::NodeStatusFile;
use crate::signal::{self, Signal};

/// How to start one node.
#[derive(Debug, Clone)]
pub struct ServeSpec {
    /// The `raftkv` executable.
    pub exe: PathBuf,
    /// The node's id, 1-based.
    pub id: usize,
    /// Every node's peer address as this node dials it, node 1 first.
    pub peers: Vec<String>,
    /// Where Redis clients connect.
    pub client: String,
    /// Its data directory.
    pub data: PathBuf,
    /// The cluster's peer secret (`--peer-secret-file`).
    pub peer_secret: PathBuf,
    /// `--cluster`: the cluster the node must belong to (`None`: not stated).
    pub cluster: Option<String>,
    /// `--bootstrap` with that id: the node founds the cluster (a new cluster's first start
    /// only; a node on an empty directory without it waits for a leader).
    pub bootstrap: bool,
}

impl ServeSpec {
    /// The `--peers` value: `1=ADDR,2=ADDR,…`.
    pub fn peer_list(&self) -> String {
        self.peers
            .iter()
            .enumerate()
            .map(|(j, addr)| format!("{}={addr}", j + 1))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The command, ready to spawn: the arguments, `--stop-on-stdin-eof` with a piped stdin,
    /// its own process group. The caller may redirect its output or set its environment.
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.exe);
        command
            .arg("serve")
            .args(["--id", &self.id.to_string()])
            .args(["--peers", &self.peer_list()])
            .args(["--client", &self.client])
            .arg("--data")
            .arg(&self.data)
            .arg("--peer-secret-file")
            .arg(&self.peer_secret)
            .arg("--stop-on-stdin-eof")
            .stdin(Stdio::piped())
            .process_group(0);
        if let Some(id) = &self.cluster {
            command.args(["--cluster", id]);
            if self.bootstrap {
                command.args(["--bootstrap", id]);
            }
        }
        command
    }

    /// Spawns [`command`](Self::command) after removing the status file a previous run left
    /// (it must not be taken for this run's).
    pub fn spawn(&self, command: &mut Command) -> io::Result<NodeProcess> {
        let _ = fs::remove_file(NodeStatusFile::path(&self.data));
        let child = command.spawn()?;
        Ok(NodeProcess { child, exit: None })
    }

    /// The node's status file, if it has written one.
    pub fn status(&self) -> Option<NodeStatusFile> {
        NodeStatusFile::read(&NodeStatusFile::path(&self.data))
    }
}

/// A running (or exited) `raftkv serve` child. Dropping it kills and reaps it.
#[derive(Debug)]
pub struct NodeProcess {
    child: Child,
    /// Set once the child is reaped: from then on its pid is never signalled.
    exit: Option<ExitStatus>,
}

impl NodeProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's exit status if it has exited (reaping it), `None` while it runs.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            self.exit = Some(status);
        }
        self.exit
    }

    /// The child still runs (a stopped child runs).
    pub fn alive(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// Sends `sig` to the child, unless it has exited: then an error, and nothing is sent (its
    /// pid may belong to another process once reaped). While this handle is held the child is
    /// reaped only here, so the pid cannot change hands between the check and the `kill(2)`.
    pub fn signal(&mut self, sig: Signal) -> io::Result<()> {
        signal::to_child(&mut self.child, sig).inspect_err(|_| {
            self.try_exit();
        })
    }

    /// Limits (or with `None`, stops limiting) the size of any file the running child
    /// writes: a write past it fails as on a full disk (see
    /// [`signal::set_child_file_size_limit`]).
    pub fn limit_file_size(&mut self, bytes: Option<u64>) -> io::Result<()> {
        signal::set_child_file_size_limit(&mut self.child, bytes).inspect_err(|_| {
            self.try_exit();
        })
    }

    /// `kill -9` and reap; the exit status.
    pub fn kill9(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        // std's kill does nothing to a child it has reaped; an error means it has exited.
        let _ = self.child.kill();
        let status = self.child.wait()?;
        self.exit = Some(status);
        Ok(status)
    }

    /// Asks the node to stop by closing its standard input; waits up to `grace` for it to exit,
    /// then kills it. Returns its exit status, `None` if it had to be killed.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        drop(self.child.stdin.take());
        self.wait_exit(grace).or_else(|| {
            let _ = self.kill9();
            None
        })
    }

    /// Waits up to `patience` for the child to exit on its own.
    pub fn wait_exit(&mut self, patience: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Closes the node's standard input (with `--stop-on-stdin-eof`, it stops).
    pub fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// The node that claims to lead in the highest term, among `(index, status)` pairs.
pub fn leader_of(
    statuses: impl IntoIterator<Item = (usize, Option<NodeStatusFile>)>,
) -> Option<usize> {
    statuses
        .into_iter()
        .filter_map(|(i, s)| s.filter(|s| s.leader).map(|s| (i, s.term)))
        .max_by_key(|&(_, term)| term)
        .map(|(i, _)| i)
}
