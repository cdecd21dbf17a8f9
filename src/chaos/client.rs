//! The chaos run's clients: each its own RESP connection to one node, issuing the lab's
//! versioned operations (`VGET`, `VSET`) on a small key set and recording every call and
//! return for the linearizability checker.
//!
//! How an answer is recorded (the porcupine KV model's reading):
//! * `VGET` → `[value, version]` or nil: a Get that returned that value (nil is `""`).
//!   A `VGET` with no answer (an error reply, a timeout, a lost connection) constrains
//!   nothing and is left out.
//! * `VSET` → `OK`: a Put that applied; `-ERRVERSION` / `-ERRNOKEY`: a Put that did not.
//!   Anything else — `-ERRMAYBE`, `-TRYAGAIN`, another error, a timeout, a lost connection —
//!   may or may not have applied, and may still apply later: it is recorded as `ErrMaybe`
//!   with no return (the checker lets it take effect at any point after its call, or never).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::kvapi::{KvErr, Tversion};
use crate::porcupine::kv::{KvInput, KvOutput};
use crate::resp::{self, Limits, Reply};

const LOG: &str = "chaos::client";

/// How long a client waits for one reply before it gives the operation up as unknown. A
/// node answers `-TRYAGAIN` after 5 s without a leader; a paused node never answers.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long [`RespConn::call_while`] reads before it asks whether to keep waiting.
const WAIT_SLICE: Duration = Duration::from_millis(200);
/// The pause before trying another node after a connection or an operation failed.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);

/// One operation as it happened, times in nanoseconds since the run's start.
#[derive(Debug, Clone)]
pub struct Record {
    pub client: usize,
    pub input: KvInput,
    pub output: KvOutput,
    pub call: i64,
    /// `None`: the outcome is unknown (a `VSET` that may still apply).
    pub ret: Option<i64>,
}

/// Why a call got no reply.
#[derive(Debug)]
pub enum CallError {
    Io(io::Error),
    Protocol(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Io(e) => write!(f, "{e}"),
            CallError::Protocol(e) => write!(f, "bad reply: {e}"),
        }
    }
}

/// A blocking RESP connection: one command, one reply.
pub struct RespConn {
    stream: TcpStream,
    buf: Vec<u8>,
    limits: Limits,
}

