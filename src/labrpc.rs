//! A simulated network with the semantics of the Go labs' `labrpc`.
//!
//! A [`Network`] holds named client ends and named servers. A [`ClientEnd`] is connected to at
//! most one server name and can be enabled or disabled; a [`Server`] holds named [`Service`]s,
//! each with named methods. [`ClientEnd::call`] encodes the arguments with
//! [`labcodec`](crate::labcodec), runs the handler on another thread and blocks the caller until
//! the typed reply arrives or the network decides that no reply will come.
//!
//! What the network can do to a call (all decisions drawn from one seeded generator, see
//! [`Network::seed`]):
//! * unreliable: 0–26 ms delay, 10 % of requests lost, 10 % of replies lost;
//! * disabled end, unconnected end or deleted server: no reply after 0–100 ms, or 0–7 s with
//!   long delays (so a Raft that sends RPCs synchronously is caught);
//! * long reordering: 2/3 of replies are held back 200–2200 ms;
//! * a reply from a server that was deleted or replaced while the handler ran is never
//!   delivered, so a client never sees success for an operation persisted into a superseded
//!   persister.
//!
//! With the `testing` feature a test can also decide exactly what happens to chosen messages
//! (hold, release in a chosen order, drop, duplicate, delay, crash the server): see
//! [`script`]. Without rules the script costs one atomic load per call.
//!
//! Handlers run on a cached pool of named threads that grows when every thread is busy, so a
//! handler that blocks for seconds never delays other calls. [`Network::cleanup`] makes every
//! pending and future call return [`RpcError::NoReply`] and lets every pool thread exit.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::dispatch::{self, Codec, NotFound, Services, Typed};
use crate::labcodec::{self, CodecError};
use crate::oneshot;

#[cfg(feature = "testing")]
pub mod script;

/// Upper bound (exclusive) of the random delay of an unreliable network, in ms.
const SHORT_DELAY_MS: u64 = 27;
/// Upper bound (exclusive) of the failure delay of a call that cannot be delivered while long
/// delays are on, in ms.
const LONG_DELAY_MS: u64 = 7000;
/// Upper bound (exclusive) of the failure delay otherwise: KV clerks must be able to try each
/// server in fairly rapid succession.
const SHORT_FAIL_DELAY_MS: u64 = 100;
/// How often a waiting call checks whether its server died (the Go tests allow 100 ms from
/// the death to the failed call, so the check must be well inside that).
const DEAD_CHECK_INTERVAL: Duration = Duration::from_millis(20);
/// How long an idle handler thread waits for work before it exits.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How many idle pool threads may spin for their next job at once (each for at most
/// `oneshot`'s spin time).
const POOL_SPINNERS: usize = 4;
/// Environment variable that fixes the seed of every network decision.
pub const SEED_ENV: &str = "RAFTKV_SEED";

/// Why a call returned no reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpcError {
    /// The network lost the request or the reply, the end is disabled or unconnected, the
    /// server is gone or was replaced, or the network was cleaned up.
    NoReply,
    /// The server has no service of that name.
    UnknownService { service: String },
    /// The service has no method of that name.
    UnknownMethod { service: String, method: String },
    /// `svc_meth` was not of the form `Service.Method`.
    BadMethodName(String),
    /// Arguments or reply could not be encoded or decoded.
    Codec(CodecError),
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RpcError::NoReply => f.write_str("no reply"),
            RpcError::UnknownService { service } => write!(f, "unknown service {service:?}"),
            RpcError::UnknownMethod { service, method } => {
                write!(f, "unknown method {method:?} of service {service:?}")
            }
            RpcError::BadMethodName(name) => {
                write!(f, "bad method name {name:?} (want \"Service.Method\")")
            }
            RpcError::Codec(e) => write!(f, "codec: {e}"),
        }
    }
}

impl std::error::Error for RpcError {}

impl From<CodecError> for RpcError {
    fn from(e: CodecError) -> Self {
        RpcError::Codec(e)
    }
}

/// What a labrpc method is: encoded arguments in, encoded reply (or why none) out.
pub type Handler = dyn Fn(&[u8]) -> Result<Vec<u8>, RpcError> + Send + Sync;

/// A named set of RPC methods, e.g. `Raft` with `RequestVote` and `AppendEntries` (the
/// registry is [`dispatch`]'s, shared with the TCP server).
pub type Service = dispatch::Service<Handler>;

