//! A RESP front end: a TCP listener whose connections speak Redis's protocol to a
//! [`CommandHandler`].
//!
//! The project's one acceptor ([`crate::net::acceptor`], thread `<name>-accept`) listens,
//! refuses connections past [`RespOptions::max_clients`], and hands each accepted one to the
//! event loop. One event-loop thread (`<name>-loop`, on `mio`) owns every connection: it
//! reads, decodes, answers the commands about the connection itself ([`super::session`]), and
//! hands the KV commands a client pipelined — one batch per connection at a time — to the
//! [`CommandHandler`]. How depends on the handler:
//! * one that never blocks ([`CommandHandler::submits_without_blocking`], the node's) gets the
//!   batches of every connection served in one turn of the loop in one
//!   [`submit`](CommandHandler::submit) call, from the loop itself; each batch's replies come
//!   back through its [`Completion`], from any thread, into one completion queue that wakes
//!   the loop once per burst (not once per batch); the loop encodes and writes them;
//! * one that may block (for a Raft commit, say) is called by a fixed pool of worker threads
//!   (`<name>-w<i>`), which encode the replies and give them back through the same queue.
//!   `INFO` (the store's sections) and the operator's commands always go to a worker.
//!
//! A connection is not read while its batch runs or its replies wait to be written, so what
//! one client can make the server hold is one batch's input and one batch's output, and the
//! completion queue holds at most one entry per connection.
//!
//! Idle connections cost a few hundred bytes each and no thread, so the default limit is
//! Redis's 10,000 clients. What a connection does with bad input, as Redis does:
//! * unknown command, wrong arity, a bad integer: the error reply, and the connection goes on;
//! * a malformed or oversized frame ([`super::ParseError`]): the error reply, then the
//!   connection is closed (the stream cannot be resynchronised); the peer and the offset are
//!   logged;
//! * more connections than [`RespOptions::max_clients`]: `-ERR max number of clients
//!   reached`, then closed;
//! * silent for [`RespOptions::idle_timeout`] (Redis's `timeout`; zero: never): closed;
//! * part of a command sent and nothing completed for
//!   [`RespOptions::partial_frame_timeout`]: closed (a slowloris client);
//! * input held for partly received commands above [`RespOptions::max_input_bytes`] over
//!   all connections: the connection holding the most is closed (Redis's
//!   `maxmemory-clients`);
//! * replies not read for [`RespOptions::write_timeout`]: closed.
//!
//! With a password ([`RespOptions::password`]) every command but `AUTH`, `HELLO` and `QUIT`
//! answers `-NOAUTH` until the client authenticates, and the commands of an unauthenticated
//! client are read under [`RespOptions::unauthenticated_limits`].

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};

use super::auth::Password;
use super::session::{ConnFacts, ServerView, Session, Slot, Work, render_info};
use super::{Decoder, Limits, Reply, encode_header};
use crate::kvapi::KvCmd;
use crate::net::acceptor::{self, Accept, Acceptor, AcceptorOptions, ConnList};

const LOG: &str = "resp::server";
const WAKER: Token = Token(1);
/// Connection ids (and tokens) start here and are never reused.
const FIRST_CONN_ID: u64 = 2;
const READ_CHUNK: usize = 64 << 10;
/// Reads one connection may take in one turn before the others get theirs.
const READS_PER_TURN: usize = 16;
/// How often timeouts are checked.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// What executes the commands of every connection. Unless it
/// [submits without blocking](Self::submits_without_blocking), it runs on a worker thread and
/// may block (for a Raft commit, say); the connection reads nothing more meanwhile.
pub trait CommandHandler: Send + Sync + 'static {
    /// Runs one KV command (PING and QUIT never reach a handler: the connection answers
    /// them).
    fn handle(&self, command: KvCmd) -> Reply;

    /// The commands one client pipelined, in order; one reply each, in the same order. The
    /// default runs them one by one; a replicated store can submit them together (and must
    /// run them atomically: an `EXEC` is one batch).
    fn handle_batch(&self, commands: Vec<KvCmd>) -> Vec<Reply> {
        commands.into_iter().map(|c| self.handle(c)).collect()
    }

    /// Whether [`submit`](Self::submit) returns at once, whatever it is given (the replies
    /// come later through each batch's [`Completion`]): then the event loop calls it itself,
    /// with no worker in between. The default, `false`: batches go to the worker pool, which
    /// calls [`handle_batch`](Self::handle_batch).
    fn submits_without_blocking(&self) -> bool {
        false
    }

    /// Starts the batches of several connections (each one client's pipelined commands, to
    /// be run in order and atomically, as `handle_batch`'s); each [`Completion`] is answered
    /// once, from any thread, with one reply per command. Called by the event loop only when
    /// [`submits_without_blocking`](Self::submits_without_blocking) says so, and then it must
    /// not block. The default runs each batch on `handle_batch` and answers at once.
    fn submit(&self, batches: Vec<Batch>) {
        for Batch { commands, done } in batches {
            done.complete(self.handle_batch(commands));
        }
    }

    /// Sections the store adds to `INFO`: lower-case name and text (`# Name\r\nkey:value\r\n…`).
    fn info(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// An operator's command (`RAFTKV.MEMBER` and its arguments); runs on a worker and may
    /// block. The default knows none.
    fn operator(&self, _args: Vec<Vec<u8>>) -> Reply {
        Reply::Error("ERR unknown command 'raftkv.member'".into())
    }
}

