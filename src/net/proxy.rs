//! A fault-injecting TCP proxy for one link: it listens on its own port and forwards every
//! connection to a target address, and on command it
//!
//! * **cuts** the link: closes every forwarded connection and closes new ones on accept (the
//!   dialler sees the connection drop at once, as with a crashed peer or a firewall reset);
//! * **blackholes** it: keeps connections open but drops every byte both ways (the dialler's
//!   calls time out, as across a real network partition);
//! * **heals** it: back to forwarding. A connection that lost bytes to a blackhole is closed
//!   then rather than resumed: its byte stream has a hole, and the bytes after the hole must
//!   never be read as frames;
//! * **delays** it: every chunk is delivered `delay` after it was read.
//!
//! A cluster under test lists each node's peers at proxy addresses (one proxy per directed
//! link), so a test partitions nodes by cutting or blackholing the proxies between them.
//!
//! Threads: `<name>-accept` (an [`Acceptor`]); per forwarded connection `<name>-<k>` with suffixes `ur`/`uw`
//! (client to target: reader, delayed writer) and `dr`/`dw` (target to client).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

use super::acceptor::{self, Accept, Acceptor, AcceptorOptions, ConnList};
use super::conn::Closing;

const LOG: &str = "net::proxy";

/// Forwarded connections open at once (each has four threads); more are closed on accept.
const MAX_LINKS: usize = 256;
/// How long the proxy waits for the target to accept a forwarded connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Chunks read but not yet delivered, per direction (the reader waits when it is full).
const DELAY_QUEUE: usize = 1024;
const CHUNK_BYTES: usize = 64 << 10;

/// What the link does with traffic now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    Forward,
    Cut,
    Blackhole,
}

struct Link {
    /// Of the client's and the upstream socket; closing wakes the delayed writers.
    closing: Closing,
    /// Bytes were dropped: nothing more is delivered, and healing closes the connection.
    tainted: AtomicBool,
}

impl Link {
    fn close(&self) {
        self.closing.close();
    }
}

struct LinkEntry {
    link: Arc<Link>,
    threads: Vec<JoinHandle<()>>,
}

impl acceptor::Conn for LinkEntry {
    fn close(&self) {
        self.link.close();
    }

    fn is_finished(&self) -> bool {
        self.threads.iter().all(|h| h.is_finished())
    }

    fn join(self) -> thread::Result<()> {
        let mut panic = None;
        for handle in self.threads {
            if let Err(p) = handle.join() {
                panic.get_or_insert(p);
            }
        }
        panic.map_or(Ok(()), Err)
    }
}

struct Inner {
    name: String,
    target: SocketAddr,
    mode: Mutex<LinkMode>,
    /// Delay in microseconds (read by the pumps without a lock).
    delay_us: AtomicU64,
    /// Blackholed now (mirrors `mode`, read by the pumps without a lock).
    blackhole: AtomicBool,
    stop: AtomicBool,
    accepted: AtomicUsize,
    refused: AtomicUsize,
    bytes_forwarded: AtomicU64,
    bytes_dropped: AtomicU64,
}

/// A proxy for one link; dropping it (or [`shutdown`](Self::shutdown)) closes every connection
/// and joins every thread.
pub struct Proxy {
    inner: Arc<Inner>,
    addr: SocketAddr,
    acceptor: Option<Acceptor<LinkEntry>>,
    links: Arc<ConnList<LinkEntry>>,
}