/// A typed method: arguments that do not decode, or a reply that does not encode, are a
/// [`RpcError::Codec`] to the caller.
impl Typed for Handler {
    fn typed(method: Box<Codec>) -> Arc<Handler> {
        Arc::new(move |bytes: &[u8]| Ok(method(bytes)?))
    }
}

impl dispatch::Service<Handler> {
    /// Adds method `name` whose handler may decline to answer (`None`), as a crashed
    /// process would: the caller then gets [`RpcError::NoReply`] after the delay of an
    /// unreachable server.
    pub fn method_or_silence<A, R, F>(mut self, name: &str, handler: F) -> Service
    where
        A: DeserializeOwned,
        R: Serialize,
        F: Fn(A) -> Option<R> + Send + Sync + 'static,
    {
        self.add_method(
            name,
            Arc::new(move |bytes: &[u8]| {
                let args: A = labcodec::decode(bytes)?;
                match handler(args) {
                    Some(reply) => Ok(labcodec::encode(&reply)?),
                    None => Err(RpcError::NoReply),
                }
            }),
        );
        self
    }
}

/// Something a server started on the simulated network runs (a Raft peer, a KV server, a test
/// service), as the tester's server groups see it. Production types do not implement it: the
/// tester's adapters wrap them (see `tester::RaftSvc`, `tester::KvSvc`).
pub trait IService: Send + Sync + 'static {
    /// Stops it: no more RPCs sent, no more threads, nothing more delivered.
    fn kill(&self);
    /// The RPC service it answers on the network, if any.
    fn rpc_service(self: Arc<Self>) -> Option<Service>;
}

/// A server: services reachable under one server name.
pub struct Server {
    services: Services<Handler>,
    count: AtomicUsize,
}

impl Default for Server {
    fn default() -> Self {
        Server::new()
    }
}

impl Server {
    pub fn new() -> Server {
        Server {
            services: Services::default(),
            count: AtomicUsize::new(0),
        }
    }

    /// Adds a service, replacing one of the same name.
    pub fn add_service(&mut self, svc: Service) {
        self.services.add(svc);
    }

    /// RPCs that reached this server's dispatcher.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    fn dispatch(&self, svc_meth: &str, args: &[u8]) -> Result<Vec<u8>, RpcError> {
        self.count.fetch_add(1, Ordering::Relaxed);
        let handler = self.services.find(svc_meth).map_err(|e| match e {
            NotFound::BadName(name) => RpcError::BadMethodName(name),
            NotFound::Service(service) => RpcError::UnknownService { service },
            NotFound::Method { service, method } => RpcError::UnknownMethod { service, method },
        })?;
        handler(args)
    }
}

struct EndState {
    enabled: bool,
    server: Option<String>,
    /// Who calls through this end (a server's name), for the script's sender matching.
    owner: Option<Arc<str>>,
}

#[derive(Default)]
struct Topology {
    reliable: bool,
    long_delays: bool,
    long_reordering: bool,
    ends: HashMap<String, EndState>,
    servers: HashMap<String, Arc<Server>>,
}

/// What a call needs to know about the network at the moment it is sent.
struct Route {
    server: Option<(String, Arc<Server>)>,
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    owner: Option<Arc<str>>,
    reliable: bool,
    long_delays: bool,
    long_reordering: bool,
}

struct NetInner {
    topology: Mutex<Topology>,
    rng: Mutex<StdRng>,
    seed: u64,
    /// Set by cleanup; guarded sleeps wake on `done_cv`.
    done: Mutex<bool>,
    done_cv: Condvar,
    done_flag: AtomicBool,
    total_count: AtomicUsize,
    total_bytes: AtomicU64,
    pool: Pool,
    #[cfg(feature = "testing")]
    script: script::Script,
}

/// The simulated network. Cheap to clone; all clones are the same network.
#[derive(Clone)]
pub struct Network {
    inner: Arc<NetInner>,
}

impl Default for Network {
    fn default() -> Self {
        Network::new()
    }
}

impl Network {
    /// A reliable network, seeded from `RAFTKV_SEED` if set, else randomly.
    pub fn new() -> Network {
        let seed = std::env::var(SEED_ENV)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or_else(rand::random);
        Network::with_seed(seed)
    }

