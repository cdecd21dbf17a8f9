//! One TCP connection carrying frames both ways, shared by the server and the client side: a
//! reader thread that decodes frames and hands them to the owner, and a writer thread that
//! drains a bounded queue of encoded frames, batching what is queued into one flush.

use std::io::{BufReader, BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam::channel::{self, Receiver, Sender};
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

/// The sending side of a connection; cheap to clone.
#[derive(Clone)]
pub(crate) struct ConnHandle {
    pub tx: Sender<Vec<u8>>,
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
/// each frame, with the connection's send queue for answers (returning false drops the
/// connection: the peer broke the protocol);
/// `on_close` runs on it once the connection is closed, whoever closed it.
pub(crate) fn start(
    stream: TcpStream,
    config: ConnConfig,
    mut on_frame: impl FnMut(Frame, &Sender<Vec<u8>>) -> bool + Send + 'static,
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
    let (closing, close_rx) = Closing::new(vec![stream]);
    let shared = Arc::new(closing);
    let (tx, rx) = channel::bounded::<Vec<u8>>(config.send_queue);
    let config = Arc::new(config);

    let writer = {
        let shared = shared.clone();
        let config = config.clone();
        thread::Builder::new()
            .name(format!("{}-w", config.name))
            .spawn(move || {
                write_loop(write_stream, &rx, &close_rx, &config, &shared);
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

fn write_loop(
    stream: TcpStream,
    rx: &Receiver<Vec<u8>>,
    close_rx: &Receiver<()>,
    config: &ConnConfig,
    shared: &Closing,
) {
    let target = config.log_target;
    let mut writer = BufWriter::with_capacity(64 << 10, stream);
    loop {
        let first = channel::select! {
            recv(rx) -> frame => match frame {
                Ok(frame) => frame,
                Err(_) => return,
            },
            recv(close_rx) -> _ => return,
        };
        let mut result = writer.write_all(&first);
        let mut batched = 1;
        while result.is_ok() && batched < MAX_BATCH_FRAMES {
            match rx.try_recv() {
                Ok(frame) => {
                    result = writer.write_all(&frame);
                    batched += 1;
                }
                Err(_) => break,
            }
        }
        if let Err(e) = result.and_then(|()| writer.flush()) {
            if !shared.is_closed() {
                log::info!(target: target, "{}: cannot write to {}: {e}; dropping the connection", config.name, config.peer);
            }
            return;
        }
    }
}