impl Proxy {
    /// Listens on `listen` (port 0 picks a free one) and forwards to `target`.
    pub fn start(name: &str, listen: impl ToSocketAddrs, target: SocketAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            name: name.to_string(),
            target,
            mode: Mutex::new(LinkMode::Forward),
            delay_us: AtomicU64::new(0),
            blackhole: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            bytes_forwarded: AtomicU64::new(0),
            bytes_dropped: AtomicU64::new(0),
        });
        let options = AcceptorOptions {
            max_connections: MAX_LINKS,
            ..AcceptorOptions::default()
        };
        let acceptor = Acceptor::start(
            name,
            listener,
            options,
            Forwarder {
                inner: inner.clone(),
            },
        )?;
        log::info!(target: LOG, "{name}: {addr} -> {target}");
        Ok(Proxy {
            inner,
            addr,
            links: acceptor.conns().clone(),
            acceptor: Some(acceptor),
        })
    }

    /// Where to connect to reach the target through this link.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn target(&self) -> SocketAddr {
        self.inner.target
    }

    pub fn mode(&self) -> LinkMode {
        *self.inner.mode.lock()
    }

    /// Closes every forwarded connection and refuses new ones until [`heal`](Self::heal).
    pub fn cut(&self) {
        self.set_mode(LinkMode::Cut);
    }

    /// Keeps connections but drops every byte both ways until [`heal`](Self::heal).
    pub fn blackhole(&self) {
        self.set_mode(LinkMode::Blackhole);
    }

    /// Forwards again.
    pub fn heal(&self) {
        self.set_mode(LinkMode::Forward);
    }

    pub fn set_mode(&self, mode: LinkMode) {
        let closing = {
            let mut current = self.inner.mode.lock();
            *current = mode;
            self.inner
                .blackhole
                .store(mode == LinkMode::Blackhole, Ordering::SeqCst);
            match mode {
                LinkMode::Cut => self.links.take_where(|_| true),
                LinkMode::Forward => self
                    .links
                    .take_where(|l| l.link.tainted.load(Ordering::SeqCst)),
                LinkMode::Blackhole => Vec::new(),
            }
        };
        log::info!(target: LOG, "{}: link to {} is now {mode:?} ({} connections closed)", self.inner.name, self.inner.target, closing.len());
        close_and_join(closing);
    }

    /// Delivers every chunk read from now on `delay` after it was read.
    pub fn set_delay(&self, delay: Duration) {
        self.inner.delay_us.store(
            delay.as_micros().min(u64::MAX as u128) as u64,
            Ordering::SeqCst,
        );
        log::info!(target: LOG, "{}: delay {delay:?}", self.inner.name);
    }

    /// Connections being forwarded now.
    pub fn connections(&self) -> usize {
        self.links.count(|l| !l.link.closing.is_closed())
    }

    /// Connections accepted and forwarded so far.
    pub fn accepted(&self) -> usize {
        self.inner.accepted.load(Ordering::Relaxed)
    }

    /// Connections closed on accept because the link was cut (or the target unreachable).
    pub fn refused(&self) -> usize {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Bytes delivered, both directions.
    pub fn bytes_forwarded(&self) -> u64 {
        self.inner.bytes_forwarded.load(Ordering::Relaxed)
    }

    /// Bytes dropped while blackholed, both directions.
    pub fn bytes_dropped(&self) -> u64 {
        self.inner.bytes_dropped.load(Ordering::Relaxed)
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
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.acceptor.is_some() {
            self.stop_and_join();
        }
    }
}

/// Closes the links and joins their threads; a pump's panic is passed on.
fn close_and_join(links: Vec<LinkEntry>) {
    if let Err(panic) = acceptor::close_and_join(links) {
        std::panic::resume_unwind(panic);
    }
}

/// Forwards each accepted connection to the target, unless the link is cut.
struct Forwarder {
    inner: Arc<Inner>,
}

impl Accept for Forwarder {
    type Conn = LinkEntry;

    fn open(
        &mut self,
        client: TcpStream,
        peer: SocketAddr,
        k: u64,
        links: &ConnList<LinkEntry>,
    ) -> io::Result<()> {
        let inner = &self.inner;
        let name = &inner.name;
        if *inner.mode.lock() == LinkMode::Cut {
            inner.refused.fetch_add(1, Ordering::Relaxed);
            log::debug!(target: LOG, "{name}: link cut: closing the connection from {peer}");
            return Ok(());
        }
        let upstream = match TcpStream::connect_timeout(&inner.target, CONNECT_TIMEOUT) {
            Ok(upstream) => upstream,
            Err(e) => {
                inner.refused.fetch_add(1, Ordering::Relaxed);
                log::debug!(target: LOG, "{name}: cannot reach {} for {peer}: {e}", inner.target);
                return Ok(());
            }
        };
        let entry = forward(inner, k, client, upstream)?;
        inner.accepted.fetch_add(1, Ordering::Relaxed);
        // Lock order: mode, then links (as `set_mode`), so a cut that raced with this
        // accept either sees this link or is seen here.
        let mode = inner.mode.lock();
        if *mode == LinkMode::Cut {
            drop(mode);
            close_and_join(vec![entry]);
        } else {
            links.push(entry);
        }
        Ok(())
    }
}