    /// A reliable network whose random decisions come from `seed`.
    pub fn with_seed(seed: u64) -> Network {
        Network {
            inner: Arc::new(NetInner {
                topology: Mutex::new(Topology {
                    reliable: true,
                    ..Topology::default()
                }),
                rng: Mutex::new(StdRng::seed_from_u64(seed)),
                seed,
                done: Mutex::new(false),
                done_cv: Condvar::new(),
                done_flag: AtomicBool::new(false),
                total_count: AtomicUsize::new(0),
                total_bytes: AtomicU64::new(0),
                pool: Pool::new(POOL_IDLE_TIMEOUT),
                #[cfg(feature = "testing")]
                script: script::Script::default(),
            }),
        }
    }

    /// The seed of this network's random decisions; set `RAFTKV_SEED` to it to replay them
    /// (as far as thread scheduling allows).
    pub fn seed(&self) -> u64 {
        self.inner.seed
    }

    /// Fails every pending and future call and stops the handler threads once their handlers
    /// return.
    pub fn cleanup(&self) {
        self.inner.done_flag.store(true, Ordering::SeqCst);
        *self.inner.done.lock() = true;
        self.inner.done_cv.notify_all();
        #[cfg(feature = "testing")]
        self.inner.script.shutdown();
        self.inner.pool.shutdown();
    }

    /// This network's script: exact control of chosen messages (see [`script`]).
    #[cfg(feature = "testing")]
    pub fn script(&self) -> script::Script {
        self.inner.script.clone()
    }

    /// Labels end `end` as `owner`'s (a server name): the script matches the sender of a
    /// request, and the receiver of a reply, by this label.
    pub fn set_end_owner(&self, end: &str, owner: &str) {
        if let Some(e) = self.inner.topology.lock().ends.get_mut(end) {
            e.owner = Some(Arc::from(owner));
        }
    }

    /// Handler threads still alive (0 some time after cleanup once handlers returned).
    pub fn handler_threads(&self) -> usize {
        self.inner.pool.live.load(Ordering::SeqCst)
    }

    pub fn set_reliable(&self, yes: bool) {
        self.inner.topology.lock().reliable = yes;
    }

    pub fn is_reliable(&self) -> bool {
        self.inner.topology.lock().reliable
    }

    pub fn set_long_reordering(&self, yes: bool) {
        self.inner.topology.lock().long_reordering = yes;
    }

    pub fn set_long_delays(&self, yes: bool) {
        self.inner.topology.lock().long_delays = yes;
    }

    pub fn is_long_delays(&self) -> bool {
        self.inner.topology.lock().long_delays
    }

    /// Creates a disabled, unconnected end. Names are unique: `None` if `name` exists.
    pub fn make_end(&self, name: &str) -> Option<ClientEnd> {
        let mut topo = self.inner.topology.lock();
        if topo.ends.contains_key(name) {
            log::error!(target: "labrpc", "make_end: {name:?} already exists");
            return None;
        }
        topo.ends.insert(
            name.to_string(),
            EndState {
                enabled: false,
                server: None,
                owner: None,
            },
        );
        Some(ClientEnd {
            name: Arc::from(name),
            net: self.clone(),
        })
    }

    pub fn delete_end(&self, name: &str) {
        self.inner.topology.lock().ends.remove(name);
    }

    /// Adds or replaces the server called `name`. Replies from a replaced server's handlers
    /// are never delivered.
    pub fn add_server(&self, name: &str, server: Server) {
        self.inner
            .topology
            .lock()
            .servers
            .insert(name.to_string(), Arc::new(server));
    }

    pub fn delete_server(&self, name: &str) {
        self.inner.topology.lock().servers.remove(name);
    }

    /// Connects end `end` to server name `server` (which need not exist yet).
    pub fn connect(&self, end: &str, server: &str) {
        if let Some(e) = self.inner.topology.lock().ends.get_mut(end) {
            e.server = Some(server.to_string());
        }
    }

    pub fn enable(&self, end: &str, enabled: bool) {
        if let Some(e) = self.inner.topology.lock().ends.get_mut(end) {
            e.enabled = enabled;
        }
    }

    /// RPCs that reached the dispatcher of the server currently called `server`.
    pub fn count(&self, server: &str) -> usize {
        self.inner
            .topology
            .lock()
            .servers
            .get(server)
            .map_or(0, |s| s.count())
    }