impl<F: Fn(KvCmd) -> Reply + Send + Sync + 'static> CommandHandler for F {
    fn handle(&self, command: KvCmd) -> Reply {
        self(command)
    }
}

/// One connection's batch for [`CommandHandler::submit`].
pub struct Batch {
    pub commands: Vec<KvCmd>,
    /// Where the replies go.
    pub done: Completion,
}

/// Where one batch's replies go: the connection's place in the event loop's completion
/// queue. Answered once ([`complete`](Self::complete)), from any thread, without blocking;
/// dropped unanswered, it answers every command with an error, so no connection waits
/// forever. An answer for a connection closed meanwhile is dropped by the loop (connection
/// ids are never reused).
pub struct Completion {
    conn: u64,
    commands: usize,
    queue: Option<Arc<Completions>>,
}

impl Completion {
    /// The commands of the batch: the replies expected.
    pub fn commands(&self) -> usize {
        self.commands
    }

    /// Hands the replies, one per command in order, to the connection.
    pub fn complete(mut self, replies: Vec<Reply>) {
        debug_assert_eq!(replies.len(), self.commands, "one reply per command");
        if let Some(queue) = self.queue.take() {
            queue.push(Finished {
                conn: self.conn,
                output: Output::Replies(replies),
            });
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take() {
            // No replies: each command is answered "no reply" (`encode_slot`).
            queue.push(Finished {
                conn: self.conn,
                output: Output::Replies(Vec::new()),
            });
        }
    }
}

/// A batch's answer on its way back to the loop.
struct Finished {
    conn: u64,
    output: Output,
}

enum Output {
    /// A worker's: every slot's reply, encoded.
    Encoded { bytes: Vec<u8>, close: bool },
    /// A [`Completion`]'s: the KV commands' replies, encoded by the loop with the
    /// connection's slots.
    Replies(Vec<Reply>),
}

/// The completion queue: what finished batches hand back to the loop, and the loop's waker.
/// At most one entry per connection (one batch in flight each), so bounded by
/// [`RespOptions::max_clients`].
struct Completions {
    name: String,
    waker: Waker,
    state: parking_lot::Mutex<CompletionState>,
}

#[derive(Default)]
struct CompletionState {
    finished: Vec<Finished>,
    /// The loop has been woken and has not taken `finished` since: a push adds to the
    /// burst without another wake.
    woken: bool,
}

impl Completions {
    fn push(&self, finished: Finished) {
        let wake = {
            let mut state = self.state.lock();
            state.finished.push(finished);
            !std::mem::replace(&mut state.woken, true)
        };
        if wake {
            self.wake();
        }
    }

    fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            log::error!(target: LOG, "{}: cannot wake the event loop: {e}", self.name);
        }
    }

    /// Moves what finished into `into` (empty); the next push wakes the loop again.
    fn take(&self, into: &mut Vec<Finished>) {
        let mut state = self.state.lock();
        std::mem::swap(&mut state.finished, into);
        state.woken = false;
    }
}

#[derive(Debug, Clone)]
pub struct RespOptions {
    pub limits: Limits,
    /// The limits a client's commands are read under until it authenticates (only with a
    /// password): small, as Redis's for unauthenticated clients.
    pub unauthenticated_limits: Limits,
    /// Connections open at once (Redis's `maxclients`); more are answered with an error and
    /// closed.
    pub max_clients: usize,
    /// Commands handed to the handler in one batch, at most.
    pub max_batch: usize,
    /// A client that does not read its replies for this long is disconnected.
    pub write_timeout: Duration,
    /// A client that sends nothing for this long is disconnected (Redis's `timeout`); zero:
    /// never.
    pub idle_timeout: Duration,
    /// A client that sent part of a command and completed none for this long is
    /// disconnected.
    pub partial_frame_timeout: Duration,
    /// Bytes of partly received commands (and queued transactions) held for all connections
    /// together; above it the connection holding the most is closed.
    pub max_input_bytes: usize,
    /// Threads that run handler calls: batches of different connections in flight at once.
    pub workers: usize,
    /// The password clients must give (`requirepass`); `None`: none.
    pub password: Option<Password>,
    /// Refuse to listen on an address other than loopback without a password (Redis's
    /// `protected-mode`).
    pub protected_mode: bool,
}

