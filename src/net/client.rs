//! The client side: a [`ClientEnd`] owns one connection to one server address, a manager
//! thread that dials it (again, with capped exponential backoff, whenever it breaks) and fails
//! calls whose timeout passes, and the connection's reader and writer threads.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam::channel::TrySendError;
use parking_lot::{Condvar, Mutex, MutexGuard};
use rand::Rng;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::conn::{self, ConnConfig, ConnHandle, ConnThreads};
use super::handshake::{self, PeerAuth};
use super::wire::{self, Frame};
use super::{DEFAULT_MAX_FRAME_BYTES, NetError, RateLimitedLog};
use crate::labcodec;
use crate::oneshot;

const LOG: &str = "net::client";

/// The longest the manager sleeps without looking at its state.
const MANAGER_IDLE_WAKE: Duration = Duration::from_secs(1);

/// A client end's timing and limits.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The timeout of [`ClientEnd::call`] and [`ClientEnd::call_async`].
    pub call_timeout: Duration,
    /// How long one dial may take.
    pub connect_timeout: Duration,
    /// The wait after the first failed dial; it doubles with each further failure …
    pub backoff_min: Duration,
    /// … up to this (each wait is then drawn between half of it and all of it).
    pub backoff_max: Duration,
    /// Largest frame sent or accepted.
    pub max_frame_bytes: usize,
    /// Calls that may wait for a connection; more fail at once with [`NetError::Overloaded`].
    pub max_waiting_calls: usize,
    /// Requests queued for the connection's writer; more fail with [`NetError::Overloaded`].
    pub send_queue: usize,
    /// A server that does not read for this long is disconnected.
    pub write_timeout: Duration,
    /// With it, each connection first passes the peer handshake (within `connect_timeout`)
    /// as the given node, to the given node; see [`handshake`](super::handshake).
    pub auth: Option<DialAuth>,
}

/// Who dials whom, for the peer handshake.
#[derive(Debug, Clone)]
pub struct DialAuth {
    /// This node.
    pub local: PeerAuth,
    /// The node expected at the address dialled.
    pub remote_node: u64,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            call_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_secs(1),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_waiting_calls: 1024,
            send_queue: 4096,
            write_timeout: Duration::from_secs(5),
            auth: None,
        }
    }
}

type Callback = Box<dyn FnOnce(Result<Vec<u8>, NetError>) + Send>;

struct Pending {
    method: Arc<str>,
    timeout: Duration,
    callback: Callback,
    /// The connection generation the request went out on; `None` while it waits for one.
    sent_on: Option<u64>,
    /// The encoded request, while it waits for a connection.
    frame: Option<Vec<u8>>,
}

struct State {
    shutdown: bool,
    conn: Option<(u64, ConnHandle)>,
    generation: u64,
    threads: Vec<ConnThreads>,
    pending: HashMap<u64, Pending>,
    /// Deadlines of pending calls; entries of calls already answered are dropped when they
    /// come to the top.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Calls waiting for a connection, oldest first.
    waiting: VecDeque<u64>,
    /// Failures to report on the manager thread (never on a caller's).
    failures: Vec<(Callback, NetError)>,
    next_dial: Instant,
    backoff: Duration,
    failed_dials: u32,
    /// When the manager will next wake by itself.
    manager_wakes_at: Instant,
}

struct Shared {
    name: String,
    peer: SocketAddr,
    options: ClientOptions,
    next_id: AtomicU64,
    state: Mutex<State>,
    wake: Condvar,
    /// Failed peer handshakes (another secret, cluster or node at the address).
    handshake_log: RateLimitedLog,
}

impl Shared {
    fn failure(&self, method: &Arc<str>, kind: FailKind) -> NetError {
        let method = method.to_string();
        let peer = self.peer;
        match kind {
            FailKind::Lost => NetError::ConnectionLost { peer, method },
            FailKind::Overloaded => NetError::Overloaded { peer, method },
        }
    }
}

enum FailKind {
    Lost,
    Overloaded,
}

/// A connection to one server, shared by its clones. The last clone dropped (or
/// [`shutdown`](Self::shutdown)) closes the connection and joins the end's threads; callbacks
/// of calls still pending are then dropped without being run, as labrpc's are after cleanup.
#[derive(Clone)]
pub struct ClientEnd {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for ClientEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ClientEnd({} -> {})",
            self.handle.shared.name, self.handle.shared.peer
        )
    }
}