    /// Every call made on this network.
    pub fn total_count(&self) -> usize {
        self.inner.total_count.load(Ordering::Relaxed)
    }

    /// Request bytes of every call plus reply bytes of every delivered reply.
    pub fn total_bytes(&self) -> u64 {
        self.inner.total_bytes.load(Ordering::Relaxed)
    }

    fn is_done(&self) -> bool {
        self.inner.done_flag.load(Ordering::Relaxed)
    }

    /// Sleeps `d` unless the network is cleaned up first. Returns false if it was.
    fn sleep(&self, d: Duration) -> bool {
        if d.is_zero() {
            return !self.is_done();
        }
        let deadline = Instant::now() + d;
        let mut done = self.inner.done.lock();
        while !*done {
            if self
                .inner
                .done_cv
                .wait_until(&mut done, deadline)
                .timed_out()
            {
                return !*done;
            }
        }
        false
    }

    fn rand_below(&self, n: u64) -> u64 {
        self.inner.rng.lock().gen_range(0..n)
    }

    fn route(&self, end: &str) -> Route {
        let topo = self.inner.topology.lock();
        let owner = topo.ends.get(end).and_then(|e| e.owner.clone());
        let server = topo.ends.get(end).and_then(|e| {
            if !e.enabled {
                return None;
            }
            let name = e.server.as_ref()?;
            let srv = topo.servers.get(name)?;
            Some((name.clone(), srv.clone()))
        });
        Route {
            server,
            owner,
            reliable: topo.reliable,
            long_delays: topo.long_delays,
            long_reordering: topo.long_reordering,
        }
    }

    /// True if `end` can no longer reach exactly `server` under `name`: the end was disabled
    /// or the server was deleted or replaced.
    fn is_server_dead(&self, end: &str, name: &str, server: &Arc<Server>) -> bool {
        let topo = self.inner.topology.lock();
        let enabled = topo.ends.get(end).is_some_and(|e| e.enabled);
        let same = topo
            .servers
            .get(name)
            .is_some_and(|s| Arc::ptr_eq(s, server));
        !enabled || !same
    }

    /// Makes one call. With `inline`, the handler runs on the calling thread (a pool thread
    /// of an asynchronous call, where nobody waits): the outcome is then known only once the
    /// handler returns, but one thread hand-off fewer makes the call cheaper.
    ///
    /// `held_reply` is set when the script held the reply and released it: the caller tells
    /// the script once the reply has been handed over ([`Network::reply_delivered`]).
    fn call_bytes(
        &self,
        end: &str,
        svc_meth: &str,
        args: Vec<u8>,
        inline: bool,
        held_reply: &mut Option<u64>,
    ) -> Result<Vec<u8>, RpcError> {
        self.inner.total_count.fetch_add(1, Ordering::Relaxed);
        self.inner
            .total_bytes
            .fetch_add(args.len() as u64, Ordering::Relaxed);
        if self.is_done() {
            return Err(RpcError::NoReply);
        }
        let mut route = self.route(end);
        let Some((server_name, server)) = route.server.take() else {
            // No reply, after a while: a Raft that waits on calls to a disconnected peer is
            // caught by the long delay.
            self.unreachable_delay(route.long_delays);
            return Err(RpcError::NoReply);
        };

        if !route.reliable {
            let ms = self.rand_below(SHORT_DELAY_MS);
            if !self.sleep(Duration::from_millis(ms)) {
                return Err(RpcError::NoReply);
            }
            if self.rand_below(1000) < 100 {
                return Err(RpcError::NoReply); // request lost
            }
        }

        let owner: &str = route.owner.as_deref().unwrap_or(end);
        #[cfg(feature = "testing")]
        let verdict = if self.inner.script.is_active() {
            self.inner.script.decide(&script::Msg {
                dir: script::Dir::Request,
                method: svc_meth,
                from: owner,
                to: &server_name,
                bytes: &args,
            })
        } else {
            script::Verdict::Deliver(None)
        };
        #[cfg(feature = "testing")]
        let held_request = match verdict {
            script::Verdict::Drop => return Err(RpcError::NoReply),
            script::Verdict::Deliver(id) => id,
            script::Verdict::Duplicate => {
                // The first copy's reply is what the caller gets; the second's is lost.
                let first = if inline {
                    server.dispatch(svc_meth, &args)
                } else {
                    self.dispatch_and_wait(end, &server_name, &server, svc_meth, args.clone())?
                };
                let _ = server.dispatch(svc_meth, &args);
                return self.finish_call(
                    end,
                    svc_meth,
                    &server_name,
                    &server,
                    owner,
                    first,
                    &route,
                    held_reply,
                );
            }
            script::Verdict::DuplicateLater => {
                self.hold_copy(svc_meth, owner, &server_name, &server, &args);
                None
            }
        };

        let result = if inline {
            Ok(server.dispatch(svc_meth, &args))
        } else {
            self.dispatch_and_wait(end, &server_name, &server, svc_meth, args)
        };
        #[cfg(feature = "testing")]
        if let Some(id) = held_request {
            self.inner.script.delivered(id);
        }
        self.finish_call(
            end,
            svc_meth,
            &server_name,
            &server,
            owner,
            result?,
            &route,
            held_reply,
        )
    }

