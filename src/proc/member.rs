//! `raftkv member list|add|remove`: the operator's membership commands. Each is one
//! `RAFTKV.MEMBER` command on a node's client port (the same port and password as the
//! clients'); the node that leads runs it (see [`crate::node::members`]). A node that does
//! not lead answers `NOTLEADER` (with the leader's client address when it knows it), and the
//! command goes there, or to the next address given.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::resp::{self, Limits, Reply};

/// `raftkv member`'s command line: what to run, and where (the help texts are the doc
/// comments: one paragraph each).
#[derive(Debug, Clone, clap::Args)]
pub struct MemberArgs {
    /// Client addresses (HOST:PORT) of nodes to ask, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub node: Vec<String>,
    /// The client password's file, if the nodes require one.
    #[arg(long, value_name = "FILE")]
    pub requirepass_file: Option<PathBuf>,
    #[command(subcommand)]
    pub action: MemberAction,
}

/// `raftkv member list|add|remove`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum MemberAction {
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

impl MemberAction {
    /// The words after `RAFTKV.MEMBER`: `LIST`, `ADD ID PEER CLIENT`, `REMOVE ID`; an error
    /// (a usage error) for an address that is not `HOST:PORT`.
    pub fn words(&self) -> Result<Vec<String>, String> {
        Ok(match self {
            MemberAction::List => vec!["LIST".to_string()],
            MemberAction::Add {
                id,
                peer_addr,
                client_addr,
            } => {
                for (what, a) in [("PEER_ADDR", peer_addr), ("CLIENT_ADDR", client_addr)] {
                    let dash = what == "PEER_ADDR" && a == "-";
                    if !dash && !a.contains(':') {
                        return Err(format!("{what} '{a}' is not HOST:PORT"));
                    }
                }
                vec![
                    "ADD".to_string(),
                    id.to_string(),
                    peer_addr.clone(),
                    client_addr.clone(),
                ]
            }
            MemberAction::Remove { id } => vec!["REMOVE".to_string(), id.to_string()],
        })
    }
}

/// How long one answer may take: an `add` waits for the new node to catch up (the node
/// gives up after 5 minutes).
const REPLY_TIMEOUT: Duration = Duration::from_secs(330);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Passes over the addresses while no node knows the leader (an election under way).
const PASSES: usize = 10;
const PASS_PAUSE: Duration = Duration::from_millis(500);

/// Runs the command (its words checked with [`MemberAction::words`]); the process's exit
/// code (0 done, 1 refused or no node answered).
pub fn run(args: MemberArgs) -> ExitCode {
    let password = match &args.requirepass_file {
        None => None,
        Some(p) => match fs::read_to_string(p) {
            Ok(t) => Some(t.lines().next().unwrap_or_default().to_string()),
            Err(e) => {
                eprintln!("raftkv member: cannot read {}: {e}", p.display());
                return ExitCode::from(1);
            }
        },
    };
    let mut words = vec!["RAFTKV.MEMBER".to_string()];
    match args.action.words() {
        Ok(w) => words.extend(w),
        Err(e) => {
            eprintln!("raftkv member: {e}");
            return ExitCode::from(2);
        }
    }
    let mut last_error = String::from("no address given");
    for pass in 0..PASSES {
        if pass > 0 {
            std::thread::sleep(PASS_PAUSE);
        }
        let mut queue: Vec<String> = args.node.clone();
        let mut tried: Vec<String> = Vec::new();
        while let Some(addr) = queue.first().cloned() {
            queue.remove(0);
            if tried.contains(&addr) {
                continue;
            }
            tried.push(addr.clone());
            match call(&addr, password.as_deref(), &words) {
                Ok(Reply::Bulk(text)) => {
                    print!("{}", String::from_utf8_lossy(&text));
                    if !text.ends_with(b"\n") {
                        println!();
                    }
                    return ExitCode::SUCCESS;
                }
                Ok(Reply::Simple(text)) => {
                    println!("{text}");
                    return ExitCode::SUCCESS;
                }
                Ok(Reply::Error(e)) if e.starts_with("NOTLEADER") => {
                    last_error = format!("{addr}: {e}");
                    // "NOTLEADER <addr> leads; ...": ask there next.
                    if let Some(leader) = e.split_whitespace().nth(1)
                        && leader.contains(':')
                    {
                        queue.insert(0, leader.to_string());
                    }
                }
                Ok(Reply::Error(e)) => {
                    eprintln!("raftkv member: {}", e.strip_prefix("ERR ").unwrap_or(&e));
                    return ExitCode::from(1);
                }
                Ok(other) => {
                    eprintln!("raftkv member: {addr}: unexpected answer {other:?}");
                    return ExitCode::from(1);
                }
                Err(e) => last_error = format!("{addr}: {e}"),
            }
        }
    }
    eprintln!("raftkv member: no leader answered ({last_error})");
    ExitCode::from(1)
}

/// One command on a fresh connection (after AUTH if a password is given).
fn call(addr: &str, password: Option<&str>, words: &[String]) -> io::Result<Reply> {
    let sock: SocketAddr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other("no address"))?;
    let mut stream = TcpStream::connect_timeout(&sock, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    stream.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    let mut buf = Vec::new();
    if let Some(p) = password
        && let Reply::Error(e) = one(&mut stream, &mut buf, &["AUTH", p])?
    {
        return Ok(Reply::Error(e));
    }
    one(&mut stream, &mut buf, words)
}

fn one<A: AsRef<[u8]>>(stream: &mut TcpStream, buf: &mut Vec<u8>, args: &[A]) -> io::Result<Reply> {
    stream.write_all(&resp::encode_command(args))?;
    let limits = Limits::default();
    let mut chunk = [0u8; 4096];
    loop {
        match resp::decode_reply(buf, &limits) {
            Ok(Some((reply, used))) => {
                buf.drain(..used);
                return Ok(reply);
            }
            Ok(None) => {}
            Err(e) => return Err(io::Error::other(format!("bad reply: {e}"))),
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
