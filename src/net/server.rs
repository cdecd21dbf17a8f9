//! The server side: an [`Acceptor`](super::acceptor::Acceptor) (the listener thread, the
//! connection cap, the optional handshake), a reader and a writer thread per connection, and
//! a fixed pool of handler threads fed through a bounded queue. With
//! [`ServerOptions::auth`] every connection first passes the peer handshake
//! ([`handshake`](super::handshake)) on a thread of its own, `<name>-hs<k>`.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender, TrySendError};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::acceptor::close_and_join;
use super::acceptor::{Accept, Acceptor, AcceptorOptions, ConnList, Handshake};
use super::conn::{self, ConnConfig, ConnHandle, ConnThreads};
use super::handshake::{self, HANDSHAKE_TIMEOUT, HandshakeError, PeerAuth};
use super::partial::PartialFrames;
use super::wire::{self, Frame, RemoteError};
use super::{DEFAULT_MAX_FRAME_BYTES, RateLimitedLog};
use crate::dispatch::{self, Codec, NotFound, Services, Typed};
use crate::labcodec;

const LOG: &str = "net::server";

/// A server's limits.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Handler threads: at most this many handlers run at once.
    pub handler_threads: usize,
    /// Calls waiting for a handler thread; a call arriving when it is full is refused with
    /// [`RemoteError::Busy`].
    pub handler_queue: usize,
    /// Methods (`"Service.Method"`) run on the connection's reader thread rather than handed
    /// to the pool: for short handlers that never wait on another node. A call of one holds
    /// back the connection's later frames until it returns (they run in order), and saves two
    /// thread hand-offs (reader → handler → reader's next read). Raft's AppendEntries, a
    /// follower's busiest call, costs a handler thread's wake-up and its idle spin each
    /// otherwise.
    pub inline_methods: Vec<String>,
    /// Largest frame accepted (and reply sent); a peer sending a larger one is disconnected.
    pub max_frame_bytes: usize,
    /// Connections open at once; further ones are closed on accept (and the limit hit logged).
    pub max_connections: usize,
    /// Runs on each accepted connection before it carries frames (see [`Handshake`]).
    pub handshake: Option<Handshake>,
    /// A peer that does not read its replies for this long is disconnected.
    pub write_timeout: Duration,
    /// Replies queued for one connection's writer.
    pub send_queue: usize,
    /// With it, every connection must first pass the peer handshake (see
    /// [`handshake`](super::handshake)) within [`HANDSHAKE_TIMEOUT`], on its own thread;
    /// nothing it sends before is decoded. An authenticated node holds one connection: a new
    /// one from the same node replaces the old. `None`: connections are served at once.
    pub auth: Option<PeerAuth>,
    /// Connections still in the handshake, at most; the oldest is closed to make room for a
    /// new one, so a flood of idle sockets cannot keep a node out.
    pub max_unauthenticated: usize,
    /// A connection that began a frame and has not completed it within this long is closed
    /// (a stalled or trickling peer, authenticated or not, holds neither memory nor a reader
    /// for longer).
    pub partial_frame_timeout: Duration,
    /// Bytes of partly received frames held for all connections together; when a frame's
    /// buffer would pass it, the connection holding the most is closed (see
    /// [`partial`](super::partial)).
    pub max_partial_bytes: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            handler_threads: 8,
            handler_queue: 1024,
            inline_methods: Vec::new(),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_connections: 256,
            handshake: None,
            write_timeout: Duration::from_secs(5),
            send_queue: 1024,
            auth: None,
            max_unauthenticated: 64,
            partial_frame_timeout: DEFAULT_PARTIAL_FRAME_TIMEOUT,
            max_partial_bytes: 2 * DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

/// How long a frame may take to arrive once begun, by default: a 64 MiB frame at 6 MB/s,
/// far more than a peer on a working link needs.
pub const DEFAULT_PARTIAL_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// A method: gets the node the call came from (authenticated by the handshake; `None`
/// without authentication) and the request body.
pub type Handler = dyn Fn(Option<u64>, &[u8]) -> Result<Vec<u8>, RemoteError> + Send + Sync;

/// A named set of methods, as [`labrpc::Service`](crate::labrpc::Service) (the registry is
/// [`dispatch`]'s, shared with the simulated network).
pub type Service = dispatch::Service<Handler>;

/// A typed method: arguments that do not decode (or a reply that does not encode) are
/// answered with [`RemoteError::BadArguments`].
impl Typed for Handler {
    fn typed(method: Box<Codec>) -> Arc<Handler> {
        Arc::new(move |_node: Option<u64>, bytes: &[u8]| {
            method(bytes).map_err(|e| RemoteError::BadArguments(e.to_string()))
        })
    }
}

