//! A RESP front end: a TCP listener whose connections speak Redis's protocol to a
//! [`CommandHandler`]. One thread per connection; the commands a client pipelined (those that
//! arrived in the same reads) go to the handler as one batch and their replies are written
//! with one flush.
//!
//! What a connection does with bad input, as Redis does:
//! * unknown command, wrong arity, a bad integer: the error reply, and the connection goes on;
//! * a malformed or oversized frame ([`ParseError`]): the error reply, then the connection is
//!   closed (the stream cannot be resynchronised); the peer and the offset are logged;
//! * more connections than [`RespOptions::max_connections`]: `-ERR max number of clients
//!   reached`, then closed.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{Command, CommandError, Decoder, Limits, ParseError, Reply};
use crate::net::acceptor::{self, Accept, Acceptor, AcceptorOptions, ConnList, Handshake};

const LOG: &str = "resp::server";
const READ_CHUNK: usize = 16 << 10;

/// What executes the commands of every connection. It runs on the connection's thread and
/// may block (for a Raft commit, say); the connection reads nothing more meanwhile.
pub trait CommandHandler: Send + Sync + 'static {
    fn handle(&self, command: Command) -> Reply;

    /// The commands one client pipelined, in order; one reply each, in the same order. The
    /// default runs them one by one; a replicated store can submit them together.
    fn handle_batch(&self, commands: Vec<Command>) -> Vec<Reply> {
        commands.into_iter().map(|c| self.handle(c)).collect()
    }
}

impl<F: Fn(Command) -> Reply + Send + Sync + 'static> CommandHandler for F {
    fn handle(&self, command: Command) -> Reply {
        self(command)
    }
}

#[derive(Debug, Clone)]
pub struct RespOptions {
    pub limits: Limits,
    /// Connections open at once; more are answered with an error and closed (and the limit
    /// hit logged).
    pub max_connections: usize,
    /// Runs on each accepted connection before its first command is read (see [`Handshake`]).
    pub handshake: Option<Handshake>,
    /// Commands handed to the handler in one batch, at most.
    pub max_batch: usize,
    /// A client that does not read its replies for this long is disconnected.
    pub write_timeout: Duration,
}

impl Default for RespOptions {
    fn default() -> Self {
        RespOptions {
            limits: Limits::default(),
            max_connections: 1024,
            handshake: None,
            max_batch: 1024,
            write_timeout: Duration::from_secs(10),
        }
    }
}

struct Inner {
    name: String,
    options: RespOptions,
    handler: Arc<dyn CommandHandler>,
    stop: AtomicBool,
    commands: AtomicU64,
    protocol_errors: AtomicU64,
}

struct ConnEntry {
    stream: TcpStream,
    thread: JoinHandle<()>,
}

impl acceptor::Conn for ConnEntry {
    fn close(&self) {
        // An error means the socket is already shut.
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    fn join(self) -> thread::Result<()> {
        self.thread.join()
    }
}

/// A RESP listener. Dropping it (or [`shutdown`](Self::shutdown)) closes every connection and
/// joins every thread (after the handler calls running then return).
pub struct RespServer {
    inner: Arc<Inner>,
    addr: SocketAddr,
    acceptor: Option<Acceptor<ConnEntry>>,
}

impl RespServer {
    /// Listens on `bind` (port 0 picks a free one). Threads: `<name>-accept`, `<name>-c<k>`.
    pub fn start(
        name: &str,
        bind: impl ToSocketAddrs,
        options: RespOptions,
        handler: Arc<dyn CommandHandler>,
    ) -> io::Result<RespServer> {
        let listener = TcpListener::bind(bind)?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            name: name.to_string(),
            options,
            handler,
            stop: AtomicBool::new(false),
            commands: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
        });
        let accept_options = AcceptorOptions {
            max_connections: inner.options.max_connections,
            handshake: inner.options.handshake.clone(),
            ..AcceptorOptions::default()
        };
        let acceptor = Acceptor::start(
            name,
            listener,
            accept_options,
            Opener {
                inner: inner.clone(),
            },
        )?;
        log::info!(target: LOG, "{name}: RESP on {addr}");
        Ok(RespServer {
            inner,
            addr,
            acceptor: Some(acceptor),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.acceptor.as_ref().map_or(0, |a| a.conns().open())
    }

    /// Commands handed to the handler so far.
    pub fn commands(&self) -> u64 {
        self.inner.commands.load(Ordering::Relaxed)
    }

    /// Connections closed for a malformed or oversized frame.
    pub fn protocol_errors(&self) -> u64 {
        self.inner.protocol_errors.load(Ordering::Relaxed)
    }

    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        // Passes a connection thread's panic on, unless this thread is already panicking.
        if let Some(mut acceptor) = self.acceptor.take() {
            acceptor.shutdown();
        }
        log::info!(target: LOG, "{}: stopped", self.inner.name);
    }
}