struct Handle {
    shared: Arc<Shared>,
    manager: Mutex<Option<JoinHandle<()>>>,
}

impl ClientEnd {
    /// An end for the server at `peer`; it starts dialling at once. `name` prefixes its
    /// threads' names (`<name>-dial`, `<name>-<generation>-r`, `-w`) and its log lines.
    pub fn connect(name: &str, peer: SocketAddr, options: ClientOptions) -> ClientEnd {
        let now = Instant::now();
        let shared = Arc::new(Shared {
            name: name.to_string(),
            peer,
            options,
            next_id: AtomicU64::new(1),
            state: Mutex::new(State {
                shutdown: false,
                conn: None,
                generation: 0,
                threads: Vec::new(),
                pending: HashMap::new(),
                deadlines: BinaryHeap::new(),
                waiting: VecDeque::new(),
                failures: Vec::new(),
                next_dial: now,
                backoff: Duration::ZERO,
                failed_dials: 0,
                manager_wakes_at: now,
            }),
            wake: Condvar::new(),
            handshake_log: RateLimitedLog::new(Duration::from_secs(10)),
        });
        let manager = {
            let shared = shared.clone();
            thread::Builder::new()
                .name(format!("{name}-dial"))
                .spawn(move || manage(&shared))
        };
        let manager = match manager {
            Ok(handle) => Some(handle),
            Err(e) => {
                // Without a manager nothing can be sent: every call fails as after shutdown.
                log::error!(target: LOG, "{name}: cannot start the connection thread for {peer}: {e}");
                shared.state.lock().shutdown = true;
                None
            }
        };
        ClientEnd {
            handle: Arc::new(Handle {
                shared,
                manager: Mutex::new(manager),
            }),
        }
    }

    /// The server's address.
    pub fn peer(&self) -> SocketAddr {
        self.handle.shared.peer
    }

    /// Whether a connection is up now.
    pub fn is_connected(&self) -> bool {
        let state = self.handle.shared.state.lock();
        state.conn.as_ref().is_some_and(|(_, c)| !c.is_closed())
    }

    /// Calls sent or waiting, whose reply has not come.
    pub fn in_flight(&self) -> usize {
        self.handle.shared.state.lock().pending.len()
    }

    /// Calls `svc_meth` (`"Service.Method"`) and blocks until the reply or an error, at most
    /// [`ClientOptions::call_timeout`]. Not from a `call_async` callback of the same end: the
    /// reply would need the reader thread the callback is running on (it would time out).
    pub fn call<A: Serialize, R: DeserializeOwned>(
        &self,
        svc_meth: &str,
        args: &A,
    ) -> Result<R, NetError> {
        self.call_timeout(svc_meth, args, self.handle.shared.options.call_timeout)
    }

    /// [`call`](Self::call) with its own timeout.
    pub fn call_timeout<A: Serialize, R: DeserializeOwned>(
        &self,
        svc_meth: &str,
        args: &A,
        timeout: Duration,
    ) -> Result<R, NetError> {
        let body = labcodec::encode(args)?;
        let (tx, rx) = oneshot::channel();
        self.call_bytes(svc_meth, body, timeout, move |result| {
            // The caller is blocked on `rx` until this or the callback's drop.
            tx.send(result);
        });
        match rx.recv() {
            Ok(reply) => Ok(labcodec::decode(&reply?)?),
            Err(_) => Err(NetError::Shutdown),
        }
    }

    /// Calls `svc_meth` and returns at once; `on_reply` runs with the outcome on one of the
    /// end's threads (never the caller's, so the caller may hold locks `on_reply` takes). It
    /// runs on the connection's reader thread for replies: keep it short. After shutdown it is
    /// not run at all.
    pub fn call_async<A, R, F>(&self, svc_meth: &str, args: &A, on_reply: F)
    where
        A: Serialize,
        R: DeserializeOwned,
        F: FnOnce(Result<R, NetError>) + Send + 'static,
    {
        let typed = move |result: Result<Vec<u8>, NetError>| {
            on_reply(result.and_then(|reply| Ok(labcodec::decode(&reply)?)));
        };
        match labcodec::encode(args) {
            Ok(body) => self.call_bytes(
                svc_meth,
                body,
                self.handle.shared.options.call_timeout,
                typed,
            ),
            Err(e) => self.fail_later(Box::new(typed), e.into()),
        }
    }