impl Default for RespOptions {
    fn default() -> Self {
        RespOptions {
            limits: Limits::default(),
            unauthenticated_limits: Limits {
                max_bulk_bytes: 16 << 10,
                max_array_len: 10,
                max_frame_bytes: 64 << 10,
                max_inline_bytes: 16 << 10,
                ..Limits::default()
            },
            max_clients: 10_000,
            max_batch: 1024,
            write_timeout: Duration::from_secs(10),
            idle_timeout: Duration::ZERO,
            partial_frame_timeout: Duration::from_secs(30),
            max_input_bytes: 256 << 20,
            workers: 64,
            password: None,
            protected_mode: true,
        }
    }
}

/// What the loop, the workers and the handle share.
struct Shared {
    name: String,
    options: RespOptions,
    handler: Arc<dyn CommandHandler>,
    /// The handler's [`CommandHandler::submits_without_blocking`], asked once.
    submits_from_loop: bool,
    stop: AtomicBool,
    completions: Arc<Completions>,
    commands: AtomicU64,
    protocol_errors: AtomicU64,
    connections: AtomicUsize,
    /// Connections closed by a limit or timeout (refused, idle, slow, over the input budget).
    limit_closes: AtomicU64,
}

/// A RESP listener. Dropping it (or [`shutdown`](Self::shutdown)) closes every connection and
/// joins every thread (after the handler calls running then return).
pub struct RespServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<Acceptor<ClientEntry>>,
    event_loop: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

/// A connection as the acceptor counts it (against `max_clients`) until the loop lets it go.
#[derive(Default)]
struct ConnState {
    /// Asked to close ([`acceptor::Conn::close`]); the loop closes it at its next sweep.
    close: AtomicBool,
    /// The loop no longer holds it (closed, or never registered).
    finished: AtomicBool,
}

/// Marks its connection finished when dropped, whichever way the loop lets it go.
struct Finishes(Arc<ConnState>);

impl Drop for Finishes {
    fn drop(&mut self) {
        self.0.finished.store(true, Ordering::SeqCst);
    }
}

/// The acceptor's entry for one client connection: the connection itself lives in the loop.
struct ClientEntry {
    state: Arc<ConnState>,
    completions: Arc<Completions>,
}

impl acceptor::Conn for ClientEntry {
    fn close(&self) {
        self.state.close.store(true, Ordering::SeqCst);
        self.completions.wake();
    }
    fn is_finished(&self) -> bool {
        self.state.finished.load(Ordering::SeqCst)
    }
    /// No thread of its own: the loop's thread is joined by the server.
    fn join(self) -> thread::Result<()> {
        Ok(())
    }
}

/// A connection accepted and on its way to the loop.
struct Incoming {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    done: Finishes,
}

/// What the acceptor hands its connections to: the loop's queue of new connections.
struct RespAccept {
    shared: Arc<Shared>,
    incoming: Sender<Incoming>,
}

impl Accept for RespAccept {
    type Conn = ClientEntry;

    fn open(
        &mut self,
        stream: std::net::TcpStream,
        peer: SocketAddr,
        _k: u64,
        conns: &ConnList<ClientEntry>,
    ) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        let state = Arc::new(ConnState::default());
        conns.push(ClientEntry {
            state: state.clone(),
            completions: self.shared.completions.clone(),
        });
        let incoming = Incoming {
            stream,
            peer,
            done: Finishes(state),
        };
        // The loop is gone only at shutdown; the connection is then dropped (and finished).
        if self.incoming.send(incoming).is_ok() {
            self.shared.completions.wake();
        }
        Ok(())
    }

    fn refuse(&mut self, stream: &mut std::net::TcpStream, _peer: SocketAddr) {
        // Best effort: the client may already be gone. The acceptor logs the refusal.
        let _ = stream.write(b"-ERR max number of clients reached\r\n");
        self.shared.limit_closes.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a server will not listen on an address: protected mode.
fn protected_mode_refusal(addr: SocketAddr) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "protected mode: clients on {addr} could reach the data without a password; \
             give a password (--requirepass-file FILE), or listen on a loopback address \
             (127.0.0.1)"
        ),
    )
}

/// Protected mode (Redis's): without a password, a server listens only on loopback
/// addresses unless [`RespOptions::protected_mode`] is off.
pub fn check_protected_mode(bind: &[SocketAddr], options: &RespOptions) -> io::Result<()> {
    if options.protected_mode
        && options.password.is_none()
        && let Some(open) = bind.iter().find(|a| !a.ip().is_loopback())
    {
        return Err(protected_mode_refusal(*open));
    }
    Ok(())
}