    /// The reply's way back: what the network (and the script) does to it.
    #[allow(clippy::too_many_arguments)]
    fn finish_call(
        &self,
        end: &str,
        svc_meth: &str,
        server_name: &str,
        server: &Arc<Server>,
        owner: &str,
        result: Result<Vec<u8>, RpcError>,
        route: &Route,
        held_reply: &mut Option<u64>,
    ) -> Result<Vec<u8>, RpcError> {
        let _ = (svc_meth, owner, &held_reply);

        // A server that died while its handler ran must not be seen to succeed.
        if self.is_server_dead(end, server_name, server) {
            return Err(RpcError::NoReply);
        }
        if result == Err(RpcError::NoReply) {
            // The handler declined to answer (its server is dead): to the caller this looks
            // like a server that is not there.
            self.unreachable_delay(route.long_delays);
            return Err(RpcError::NoReply);
        }
        let reply = result?;
        #[cfg(feature = "testing")]
        if self.inner.script.is_active() {
            match self.inner.script.decide(&script::Msg {
                dir: script::Dir::Reply,
                method: svc_meth,
                from: server_name,
                to: owner,
                bytes: &reply,
            }) {
                script::Verdict::Drop => return Err(RpcError::NoReply),
                script::Verdict::Deliver(id) => *held_reply = id,
                // Refused when the rule is made: a caller takes one answer per call.
                script::Verdict::Duplicate | script::Verdict::DuplicateLater => {
                    debug_assert!(false, "a reply rule that duplicates");
                }
            }
            if self.is_server_dead(end, server_name, server) {
                return Err(RpcError::NoReply);
            }
        }
        if !route.reliable && self.rand_below(1000) < 100 {
            return Err(RpcError::NoReply); // reply lost
        }
        if route.long_reordering && self.rand_below(900) < 600 {
            // 200 + rand(1 + rand(2000)): most delays short, some up to 2.2 s.
            let spread = self.rand_below(2000) + 1;
            let ms = 200 + self.rand_below(spread);
            if !self.sleep(Duration::from_millis(ms)) {
                return Err(RpcError::NoReply);
            }
        }
        self.inner
            .total_bytes
            .fetch_add(reply.len() as u64, Ordering::Relaxed);
        Ok(reply)
    }

    /// Tells the script that a held reply has been handed to its caller.
    fn reply_delivered(&self, held_reply: Option<u64>) {
        #[cfg(feature = "testing")]
        if let Some(id) = held_reply {
            self.inner.script.delivered(id);
        }
        let _ = held_reply;
    }

    /// A late duplicate: a copy of a request, held until the test releases it, then delivered
    /// to the same server instance if it is still there (its reply goes nowhere).
    #[cfg(feature = "testing")]
    fn hold_copy(
        &self,
        svc_meth: &str,
        from: &str,
        server_name: &str,
        server: &Arc<Server>,
        args: &[u8],
    ) {
        let script = self.inner.script.clone();
        let msg = script::Msg {
            dir: script::Dir::Request,
            method: svc_meth,
            from,
            to: server_name,
            bytes: args,
        };
        let id = script.hold(
            &msg,
            true,
            0,
            &format!("request {svc_meth} {from}->{server_name}"),
        );
        let net = self.clone();
        let server = server.clone();
        let name = server_name.to_string();
        let method = svc_meth.to_string();
        let args = args.to_vec();
        let spawned = thread::Builder::new()
            .name("labrpc-script-copy".to_string())
            .spawn(move || {
                if script.wait_released(id) {
                    let same = net
                        .inner
                        .topology
                        .lock()
                        .servers
                        .get(&name)
                        .is_some_and(|s| Arc::ptr_eq(s, &server));
                    if same && !net.is_done() {
                        let _ = server.dispatch(&method, &args);
                    }
                }
                script.delivered(id);
            });
        if let Err(e) = spawned {
            log::error!(target: "labrpc::script", "cannot start a thread for a held copy: {e}");
            self.inner.script.drop_held(id);
        }
    }

