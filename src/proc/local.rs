//! `raftkv local`: a cluster of `raftkv serve` children on 127.0.0.1 and a live status line.
//! Ctrl-C (or SIGTERM) reaches only this process (the nodes run in their own process groups);
//! it then closes every node's standard input, waits up to [`STOP_GRACE`] for each, kills what
//! is left and reaps all.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use super::spawn::{NodeProcess, ServeSpec, leader_of};
use crate::node::identity::{IDENTITY_FILE, LEGACY_FILE, random_cluster_id};

/// How long a node may take to stop after its standard input closes.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// `raftkv local`'s command line (the help texts are the doc comments: one paragraph each).
/// Node i's Redis port is `port + i - 1`, its peer port `port + 1000 + i - 1`.
#[derive(Debug, Clone, clap::Args)]
pub struct LocalArgs {
    /// Nodes to run.
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=9))]
    pub nodes: usize,
    /// Where the nodes keep their data.
    #[arg(long, default_value = "./raftkv-data")]
    pub dir: PathBuf,
    /// Node 1's Redis port (P).
    #[arg(long, default_value_t = 7001, value_parser = clap::value_parser!(u16).range(1..=64000))]
    pub port: u16,
    /// Clients must AUTH with the password in FILE (its first line).
    #[arg(long, value_name = "FILE", conflicts_with = "auth")]
    pub requirepass_file: Option<PathBuf>,
    /// Clients must AUTH with the password in DIR/requirepass (created, mode 0600, with a
    /// random password if it does not exist).
    #[arg(long)]
    pub auth: bool,
}

/// Creates `path` with a random password (32 hex digits, mode 0600) unless it exists.
fn ensure_password_file(path: &Path) -> io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let password = format!("{:032x}\n", rand::random::<u128>());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(password.as_bytes())?;
    f.sync_all()
}

struct Children(Vec<(ServeSpec, NodeProcess)>);