impl RespServer {
    /// Listens on `bind` (port 0 picks a free one). Threads: `<name>-loop`, `<name>-w<i>`.
    pub fn start(
        name: &str,
        bind: impl ToSocketAddrs,
        options: RespOptions,
        handler: Arc<dyn CommandHandler>,
    ) -> io::Result<RespServer> {
        let bind: Vec<SocketAddr> = bind.to_socket_addrs()?.collect();
        check_protected_mode(&bind, &options)?;
        let listener = std::net::TcpListener::bind(&bind[..])?;
        let addr = listener.local_addr()?;
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let max_clients = options.max_clients;
        let workers = options.workers.max(1);
        let shared = Arc::new(Shared {
            name: name.to_string(),
            options,
            submits_from_loop: handler.submits_without_blocking(),
            handler,
            stop: AtomicBool::new(false),
            completions: Arc::new(Completions {
                name: name.to_string(),
                waker,
                state: parking_lot::Mutex::new(CompletionState::default()),
            }),
            commands: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            limit_closes: AtomicU64::new(0),
        });
        // Bounded by the connections: each has at most one batch in flight.
        let (job_tx, job_rx) = channel::unbounded::<Job>();
        // Bounded by `max_clients`: the acceptor counts a connection from before it is sent.
        let (incoming_tx, incoming_rx) = channel::unbounded::<Incoming>();
        let mut server = RespServer {
            shared: shared.clone(),
            addr,
            acceptor: None,
            event_loop: None,
            workers: Vec::new(),
        };
        for i in 0..workers {
            let (shared, jobs) = (shared.clone(), job_rx.clone());
            let spawned = thread::Builder::new()
                .name(format!("{name}-w{i}"))
                .spawn(move || run_worker(&shared, &jobs));
            match spawned {
                Ok(h) => server.workers.push(h),
                // Dropping `server` stops and joins the workers started so far.
                Err(e) => return Err(e),
            }
        }
        drop(job_rx);
        let event_loop = EventLoop {
            shared: shared.clone(),
            poll,
            incoming: incoming_rx,
            port: addr.port(),
            bind: bind
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(" "),
            conns: HashMap::new(),
            runnable: VecDeque::new(),
            next_id: FIRST_CONN_ID,
            input_held: 0,
            jobs: job_tx,
            submissions: Vec::new(),
            finished: Vec::new(),
            started: Instant::now(),
            chunk: vec![0; READ_CHUNK],
        };
        server.event_loop = Some(
            thread::Builder::new()
                .name(format!("{name}-loop"))
                .spawn(move || event_loop.run())?,
        );
        server.acceptor = Some(Acceptor::start(
            name,
            listener,
            AcceptorOptions {
                max_connections: max_clients,
                handshake: None,
                ..AcceptorOptions::default()
            },
            RespAccept {
                shared: shared.clone(),
                incoming: incoming_tx,
            },
        )?);
        log::info!(target: LOG, "{name}: RESP on {addr}");
        Ok(server)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Commands received so far.
    pub fn commands(&self) -> u64 {
        self.shared.commands.load(Ordering::Relaxed)
    }

    /// Connections closed for a malformed or oversized frame.
    pub fn protocol_errors(&self) -> u64 {
        self.shared.protocol_errors.load(Ordering::Relaxed)
    }

    /// Connections refused or closed by a limit or a timeout.
    pub fn limit_closes(&self) -> u64 {
        self.shared.limit_closes.load(Ordering::Relaxed)
    }

    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        // No new connection first; then the loop closes every connection and drops the job
        // queue, which ends the workers.
        let mut panic = self.acceptor.take().and_then(|mut a| a.stop().err());
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.completions.wake();
        if let Some(p) = self.event_loop.take().and_then(|h| h.join().err()) {
            panic.get_or_insert(p);
        }
        for h in self.workers.drain(..) {
            if let Err(p) = h.join() {
                panic.get_or_insert(p);
            }
        }
        log::info!(target: LOG, "{}: stopped", self.shared.name);
        if let Some(p) = panic
            && !thread::panicking()
        {
            std::panic::resume_unwind(p);
        }
    }
}

impl Drop for RespServer {
    fn drop(&mut self) {
        if self.acceptor.is_some() || self.event_loop.is_some() || !self.workers.is_empty() {
            self.stop_and_join();
        }
    }
}

/// A connection's batch for a worker.
struct Job {
    conn: u64,
    work: Work,
}

fn run_worker(shared: &Shared, jobs: &Receiver<Job>) {
    while let Ok(Job { conn, work }) = jobs.recv() {
        let close = work.close;
        let bytes = execute(&*shared.handler, work);
        shared.completions.push(Finished {
            conn,
            output: Output::Encoded { bytes, close },
        });
    }
}