/// Starts the four pump threads of one forwarded connection.
fn forward(
    inner: &Arc<Inner>,
    id: u64,
    client: TcpStream,
    upstream: TcpStream,
) -> io::Result<LinkEntry> {
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    let (closing, close_rx) = Closing::new(vec![client.try_clone()?, upstream.try_clone()?]);
    let link = Arc::new(Link {
        closing,
        tainted: AtomicBool::new(false),
    });
    let mut entry = LinkEntry {
        link: link.clone(),
        threads: Vec::new(),
    };
    let directions = [
        ("u", client.try_clone()?, upstream.try_clone()?),
        ("d", upstream, client),
    ];
    for (direction, from, to) in directions {
        let (chunk_tx, chunk_rx) = channel::bounded::<(Instant, Vec<u8>)>(DELAY_QUEUE);
        let reader = {
            let (inner, link) = (inner.clone(), link.clone());
            thread::Builder::new()
                .name(format!("{}-{id}{direction}r", inner.name))
                .spawn(move || {
                    pump_in(&inner, &link, from, &chunk_tx);
                    link.close();
                })
        };
        let writer = {
            let (inner, link, close_rx) = (inner.clone(), link.clone(), close_rx.clone());
            thread::Builder::new()
                .name(format!("{}-{id}{direction}w", inner.name))
                .spawn(move || {
                    pump_out(&inner, &link, to, &chunk_rx, &close_rx);
                    link.close();
                })
        };
        for spawned in [reader, writer] {
            match spawned {
                Ok(handle) => entry.threads.push(handle),
                Err(e) => {
                    close_and_join(vec![entry]);
                    return Err(e);
                }
            }
        }
    }
    Ok(entry)
}

/// Reads chunks and queues them with their delivery time (or drops them while blackholed).
fn pump_in(inner: &Inner, link: &Link, mut from: TcpStream, chunks: &Sender<(Instant, Vec<u8>)>) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if drops(inner, link) {
            inner.bytes_dropped.fetch_add(n as u64, Ordering::Relaxed);
            continue;
        }
        let delay = Duration::from_micros(inner.delay_us.load(Ordering::SeqCst));
        if chunks
            .send((Instant::now() + delay, buf[..n].to_vec()))
            .is_err()
        {
            return;
        }
    }
}

/// Delivers queued chunks when they are due.
fn pump_out(
    inner: &Inner,
    link: &Link,
    mut to: TcpStream,
    chunks: &Receiver<(Instant, Vec<u8>)>,
    close_rx: &Receiver<()>,
) {
    loop {
        let (due, chunk) = channel::select! {
            recv(chunks) -> chunk => match chunk {
                Ok(chunk) => chunk,
                Err(_) => return,
            },
            recv(close_rx) -> _ => return,
        };
        let wait = due.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            match close_rx.recv_timeout(wait) {
                Err(RecvTimeoutError::Timeout) => {}
                // Closed (the sender dropped) while the chunk waited.
                _ => return,
            }
        }
        if inner.stop.load(Ordering::SeqCst) {
            return;
        }
        // A chunk read before a blackhole began is still dropped.
        if drops(inner, link) {
            inner
                .bytes_dropped
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            continue;
        }
        if to.write_all(&chunk).is_err() {
            return;
        }
        inner
            .bytes_forwarded
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
}

/// Whether traffic on `link` is dropped now; a link that drops once stays tainted, and a
/// tainted link outside a blackhole is closed.
fn drops(inner: &Inner, link: &Link) -> bool {
    if !link.tainted.load(Ordering::SeqCst) {
        if !inner.blackhole.load(Ordering::SeqCst) {
            return false;
        }
        link.tainted.store(true, Ordering::SeqCst);
    }
    // `heal` clears the blackhole flag, then closes the tainted links it sees; a link tainted
    // just after that sees the flag cleared here (both are SeqCst) and closes itself.
    if !inner.blackhole.load(Ordering::SeqCst) {
        link.close();
    }
    true
}