impl dispatch::Service<Handler> {
    /// As [`method`](Self::method), and the handler also gets the node the call came from:
    /// the one the peer handshake proved, `None` on a server without authentication.
    pub fn method_from<A, R, F>(mut self, name: &str, handler: F) -> Service
    where
        A: DeserializeOwned,
        R: Serialize,
        F: Fn(Option<u64>, A) -> R + Send + Sync + 'static,
    {
        self.add_method(
            name,
            Arc::new(move |node: Option<u64>, bytes: &[u8]| {
                let args: A = labcodec::decode(bytes)
                    .map_err(|e| RemoteError::BadArguments(e.to_string()))?;
                labcodec::encode(&handler(node, args))
                    .map_err(|e| RemoteError::BadArguments(e.to_string()))
            }),
        );
        self
    }

    /// Adds method `name` on raw bytes: the handler gets the request body and returns the
    /// reply body.
    pub fn raw_method<F>(mut self, name: &str, handler: F) -> Service
    where
        F: Fn(&[u8]) -> Vec<u8> + Send + Sync + 'static,
    {
        self.add_method(name, Arc::new(move |_, bytes: &[u8]| Ok(handler(bytes))));
        self
    }
}

struct Job {
    id: u64,
    method: String,
    body: Vec<u8>,
    peer: SocketAddr,
    /// The node the handshake proved at the other end.
    node: Option<u64>,
    reply_tx: conn::Outbox,
}

struct Inner {
    name: String,
    addr: SocketAddr,
    options: ServerOptions,
    services: RwLock<Services<Handler>>,
    dispatched: AtomicUsize,
    refused: AtomicU64,
    busy_log: RateLimitedLog,
    /// The connection of each authenticated node.
    nodes: Mutex<HashMap<u64, ConnHandle>>,
    /// Handshakes refused, and connections closed unauthenticated to make room.
    unauthenticated_log: RateLimitedLog,
    handshakes_refused: AtomicU64,
    /// Memory of partly received frames, all connections together.
    partial: Arc<PartialFrames>,
}

/// One accepted connection: served at once, or (with authentication) first in the handshake
/// on its own thread, which then serves it.
struct ConnEntry {
    /// The accept number, `k` of the thread names.
    k: u64,
    /// With authentication: a handle on the socket (shutting it down ends the handshake, or
    /// the connection served after it) and the handshake thread.
    handshake: Option<(TcpStream, JoinHandle<()>)>,
    /// The connection once served.
    served: Arc<Mutex<Option<(ConnHandle, ConnThreads)>>>,
}

impl ConnEntry {
    /// Still in the handshake.
    fn pending(&self) -> bool {
        self.handshake
            .as_ref()
            .is_some_and(|(_, t)| !t.is_finished())
            && self.served.lock().is_none()
    }

    fn is_open(&self) -> bool {
        self.served
            .lock()
            .as_ref()
            .is_some_and(|(h, _)| !h.is_closed())
    }
}

impl super::acceptor::Conn for ConnEntry {
    fn close(&self) {
        if let Some((socket, _)) = &self.handshake {
            // Sticky: a connection served after this finds its socket shut.
            let _ = socket.shutdown(Shutdown::Both);
        }
        if let Some((handle, _)) = &*self.served.lock() {
            handle.close();
        }
    }

    fn is_finished(&self) -> bool {
        self.handshake.as_ref().is_none_or(|(_, t)| t.is_finished())
            && self
                .served
                .lock()
                .as_ref()
                .is_none_or(|(_, threads)| threads.is_finished())
    }

    fn join(self) -> thread::Result<()> {
        if let Some((_, thread)) = self.handshake {
            thread.join()?;
        }
        let served = self.served.lock().take();
        match served {
            Some((_, threads)) => std::panic::catch_unwind(AssertUnwindSafe(|| threads.join())),
            None => Ok(()),
        }
    }
}

/// Starts the reader and writer of each accepted connection, or its handshake first.
struct Opener {
    inner: Arc<Inner>,
    job_tx: Sender<Job>,
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
        let served = Arc::new(Mutex::new(None));
        let Some(auth) = self.inner.options.auth.clone() else {
            *served.lock() = Some(start_conn(
                &self.inner,
                &self.job_tx,
                stream,
                peer,
                None,
                k,
                None,
            )?);
            conns.push(ConnEntry {
                k,
                handshake: None,
                served,
            });
            return Ok(());
        };
        if conns.count(ConnEntry::pending) >= self.inner.options.max_unauthenticated.max(1) {
            evict_oldest(&self.inner, conns);
        }
        let socket = stream.try_clone()?;
        let thread = {
            let (inner, job_tx, served) = (self.inner.clone(), self.job_tx.clone(), served.clone());
            thread::Builder::new()
                .name(format!("{}-hs{k}", self.inner.name))
                .spawn(move || authenticate(&inner, &job_tx, &auth, stream, peer, k, &served))?
        };
        conns.push(ConnEntry {
            k,
            handshake: Some((socket, thread)),
            served,
        });
        Ok(())
    }
}

