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

/// What to run, and where.
#[derive(Debug, Clone)]
pub struct MemberArgs {
    /// Client addresses of nodes to ask, in order.
    pub nodes: Vec<String>,
    pub requirepass_file: Option<PathBuf>,
    /// The words after `RAFTKV.MEMBER`: `LIST`, `ADD ID PEER CLIENT`, `REMOVE ID`.
    pub command: Vec<String>,
}

/// How long one answer may take: an `add` waits for the new node to catch up (the node
/// gives up after 5 minutes).
const REPLY_TIMEOUT: Duration = Duration::from_secs(330);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Passes over the addresses while no node knows the leader (an election under way).
const PASSES: usize = 10;
const PASS_PAUSE: Duration = Duration::from_millis(500);

/// Runs the command; the process's exit code (0 done, 1 refused or no node answered).
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
    words.extend(args.command.iter().cloned());
    let mut last_error = String::from("no address given");
    for pass in 0..PASSES {
        if pass > 0 {
            std::thread::sleep(PASS_PAUSE);
        }
        let mut queue: Vec<String> = args.nodes.clone();
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
