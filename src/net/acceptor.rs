//! The one accept loop of the project's TCP servers (the peer [`Server`](super::Server), the
//! link [`Proxy`](super::proxy::Proxy) and the RESP server): it listens, turns away
//! connections above a cap (the limit hit is logged), runs an optional per-connection
//! [`Handshake`] before a connection is handed over, reaps the connections that have ended,
//! and on shutdown stops, closes every connection and joins every thread.
//!
//! The owner supplies what a connection is ([`Conn`]: close it, has it ended, join it) and how
//! to start one ([`Accept::open`]); the acceptor keeps them in a [`ConnList`] the owner shares
//! (so it can count them, or close some of them, as the proxy does when a link is cut).
//!
//! Thread: `<name>-accept`, which waits for a connection with `poll(2)` on its listener (at
//! most [`ACCEPT_POLL`] at a time, to see a stop) and reaps finished connections between
//! accepts (at most every [`ACCEPT_POLL`] while connections pour in).

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::RateLimitedLog;

const LOG: &str = "net::acceptor";

/// How long the accept thread waits for a connection before it checks for shutdown and
/// reaps again (a connection that arrives meanwhile is accepted at once).
pub const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// After an accept fails (out of file descriptors, say), the pause before the next try: the
/// connection stays in the backlog meanwhile.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How many connections the kernel may hold completed for the accept thread (`listen(2)`'s
/// backlog; the kernel caps it at `net.core.somaxconn`, 4096 by default). The standard
/// library listens with 128: a burst of new clients while the accept thread waits for a CPU
/// then overflows the queue, and each connection the kernel drops waits a whole SYN
/// retransmission (1 s, then 3 s) on the client's side.
pub const LISTEN_BACKLOG: i32 = 4096;

/// One served connection, as the acceptor sees it.
pub trait Conn: Send + 'static {
    /// Asks the connection to end (its threads exit soon after); idempotent.
    fn close(&self);
    /// Every thread of the connection has ended.
    fn is_finished(&self) -> bool;
    /// Joins the connection's threads; a thread's panic is returned.
    fn join(self) -> thread::Result<()>;
}

/// What runs on a freshly accepted connection before it is handed over (an authentication
/// exchange, a per-client check): `Err` turns the connection away, and the error is logged
/// with the peer. It runs on the accept thread with the socket's read and write timeouts set
/// to [`AcceptorOptions::handshake_timeout`] (cleared afterwards), so one slow peer delays
/// the next accepts by at most that long.
#[derive(Clone)]
pub struct Handshake(pub Arc<HandshakeFn>);

/// The function a [`Handshake`] runs.
pub type HandshakeFn = dyn Fn(&mut TcpStream, SocketAddr) -> io::Result<()> + Send + Sync;

impl Handshake {
    pub fn new(
        f: impl Fn(&mut TcpStream, SocketAddr) -> io::Result<()> + Send + Sync + 'static,
    ) -> Handshake {
        Handshake(Arc::new(f))
    }
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Handshake(..)")
    }
}

/// An acceptor's limits.
#[derive(Debug, Clone)]
pub struct AcceptorOptions {
    /// Connections open at once; one accepted above it is refused ([`Accept::refuse`]) and
    /// closed, and the refusal logged (at most once a second, with a count).
    pub max_connections: usize,
    /// Runs before each connection is handed over.
    pub handshake: Option<Handshake>,
    /// The socket timeouts while the handshake runs.
    pub handshake_timeout: Duration,
}