    /// How long a call to a server that is not there takes to fail.
    fn unreachable_delay(&self, long_delays: bool) {
        let ms = if long_delays {
            self.rand_below(LONG_DELAY_MS)
        } else {
            self.rand_below(SHORT_FAIL_DELAY_MS)
        };
        self.sleep(Duration::from_millis(ms));
    }

    /// Runs the handler on a pool thread and waits for it, giving up as soon as the server
    /// dies or the end is disabled.
    fn dispatch_and_wait(
        &self,
        end: &str,
        server_name: &str,
        server: &Arc<Server>,
        svc_meth: &str,
        args: Vec<u8>,
    ) -> Result<Result<Vec<u8>, RpcError>, RpcError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let job_server = server.clone();
        let job_method: Box<str> = svc_meth.into();
        let submitted = self.inner.pool.execute(Box::new(move || {
            let result = job_server.dispatch(&job_method, &args);
            // The caller may have given up; nobody to tell then.
            reply_tx.send(result);
        }));
        if !submitted {
            return Err(RpcError::NoReply);
        }

        loop {
            match reply_rx.recv_timeout(DEAD_CHECK_INTERVAL) {
                Ok(r) => return Ok(r),
                Err(oneshot::RecvTimeoutError::Timeout) => {
                    if self.is_done() || self.is_server_dead(end, server_name, server) {
                        return Err(RpcError::NoReply);
                    }
                }
                Err(oneshot::RecvTimeoutError::Disconnected) => return Err(RpcError::NoReply),
            }
        }
    }
}

/// One end of a connection: calls go to whatever server its name is connected to.
#[derive(Clone)]
pub struct ClientEnd {
    name: Arc<str>,
    net: Network,
}

impl fmt::Debug for ClientEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientEnd({})", self.name)
    }
}

impl ClientEnd {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Calls `svc_meth` (`"Service.Method"`) and blocks until the reply arrives or the network
    /// decides that it will not. Concurrent calls on one end are allowed and may be reordered.
    pub fn call<A: Serialize, R: DeserializeOwned>(
        &self,
        svc_meth: &str,
        args: &A,
    ) -> Result<R, RpcError> {
        let bytes = labcodec::encode(args)?;
        let mut held = None;
        let reply = self
            .net
            .call_bytes(&self.name, svc_meth, bytes, false, &mut held);
        let result = reply.and_then(|r| Ok(labcodec::decode(&r)?));
        self.net.reply_delivered(held);
        result
    }