impl Drop for RespServer {
    fn drop(&mut self) {
        if self.acceptor.is_some() {
            self.stop_and_join();
        }
    }
}

/// Starts the thread of each accepted connection.
struct Opener {
    inner: Arc<Inner>,
}

impl Accept for Opener {
    type Conn = ConnEntry;

    fn open(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        k: u64,
        conns: &ConnList<ConnEntry>,
    ) -> io::Result<()> {
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(self.inner.options.write_timeout))?;
        let clone = stream.try_clone()?;
        let conn_name = format!("{}-c{k}", self.inner.name);
        let thread = {
            let inner = self.inner.clone();
            let conn_name = conn_name.clone();
            thread::Builder::new()
                .name(conn_name.clone())
                .spawn(move || serve(&inner, &conn_name, stream, peer))?
        };
        conns.push(ConnEntry {
            stream: clone,
            thread,
        });
        Ok(())
    }

    fn refuse(&mut self, stream: &mut TcpStream, _peer: SocketAddr) {
        // Best effort: the client may already be gone.
        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
        let _ =
            stream.write_all(&Reply::Error("ERR max number of clients reached".into()).to_bytes());
    }
}

/// What a connection does after a batch.
enum Next {
    Continue,
    Close,
}

/// One connection: read, decode, execute in batches, reply, until the client leaves, QUITs,
/// breaks the protocol or the server stops.
fn serve(inner: &Inner, name: &str, mut stream: TcpStream, peer: SocketAddr) {
    log::debug!(target: LOG, "{name}: client {peer} connected");
    let mut decoder = Decoder::new(inner.options.limits);
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut out = Vec::new();
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if !inner.stop.load(Ordering::SeqCst) {
                    log::debug!(target: LOG, "{name}: read from {peer}: {e}");
                }
                break;
            }
        };
        decoder.feed(&chunk[..n]);
        let next = run_available(inner, name, peer, &mut decoder, &mut out);
        if !out.is_empty() {
            if let Err(e) = stream.write_all(&out) {
                log::debug!(target: LOG, "{name}: write to {peer}: {e}");
                break;
            }
            out.clear();
        }
        if let Next::Close = next {
            break;
        }
    }
    // The client may be gone already.
    let _ = stream.shutdown(Shutdown::Both);
    log::debug!(target: LOG, "{name}: client {peer} gone");
}

/// Runs every command the decoder has, in batches; their replies go to `out`.
fn run_available(
    inner: &Inner,
    name: &str,
    peer: SocketAddr,
    decoder: &mut Decoder,
    out: &mut Vec<u8>,
) -> Next {
    let mut batch: Vec<Command> = Vec::new();
    let flush = |batch: &mut Vec<Command>, out: &mut Vec<u8>| {
        if batch.is_empty() {
            return;
        }
        let count = batch.len();
        inner.commands.fetch_add(count as u64, Ordering::Relaxed);
        let replies = inner.handler.handle_batch(std::mem::take(batch));
        debug_assert_eq!(replies.len(), count, "one reply per command");
        for reply in replies.iter().take(count) {
            reply.encode(out);
        }
        for _ in replies.len()..count {
            Reply::Error("ERR internal error: no reply".into()).encode(out);
        }
    };
    loop {
        match decoder.next_command() {
            Ok(Some(args)) => match Command::parse(args) {
                Ok(Command::Quit) => {
                    flush(&mut batch, out);
                    Reply::ok().encode(out);
                    return Next::Close;
                }
                Ok(command) => {
                    batch.push(command);
                    if batch.len() >= inner.options.max_batch {
                        flush(&mut batch, out);
                    }
                }
                Err(e) => {
                    flush(&mut batch, out);
                    log_command_error(name, peer, &e);
                    e.reply().encode(out);
                }
            },
            Ok(None) => {
                flush(&mut batch, out);
                return Next::Continue;
            }
            Err(e) => {
                flush(&mut batch, out);
                protocol_error(inner, name, peer, &e);
                e.reply().encode(out);
                return Next::Close;
            }
        }
    }
}

fn log_command_error(name: &str, peer: SocketAddr, e: &CommandError) {
    log::debug!(target: LOG, "{name}: {peer}: {e}");
}

fn protocol_error(inner: &Inner, name: &str, peer: SocketAddr, e: &ParseError) {
    inner.protocol_errors.fetch_add(1, Ordering::Relaxed);
    log::warn!(target: LOG, "{name}: client {peer}: {e}; closing the connection");
}