/// Runs a batch's KV commands on the handler and encodes every reply in order.
fn execute(handler: &dyn CommandHandler, work: Work) -> Vec<u8> {
    let count = work.kv.len();
    let replies = if count == 0 {
        Vec::new()
    } else {
        handler.handle_batch(work.kv)
    };
    debug_assert_eq!(replies.len(), count, "one reply per command");
    fn wants_info(slots: &[Slot]) -> bool {
        slots.iter().any(|s| match s {
            Slot::Info { .. } => true,
            Slot::Exec { slots, .. } => wants_info(slots),
            Slot::Operator { .. } => false,
            _ => false,
        })
    }
    let store_info = if wants_info(&work.slots) {
        handler.info()
    } else {
        Vec::new()
    };
    let mut out = Vec::new();
    for slot in work.slots {
        let slot = run_operator(handler, slot);
        encode_slot(slot, &replies, &store_info, &mut out);
    }
    out
}

/// An operator's command, run now and made a ready answer (inside `EXEC` too).
fn run_operator(handler: &dyn CommandHandler, slot: Slot) -> Slot {
    match slot {
        Slot::Operator { args, protocol } => {
            let mut bytes = Vec::new();
            handler.operator(args).encode_as(protocol, &mut bytes);
            Slot::Ready(bytes)
        }
        Slot::Exec { slots, protocol } => Slot::Exec {
            slots: slots
                .into_iter()
                .map(|s| run_operator(handler, s))
                .collect(),
            protocol,
        },
        other => other,
    }
}

fn encode_slot(slot: Slot, replies: &[Reply], store_info: &[(String, String)], out: &mut Vec<u8>) {
    let missing = || Reply::Error("ERR internal error: no reply".into());
    match slot {
        Slot::Ready(bytes) => out.extend_from_slice(&bytes),
        // Run before encoding (`run_operator`).
        Slot::Operator { protocol, .. } => missing().encode_as(protocol, out),
        Slot::Kv { index, protocol } => match replies.get(index) {
            Some(reply) => reply.encode_as(protocol, out),
            None => missing().encode_as(protocol, out),
        },
        Slot::Exec { slots, .. } => {
            encode_header(out, b'*', slots.len());
            for slot in slots {
                encode_slot(slot, replies, store_info, out);
            }
        }
        Slot::Info {
            local,
            wanted,
            keyspace,
            protocol,
        } => {
            let store: Vec<String> = store_info
                .iter()
                .filter(|(name, _)| wanted.as_ref().is_none_or(|w| w.contains(name)))
                .map(|(_, text)| text.clone())
                .collect();
            let keys = keyspace.map(|i| match replies.get(i) {
                Some(Reply::Integer(n)) => Ok(*n),
                Some(Reply::Error(e)) => Err(e.clone()),
                _ => Err("no answer".to_string()),
            });
            Reply::Verbatim(render_info(local, store, keys)).encode_as(protocol, out);
        }
    }
}

/// One client connection, owned by the event loop.
struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    decoder: Decoder,
    session: Session,
    /// Replies not yet written: `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
    /// A batch is with a worker or the handler.
    busy: bool,
    /// The socket may hold unread bytes: a readiness event came since a read found it
    /// empty (epoll reports every arrival on an edge-triggered socket, so a read that
    /// found no more, or a short one, need not be followed by another until the next
    /// event; saves a read that would fail with `WouldBlock` after each reply).
    may_read: bool,
    /// The slots of the batch submitted from the loop, encoded when its replies come.
    in_flight: Option<InFlight>,
    /// Close once `out` is written.
    closing: bool,
    /// In the loop's run queue.
    scheduled: bool,
    created: Instant,
    last_interaction: Instant,
    /// Since when part of a command has waited for the rest with no command completed.
    partial_since: Option<Instant>,
    /// Since when written replies have waited for the client to read.
    write_stalled_since: Option<Instant>,
    /// Bytes this connection counts in the loop's input budget.
    held: usize,
    /// Tells the acceptor when the connection is let go (its slot under `max_clients`).
    done: Finishes,
}

impl Conn {
    fn facts(&self, now: Instant) -> ConnFacts {
        ConnFacts {
            addr: self.peer,
            laddr: self.local,
            fd: self.stream.as_raw_fd(),
            age_secs: now.duration_since(self.created).as_secs(),
            idle_secs: now.duration_since(self.last_interaction).as_secs(),
            qbuf: self.decoder.buffered(),
            omem: self.out.len() - self.out_pos,
        }
    }