impl RespConn {
    pub fn connect(addr: SocketAddr, reply_timeout: Duration) -> io::Result<RespConn> {
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(reply_timeout))?;
        stream.set_write_timeout(Some(reply_timeout))?;
        Ok(RespConn {
            stream,
            buf: Vec::new(),
            limits: Limits::default(),
        })
    }

    /// Sends one command and reads its reply. After an error the connection is unusable (a
    /// late reply would be taken for the next command's): drop it.
    pub fn call<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<Reply, CallError> {
        self.stream
            .write_all(&resp::encode_command(args))
            .map_err(CallError::Io)?;
        self.read_reply()
    }

    /// [`call`](Self::call) for a command whose reply may take long (a membership change
    /// waiting for its node to catch up): it waits in slices of [`WAIT_SLICE`] and gives up
    /// with `TimedOut` once `keep_waiting` says no or `deadline` passes.
    pub fn call_while<A: AsRef<[u8]>>(
        &mut self,
        args: &[A],
        deadline: Instant,
        keep_waiting: impl Fn() -> bool,
    ) -> Result<Reply, CallError> {
        self.stream
            .write_all(&resp::encode_command(args))
            .map_err(CallError::Io)?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !keep_waiting() {
                return Err(CallError::Io(io::ErrorKind::TimedOut.into()));
            }
            self.stream
                .set_read_timeout(Some(left.min(WAIT_SLICE)))
                .map_err(CallError::Io)?;
            match self.read_reply() {
                Err(CallError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                other => return other,
            }
        }
    }

    /// Reads one reply; what a timed-out read had received stays buffered for the next.
    fn read_reply(&mut self) -> Result<Reply, CallError> {
        let mut chunk = [0u8; 4096];
        loop {
            match resp::decode_reply(&self.buf, &self.limits) {
                Ok(Some((reply, used))) => {
                    self.buf.drain(..used);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(e) => return Err(CallError::Protocol(e.to_string())),
            }
            let n = self.stream.read(&mut chunk).map_err(CallError::Io)?;
            if n == 0 {
                return Err(CallError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// What the clients share with the driver.
pub struct Shared {
    pub start: Instant,
    pub stop: AtomicBool,
    /// Operations with a definite answer so far.
    pub done: AtomicU64,
    /// `VGET`s that got no answer (left out of the history).
    pub failed_reads: AtomicU64,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            start: Instant::now(),
            stop: AtomicBool::new(false),
            done: AtomicU64::new(0),
            failed_reads: AtomicU64::new(0),
        }
    }

    /// Nanoseconds since the run's start.
    pub fn now(&self) -> i64 {
        i64::try_from(self.start.elapsed().as_nanos()).unwrap_or(i64::MAX)
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new()
    }
}

pub fn key_name(k: usize) -> String {
    format!("chaos-{k}")
}

/// What one client does: a connection to `addrs[first]`, moving on to the next node
/// whenever a connection fails.
pub struct ClientSpec {
    pub id: usize,
    pub addrs: Vec<SocketAddr>,
    pub first: usize,
    pub keys: usize,
    pub seed: u64,
}

/// How a reply reads to the model.
enum Answer {
    Get {
        value: String,
        version: Tversion,
    },
    Put(KvErr),
    /// No usable answer: the connection is dropped and the next node tried.
    Failed {
        why: String,
    },
}

fn read_get(reply: Reply) -> Answer {
    match reply {
        Reply::Null => Answer::Get {
            value: String::new(),
            version: 0,
        },
        Reply::Array(items) => match items.as_slice() {
            [Reply::Bulk(value), Reply::Integer(version)] if *version >= 0 => Answer::Get {
                value: String::from_utf8_lossy(value).into_owned(),
                version: *version as Tversion,
            },
            _ => Answer::Failed {
                why: format!("VGET answered {items:?}"),
            },
        },
        other => failed("VGET", other),
    }
}

fn read_put(reply: Reply) -> Answer {
    match reply {
        Reply::Simple(s) if s == "OK" => Answer::Put(KvErr::Ok),
        Reply::Error(e) if e.starts_with("ERRVERSION") || e.starts_with("ERRNOKEY") => {
            Answer::Put(KvErr::Version)
        }
        // ERRMAYBE, TRYAGAIN, anything else: the write may or may not have applied.
        other => failed("VSET", other),
    }
}

/// A reply to `command` that is no answer. Either way the client moves on to the next node:
/// an error (`TRYAGAIN`, `ERR node stopped`) comes from a node that cannot serve now, and
/// asking it again at once would only pile up writes of unknown outcome (each one widens
/// the history the checker must search); anything else (a reply of the wrong type) means
/// the connection cannot be trusted.
fn failed(command: &str, reply: Reply) -> Answer {
    match reply {
        Reply::Error(e) => Answer::Failed { why: e },
        other => Answer::Failed {
            why: format!("{command} answered {other:?}"),
        },
    }
}

/// Runs one client until `shared.stop`; returns its history.
pub fn run_client(spec: &ClientSpec, shared: &Arc<Shared>) -> Vec<Record> {
    let mut rng = SmallRng::seed_from_u64(spec.seed);
    let mut records = Vec::new();
    let mut target = spec.first % spec.addrs.len();
    let mut conn: Option<RespConn> = None;
    // The version this client last saw of each key: what its next VSET offers.
    let mut known: Vec<Tversion> = vec![0; spec.keys];
    let mut writes = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        let con = match conn.as_mut() {
            Some(c) => c,
            None => match RespConn::connect(spec.addrs[target], REPLY_TIMEOUT) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    log::debug!(target: LOG, "client {}: cannot connect to node {}: {e}", spec.id, target + 1);
                    target = (target + 1) % spec.addrs.len();
                    thread::sleep(RECONNECT_PAUSE);
                    continue;
                }
            },
        };
        let k = rng.gen_range(0..spec.keys);
        let key = key_name(k);
        let is_put = rng.gen_bool(0.5);
        let (input, call, answer) = if is_put {
            writes += 1;
            let value = format!("c{}w{writes}", spec.id);
            let version = known[k];
            let version_text = version.to_string();
            let call = shared.now();
            let answer = match con.call(&["VSET", key.as_str(), value.as_str(), &version_text]) {
                Ok(reply) => read_put(reply),
                Err(e) => Answer::Failed { why: e.to_string() },
            };
            let input = KvInput::put(key, value, version);
            (input, call, answer)
        } else {
            let call = shared.now();
            let answer = match con.call(&["VGET", key.as_str()]) {
                Ok(reply) => read_get(reply),
                Err(e) => Answer::Failed { why: e.to_string() },
            };
            let input = KvInput::get(key);
            (input, call, answer)
        };
        let ret = shared.now();
        let (output, ret) = match answer {
            Answer::Get { value, version } => {
                known[k] = version;
                let output = KvOutput::got(value, version, KvErr::Ok);
                (output, Some(ret))
            }
            Answer::Put(err) => {
                if err == KvErr::Ok {
                    known[k] += 1;
                }
                let output = KvOutput::put(err);
                (output, Some(ret))
            }
            Answer::Failed { why } => {
                log::debug!(target: LOG, "client {}: node {}: {} {}: {why}", spec.id, target + 1, if is_put { "VSET" } else { "VGET" }, input.key);
                conn = None;
                target = (target + 1) % spec.addrs.len();
                thread::sleep(RECONNECT_PAUSE);
                if !is_put {
                    shared.failed_reads.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let output = KvOutput::put(KvErr::Maybe);
                (output, None)
            }
        };
        if ret.is_some() {
            shared.done.fetch_add(1, Ordering::Relaxed);
        }
        records.push(Record {
            client: spec.id,
            input,
            output,
            call,
            ret,
        });
    }
    records
}

/// After the faults: one `VGET` of `key`, tried on every node in turn until one answers or
/// `deadline` passes (the cluster must recover once everything is healed).
pub fn final_read(
    id: usize,
    addrs: &[SocketAddr],
    key: &str,
    shared: &Shared,
    deadline: Instant,
) -> Option<Record> {
    let mut target = 0;
    while Instant::now() < deadline {
        let node = target % addrs.len();
        target += 1;
        let Ok(mut con) = RespConn::connect(addrs[node], REPLY_TIMEOUT) else {
            thread::sleep(RECONNECT_PAUSE);
            continue;
        };
        let call = shared.now();
        let answer = match con.call(&["VGET", key]) {
            Ok(reply) => read_get(reply),
            Err(e) => Answer::Failed { why: e.to_string() },
        };
        match answer {
            Answer::Get { value, version } => {
                return Some(Record {
                    client: id,
                    input: KvInput::get(key),
                    output: KvOutput::got(value, version, KvErr::Ok),
                    call,
                    ret: Some(shared.now()),
                });
            }
            // read_get never answers Put.
            Answer::Put(_) | Answer::Failed { .. } => {
                log::debug!(target: LOG, "final read of {key} on node {}: no answer", node + 1);
                thread::sleep(RECONNECT_PAUSE);
            }
        }
    }
    None
}