impl Children {
    /// Asks every node to stop (closing its standard input), waits up to [`STOP_GRACE`] in all,
    /// then kills what is left; every child is reaped. Returns each node's exit, `None` for
    /// those that had to be killed.
    fn stop(&mut self) -> Vec<(usize, Option<ExitStatus>)> {
        for (_, node) in &mut self.0 {
            node.close_stdin();
        }
        let deadline = Instant::now() + STOP_GRACE;
        self.0
            .drain(..)
            .map(|(spec, mut node)| {
                let left = deadline.saturating_duration_since(Instant::now());
                let status = node.wait_exit(left);
                if status.is_none() {
                    let _ = node.kill9();
                }
                (spec.id, status)
            })
            .collect()
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

/// After a stop signal: every node stopped cleanly → exit 0.
fn stop_local(children: &mut Children, signal: &str, tty: bool) -> ExitCode {
    if tty {
        println!();
    }
    println!("raftkv: {signal}: stopping every node");
    let mut clean = true;
    for (id, status) in children.stop() {
        match status {
            Some(s) if s.success() => {}
            Some(s) => {
                println!("raftkv: node {id} exited with {s}");
                clean = false;
            }
            None => {
                println!("raftkv: node {id} did not stop within {STOP_GRACE:?}; killed");
                clean = false;
            }
        }
    }
    if clean {
        println!("raftkv: stopped; the data stays for the next start");
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The cluster id a node's data directory holds, if it holds a readable identity.
fn stored_cluster_id(data: &Path) -> Option<String> {
    let text = fs::read_to_string(data.join(IDENTITY_FILE)).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("cluster "))
        .map(str::to_string)
}

/// Runs the cluster until a stop signal, or until every node has exited.
pub fn run(args: LocalArgs) -> ExitCode {
    // Ctrl-C (or SIGTERM) reaches only this process: the nodes run in their own process
    // groups and are stopped through their standard input, cleanly.
    if let Err(e) = crate::signal::catch_stop_signals() {
        eprintln!("raftkv local: cannot catch SIGINT/SIGTERM: {e}");
        return ExitCode::from(1);
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("raftkv local: cannot find my own executable: {e}");
            return ExitCode::from(1);
        }
    };
    crate::node::files::private_umask();
    let requirepass_file = if args.auth {
        let path = args.dir.join("requirepass");
        if let Err(e) = ensure_password_file(&path) {
            eprintln!("raftkv local: cannot create {}: {e}", path.display());
            return ExitCode::from(1);
        }
        Some(path)
    } else {
        args.requirepass_file.clone()
    };
    let n = args.nodes;
    let client_port = |i: usize| args.port as usize + i;
    let peer_port = |i: usize| args.port as usize + 1000 + i;
    let peers: Vec<String> = (0..n)
        .map(|i| format!("127.0.0.1:{}", peer_port(i)))
        .collect();
    let secret = args.dir.join(crate::node::secret::SECRET_FILE);
    if let Err(e) = std::fs::create_dir_all(&args.dir)
        .map_err(|e| format!("cannot create {}: {e}", args.dir.display()))
        .and_then(|()| crate::node::secret::create_secret(&secret))
    {
        eprintln!("raftkv local: {e}");
        return ExitCode::from(1);
    }
    // A new cluster gets a random id, given to every node as --bootstrap; on a restart the
    // nodes' identities hold it (a format-1 directory is upgraded with it). A node whose
    // directory is gone rejoins without --bootstrap: it waits for the leader and catches up.
    let node_dir = |i: usize| args.dir.join(format!("node-{}", i + 1));
    let stored = (0..n).find_map(|i| stored_cluster_id(&node_dir(i)));
    let cluster_id = stored.clone().unwrap_or_else(random_cluster_id);
    let mut children = Children(Vec::new());
    for i in 0..n {
        let spec = ServeSpec {
            exe: exe.clone(),
            id: i + 1,
            peers: peers.clone(),
            client: format!("127.0.0.1:{}", client_port(i)),
            data: node_dir(i),
            cluster: Some(cluster_id.clone()),
            bootstrap: stored.is_none() || node_dir(i).join(LEGACY_FILE).exists(),
            peer_secret: secret.clone(),
        };
        let mut command = spec.command();
        if let Some(file) = &requirepass_file {
            command.arg("--requirepass-file").arg(file);
        }
        match spec.spawn(&mut command) {
            Ok(node) => children.0.push((spec, node)),
            Err(e) => {
                eprintln!("raftkv local: cannot start node {}: {e}", i + 1);
                return ExitCode::from(1);
            }
        }
    }
    let auth_hint = match &requirepass_file {
        Some(f) => format!(" --askpass    (password in {})", f.display()),
        None => String::new(),
    };
    println!(
        "raftkv: {n} nodes, data in {}. Connect to any of them:\n  redis-cli -p {}{auth_hint}    (nodes on ports {}–{})\nCtrl-C stops the cluster.",
        args.dir.display(),
        client_port(0),
        client_port(0),
        client_port(n - 1),
    );
    let tty = io::stdout().is_terminal();
    let mut last: Option<(Instant, u64)> = None;
    let mut last_plain = Instant::now() - Duration::from_secs(60);
    loop {
        for _ in 0..10 {
            if let Some(signal) = crate::signal::stop_requested() {
                return stop_local(&mut children, signal, tty);
            }
            thread::sleep(Duration::from_millis(50));
        }
        let mut statuses = Vec::new();
        let mut down = Vec::new();
        for (spec, node) in &mut children.0 {
            match node.try_exit() {
                // A node that stopped on an error said why in its last status.
                Some(status) => match spec.status().and_then(|s| s.stopped) {
                    Some(why) => down.push(format!("node {} stopped: {why}", spec.id)),
                    None => down.push(format!("node {} exited ({status})", spec.id)),
                },
                None => statuses.push((spec.id, spec.status())),
            }
        }
        if !down.is_empty() && down.len() == n {
            println!("\nraftkv: every node has exited: {}", down.join(", "));
            return ExitCode::from(1);
        }
        let leader = leader_of(statuses.iter().cloned());
        let term = statuses
            .iter()
            .find(|(id, _)| Some(*id) == leader)
            .and_then(|(_, s)| s.as_ref().map(|s| s.term));
        let known = || statuses.iter().filter_map(|(_, s)| s.as_ref());
        let commands: u64 = known().map(|s| s.commands).sum();
        let applied = known().map(|s| s.applied).max().unwrap_or(0);
        let keys = known().map(|s| s.keys).max().unwrap_or(0);
        let now = Instant::now();
        let rate = match last {
            Some((at, before)) => {
                commands.saturating_sub(before) as f64 / now.duration_since(at).as_secs_f64()
            }
            None => 0.0,
        };
        last = Some((now, commands));
        let mut line = match (leader, term) {
            (Some(id), Some(term)) => format!("leader node {id}, term {term}"),
            _ => "no leader yet".to_string(),
        };
        let _ = write!(
            line,
            " | applied {applied} | keys {keys} | {rate:.0} ops/s | up {}/{n}",
            n - down.len()
        );
        if !down.is_empty() {
            let _ = write!(line, " | {}", down.join(", "));
        }
        if tty {
            print!("\r\x1b[2K{line}");
            let _ = io::stdout().flush();
        } else if now.duration_since(last_plain) >= Duration::from_secs(10) {
            println!("{line}");
            last_plain = now;
        }
    }
}
