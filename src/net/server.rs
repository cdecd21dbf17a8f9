//! The server side: a listener thread, a reader and a writer thread per connection, and a
//! fixed pool of handler threads fed through a bounded queue.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender, TrySendError};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::conn::{self, ConnConfig, ConnHandle, ConnThreads};
use super::handshake::{self, HANDSHAKE_TIMEOUT, PeerAuth};
use super::wire::{self, Frame, RemoteError};
use super::{DEFAULT_MAX_FRAME_BYTES, RateLimitedLog};
use crate::labcodec;

const LOG: &str = "net::server";

/// How long the listener thread sleeps when no connection is waiting (it also checks for
/// shutdown then).
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// A server's limits.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Handler threads: at most this many handlers run at once.
    pub handler_threads: usize,
    /// Calls waiting for a handler thread; a call arriving when it is full is refused with
    /// [`RemoteError::Busy`].
    pub handler_queue: usize,
    /// Largest frame accepted (and reply sent); a peer sending a larger one is disconnected.
    pub max_frame_bytes: usize,
    /// Connections open at once; further ones are closed on accept.
    pub max_connections: usize,
    /// A peer that does not read its replies for this long is disconnected.
    pub write_timeout: Duration,
    /// Replies queued for one connection's writer.
    pub send_queue: usize,
    /// With it, every connection must first pass the peer handshake (see
    /// [`handshake`](super::handshake)) within [`HANDSHAKE_TIMEOUT`]; nothing it sends before
    /// is decoded. An authenticated node holds one connection: a new one from the same node
    /// replaces the old. `None`: connections are served at once (tests, tools).
    pub auth: Option<PeerAuth>,
    /// Connections still in the handshake, at most; the oldest is closed to make room for a
    /// new one, so a flood of idle sockets cannot keep a node out for long.
    pub max_unauthenticated: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            handler_threads: 8,
            handler_queue: 1024,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_connections: 256,
            write_timeout: Duration::from_secs(5),
            send_queue: 1024,
            auth: None,
            max_unauthenticated: 64,
        }
    }
}

type Handler = Box<dyn Fn(&[u8]) -> Result<Vec<u8>, RemoteError> + Send + Sync>;

/// A named set of methods, as [`labrpc::Service`](crate::labrpc::Service).
pub struct Service {
    name: String,
    methods: HashMap<String, Handler>,
}

impl Service {
    pub fn new(name: impl Into<String>) -> Service {
        Service {
            name: name.into(),
            methods: HashMap::new(),
        }
    }

    /// Adds method `name`: the handler gets the decoded arguments and returns the reply,
    /// which is encoded back to the caller. Arguments that do not decode are answered with
    /// [`RemoteError::BadArguments`] without running the handler.
    pub fn method<A, R, F>(mut self, name: &str, handler: F) -> Service
    where
        A: DeserializeOwned,
        R: Serialize,
        F: Fn(A) -> R + Send + Sync + 'static,
    {
        let handler: Handler = Box::new(move |bytes: &[u8]| {
            let args: A =
                labcodec::decode(bytes).map_err(|e| RemoteError::BadArguments(e.to_string()))?;
            labcodec::encode(&handler(args)).map_err(|e| RemoteError::BadArguments(e.to_string()))
        });
        self.methods.insert(name.to_string(), handler);
        self
    }