/// Closes the oldest connection still in the handshake, to make room for a new one: it has
/// had the longest to prove itself.
fn evict_oldest(inner: &Inner, conns: &ConnList<ConnEntry>) {
    let oldest = std::cell::Cell::new(u64::MAX);
    conns.count(|c| {
        if c.pending() {
            oldest.set(oldest.get().min(c.k));
        }
        false
    });
    let oldest = oldest.get();
    let taken = conns.take_where(|c| c.k == oldest);
    if taken.is_empty() {
        return;
    }
    inner.handshakes_refused.fetch_add(1, Ordering::Relaxed);
    if let Some(count) = inner.unauthenticated_log.tick() {
        log::warn!(target: LOG, "{}: {} connections in the handshake (the limit): closed the oldest ({count} refused since the last report)", inner.name, inner.options.max_unauthenticated);
    }
    if let Err(panic) = close_and_join(taken) {
        std::panic::resume_unwind(panic);
    }
}

/// A handshake thread: serves the connection if the peer proves itself within
/// [`HANDSHAKE_TIMEOUT`], else closes it and says why.
fn authenticate(
    inner: &Arc<Inner>,
    job_tx: &Sender<Job>,
    auth: &PeerAuth,
    mut stream: TcpStream,
    peer: SocketAddr,
    k: u64,
    served: &Mutex<Option<(ConnHandle, ConnThreads)>>,
) {
    let name = &inner.name;
    let accepted = match handshake::accept(&mut stream, auth, Instant::now() + HANDSHAKE_TIMEOUT) {
        Ok(node) => {
            log::debug!(target: LOG, "{name}: node {node} authenticated from {peer}");
            Ok((node, None))
        }
        Err(HandshakeError::NotMember {
            claimed,
            removed_at: Some(index),
        }) => {
            // A member removed for good: it is served only to be told so, every call
            // answered `NotMember` unrun, so it stops campaigning instead of retrying forever.
            if let Some(count) = inner.unauthenticated_log.tick() {
                log::info!(target: LOG, "{name}: node {claimed} at {peer} is not a member of the committed configuration (entry {index}): its calls are answered so ({count} such since the last report)");
            }
            Ok((claimed, Some(index)))
        }
        Err(e) => Err(e),
    };
    match accepted {
        Ok((node, removed_at)) => {
            match start_conn(inner, job_tx, stream, peer, Some(node), k, removed_at) {
                Ok((handle, threads)) => {
                    if let Some(old) = inner.nodes.lock().insert(node, handle.clone())
                        && !old.is_closed()
                    {
                        log::info!(target: LOG, "{name}: node {node} connected again from {peer}: its older connection is closed");
                        old.close();
                    }
                    *served.lock() = Some((handle, threads));
                }
                Err(e) => log::warn!(target: LOG, "{name}: cannot serve {peer}: {e}"),
            }
        }
        Err(e) => {
            inner.handshakes_refused.fetch_add(1, Ordering::Relaxed);
            if let Some(count) = inner.unauthenticated_log.tick() {
                log::warn!(target: LOG, "{name}: refused peer connection from {peer}: {e} ({count} refused since the last report)");
            }
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// Starts the reader and writer of a connection; with `removed_at`, one of a node removed
/// from the configuration, whose every call is answered [`RemoteError::NotMember`] unrun.
fn start_conn(
    inner: &Arc<Inner>,
    job_tx: &Sender<Job>,
    stream: TcpStream,
    peer: SocketAddr,
    node: Option<u64>,
    k: u64,
    removed_at: Option<u64>,
) -> io::Result<(ConnHandle, ConnThreads)> {
    let config = ConnConfig {
        name: format!("{}-c{k}", inner.name),
        log_target: LOG,
        peer,
        max_frame_bytes: inner.options.max_frame_bytes,
        write_timeout: inner.options.write_timeout,
        send_queue: inner.options.send_queue.max(1),
        partial_frame_timeout: Some(inner.options.partial_frame_timeout),
        partial_budget: Some((inner.partial.clone(), k)),
        who: match node {
            Some(n) => format!("node {n} at {peer}"),
            None => format!("peer {peer}"),
        },
    };
    let on_frame = {
        let inner = inner.clone();
        let job_tx = job_tx.clone();
        move |frame, reply_tx: &conn::Outbox| match removed_at {
            Some(index) => not_member(index, frame, reply_tx),
            None => on_request(&inner, &job_tx, peer, node, frame, reply_tx),
        }
    };
    conn::start(stream, config, on_frame, || {})
}

/// A TCP RPC server. Dropping it (or [`shutdown`](Self::shutdown)) closes every connection and
/// joins every thread, after the handlers running then return.
pub struct Server {
    inner: Arc<Inner>,
    job_tx: Option<Sender<Job>>,
    acceptor: Option<Acceptor<ConnEntry>>,
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
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            name: name.to_string(),
            addr,
            options: options.clone(),
            services: RwLock::new(Services::default()),
            dispatched: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            busy_log: RateLimitedLog::new(Duration::from_secs(1)),
            nodes: Mutex::new(HashMap::new()),
            unauthenticated_log: RateLimitedLog::new(Duration::from_secs(1)),
            handshakes_refused: AtomicU64::new(0),
            partial: Arc::new(PartialFrames::new(options.max_partial_bytes.max(1))),
        });
        let (job_tx, job_rx) = channel::bounded::<Job>(options.handler_queue.max(1));
        let mut server = Server {
            inner: inner.clone(),
            job_tx: Some(job_tx.clone()),
            acceptor: None,
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
        let accept_options = AcceptorOptions {
            max_connections: options.max_connections,
            handshake: options.handshake.clone(),
            ..AcceptorOptions::default()
        };
        server.acceptor = Some(Acceptor::start(
            name,
            listener,
            accept_options,
            Opener { inner, job_tx },
        )?);
        log::info!(target: LOG, "{name}: listening on {addr}");
        Ok(server)
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Adds a service, replacing one of the same name. Calls already running keep the old one.
    pub fn add_service(&self, service: Service) {
        self.inner.services.write().add(service);
    }

    /// Calls handed to a handler so far.
    pub fn dispatched(&self) -> usize {
        self.inner.dispatched.load(Ordering::Relaxed)
    }

    /// Bytes held now in partly received frames, every connection together (at most
    /// [`ServerOptions::max_partial_bytes`]).
    pub fn partial_frame_bytes(&self) -> usize {
        self.inner.partial.held()
    }

    /// Calls refused because the handler queue was full.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Connections served now (past the handshake, when the server authenticates).
    pub fn connections(&self) -> usize {
        self.acceptor
            .as_ref()
            .map_or(0, |a| a.conns().count(|c| c.is_open()))
    }

    /// Connections refused in the handshake, or closed before finishing it, so far.
    pub fn handshakes_refused(&self) -> u64 {
        self.inner.handshakes_refused.load(Ordering::Relaxed)
    }

    /// Stops accepting, closes every connection and joins every thread. Handlers running now
    /// finish first (their replies are dropped).
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let mut panic = self.acceptor.take().and_then(|mut a| a.stop().err());
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
        if self.acceptor.is_some() || !self.workers.is_empty() {
            self.stop_and_join();
        }
    }
}

/// A frame from a removed node: answered at once, nothing run.
fn not_member(index: u64, frame: Frame, reply_tx: &conn::Outbox) -> bool {
    let Frame::Request { id, .. } = frame else {
        return false;
    };
    if let Ok(frame) = wire::encode_reply(id, Err(&RemoteError::NotMember { index })) {
        // A full queue: the caller times out instead.
        let _ = reply_tx.try_send(frame);
    }
    true
}

/// A frame from a client: queue the call, or refuse it when the queue is full.
fn on_request(
    inner: &Inner,
    job_tx: &Sender<Job>,
    peer: SocketAddr,
    node: Option<u64>,
    frame: Frame,
    reply_tx: &conn::Outbox,
) -> bool {
    let Frame::Request { id, method, body } = frame else {
        return false;
    };
    let job = Job {
        id,
        method,
        body,
        peer,
        node,
        reply_tx: reply_tx.clone(),
    };
    if inner.options.inline_methods.contains(&job.method) {
        serve(inner, &job);
        return true;
    }
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
        serve(inner, &job);
    }
}

/// Runs a call's handler and queues its reply for the connection's writer.
fn serve(inner: &Inner, job: &Job) {
    inner.dispatched.fetch_add(1, Ordering::Relaxed);
    let result = dispatch(inner, job);
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

fn dispatch(inner: &Inner, job: &Job) -> Result<Vec<u8>, RemoteError> {
    let found = inner.services.read().find(&job.method);
    let handler = found.map_err(|e| match e {
        NotFound::BadName(name) => RemoteError::BadMethodName(name),
        NotFound::Service(service) => RemoteError::UnknownService(service),
        NotFound::Method { service, method } => RemoteError::UnknownMethod { service, method },
    })?;
    std::panic::catch_unwind(AssertUnwindSafe(|| handler(job.node, &job.body))).unwrap_or_else(|_| {
        log::error!(target: LOG, "{}: handler of {} panicked (call from {})", inner.name, job.method, job.peer);
        Err(RemoteError::HandlerPanicked)
    })
}
