//! One TCP connection carrying frames both ways, shared by the server and the client side: a
//! reader thread that decodes frames and hands them to the owner, and a writer thread that
//! drains a bounded queue of encoded frames, batching what is queued into one flush.
//!
//! A sender that finds the socket idle (no writer writing, nothing queued) writes its frame
//! itself, without blocking (`MSG_DONTWAIT`): a Raft leader's AppendEntries and a follower's
//! answer leave from the thread that made them instead of waking the writer thread, one
//! thread hand-off (a wake-up and a context switch) less each way. What the socket does not
//! take at once is left to the writer, ahead of everything queued, so frames go in the order
//! they were sent and a sender never blocks on the socket.

use std::io::{self, BufReader, BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam::channel::{self, Receiver, SendError, Sender, TrySendError};
use parking_lot::Mutex;

use super::partial::PartialFrames;
use super::wire::{self, Frame, ReadError};

/// The longest a reader with a partial-frame timeout waits in one read.
const READ_TICK: Duration = Duration::from_secs(1);

/// Frames written before one flush, at most.
const MAX_BATCH_FRAMES: usize = 256;

/// How a connection is set up.
pub(crate) struct ConnConfig {
    /// Prefix of the two threads' names (`<name>-r`, `<name>-w`).
    pub name: String,
    /// The `log` target of the owner (`net::server`, `net::client`).
    pub log_target: &'static str,
    pub peer: SocketAddr,
    pub max_frame_bytes: usize,
    pub write_timeout: Duration,
    pub send_queue: usize,
    /// A frame begun must be complete within this long (`None`: no limit).
    pub partial_frame_timeout: Option<Duration>,
    /// The budget for partly received frames this connection shares, and its key in it.
    pub partial_budget: Option<(Arc<PartialFrames>, u64)>,
    /// Who the peer is, for log lines (the node the handshake proved, or the address).
    pub who: String,
}

/// A connection's closed flag, the signal that wakes its threads waiting on the receiver
/// [`Closing::new`] gave (it disconnects), and its sockets, shut on close (which wakes its
/// threads blocked in a read). Used by this module's connections and the proxy's links.
pub(super) struct Closing {
    tx: Mutex<Option<Sender<()>>>,
    closed: AtomicBool,
    sockets: Vec<TcpStream>,
}

impl Closing {
    pub(super) fn new(sockets: Vec<TcpStream>) -> (Closing, Receiver<()>) {
        let (tx, rx) = channel::bounded::<()>(0);
        let closing = Closing {
            tx: Mutex::new(Some(tx)),
            closed: AtomicBool::new(false),
            sockets,
        };
        (closing, rx)
    }

    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.tx.lock().take();
        for socket in &self.sockets {
            // An error means the socket is already shut.
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// Where a connection's frames go: written at once by the sender when the socket is idle,
/// else queued for the writer thread (see the module's doc). Cheap to clone.
#[derive(Clone)]
pub(crate) struct Outbox {
    inner: Arc<OutboxInner>,
}

struct OutboxInner {
    /// The writer thread's queue, bounded by [`ConnConfig::send_queue`].
    tx: Sender<Vec<u8>>,
    /// Whoever writes to the socket holds this: the writer thread for each batch it writes
    /// (the only thread that waits for it), or a sender that found it free and nothing
    /// queued, for one non-blocking write (senders only ever `try_lock` it, so none waits on
    /// another's write). It holds the bytes of a frame a sender began and the socket did not
    /// take; the writer sends them before anything queued.
    socket: Arc<Mutex<Vec<u8>>>,
    /// The connection's socket (the fd the direct writes go to).
    stream: TcpStream,
    closing: Arc<Closing>,
    config: Arc<ConnConfig>,
}

impl Outbox {
    /// Sends `frame`, waiting while the writer's queue is full; an error once the
    /// connection is closed.
    pub fn send(&self, frame: Vec<u8>) -> Result<(), SendError<Vec<u8>>> {
        match self.try_direct(frame) {
            Ok(()) => Ok(()),
            Err(frame) => self.inner.tx.send(frame),
        }
    }

    /// Sends `frame` without waiting: `Full` when the writer's queue is, `Disconnected`
    /// (with the frame, unsent) once the connection is closed.
    pub fn try_send(&self, frame: Vec<u8>) -> Result<(), TrySendError<Vec<u8>>> {
        match self.try_direct(frame) {
            Ok(()) => Ok(()),
            Err(frame) => self.inner.tx.try_send(frame),
        }
    }

    /// Writes `frame` on this thread if the socket is idle and nothing is queued before it,
    /// as far as the socket takes it without blocking; the rest is handed to the writer,
    /// first in line. `Err(frame)`, nothing written, when it must be queued instead.
    fn try_direct(&self, frame: Vec<u8>) -> Result<(), Vec<u8>> {
        let inner = &*self.inner;
        if frame.is_empty() || inner.closing.is_closed() || !inner.tx.is_empty() {
            return Err(frame);
        }
        let Some(mut rest) = inner.socket.try_lock() else {
            return Err(frame);
        };
        // Under the lock: the writer takes frames off the queue only while it holds it, so
        // an empty queue now means every frame sent before this one is on the socket.
        if !rest.is_empty() || !inner.tx.is_empty() {
            return Err(frame);
        }
        let fd = inner.stream.as_raw_fd();
        let mut sent = 0;
        while sent < frame.len() {
            let left = &frame[sent..];
            // SAFETY: `fd` is the socket `inner.stream` owns (open while `inner` lives), and
            // `left` is valid for `left.len()` bytes.
            let n = unsafe {
                libc::send(
                    fd,
                    left.as_ptr().cast(),
                    left.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n > 0 {
                sent += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted if n < 0 => continue,
                io::ErrorKind::WouldBlock if n < 0 => break,
                _ if n == 0 => break,
                _ => {
                    // As when the writer fails: the connection goes, and with it this frame
                    // (the owner learns of it as of every frame lost with a connection).
                    if !inner.closing.is_closed() {
                        let config = &inner.config;
                        log::info!(target: config.log_target, "{}: cannot write to {}: {e}; dropping the connection", config.name, config.peer);
                    }
                    inner.closing.close();
                    return Ok(());
                }
            }
        }
        if sent == 0 {
            return Err(frame);
        }
        if sent < frame.len() {
            rest.extend_from_slice(&frame[sent..]);
            drop(rest);
            // Wakes the writer for the rest (an empty frame writes nothing). A full queue
            // has the writer busy already, and it takes the rest first.
            let _ = inner.tx.try_send(Vec::new());
        }
        Ok(())
    }
}

/// The sending side of a connection; cheap to clone.
#[derive(Clone)]
pub(crate) struct ConnHandle {
    pub tx: Outbox,
    shared: Arc<Closing>,
}

impl ConnHandle {
    /// Closes the connection: both threads exit soon after.
    pub fn close(&self) {
        self.shared.close();
    }

    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }
}

/// The connection's threads, for the owner to join.
pub(crate) struct ConnThreads(Vec<JoinHandle<()>>);

impl ConnThreads {
    pub fn is_finished(&self) -> bool {
        self.0.iter().all(|h| h.is_finished())
    }

    /// Joins both threads; a thread's panic is passed on.
    pub fn join(self) {
        for handle in self.0 {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

/// Starts the reader and writer threads of `stream`. `on_frame` runs on the reader thread for
/// each frame, with the connection's [`Outbox`] for answers (returning false drops the
/// connection: the peer broke the protocol);
/// `on_close` runs on it once the connection is closed, whoever closed it.
pub(crate) fn start(
    stream: TcpStream,
    config: ConnConfig,
    mut on_frame: impl FnMut(Frame, &Outbox) -> bool + Send + 'static,
    on_close: impl FnOnce() + Send + 'static,
) -> std::io::Result<(ConnHandle, ConnThreads)> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(config.write_timeout))?;
    if let Some(limit) = config.partial_frame_timeout {
        // The reader wakes this often to see whether a frame begun has stalled.
        stream.set_read_timeout(Some(
            (limit / 4).clamp(Duration::from_millis(10), READ_TICK),
        ))?;
    }
    let read_stream = stream.try_clone()?;
    if let Some((budget, key)) = &config.partial_budget {
        budget.register(*key, config.who.clone(), stream.try_clone()?);
    }
    let write_stream = stream.try_clone()?;
    let direct_stream = stream.try_clone()?;
    let (closing, close_rx) = Closing::new(vec![stream]);
    let shared = Arc::new(closing);
    let (tx, rx) = channel::bounded::<Vec<u8>>(config.send_queue);
    let config = Arc::new(config);
    let socket = Arc::new(Mutex::new(Vec::new()));
    let tx = Outbox {
        inner: Arc::new(OutboxInner {
            tx,
            socket: socket.clone(),
            stream: direct_stream,
            closing: shared.clone(),
            config: config.clone(),
        }),
    };

    let writer = {
        let shared = shared.clone();
        let config = config.clone();
        thread::Builder::new()
            .name(format!("{}-w", config.name))
            .spawn(move || {
                write_loop(write_stream, &rx, &close_rx, &socket, &config, &shared);
                shared.close();
            })
    };
    let writer = match writer {
        Ok(handle) => handle,
        Err(e) => {
            shared.close();
            return Err(e);
        }
    };
    let reader = {
        let shared = shared.clone();
        let config = config.clone();
        let tx = tx.clone();
        thread::Builder::new()
            .name(format!("{}-r", config.name))
            .spawn(move || {
                read_loop(
                    read_stream,
                    &mut |frame| on_frame(frame, &tx),
                    &config,
                    &shared,
                );
                shared.close();
                if let Some((budget, key)) = &config.partial_budget {
                    budget.unregister(*key);
                }
                on_close();
            })
    };
    let reader = match reader {
        Ok(handle) => handle,
        Err(e) => {
            shared.close();
            if let Err(panic) = writer.join() {
                std::panic::resume_unwind(panic);
            }
            return Err(e);
        }
    };
    Ok((ConnHandle { tx, shared }, ConnThreads(vec![reader, writer])))
}

fn read_loop(
    stream: TcpStream,
    on_frame: &mut impl FnMut(Frame) -> bool,
    config: &ConnConfig,
    shared: &Closing,
) {
    let target = config.log_target;
    let mut reader = BufReader::with_capacity(64 << 10, stream);
    let bounds = wire::Bounds {
        max_bytes: config.max_frame_bytes,
        partial_timeout: config.partial_frame_timeout,
        budget: config.partial_budget.as_ref().map(|(b, k)| (&**b, *k)),
    };
    loop {
        match wire::read_frame_bounded(&mut reader, &bounds) {
            Ok(frame) => {
                if !on_frame(frame) {
                    log::warn!(target: target, "{}: peer {} sent a frame of the wrong kind; dropping the connection", config.name, config.peer);
                    return;
                }
            }
            Err(ReadError::Closed) => {
                log::debug!(target: target, "{}: peer {} closed the connection", config.name, config.peer);
                return;
            }
            Err(
                e @ (ReadError::TooLarge { .. }
                | ReadError::Garbage(_)
                | ReadError::Stalled { .. }
                | ReadError::OverBudget { .. }),
            ) => {
                log::warn!(target: target, "{}: {}: {e}; dropping the connection", config.name, config.who);
                return;
            }
            Err(ReadError::Io(e)) => {
                if shared.is_closed() {
                    log::debug!(target: target, "{}: connection to {} closed here", config.name, config.peer);
                } else {
                    log::info!(target: target, "{}: connection to {} failed: {e}", config.name, config.peer);
                }
                return;
            }
        }
    }
}

/// The writer thread: waits until a frame is queued, then, holding the socket (see
/// [`OutboxInner::socket`]), writes what a sender left unfinished and what is queued, and
/// flushes. Frames are taken off the queue only while it holds the socket.
fn write_loop(
    stream: TcpStream,
    rx: &Receiver<Vec<u8>>,
    close_rx: &Receiver<()>,
    socket: &Mutex<Vec<u8>>,
    config: &ConnConfig,
    shared: &Closing,
) {
    let target = config.log_target;
    let mut writer = BufWriter::with_capacity(64 << 10, stream);
    loop {
        let mut ready = channel::Select::new();
        ready.recv(rx);
        ready.recv(close_rx);
        ready.ready();
        if shared.is_closed() {
            return;
        }
        let mut rest = socket.lock();
        let mut result = writer.write_all(&rest);
        rest.clear();
        let mut batched = 0;
        while result.is_ok() && batched < MAX_BATCH_FRAMES {
            match rx.try_recv() {
                Ok(frame) => {
                    result = writer.write_all(&frame);
                    batched += 1;
                }
                Err(channel::TryRecvError::Empty) => break,
                Err(channel::TryRecvError::Disconnected) => return,
            }
        }
        let result = result.and_then(|()| writer.flush());
        drop(rest);
        if let Err(e) = result {
            if !shared.is_closed() {
                log::info!(target: target, "{}: cannot write to {}: {e}; dropping the connection", config.name, config.peer);
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    /// An outbox on a fresh loopback connection with no writer thread: the test plays the
    /// writer (it holds the queue's receiver and can hold the socket lock). Also the peer's
    /// end of the connection.
    fn outbox() -> (Outbox, Receiver<Vec<u8>>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (peer, _) = listener.accept().unwrap();
        let (tx, rx) = channel::bounded(16);
        let config = Arc::new(ConnConfig {
            name: "conn-test".into(),
            log_target: "net::conn",
            peer: peer.local_addr().unwrap(),
            max_frame_bytes: 1 << 30,
            write_timeout: Duration::from_secs(5),
            send_queue: 16,
            partial_frame_timeout: None,
            partial_budget: None,
            who: "the test".into(),
        });
        let (closing, _) = Closing::new(vec![ours.try_clone().unwrap()]);
        let outbox = Outbox {
            inner: Arc::new(OutboxInner {
                tx,
                socket: Arc::new(Mutex::new(Vec::new())),
                stream: ours,
                closing: Arc::new(closing),
                config,
            }),
        };
        (outbox, rx, peer)
    }

    /// What the peer can read now, without waiting.
    fn available(peer: &mut TcpStream) -> Vec<u8> {
        peer.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1 << 16];
        loop {
            match peer.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("read: {e}"),
            }
        }
        peer.set_nonblocking(false).unwrap();
        got
    }

    #[test]
    fn a_frame_goes_straight_to_an_idle_socket_but_never_past_a_queued_one() {
        let (outbox, rx, mut peer) = outbox();
        // The writer holds the socket: the frame is queued.
        let writing = outbox.inner.socket.lock();
        outbox.try_send(b"one".to_vec()).unwrap();
        drop(writing);
        // The socket is free, but a frame sent before waits in the queue: this one queues
        // behind it.
        outbox.send(b"two".to_vec()).unwrap();
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [b"one", b"two"]);
        // Nothing was written by a sender.
        thread::sleep(Duration::from_millis(50));
        assert!(available(&mut peer).is_empty());
        // Idle and nothing queued: written at once, by the sender.
        outbox.try_send(b"three".to_vec()).unwrap();
        assert!(rx.is_empty());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < 5 && std::time::Instant::now() < deadline {
            got.extend(available(&mut peer));
        }
        assert_eq!(got, b"three");
    }

    #[test]
    fn what_the_socket_did_not_take_goes_first_and_the_sender_does_not_wait() {
        let (outbox, rx, mut peer) = outbox();
        // Far more than a socket's buffers, to a peer that reads nothing: part goes, the
        // rest is left for the writer (woken by an empty frame), and the send returns.
        let big: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
        outbox.send(big.clone()).unwrap();
        let rest = outbox.inner.socket.lock().clone();
        assert!(
            !rest.is_empty() && rest.len() < big.len(),
            "{} left",
            rest.len()
        );
        assert_eq!(rest, big[big.len() - rest.len()..]);
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [Vec::<u8>::new()]);
        // The peer makes room; the queue is empty, but the rest is still to be written: a
        // new frame must wait behind it, not go into the room.
        let sent = big.len() - rest.len();
        let mut head = vec![0u8; sent.min(1 << 20)];
        peer.read_exact(&mut head).unwrap();
        assert_eq!(head, big[..head.len()]);
        outbox.try_send(b"after".to_vec()).unwrap();
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [b"after"]);
        assert_eq!(*outbox.inner.socket.lock(), rest);
    }
}