    fn pending_out(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// Writes what it can of `out`. `Ok(true)` when all is written.
    fn flush(&mut self, now: Instant) -> io::Result<bool> {
        while self.pending_out() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out_pos += n;
                    self.last_interaction = now;
                    self.write_stalled_since = Some(now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.write_stalled_since.get_or_insert(now);
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        if self.out.capacity() > READ_CHUNK {
            self.out = Vec::new();
        }
        self.write_stalled_since = None;
        Ok(true)
    }

    fn held_now(&self) -> usize {
        self.decoder.held_bytes() + self.session.queued_bytes()
    }
}

/// A batch the loop submitted itself ([`CommandHandler::submit`]): what to do with its
/// replies.
struct InFlight {
    slots: Vec<Slot>,
    close: bool,
}

/// Why the loop closes a connection.
#[derive(Debug)]
enum Close {
    /// The client closed, or the connection broke.
    Gone(Option<io::Error>),
    /// After `QUIT` or a protocol error, once the replies were written.
    Done,
    /// The node-wide input budget was exceeded and this connection held the most.
    InputBudget { held: usize, total: usize },
}

struct EventLoop {
    shared: Arc<Shared>,
    poll: Poll,
    /// Connections the acceptor accepted, not yet watched by the loop.
    incoming: Receiver<Incoming>,
    port: u16,
    bind: String,
    conns: HashMap<u64, Conn>,
    runnable: VecDeque<u64>,
    next_id: u64,
    /// Sum of every connection's `held`.
    input_held: usize,
    jobs: Sender<Job>,
    /// Batches for [`CommandHandler::submit`] gathered during this turn.
    submissions: Vec<Batch>,
    /// What the completion queue handed over (kept for its capacity).
    finished: Vec<Finished>,
    started: Instant,
    chunk: Vec<u8>,
}

impl EventLoop {
    fn run(mut self) {
        let name = self.shared.name.clone();
        let mut events = Events::with_capacity(1024);
        let mut last_sweep = Instant::now();
        while !self.shared.stop.load(Ordering::SeqCst) {
            let timeout = if self.runnable.is_empty() {
                SWEEP_INTERVAL
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!(target: LOG, "{name}: poll failed: {e}");
                    thread::sleep(SWEEP_INTERVAL);
                }
                continue;
            }
            for event in events.iter() {
                match event.token() {
                    WAKER => {}
                    Token(t) => {
                        let id = t as u64;
                        if (event.is_readable() || event.is_read_closed() || event.is_error())
                            && let Some(conn) = self.conns.get_mut(&id)
                        {
                            conn.may_read = true;
                        }
                        self.schedule(id);
                    }
                }
            }
            self.take_incoming();
            self.take_finished();
            // Only what was runnable at the start of this turn: a connection that used up
            // its reads goes to the back, after the others.
            for _ in 0..self.runnable.len() {
                let Some(id) = self.runnable.pop_front() else {
                    break;
                };
                self.advance(id);
            }
            if !self.submissions.is_empty() {
                // One call for every batch of this turn: the handler queues them together.
                self.shared
                    .handler
                    .submit(std::mem::take(&mut self.submissions));
            }
            let now = Instant::now();
            if now.duration_since(last_sweep) >= SWEEP_INTERVAL {
                last_sweep = now;
                self.sweep(now);
            }
        }
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(conn) = self.conns.remove(&id) {
                self.close(conn, Close::Done);
            }
        }
    }

    /// Hands the replies of finished batches to their connections (those still open).
    fn take_finished(&mut self) {
        self.shared.completions.take(&mut self.finished);
        let mut finished = std::mem::take(&mut self.finished);
        for Finished { conn: id, output } in finished.drain(..) {
            let Some(conn) = self.conns.get_mut(&id) else {
                continue;
            };
            conn.busy = false;
            match output {
                Output::Encoded { bytes, close } => {
                    conn.out.extend_from_slice(&bytes);
                    conn.closing |= close;
                }
                Output::Replies(replies) => {
                    let Some(InFlight { slots, close }) = conn.in_flight.take() else {
                        debug_assert!(false, "replies for client {id} with no batch in flight");
                        continue;
                    };
                    for slot in slots {
                        encode_slot(slot, &replies, &[], &mut conn.out);
                    }
                    conn.closing |= close;
                }
            }
            self.schedule(id);
        }
        self.finished = finished;
    }

    fn schedule(&mut self, id: u64) {
        if let Some(conn) = self.conns.get_mut(&id)
            && !conn.scheduled
        {
            conn.scheduled = true;
            self.runnable.push_back(id);
        }
    }