    /// The untyped call underneath: `body` is the encoded arguments, the callback gets the
    /// encoded reply.
    pub fn call_bytes<F>(&self, svc_meth: &str, body: Vec<u8>, timeout: Duration, on_reply: F)
    where
        F: FnOnce(Result<Vec<u8>, NetError>) + Send + 'static,
    {
        let shared = &self.handle.shared;
        let method: Arc<str> = svc_meth.into();
        let callback: Callback = Box::new(on_reply);
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = match wire::encode_request(id, svc_meth, &body) {
            Ok(frame) => frame,
            Err(e) => return self.fail_later(callback, e.into()),
        };
        if wire::body_len(&frame) > shared.options.max_frame_bytes {
            return self.fail_later(
                callback,
                NetError::FrameTooLarge {
                    peer: shared.peer,
                    method: svc_meth.to_string(),
                    bytes: wire::body_len(&frame),
                    max: shared.options.max_frame_bytes,
                },
            );
        }
        let deadline = Instant::now() + timeout;
        let mut pending = Pending {
            method,
            timeout,
            callback,
            sent_on: None,
            frame: None,
        };
        let mut state = shared.state.lock();
        if state.shutdown {
            // Dropped once the lock is released: dropping a callback may drop a clone of
            // this end, which takes the lock.
            drop(state);
            drop(pending);
            return;
        }
        let mut frame = Some(frame);
        if let Some((generation, conn)) = &state.conn {
            match conn.tx.try_send(frame.take().expect("not sent yet")) {
                Ok(()) => pending.sent_on = Some(*generation),
                Err(TrySendError::Full(_)) => {
                    let error = shared.failure(&pending.method, FailKind::Overloaded);
                    state.failures.push((pending.callback, error));
                    shared.wake.notify_one();
                    return;
                }
                // The connection is closing: wait for the next one.
                Err(TrySendError::Disconnected(unsent)) => frame = Some(unsent),
            }
        }
        if frame.is_some() {
            if state.waiting.len() >= shared.options.max_waiting_calls {
                log::warn!(target: LOG, "{}: {} calls already wait for a connection to {}; failing {}", shared.name, state.waiting.len(), shared.peer, pending.method);
                let error = shared.failure(&pending.method, FailKind::Overloaded);
                state.failures.push((pending.callback, error));
                shared.wake.notify_one();
                return;
            }
            pending.frame = frame;
            state.waiting.push_back(id);
        }
        state.pending.insert(id, pending);
        state.deadlines.push(Reverse((deadline, id)));
        if deadline < state.manager_wakes_at {
            shared.wake.notify_one();
        }
    }

    /// Reports `error` to `callback` on the manager thread.
    fn fail_later(&self, callback: Callback, error: NetError) {
        let shared = &self.handle.shared;
        let mut state = shared.state.lock();
        if state.shutdown {
            drop(state);
            drop(callback);
            return;
        }
        state.failures.push((callback, error));
        shared.wake.notify_one();
    }

    /// Closes the connection and joins the end's threads (for every clone). Pending calls'
    /// callbacks are dropped without being run; blocked [`call`](Self::call)s return
    /// [`NetError::Shutdown`].
    pub fn shutdown(&self) {
        self.handle.shutdown();
    }
}