    /// Adds method `name` on raw bytes: the handler gets the request body and returns the
    /// reply body.
    pub fn raw_method<F>(mut self, name: &str, handler: F) -> Service
    where
        F: Fn(&[u8]) -> Vec<u8> + Send + Sync + 'static,
    {
        self.methods
            .insert(name.to_string(), Box::new(move |bytes| Ok(handler(bytes))));
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

struct Job {
    id: u64,
    method: String,
    body: Vec<u8>,
    peer: SocketAddr,
    reply_tx: Sender<Vec<u8>>,
}

struct Inner {
    name: String,
    addr: SocketAddr,
    options: ServerOptions,
    services: RwLock<HashMap<String, Arc<Service>>>,
    stop: AtomicBool,
    dispatched: AtomicUsize,
    refused: AtomicU64,
    busy_log: RateLimitedLog,
    next_conn: AtomicU64,
    /// Handshakes refused, and connections closed unauthenticated to make room.
    unauthenticated_log: RateLimitedLog,
    handshakes_refused: AtomicU64,
}

struct ConnEntry {
    handle: ConnHandle,
    threads: ConnThreads,
    /// The node at the other end, once the handshake has proved it.
    node: Option<u64>,
}

/// A connection in the handshake, on its own thread.
struct Handshaking {
    /// A handle on the socket, to close it (which ends the handshake at once).
    stream: TcpStream,
    peer: SocketAddr,
    /// Decided once: the accept loop closes it to make room, or its thread serves it.
    outcome: Arc<Mutex<Outcome>>,
    thread: JoinHandle<()>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pending,
    Serving,
    Evicted,
}

/// A TCP RPC server. Dropping it (or [`shutdown`](Self::shutdown)) closes every connection and
/// joins every thread, after the handlers running then return.
pub struct Server {
    inner: Arc<Inner>,
    job_tx: Option<Sender<Job>>,
    conns: Arc<Mutex<Vec<ConnEntry>>>,
    accept: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

impl Server {
    /// Listens on `bind` (port 0 picks a free port: see [`local_addr`](Self::local_addr)).
    /// `name` prefixes the threads' names and log lines.
    pub fn start(
        name: &str,
        bind: impl ToSocketAddrs,
        options: ServerOptions,
    ) -> io::Result<Server> {
        let listener = TcpListener::bind(bind)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            name: name.to_string(),
            addr,
            options: options.clone(),
            services: RwLock::new(HashMap::new()),
            stop: AtomicBool::new(false),
            dispatched: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            busy_log: RateLimitedLog::new(Duration::from_secs(1)),
            next_conn: AtomicU64::new(0),
            unauthenticated_log: RateLimitedLog::new(Duration::from_secs(1)),
            handshakes_refused: AtomicU64::new(0),
        });
        let (job_tx, job_rx) = channel::bounded::<Job>(options.handler_queue.max(1));
        let mut server = Server {
            inner: inner.clone(),
            job_tx: Some(job_tx.clone()),
            conns: Arc::new(Mutex::new(Vec::new())),
            accept: None,
            workers: Vec::new(),
        };
        for i in 0..options.handler_threads.max(1) {
            let inner = inner.clone();
            let job_rx = job_rx.clone();
            let spawned = thread::Builder::new()
                .name(format!("{name}-h{i}"))
                .spawn(move || work(&inner, &job_rx));
            match spawned {
                Ok(worker) => server.workers.push(worker),
                Err(e) => {
                    // With this sender gone, dropping `server` stops and joins the workers.
                    drop(job_tx);
                    return Err(e);
                }
            }
        }
        let conns = server.conns.clone();
        server.accept = Some(
            thread::Builder::new()
                .name(format!("{name}-accept"))
                .spawn(move || accept_loop(&listener, &inner, &conns, &job_tx))?,
        );
        log::info!(target: LOG, "{name}: listening on {addr}");
        Ok(server)
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Adds a service, replacing one of the same name. Calls already running keep the old one.
    pub fn add_service(&self, service: Service) {
        self.inner
            .services
            .write()
            .insert(service.name.clone(), Arc::new(service));
    }

    /// Calls handed to a handler so far.
    pub fn dispatched(&self) -> usize {
        self.inner.dispatched.load(Ordering::Relaxed)
    }

    /// Calls refused because the handler queue was full.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Connections refused in the handshake (or closed before finishing it) so far.
    pub fn handshakes_refused(&self) -> u64 {
        self.inner.handshakes_refused.load(Ordering::Relaxed)
    }

    /// Connections open now (authenticated ones, when the server authenticates).
    pub fn connections(&self) -> usize {
        self.conns
            .lock()
            .iter()
            .filter(|c| !c.handle.is_closed())
            .count()
    }

    /// Stops accepting, closes every connection and joins every thread. Handlers running now
    /// finish first (their replies are dropped).
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        let mut panic = None;
        if let Some(accept) = self.accept.take() {
            panic = accept.join().err();
        }
        let conns: Vec<ConnEntry> = std::mem::take(&mut *self.conns.lock());
        for conn in &conns {
            conn.handle.close();
        }
        for conn in conns {
            if let Err(p) = std::panic::catch_unwind(AssertUnwindSafe(|| conn.threads.join())) {
                panic.get_or_insert(p);
            }
        }
        // The last sender: the workers finish the queued calls and exit.
        self.job_tx.take();
        for worker in self.workers.drain(..) {
            if let Err(p) = worker.join() {
                panic.get_or_insert(p);
            }
        }
        log::info!(target: LOG, "{}: stopped", self.inner.name);
        if let Some(p) = panic
            && !thread::panicking()
        {
            std::panic::resume_unwind(p);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.accept.is_some() || !self.workers.is_empty() {
            self.stop_and_join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    inner: &Arc<Inner>,
    conns: &Arc<Mutex<Vec<ConnEntry>>>,
    job_tx: &Sender<Job>,
) {
    let name = &inner.name;
    let mut handshaking: Vec<Handshaking> = Vec::new();
    while !inner.stop.load(Ordering::SeqCst) {
        reap(conns);
        reap_handshakes(&mut handshaking);
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(e) => {
                log::warn!(target: LOG, "{name}: accept failed: {e}");
                thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        if let Err(e) = stream.set_nonblocking(false) {
            log::warn!(target: LOG, "{name}: connection from {peer}: {e}");
            continue;
        }
        let Some(auth) = &inner.options.auth else {
            let open = conns.lock().len();
            if open >= inner.options.max_connections {
                log::warn!(target: LOG, "{name}: refusing connection from {peer}: {open} connections open (the limit)");
                continue;
            }
            serve(inner, conns, job_tx, stream, peer, None);
            continue;
        };
        if handshaking.len() >= inner.options.max_unauthenticated.max(1) {
            evict_oldest(inner, &mut handshaking);
        }
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        let outcome = Arc::new(Mutex::new(Outcome::Pending));
        let spawned = {
            let (inner, conns, job_tx, auth, outcome) = (
                inner.clone(),
                conns.clone(),
                job_tx.clone(),
                auth.clone(),
                outcome.clone(),
            );
            let k = inner.next_conn.fetch_add(1, Ordering::Relaxed);
            thread::Builder::new()
                .name(format!("{name}-hs{k}"))
                .spawn(move || authenticate(&inner, &conns, &job_tx, &auth, stream, peer, &outcome))
        };
        match spawned {
            Ok(thread) => handshaking.push(Handshaking {
                stream: handle,
                peer,
                outcome,
                thread,
            }),
            Err(e) => log::warn!(target: LOG, "{name}: cannot start a handshake with {peer}: {e}"),
        }
    }
    // Shutdown: end every handshake (a finished one has registered its connection, which
    // the server closes next).
    for h in &handshaking {
        let _ = h.stream.shutdown(Shutdown::Both);
    }
    for h in handshaking {
        let _ = h.thread.join();
    }
}

/// Closes the oldest connection still in the handshake, to make room for a new one: the
/// oldest has had the longest to prove itself.
fn evict_oldest(inner: &Inner, handshaking: &mut Vec<Handshaking>) {
    let Some(k) = handshaking.iter().position(|h| {
        let mut outcome = h.outcome.lock();
        if *outcome == Outcome::Pending {
            *outcome = Outcome::Evicted;
            true
        } else {
            false
        }
    }) else {
        return; // all of them authenticated meanwhile
    };
    let oldest = handshaking.remove(k);
    let _ = oldest.stream.shutdown(Shutdown::Both);
    inner.handshakes_refused.fetch_add(1, Ordering::Relaxed);
    if let Some(count) = inner.unauthenticated_log.tick() {
        log::warn!(target: LOG, "{}: {} connections in the handshake (the limit): closed the oldest, from {} ({count} refused since the last report)", inner.name, inner.options.max_unauthenticated, oldest.peer);
    }
    let _ = oldest.thread.join();
}

/// Joins the handshake threads that are done.
fn reap_handshakes(handshaking: &mut Vec<Handshaking>) {
    let (done, running): (Vec<_>, Vec<_>) = std::mem::take(handshaking)
        .into_iter()
        .partition(|h| h.thread.is_finished());
    *handshaking = running;
    for h in done {
        let _ = h.thread.join();
    }
}

/// A handshake thread: serves the connection if the peer proves itself within
/// [`HANDSHAKE_TIMEOUT`], else closes it and says why.
fn authenticate(
    inner: &Arc<Inner>,
    conns: &Mutex<Vec<ConnEntry>>,
    job_tx: &Sender<Job>,
    auth: &PeerAuth,
    mut stream: TcpStream,
    peer: SocketAddr,
    outcome: &Mutex<Outcome>,
) {
    let name = &inner.name;
    match handshake::accept(&mut stream, auth, Instant::now() + HANDSHAKE_TIMEOUT) {
        Ok(node) => {
            {
                let mut outcome = outcome.lock();
                if *outcome == Outcome::Evicted || inner.stop.load(Ordering::SeqCst) {
                    return;
                }
                *outcome = Outcome::Serving;
            }
            log::debug!(target: LOG, "{name}: node {node} authenticated from {peer}");
            serve(inner, conns, job_tx, stream, peer, Some(node));
        }
        Err(e) => {
            if *outcome.lock() == Outcome::Evicted || inner.stop.load(Ordering::SeqCst) {
                return; // counted and logged by whoever closed it
            }
            inner.handshakes_refused.fetch_add(1, Ordering::Relaxed);
            if let Some(count) = inner.unauthenticated_log.tick() {
                log::warn!(target: LOG, "{name}: refused peer connection from {peer}: {e} ({count} refused since the last report)");
            }
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// Starts serving `stream`. A connection from an authenticated node replaces any other
/// from that node.
fn serve(
    inner: &Arc<Inner>,
    conns: &Mutex<Vec<ConnEntry>>,
    job_tx: &Sender<Job>,
    stream: TcpStream,
    peer: SocketAddr,
    node: Option<u64>,
) {
    let name = &inner.name;
    let k = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    let config = ConnConfig {
        name: format!("{name}-c{k}"),
        log_target: LOG,
        peer,
        max_frame_bytes: inner.options.max_frame_bytes,
        write_timeout: inner.options.write_timeout,
        send_queue: inner.options.send_queue.max(1),
    };
    let on_frame = {
        let inner = inner.clone();
        let job_tx = job_tx.clone();
        move |frame, reply_tx: &Sender<Vec<u8>>| on_request(&inner, &job_tx, peer, frame, reply_tx)
    };
    let mut conns = conns.lock();
    if let Some(node) = node {
        for old in conns.iter().filter(|c| c.node == Some(node)) {
            log::info!(target: LOG, "{name}: node {node} connected again from {peer}: its older connection is closed");
            old.handle.close();
        }
    } else if conns.len() >= inner.options.max_connections {
        log::warn!(target: LOG, "{name}: refusing connection from {peer}: {} connections open (the limit)", conns.len());
        return;
    }
    match conn::start(stream, config, on_frame, || {}) {
        Ok((handle, threads)) => {
            log::debug!(target: LOG, "{name}: connection from {peer}");
            conns.push(ConnEntry {
                handle,
                threads,
                node,
            });
        }
        Err(e) => log::warn!(target: LOG, "{name}: cannot serve {peer}: {e}"),
    }
}

/// Joins the threads of connections that have ended.
fn reap(conns: &Mutex<Vec<ConnEntry>>) {
    let finished: Vec<ConnEntry> = {
        let mut conns = conns.lock();
        let (done, open) = std::mem::take(&mut *conns)
            .into_iter()
            .partition(|c| c.threads.is_finished());
        *conns = open;
        done
    };
    for conn in finished {
        conn.threads.join();
    }
}

/// A frame from a client: queue the call, or refuse it when the queue is full.
fn on_request(
    inner: &Inner,
    job_tx: &Sender<Job>,
    peer: SocketAddr,
    frame: Frame,
    reply_tx: &Sender<Vec<u8>>,
) -> bool {
    let Frame::Request { id, method, body } = frame else {
        return false;
    };
    let job = Job {
        id,
        method,
        body,
        peer,
        reply_tx: reply_tx.clone(),
    };
    match job_tx.try_send(job) {
        Ok(()) => true,
        Err(TrySendError::Full(job)) => {
            inner.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(count) = inner.busy_log.tick() {
                log::warn!(target: LOG, "{}: handler queue full ({} calls waiting): refused {count} call(s), the last {} from {peer}", inner.name, inner.options.handler_queue, job.method);
            }
            if let Ok(frame) = wire::encode_reply(id, Err(&RemoteError::Busy)) {
                // Full too: the caller times out instead.
                let _ = reply_tx.try_send(frame);
            }
            true
        }
        Err(TrySendError::Disconnected(_)) => false,
    }
}

fn work(inner: &Inner, job_rx: &Receiver<Job>) {
    for job in job_rx {
        inner.dispatched.fetch_add(1, Ordering::Relaxed);
        let result = dispatch(inner, &job);
        let mut frame = match &result {
            Ok(reply) => wire::encode_reply(job.id, Ok(reply)),
            Err(e) => wire::encode_reply(job.id, Err(e)),
        };
        if let Ok(bytes) = &frame
            && wire::body_len(bytes) > inner.options.max_frame_bytes
        {
            log::warn!(target: LOG, "{}: reply to {} from {} is {} bytes, above the frame limit; sending an error instead", inner.name, job.method, job.peer, wire::body_len(bytes));
            frame = wire::encode_reply(
                job.id,
                Err(&RemoteError::ReplyTooLarge {
                    bytes: wire::body_len(bytes),
                    max: inner.options.max_frame_bytes,
                }),
            );
        }
        match frame {
            // Blocks while the writer's queue is full; the writer gives up on a peer that
            // does not read within the write timeout, which ends this send too.
            Ok(frame) => {
                if job.reply_tx.send(frame).is_err() {
                    log::debug!(target: LOG, "{}: connection to {} closed before the reply to {}", inner.name, job.peer, job.method);
                }
            }
            Err(e) => {
                log::error!(target: LOG, "{}: cannot encode the reply to {}: {e}", inner.name, job.method)
            }
        }
    }
}

fn dispatch(inner: &Inner, job: &Job) -> Result<Vec<u8>, RemoteError> {
    let (service_name, method_name) = job
        .method
        .split_once('.')
        .ok_or_else(|| RemoteError::BadMethodName(job.method.clone()))?;
    let service = inner
        .services
        .read()
        .get(service_name)
        .cloned()
        .ok_or_else(|| RemoteError::UnknownService(service_name.to_string()))?;
    let handler = service
        .methods
        .get(method_name)
        .ok_or_else(|| RemoteError::UnknownMethod {
            service: service_name.to_string(),
            method: method_name.to_string(),
        })?;
    std::panic::catch_unwind(AssertUnwindSafe(|| handler(&job.body))).unwrap_or_else(|_| {
        log::error!(target: LOG, "{}: handler of {} panicked (call from {})", inner.name, job.method, job.peer);
        Err(RemoteError::HandlerPanicked)
    })
}