    /// Watches the connections the acceptor handed over since the last turn.
    fn take_incoming(&mut self) {
        let name = self.shared.name.clone();
        while let Ok(Incoming { stream, peer, done }) = self.incoming.try_recv() {
            let local = match stream.local_addr() {
                Ok(a) => a,
                Err(e) => {
                    log::debug!(target: LOG, "{name}: connection from {peer}: {e}");
                    continue;
                }
            };
            let mut stream = TcpStream::from_std(stream);
            let id = self.next_id;
            self.next_id += 1;
            let registered = self.poll.registry().register(
                &mut stream,
                Token(id as usize),
                Interest::READABLE | Interest::WRITABLE,
            );
            if let Err(e) = registered {
                log::warn!(target: LOG, "{name}: cannot watch the connection from {peer}: {e}");
                continue;
            }
            let options = &self.shared.options;
            let password_required = options.password.is_some();
            let limits = if password_required {
                options.unauthenticated_limits
            } else {
                options.limits
            };
            let now = Instant::now();
            let conn = Conn {
                stream,
                peer,
                local,
                decoder: Decoder::new(limits),
                session: Session::new(id, password_required),
                out: Vec::new(),
                out_pos: 0,
                busy: false,
                may_read: true,
                in_flight: None,
                closing: false,
                scheduled: false,
                created: now,
                last_interaction: now,
                partial_since: None,
                write_stalled_since: None,
                held: 0,
                done,
            };
            self.conns.insert(id, conn);
            self.shared
                .connections
                .store(self.conns.len(), Ordering::Relaxed);
            log::debug!(target: LOG, "{name}: client {id} {peer} connected");
            // What it sent before it was watched is read now.
            self.schedule(id);
        }
    }

