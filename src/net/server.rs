//! The server side: an [`Acceptor`](super::acceptor::Acceptor) (the listener thread, the
//! connection cap, the optional handshake), a reader and a writer thread per connection, and
//! a fixed pool of handler threads fed through a bounded queue.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam::channel::{self, Receiver, Sender, TrySendError};
use parking_lot::RwLock;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::acceptor::{Accept, Acceptor, AcceptorOptions, ConnList, Handshake};
use super::conn::{self, ConnConfig, ConnHandle, ConnThreads};
use super::wire::{self, Frame, RemoteError};
use super::{DEFAULT_MAX_FRAME_BYTES, RateLimitedLog};
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
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            handler_threads: 8,
            handler_queue: 1024,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_connections: 256,
            handshake: None,
            write_timeout: Duration::from_secs(5),
            send_queue: 1024,
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
    dispatched: AtomicUsize,
    refused: AtomicU64,
    busy_log: RateLimitedLog,
}

struct ConnEntry {
    handle: ConnHandle,
    threads: ConnThreads,
}

impl super::acceptor::Conn for ConnEntry {
    fn close(&self) {
        self.handle.close();
    }

    fn is_finished(&self) -> bool {
        self.threads.is_finished()
    }

    fn join(self) -> thread::Result<()> {
        std::panic::catch_unwind(AssertUnwindSafe(|| self.threads.join()))
    }
}

/// Starts the reader and writer of each accepted connection.
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
        let inner = &self.inner;
        let config = ConnConfig {
            name: format!("{}-c{k}", inner.name),
            log_target: LOG,
            peer,
            max_frame_bytes: inner.options.max_frame_bytes,
            write_timeout: inner.options.write_timeout,
            send_queue: inner.options.send_queue.max(1),
        };
        let on_frame = {
            let inner = inner.clone();
            let job_tx = self.job_tx.clone();
            move |frame, reply_tx: &Sender<Vec<u8>>| {
                on_request(&inner, &job_tx, peer, frame, reply_tx)
            }
        };
        let (handle, threads) = conn::start(stream, config, on_frame, || {})?;
        conns.push(ConnEntry { handle, threads });
        Ok(())
    }
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
            services: RwLock::new(HashMap::new()),
            dispatched: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            busy_log: RateLimitedLog::new(Duration::from_secs(1)),
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

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.acceptor
            .as_ref()
            .map_or(0, |a| a.conns().count(|c| !c.handle.is_closed()))
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