impl Default for AcceptorOptions {
    fn default() -> Self {
        AcceptorOptions {
            max_connections: 256,
            handshake: None,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// The connections an acceptor serves; shared with its owner.
pub struct ConnList<C> {
    conns: Mutex<Vec<C>>,
}

impl<C: Conn> ConnList<C> {
    fn new() -> ConnList<C> {
        ConnList {
            conns: Mutex::new(Vec::new()),
        }
    }

    /// Adds a connection the owner has started.
    pub fn push(&self, conn: C) {
        self.conns.lock().push(conn);
    }

    /// Connections held (ended ones not yet reaped included): what the cap counts.
    pub fn len(&self) -> usize {
        self.conns.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Connections whose threads still run.
    pub fn open(&self) -> usize {
        self.conns
            .lock()
            .iter()
            .filter(|c| !c.is_finished())
            .count()
    }

    /// Counts the connections for which `f` holds.
    pub fn count(&self, f: impl Fn(&C) -> bool) -> usize {
        self.conns.lock().iter().filter(|c| f(c)).count()
    }

    /// Removes and returns the connections for which `f` holds (for the owner to close and
    /// join: see [`close_and_join`]).
    pub fn take_where(&self, f: impl Fn(&C) -> bool) -> Vec<C> {
        let mut conns = self.conns.lock();
        let (taken, kept) = std::mem::take(&mut *conns).into_iter().partition(|c| f(c));
        *conns = kept;
        taken
    }

    /// Joins the connections that have ended; the first panic among them is returned. Cheap
    /// when none has: one pass over the list, nothing moved or allocated.
    fn reap(&self) -> Option<Box<dyn std::any::Any + Send>> {
        let finished = {
            let mut conns = self.conns.lock();
            if !conns.iter().any(|c| c.is_finished()) {
                return None;
            }
            let mut finished = Vec::new();
            let mut i = 0;
            while i < conns.len() {
                if conns[i].is_finished() {
                    finished.push(conns.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            finished
        };
        close_and_join(finished).err()
    }
}

/// Closes every connection, then joins them all; the first panic is returned (after all are
/// joined).
pub fn close_and_join<C: Conn>(conns: Vec<C>) -> thread::Result<()> {
    for conn in &conns {
        conn.close();
    }
    let mut panic = None;
    for conn in conns {
        if let Err(p) = conn.join() {
            panic.get_or_insert(p);
        }
    }
    match panic {
        Some(p) => Err(p),
        None => Ok(()),
    }
}

/// How the owner starts serving what the acceptor accepts.
pub trait Accept: Send + 'static {
    type Conn: Conn;

    /// Serves `stream` (blocking mode, handshake done), the `k`-th connection accepted: starts
    /// its threads and pushes it to `conns`, or drops it (turned away by the owner's own
    /// rule). An error is logged with the peer.
    fn open(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        k: u64,
        conns: &ConnList<Self::Conn>,
    ) -> io::Result<()>;

    /// A connection above the cap, about to be closed: the owner may tell the peer why.
    fn refuse(&mut self, _stream: &mut TcpStream, _peer: SocketAddr) {}
}

struct Shared<C> {
    name: String,
    options: AcceptorOptions,
    stop: AtomicBool,
    conns: Arc<ConnList<C>>,
    refused: AtomicU64,
    full_log: RateLimitedLog,
    error_log: RateLimitedLog,
}

/// A listener and its accept thread. Dropping it (or [`shutdown`](Self::shutdown)) stops
/// accepting, closes every connection and joins every thread.
pub struct Acceptor<C: Conn> {
    shared: Arc<Shared<C>>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl<C: Conn> Acceptor<C> {
    /// Accepts on `listener` (made non-blocking here) in the thread `<name>-accept`.
    pub fn start<A: Accept<Conn = C>>(
        name: &str,
        listener: TcpListener,
        options: AcceptorOptions,
        owner: A,
    ) -> io::Result<Acceptor<C>> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        // SAFETY: `listen` on a socket this function owns; a second call only resizes the
        // queue of a socket that listens already.
        if unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let shared = Arc::new(Shared {
            name: name.to_string(),
            options,
            stop: AtomicBool::new(false),
            conns: Arc::new(ConnList::new()),
            refused: AtomicU64::new(0),
            full_log: RateLimitedLog::new(Duration::from_secs(1)),
            error_log: RateLimitedLog::new(Duration::from_secs(1)),
        });
        let accept = {
            let shared = shared.clone();
            thread::Builder::new()
                .name(format!("{name}-accept"))
                .spawn(move || accept_loop(&listener, &shared, owner))?
        };
        Ok(Acceptor {
            shared,
            addr,
            accept: Some(accept),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The connections being served.
    pub fn conns(&self) -> &Arc<ConnList<C>> {
        &self.shared.conns
    }

    /// Connections refused because the cap was reached.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Stops accepting, closes every connection and joins every thread; a panic of the accept
    /// thread or of a connection's thread is returned. Idempotent.
    pub fn stop(&mut self) -> thread::Result<()> {
        self.shared.stop.store(true, Ordering::SeqCst);
        let mut panic = None;
        if let Some(accept) = self.accept.take()
            && let Err(p) = accept.join()
        {
            panic = Some(p);
        }
        let conns = self.shared.conns.take_where(|_| true);
        if let Err(p) = close_and_join(conns) {
            panic.get_or_insert(p);
        }
        match panic {
            Some(p) => Err(p),
            None => Ok(()),
        }
    }

    /// [`stop`](Self::stop), passing a panic on unless this thread is already panicking.
    pub fn shutdown(&mut self) {
        if let Err(p) = self.stop()
            && !thread::panicking()
        {
            std::panic::resume_unwind(p);
        }
    }
}

impl<C: Conn> Drop for Acceptor<C> {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.shutdown();
        }
    }
}

fn accept_loop<A: Accept>(listener: &TcpListener, shared: &Shared<A::Conn>, mut owner: A) {
    let name = &shared.name;
    let mut next_conn = 0u64;
    // Reaped at most once per ACCEPT_POLL while connections pour in (a burst of thousands
    // must not pay a pass over the list each), and before a connection is refused.
    let reap = |last: &mut Option<Instant>| {
        *last = Some(Instant::now());
        if let Some(panic) = shared.conns.reap() {
            std::panic::resume_unwind(panic);
        }
    };
    let mut last_reap = None;
    while !shared.stop.load(Ordering::SeqCst) {
        if last_reap.is_none_or(|t: Instant| t.elapsed() >= ACCEPT_POLL) {
            reap(&mut last_reap);
        }
        let (mut stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_readable(listener, ACCEPT_POLL);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if let Some(count) = shared.error_log.tick() {
                    log::warn!(target: LOG, "{name}: accept failed {count} time(s): {e}; retrying every {ACCEPT_RETRY:?}");
                }
                thread::sleep(ACCEPT_RETRY);
                continue;
            }
        };
        if let Err(e) = stream.set_nonblocking(false) {
            log::warn!(target: LOG, "{name}: connection from {peer}: {e}");
            continue;
        }
        let mut open = shared.conns.len();
        if open >= shared.options.max_connections {
            reap(&mut last_reap);
            open = shared.conns.len();
        }
        if open >= shared.options.max_connections {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(count) = shared.full_log.tick() {
                log::warn!(target: LOG, "{name}: {open} connections open (the limit): refused {count} connection(s), the last from {peer}");
            }
            owner.refuse(&mut stream, peer);
            continue;
        }
        if let Some(handshake) = &shared.options.handshake
            && let Err(e) = run_handshake(handshake, &mut stream, peer, shared)
        {
            log::warn!(target: LOG, "{name}: handshake with {peer} failed: {e}; closing the connection");
            continue;
        }
        let k = next_conn;
        next_conn += 1;
        if let Err(e) = owner.open(stream, peer, k, &shared.conns) {
            log::warn!(target: LOG, "{name}: cannot serve {peer}: {e}");
        } else {
            log::debug!(target: LOG, "{name}: connection {k} from {peer}");
        }
    }
}

/// Waits until `listener` has a connection to accept, or `at_most` has passed (or a signal
/// came): the caller tries to accept either way.
fn wait_readable(listener: &TcpListener, at_most: Duration) {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(at_most.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid `pollfd` for the duration of the call; the result is only a hint.
    let ready = unsafe { libc::poll(&mut fd, 1, ms) };
    if ready < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
        // Cannot wait (never expected): fall back to a short sleep rather than spin.
        thread::sleep(at_most);
    }
}

fn run_handshake<C>(
    handshake: &Handshake,
    stream: &mut TcpStream,
    peer: SocketAddr,
    shared: &Shared<C>,
) -> io::Result<()> {
    let timeout = Some(
        shared
            .options
            .handshake_timeout
            .max(Duration::from_millis(1)),
    );
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    (handshake.0)(stream, peer)?;
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A connection served by a thread that echoes one byte back, then ends.
    struct Echo {
        stream: TcpStream,
        thread: JoinHandle<()>,
    }

    impl Conn for Echo {
        fn close(&self) {
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
        }
        fn is_finished(&self) -> bool {
            self.thread.is_finished()
        }
        fn join(self) -> thread::Result<()> {
            self.thread.join()
        }
    }

    struct EchoOwner {
        refused: Arc<AtomicUsize>,
    }

    impl Accept for EchoOwner {
        type Conn = Echo;
        fn open(
            &mut self,
            mut stream: TcpStream,
            _peer: SocketAddr,
            _k: u64,
            conns: &ConnList<Echo>,
        ) -> io::Result<()> {
            let clone = stream.try_clone()?;
            let thread = thread::Builder::new().name("echo".into()).spawn(move || {
                let mut b = [0u8; 1];
                if stream.read_exact(&mut b).is_ok() {
                    let _ = stream.write_all(&b);
                }
                // Hold the connection until the client goes.
                let _ = stream.read(&mut b);
            })?;
            conns.push(Echo {
                stream: clone,
                thread,
            });
            Ok(())
        }
        fn refuse(&mut self, stream: &mut TcpStream, _peer: SocketAddr) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            let _ = stream.write_all(b"F");
        }
    }

    fn start(options: AcceptorOptions) -> (Acceptor<Echo>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let refused = Arc::new(AtomicUsize::new(0));
        let owner = EchoOwner {
            refused: refused.clone(),
        };
        (
            Acceptor::start("test-acceptor", listener, options, owner).unwrap(),
            refused,
        )
    }

    fn echo(addr: SocketAddr, byte: u8) -> (TcpStream, Option<u8>) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&[byte]).unwrap();
        let mut b = [0u8; 1];
        let got = match s.read(&mut b) {
            Ok(1) => Some(b[0]),
            _ => None,
        };
        (s, got)
    }

    #[test]
    fn cap_refuses_and_reaping_frees_a_slot() {
        let (mut acceptor, refused) = start(AcceptorOptions {
            max_connections: 2,
            ..AcceptorOptions::default()
        });
        let addr = acceptor.local_addr();
        let (a, got) = echo(addr, b'a');
        assert_eq!(got, Some(b'a'));
        let (_b, got) = echo(addr, b'b');
        assert_eq!(got, Some(b'b'));
        // The third is over the cap: the owner's refusal, then closed.
        let (_c, got) = echo(addr, b'c');
        assert_eq!(got, Some(b'F'));
        assert_eq!(refused.load(Ordering::SeqCst), 1);
        assert_eq!(acceptor.refused(), 1);
        // One leaves: once reaped, a new connection is served again.
        drop(a);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while acceptor.conns().len() > 1 {
            assert!(std::time::Instant::now() < deadline, "never reaped");
            thread::sleep(Duration::from_millis(10));
        }
        let (_d, got) = echo(addr, b'd');
        assert_eq!(got, Some(b'd'));
        acceptor.stop().unwrap();
        assert!(acceptor.conns().is_empty());
    }

    #[test]
    fn handshake_runs_first_and_a_failed_one_closes_the_connection() {
        let handshake = Handshake::new(|stream, _peer| {
            let mut b = [0u8; 1];
            stream.read_exact(&mut b)?;
            if b[0] == b'!' {
                stream.write_all(b"+")
            } else {
                Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "bad greeting",
                ))
            }
        });
        let (mut acceptor, _) = start(AcceptorOptions {
            handshake: Some(handshake),
            handshake_timeout: Duration::from_secs(2),
            ..AcceptorOptions::default()
        });
        let addr = acceptor.local_addr();
        let mut good = TcpStream::connect(addr).unwrap();
        good.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        good.write_all(b"!x").unwrap();
        let mut b = [0u8; 2];
        good.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"+x");
        let (_bad, got) = echo(addr, b'?');
        assert_eq!(got, None, "a failed handshake must close the connection");
        assert_eq!(acceptor.conns().len(), 1);
        // A peer that says nothing is given up on after the handshake timeout, and the
        // acceptor goes on serving.
        let _silent = TcpStream::connect(addr).unwrap();
        let mut late = TcpStream::connect(addr).unwrap();
        late.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        late.write_all(b"!y").unwrap();
        late.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"+y");
        acceptor.stop().unwrap();
    }

    #[test]
    fn a_burst_of_connections_waits_in_the_backlog_while_the_accept_thread_is_busy() {
        // The first connection's handshake holds the accept thread until the test lets it go;
        // meanwhile every connection of a burst must still complete at once, held by the
        // kernel's queue (with the standard library's 128 the kernel drops the rest, and their
        // connects wait out a SYN retransmission).
        // The kernel caps the queue at `net.core.somaxconn` (4096 by default since Linux 5.4).
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(4096);
        let burst_len = 600.min(somaxconn.saturating_sub(2));
        let (release, held) = crossbeam::channel::bounded::<()>(1);
        let handshake = Handshake::new(move |_stream, _peer| {
            let _ = held.recv_timeout(Duration::from_secs(30));
            Ok(())
        });
        let (mut acceptor, _) = start(AcceptorOptions {
            handshake: Some(handshake),
            handshake_timeout: Duration::from_secs(30),
            ..AcceptorOptions::default()
        });
        let addr = acceptor.local_addr();
        let first = TcpStream::connect(addr).unwrap();
        let mut burst = Vec::new();
        let outcome = (0..burst_len).try_for_each(|k| {
            let s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).map_err(|e| {
                format!("connection {k} of {burst_len} while the accept thread was busy: {e}")
            })?;
            burst.push(s);
            Ok::<(), String>(())
        });
        // Every handshake, the held one and those after it, returns at once from here on.
        drop(release);
        drop(first);
        drop(burst);
        acceptor.stop().unwrap();
        outcome.unwrap();
    }
}