    /// Serves one connection as far as it can go without waiting.
    fn advance(&mut self, id: u64) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        conn.scheduled = false;
        match self.drive(&mut conn) {
            Ok(()) => {
                self.conns.insert(id, conn);
            }
            Err(why) => self.close(conn, why),
        }
    }

    fn drive(&mut self, conn: &mut Conn) -> Result<(), Close> {
        let mut reads = 0;
        loop {
            if conn.busy {
                return Ok(());
            }
            let now = Instant::now();
            if !conn.flush(now).map_err(|e| Close::Gone(Some(e)))? {
                return Ok(());
            }
            if conn.closing {
                return Err(Close::Done);
            }
            if let Some(work) = self.take_work(conn, now) {
                self.account(conn)?;
                if work.needs_store() {
                    conn.busy = true;
                    if self.shared.submits_from_loop && work.kv_only() {
                        let Work { kv, slots, close } = work;
                        conn.in_flight = Some(InFlight { slots, close });
                        self.submissions.push(Batch {
                            done: Completion {
                                conn: conn.session.id,
                                commands: kv.len(),
                                queue: Some(self.shared.completions.clone()),
                            },
                            commands: kv,
                        });
                        return Ok(());
                    }
                    let job = Job {
                        conn: conn.session.id,
                        work,
                    };
                    if self.jobs.send(job).is_err() {
                        return Err(Close::Done);
                    }
                    return Ok(());
                }
                conn.closing |= work.close;
                conn.out = execute(&*self.shared.handler, work);
                conn.out_pos = 0;
                continue;
            }
            if !conn.may_read {
                // Nothing arrived since the socket was last found empty.
                return Ok(());
            }
            if reads == READS_PER_TURN {
                // More may be waiting: come back after the others had their turn.
                conn.scheduled = true;
                self.runnable.push_back(conn.session.id);
                return Ok(());
            }
            match conn.stream.read(&mut self.chunk) {
                Ok(0) => return Err(Close::Gone(None)),
                Ok(n) => {
                    reads += 1;
                    // A read shorter than asked took everything the socket held; what
                    // arrives later comes with its own readiness event.
                    conn.may_read = n == self.chunk.len();
                    conn.last_interaction = now;
                    conn.decoder.feed(&self.chunk[..n]);
                    self.account(conn)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.may_read = false;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Close::Gone(Some(e))),
            }
        }
    }

    /// Takes the complete commands the connection has (up to a batch) and works out their
    /// answers or the batch for the store; `None` if there were none.
    fn take_work(&self, conn: &mut Conn, now: Instant) -> Option<Work> {
        let options = &self.shared.options;
        let mut work = Work::default();
        let mut completed = false;
        let others = || -> Vec<(u64, String)> {
            self.conns
                .values()
                .map(|c| (c.session.id, c.session.describe(&c.facts(now))))
                .collect()
        };
        while work.kv.len() < options.max_batch && work.slots.len() < options.max_batch {
            match conn.decoder.next_command() {
                Ok(Some(args)) => {
                    completed = true;
                    self.shared.commands.fetch_add(1, Ordering::Relaxed);
                    let view = ServerView {
                        password: options.password.as_ref(),
                        started: self.started,
                        port: self.port,
                        connected_clients: self.conns.len() + 1,
                        max_clients: options.max_clients,
                        idle_timeout_secs: options.idle_timeout.as_secs(),
                        partial_frame_timeout_secs: options.partial_frame_timeout.as_secs(),
                        input_bytes_held: self.input_held,
                        input_bytes_limit: options.max_input_bytes,
                        max_bulk_bytes: options.limits.max_bulk_bytes,
                        protected_mode: options.protected_mode,
                        bind: &self.bind,
                        facts: conn.facts(now),
                        other_clients: &others,
                    };
                    let was_authenticated = conn.session.authenticated;
                    let flow = conn.session.process(args, &mut work, &view);
                    if conn.session.authenticated && !was_authenticated {
                        conn.decoder.set_limits(options.limits);
                    }
                    if work.close || flow == super::session::Flow::Close {
                        work.close = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.shared.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    log::warn!(
                        target: LOG,
                        "{}: client {} {}: {e}; closing the connection",
                        self.shared.name,
                        conn.session.id,
                        conn.peer
                    );
                    work.slots.push(Slot::Ready(e.reply().to_bytes()));
                    work.close = true;
                    break;
                }
            }
        }
        if conn.decoder.mid_command() && !work.close {
            if completed || conn.partial_since.is_none() {
                conn.partial_since = Some(now);
            }
        } else {
            conn.partial_since = None;
            conn.decoder.release_if_empty();
        }
        (!work.slots.is_empty()).then_some(work)
    }

    /// Updates the connection's share of the input budget; over the budget, closes the
    /// connection holding the most (this one: `Err`).
    fn account(&mut self, conn: &mut Conn) -> Result<(), Close> {
        let held = conn.held_now();
        self.input_held = self.input_held - conn.held + held;
        conn.held = held;
        let limit = self.shared.options.max_input_bytes;
        while self.input_held > limit {
            let largest = self
                .conns
                .iter()
                .max_by_key(|(_, c)| c.held)
                .map(|(id, c)| (*id, c.held));
            match largest {
                Some((id, other)) if other > conn.held => {
                    let total = self.input_held;
                    if let Some(victim) = self.conns.remove(&id) {
                        self.close(victim, Close::InputBudget { held: other, total });
                    }
                }
                _ => {
                    return Err(Close::InputBudget {
                        held: conn.held,
                        total: self.input_held,
                    });
                }
            }
        }
        Ok(())
    }

    /// Closes connections past a timeout.
    fn sweep(&mut self, now: Instant) {
        let shared = self.shared.clone();
        let options = &shared.options;
        let mut expired = Vec::new();
        for (id, conn) in &self.conns {
            if conn.done.0.close.load(Ordering::SeqCst) {
                expired.push((*id, "closed by the server"));
                continue;
            }
            if conn.busy {
                continue;
            }
            let why = if conn.write_stalled_since.is_some_and(|t| {
                conn.pending_out() && now.duration_since(t) >= options.write_timeout
            }) {
                Some("did not read its replies")
            } else if conn
                .partial_since
                .is_some_and(|t| now.duration_since(t) >= options.partial_frame_timeout)
            {
                Some("sent part of a command and no more")
            } else if !options.idle_timeout.is_zero()
                && now.duration_since(conn.last_interaction) >= options.idle_timeout
            {
                Some("idle")
            } else {
                None
            };
            if let Some(why) = why {
                expired.push((*id, why));
            }
        }
        for (id, why) in expired {
            if let Some(conn) = self.conns.remove(&id) {
                if why == "closed by the server" {
                    log::debug!(target: LOG, "{}: closing client {id} {}: {why}", self.shared.name, conn.peer);
                    self.close(conn, Close::Done);
                    continue;
                }
                let limit = match why {
                    "idle" => options.idle_timeout,
                    "did not read its replies" => options.write_timeout,
                    _ => options.partial_frame_timeout,
                };
                log::info!(
                    target: LOG,
                    "{}: closing client {id} {}: {why} for {limit:?}",
                    self.shared.name,
                    conn.peer
                );
                self.shared.limit_closes.fetch_add(1, Ordering::Relaxed);
                self.close(conn, Close::Done);
            }
        }
    }

    fn close(&mut self, mut conn: Conn, why: Close) {
        let name = &self.shared.name;
        let id = conn.session.id;
        match &why {
            Close::Gone(None) | Close::Done => {
                log::debug!(target: LOG, "{name}: client {id} {} gone", conn.peer)
            }
            Close::Gone(Some(e)) => {
                log::debug!(target: LOG, "{name}: client {id} {}: {e}", conn.peer)
            }
            Close::InputBudget { held, total } => {
                self.shared.limit_closes.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    target: LOG,
                    "{name}: closing client {id} {}: it holds {held} bytes of unfinished input, and all clients {total}, over the limit of {}",
                    conn.peer,
                    self.shared.options.max_input_bytes
                );
            }
        }
        self.input_held -= conn.held;
        // Errors here mean the socket is gone already.
        let _ = self.poll.registry().deregister(&mut conn.stream);
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        drop(conn);
        self.shared
            .connections
            .store(self.conns.len(), Ordering::Relaxed);
    }
}