impl Handle {
    fn shutdown(&self) {
        {
            let mut state = self.shared.state.lock();
            state.shutdown = true;
            self.shared.wake.notify_all();
        }
        let Some(manager) = self.manager.lock().take() else {
            return;
        };
        // A callback running on one of this end's threads may drop its last clone: that
        // thread cannot wait for itself. The manager still stops the threads; this one exits
        // when its callback returns.
        let here = thread::current();
        let ours = here
            .name()
            .is_some_and(|n| n.starts_with(&format!("{}-", self.shared.name)));
        if ours {
            log::debug!(target: LOG, "{}: dropped on its own thread; not joining", self.shared.name);
            return;
        }
        if let Err(panic) = manager.join()
            && !thread::panicking()
        {
            std::panic::resume_unwind(panic);
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The manager thread: dials, fails timed-out calls, reports failures, reaps connection
/// threads; on shutdown closes the connection and joins its threads.
fn manage(shared: &Arc<Shared>) {
    let name = &shared.name;
    let mut state = shared.state.lock();
    while !state.shutdown {
        let now = Instant::now();
        let mut due: Vec<(Callback, NetError)> = std::mem::take(&mut state.failures);
        let mut expired_waiting = false;
        while let Some(&Reverse((deadline, id))) = state.deadlines.peek() {
            if deadline > now {
                break;
            }
            state.deadlines.pop();
            if let Some(call) = state.pending.remove(&id) {
                expired_waiting |= call.sent_on.is_none();
                let error = NetError::Timeout {
                    peer: shared.peer,
                    method: call.method.to_string(),
                    after: call.timeout,
                };
                due.push((call.callback, error));
            }
        }
        // Deadlines of calls answered meanwhile are dropped from the top too: the manager
        // then sleeps until the first call still pending can time out, instead of waking
        // once for every call made (a Raft leader makes thousands a second).
        while let Some(&Reverse((_, id))) = state.deadlines.peek() {
            if state.pending.contains_key(&id) {
                break;
            }
            state.deadlines.pop();
        }
        if expired_waiting {
            let State {
                waiting, pending, ..
            } = &mut *state;
            waiting.retain(|id| pending.contains_key(id));
        }
        let finished: Vec<ConnThreads> = {
            let (done, running) = std::mem::take(&mut state.threads)
                .into_iter()
                .partition(|t| t.is_finished());
            state.threads = running;
            done
        };
        // A connection that closed is forgotten here too, whichever of this and its reader's
        // `on_closed` gets the lock first (the reader still fails the calls sent on it).
        if state.conn.as_ref().is_some_and(|(_, c)| c.is_closed()) {
            state.conn = None;
            state.next_dial = state.next_dial.min(now);
        }
        let dial = state.conn.is_none() && now >= state.next_dial;
        if due.is_empty() && finished.is_empty() && !dial {
            let mut wake_at = now + MANAGER_IDLE_WAKE;
            if let Some(&Reverse((deadline, _))) = state.deadlines.peek() {
                wake_at = wake_at.min(deadline);
            }
            if state.conn.is_none() {
                wake_at = wake_at.min(state.next_dial);
            }
            state.manager_wakes_at = wake_at;
            shared.wake.wait_until(&mut state, wake_at);
            continue;
        }
        MutexGuard::unlocked(&mut state, || {
            for (callback, error) in due {
                callback(Err(error));
            }
            for threads in finished {
                threads.join();
            }
        });
        if dial {
            dial_once(shared, &mut state);
        }
    }
    // Shutdown: close the connection, join its threads, drop the pending callbacks — all
    // outside the lock (a callback's drop may take it).
    let conn = state.conn.take();
    let threads = std::mem::take(&mut state.threads);
    let pending = std::mem::take(&mut state.pending);
    let failures = std::mem::take(&mut state.failures);
    drop(state);
    if let Some((_, conn)) = conn {
        conn.close();
    }
    for threads in threads {
        threads.join();
    }
    drop(pending);
    drop(failures);
    log::debug!(target: LOG, "{name}: stopped");
}

/// Dials the peer (outside the lock) and installs the connection, or schedules the next try.
fn dial_once(shared: &Arc<Shared>, state: &mut MutexGuard<'_, State>) {
    let name = &shared.name;
    let peer = shared.peer;
    let generation = state.generation + 1;
    let options = &shared.options;
    let started = MutexGuard::unlocked(state, || {
        let mut stream = TcpStream::connect_timeout(&peer, options.connect_timeout)?;
        if let Some(auth) = &options.auth {
            let deadline = Instant::now() + options.connect_timeout;
            handshake::dial(&mut stream, &auth.local, auth.remote_node, deadline).map_err(|e| {
                if let Some(count) = shared.handshake_log.tick() {
                    log::warn!(target: LOG, "{name}: peer handshake with node {} at {peer} failed: {e} ({count} since the last report)", auth.remote_node);
                }
                std::io::Error::other(e.to_string())
            })?;
        }
        let config = ConnConfig {
            name: format!("{name}-{generation}"),
            log_target: LOG,
            peer,
            max_frame_bytes: options.max_frame_bytes,
            write_timeout: options.write_timeout,
            send_queue: options.send_queue.max(1),
            // Replies come from the server this end dialled, one connection per end.
            partial_frame_timeout: None,
            partial_budget: None,
            who: format!("peer {peer}"),
        };
        let on_frame = {
            let shared = shared.clone();
            move |frame, _: &conn::Outbox| on_reply(&shared, frame)
        };
        let on_close = {
            let shared = shared.clone();
            move || on_closed(&shared, generation)
        };
        conn::start(stream, config, on_frame, on_close)
    });
    match started {
        Ok((conn, threads)) => {
            state.threads.push(threads);
            if state.shutdown {
                conn.close();
                return;
            }
            // Closed already (a peer or proxy that closes on accept): its `on_closed` ran
            // before this install and found nothing to clear, so installing it would leave a
            // dead connection that is never re-dialled. Count it as a failed dial.
            if conn.is_closed() {
                schedule_redial(shared, state, "closed by the peer at once");
                return;
            }
            if state.failed_dials > 0 {
                log::info!(target: LOG, "{name}: connected to {peer} after {} failed attempts", state.failed_dials);
            } else {
                log::debug!(target: LOG, "{name}: connected to {peer}");
            }
            state.generation = generation;
            state.failed_dials = 0;
            state.backoff = Duration::ZERO;
            send_waiting(shared, state, generation, &conn);
            state.conn = Some((generation, conn));
        }
        Err(e) => schedule_redial(shared, state, &e.to_string()),
    }
}

/// A dial failed: the next one after a backoff that doubles per failure, up to the cap.
fn schedule_redial(shared: &Shared, state: &mut State, why: &str) {
    let (name, peer, options) = (&shared.name, shared.peer, &shared.options);
    state.failed_dials += 1;
    state.backoff = if state.backoff.is_zero() {
        options.backoff_min
    } else {
        (state.backoff * 2).min(options.backoff_max)
    };
    let wait = state
        .backoff
        .mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
    state.next_dial = Instant::now() + wait;
    if state.failed_dials == 1 {
        log::info!(target: LOG, "{name}: cannot connect to {peer}: {why}; retrying with backoff up to {:?}", options.backoff_max);
    } else {
        log::debug!(target: LOG, "{name}: dial {} to {peer} failed: {why}; next in {wait:?}", state.failed_dials);
    }
}

/// Sends the calls that waited for a connection.
fn send_waiting(shared: &Shared, state: &mut State, generation: u64, conn: &ConnHandle) {
    while let Some(id) = state.waiting.pop_front() {
        let Some(call) = state.pending.get_mut(&id) else {
            continue;
        };
        let frame = call.frame.take().expect("a waiting call has its frame");
        match conn.tx.try_send(frame) {
            Ok(()) => call.sent_on = Some(generation),
            Err(TrySendError::Full(_)) => {
                let call = state.pending.remove(&id).expect("present");
                let error = shared.failure(&call.method, FailKind::Overloaded);
                state.failures.push((call.callback, error));
            }
            Err(TrySendError::Disconnected(frame)) => {
                // Closed already: keep the rest waiting for the next connection.
                call.frame = Some(frame);
                state.waiting.push_front(id);
                return;
            }
        }
    }
}

/// A frame from the server, on the reader thread.
fn on_reply(shared: &Shared, frame: Frame) -> bool {
    let Frame::Reply { id, result } = frame else {
        return false;
    };
    let call = shared.state.lock().pending.remove(&id);
    match call {
        Some(call) => (call.callback)(result.map_err(|error| NetError::Remote {
            peer: shared.peer,
            method: call.method.to_string(),
            error,
        })),
        None => {
            log::debug!(target: LOG, "{}: reply {id} from {} came after its call timed out", shared.name, shared.peer)
        }
    }
    true
}

/// The connection of `generation` closed: fail the calls sent on it, dial again.
fn on_closed(shared: &Shared, generation: u64) {
    let lost: Vec<Pending> = {
        let mut state = shared.state.lock();
        if state
            .conn
            .as_ref()
            .is_some_and(|(current, _)| *current == generation)
        {
            state.conn = None;
            state.next_dial = Instant::now();
        }
        let ids: Vec<u64> = state
            .pending
            .iter()
            .filter(|(_, call)| call.sent_on == Some(generation))
            .map(|(&id, _)| id)
            .collect();
        shared.wake.notify_one();
        ids.iter()
            .filter_map(|id| state.pending.remove(id))
            .collect()
    };
    if !lost.is_empty() {
        log::debug!(target: LOG, "{}: connection {generation} to {} closed with {} calls in flight", shared.name, shared.peer, lost.len());
    }
    for call in lost {
        let error = shared.failure(&call.method, FailKind::Lost);
        (call.callback)(Err(error));
    }
}