    /// Like [`call`](Self::call), but returns at once: the call is made on a network thread,
    /// which then runs `on_reply` with the outcome. `on_reply` never runs on the caller's
    /// thread, so the caller may hold locks that `on_reply` takes. After
    /// [`Network::cleanup`] it is not run at all.
    ///
    /// The handler runs on that same network thread, so the outcome is reported once the
    /// handler returns (a reply from a server that died meanwhile is still never delivered).
    /// Use it for handlers that do not block for long, as Raft's do.
    pub fn call_async<A, R, F>(&self, svc_meth: &str, args: &A, on_reply: F)
    where
        A: Serialize,
        R: DeserializeOwned,
        F: FnOnce(Result<R, RpcError>) + Send + 'static,
    {
        let bytes = match labcodec::encode(args) {
            Ok(b) => b,
            Err(e) => {
                let net = self.net.clone();
                net.inner
                    .pool
                    .execute(Box::new(move || on_reply(Err(e.into()))));
                return;
            }
        };
        let end = self.clone();
        let method: Box<str> = svc_meth.into();
        let net = self.net.clone();
        net.inner.pool.execute(Box::new(move || {
            let mut held = None;
            let result = end
                .net
                .call_bytes(&end.name, &method, bytes, true, &mut held)
                .and_then(|reply| Ok(labcodec::decode(&reply)?));
            on_reply(result);
            end.net.reply_delivered(held);
        }));
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A cached thread pool: a job goes straight to an idle thread if there is one (the one idle
/// for the shortest time, so few threads stay warm), else a new thread is started, so a
/// blocked handler never holds up another. Idle threads park (the first `POOL_SPINNERS` of
/// them after a short spin) and exit after an idle timeout (`POOL_IDLE_TIMEOUT` for a
/// `Network`) or at shutdown.
struct Pool {
    shared: Arc<PoolShared>,
    live: Arc<AtomicUsize>,
    spawned: AtomicUsize,
}

struct PoolShared {
    idle_timeout: Duration,
    /// Idle workers, the most recently idle last; `None` once shut down.
    idle: Mutex<Option<Vec<Arc<Worker>>>>,
    /// Idle workers spinning for their next job (at most `POOL_SPINNERS`).
    spinning: AtomicUsize,
}

/// One pool thread's mailbox.
struct Worker {
    slot: Mutex<WorkerSlot>,
    /// Set when the slot stops being `Waiting`: what a spinning worker watches.
    mail: AtomicBool,
    cv: Condvar,
}

enum WorkerSlot {
    Waiting,
    Job(Job),
    Stop,
}

impl Pool {
    fn new(idle_timeout: Duration) -> Pool {
        Pool {
            shared: Arc::new(PoolShared {
                idle_timeout,
                idle: Mutex::new(Some(Vec::new())),
                spinning: AtomicUsize::new(0),
            }),
            live: Arc::new(AtomicUsize::new(0)),
            spawned: AtomicUsize::new(0),
        }
    }

    /// Runs `job` on a pool thread. False if the pool is shut down.
    fn execute(&self, job: Job) -> bool {
        let worker = {
            let mut idle = self.shared.idle.lock();
            match idle.as_mut() {
                None => return false,
                Some(idle) => idle.pop(),
            }
        };
        if let Some(w) = worker {
            // Off the idle list, the worker waits for exactly this job.
            *w.slot.lock() = WorkerSlot::Job(job);
            w.mail.store(true, Ordering::Release);
            w.cv.notify_one();
            return true;
        }
        let shared = self.shared.clone();
        let live = self.live.clone();
        let id = self.spawned.fetch_add(1, Ordering::Relaxed);
        live.fetch_add(1, Ordering::SeqCst);
        let spawned = thread::Builder::new()
            .name(format!("labrpc-handler-{id}"))
            .spawn(move || {
                let me = Arc::new(Worker {
                    slot: Mutex::new(WorkerSlot::Waiting),
                    mail: AtomicBool::new(false),
                    cv: Condvar::new(),
                });
                let mut job = Some(job);
                while let Some(j) = job.take() {
                    j();
                    job = shared.next_job(&me);
                }
                live.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.live.fetch_sub(1, Ordering::SeqCst);
            log::error!(target: "labrpc", "cannot start a handler thread: {e}");
            return false;
        }
        true
    }

    fn shutdown(&self) {
        let idle = self.shared.idle.lock().take();
        for w in idle.into_iter().flatten() {
            *w.slot.lock() = WorkerSlot::Stop;
            w.mail.store(true, Ordering::Release);
            w.cv.notify_one();
        }
    }
}

impl PoolShared {
    /// If fewer than `POOL_SPINNERS` idle workers spin, watches `me`'s mailbox for a moment
    /// before it parks. The most recently idle worker gets the next job, so while calls come
    /// in quick succession (one clerk's, or Raft's AppendEntries rounds) the job usually
    /// finds a thread awake and skips a futex wake-up, which on a quiet machine is most of an
    /// RPC's cost. Only a few spin, yielding as they go, so under load it costs little CPU.
    fn spin_for_mail(&self, me: &Worker) {
        oneshot::spin_until(&me.mail, POOL_SPINNERS, &self.spinning);
    }

    /// Puts `me` on the idle list and waits for its next job: `None` when it should exit
    /// (idle too long, or the pool shut down).
    fn next_job(&self, me: &Arc<Worker>) -> Option<Job> {
        me.mail.store(false, Ordering::Relaxed);
        {
            let mut idle = self.idle.lock();
            idle.as_mut()?.push(me.clone());
        }
        self.spin_for_mail(me);
        let deadline = Instant::now() + self.idle_timeout;
        let mut slot = me.slot.lock();
        loop {
            match std::mem::replace(&mut *slot, WorkerSlot::Waiting) {
                WorkerSlot::Job(j) => return Some(j),
                WorkerSlot::Stop => return None,
                WorkerSlot::Waiting => {}
            }
            if me.cv.wait_until(&mut slot, deadline).timed_out() {
                if !matches!(*slot, WorkerSlot::Waiting) {
                    continue;
                }
                // Leave the idle list, unless a submitter took us off it: then its job is
                // on the way.
                drop(slot);
                let removed = {
                    let mut idle = self.idle.lock();
                    match idle.as_mut() {
                        Some(list) => match list.iter().position(|w| Arc::ptr_eq(w, me)) {
                            Some(i) => {
                                list.remove(i);
                                true
                            }
                            None => false,
                        },
                        // Shut down: `shutdown` took the list and sends Stop.
                        None => false,
                    }
                };
                if removed {
                    return None;
                }
                slot = me.slot.lock();
                while matches!(*slot, WorkerSlot::Waiting) {
                    me.cv.wait(&mut slot);
                }
            }
        }
    }
}

#[cfg(test)]
mod pool_tests {
    use super::*;
    use crossbeam::channel;

    fn idle_count(pool: &Pool) -> usize {
        pool.shared.idle.lock().as_ref().map_or(0, Vec::len)
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn wait_for_no_workers(pool: &Pool) {
        wait_for("the workers to exit", || {
            pool.live.load(Ordering::SeqCst) == 0
        });
    }

    fn shut_down_and_wait(pool: &Pool) {
        pool.shutdown();
        wait_for_no_workers(pool);
    }

    #[test]
    fn an_idle_thread_takes_the_next_job() {
        let pool = Pool::new(Duration::from_secs(10));
        for i in 0..50 {
            let (tx, rx) = channel::bounded(1);
            assert!(pool.execute(Box::new(move || tx.send(i).unwrap())));
            assert_eq!(rx.recv().unwrap(), i);
            wait_for("the worker to go idle", || idle_count(&pool) == 1);
        }
        assert_eq!(pool.spawned.load(Ordering::Relaxed), 1, "threads started");
        shut_down_and_wait(&pool);
    }

    #[test]
    fn a_blocked_job_does_not_hold_up_another() {
        let pool = Pool::new(Duration::from_secs(10));
        let (release_tx, release_rx) = channel::bounded::<()>(0);
        let (done_tx, done_rx) = channel::unbounded();
        let d = done_tx.clone();
        assert!(pool.execute(Box::new(move || {
            release_rx.recv().unwrap();
            d.send("blocked").unwrap();
        })));
        assert!(pool.execute(Box::new(move || done_tx.send("free").unwrap())));
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(5)), Ok("free"));
        release_tx.send(()).unwrap();
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(5)), Ok("blocked"));
        assert_eq!(pool.spawned.load(Ordering::Relaxed), 2);
        shut_down_and_wait(&pool);
    }

    #[test]
    fn idle_threads_exit_after_the_timeout() {
        let pool = Pool::new(Duration::from_millis(50));
        let barrier = Arc::new(std::sync::Barrier::new(4));
        for _ in 0..3 {
            let b = barrier.clone();
            assert!(pool.execute(Box::new(move || {
                b.wait();
            })));
        }
        barrier.wait();
        assert_eq!(pool.spawned.load(Ordering::Relaxed), 3);
        wait_for_no_workers(&pool);
        assert_eq!(
            idle_count(&pool),
            0,
            "an exited worker left on the idle list"
        );
        // The pool still works: a new thread takes the next job.
        let (tx, rx) = channel::bounded(1);
        assert!(pool.execute(Box::new(move || tx.send(()).unwrap())));
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        pool.shutdown();
    }

    #[test]
    fn shutdown_wakes_idle_threads_and_refuses_jobs() {
        let pool = Pool::new(Duration::from_secs(60));
        for _ in 0..3 {
            assert!(pool.execute(Box::new(|| thread::sleep(Duration::from_millis(10)))));
        }
        wait_for("the workers to go idle", || idle_count(&pool) == 3);
        shut_down_and_wait(&pool);
        assert!(!pool.execute(Box::new(|| {})));
    }
}
