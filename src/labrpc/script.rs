//! Exact control of the simulated network, for tests that reproduce one schedule (test
//! support, feature `testing`).
//!
//! A test adds [`Rule`]s to the network's [`Script`]. Each message — a request on its way to
//! the server, or a reply on its way back — is matched against the rules in the order they
//! were added; the first rule that matches decides what happens to it:
//!
//! * [`Action::Pass`]: nothing (the message is counted and logged);
//! * [`Action::Drop`]: lost (the caller gets `RpcError::NoReply`);
//! * [`Action::Hold`]: parked until the test releases it ([`Script::release`]) or drops it;
//!   releasing held messages one at a time in a chosen order reorders them;
//! * [`Action::Delay`]: delivered after a fixed time;
//! * [`Action::Duplicate`]: a request delivered twice in a row (the caller gets the first
//!   reply); [`Action::DuplicateLater`]: delivered now, and a copy is held until released
//!   (its reply goes nowhere, as a late duplicate's would). Requests only: every caller takes
//!   at most one answer per call (labrpc's `call` and `call_async`, and so Raft's transport
//!   contract; over TCP, `net` matches answers to calls by request id and a second one finds
//!   no call), so a second copy of a reply could reach nobody. What a duplicated reply shows
//!   a caller in a network of one-way messages — an old answer arriving after newer ones —
//!   is here a reply held and released after the replies of later calls; a rule that would
//!   duplicate a reply is refused when it is made (a panic naming it), not silently passed;
//! * [`Action::Crash`]: the message is lost and a callback runs first, e.g. the test's
//!   "crash this server" — on a reply, that is a crash after the server acted (and made its
//!   state durable) but before its answer left.
//!
//! A rule matches by direction, method, sender, receiver and a predicate on the decoded
//! message, and may be limited to its first `n` matches. A request goes *from* the owner of
//! the client end (the tester labels the ends of server `i` with its server name, see
//! [`Network::set_end_owner`]) *to* the server; a reply goes the other way. Every decision is
//! logged under the target `labrpc::script` and kept in [`Script::events`]; the script uses no
//! randomness, so a test replays the same decisions for the same messages.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::de::DeserializeOwned;

use crate::labcodec;

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Request,
    Reply,
}

/// What the script does to a matched message.
#[derive(Clone)]
pub enum Action {
    Pass,
    Drop,
    Hold,
    Delay(Duration),
    Duplicate,
    DuplicateLater,
    Crash(Arc<dyn Fn() + Send + Sync>),
}

impl fmt::Debug for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Pass => f.write_str("pass"),
            Action::Drop => f.write_str("drop"),
            Action::Hold => f.write_str("hold"),
            Action::Delay(d) => write!(f, "delay {d:?}"),
            Action::Duplicate => f.write_str("duplicate"),
            Action::DuplicateLater => f.write_str("duplicate later"),
            Action::Crash(_) => f.write_str("crash"),
        }
    }
}

type Pred = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// Which messages a rule applies to, and what it does to them.
#[derive(Clone)]
pub struct Rule {
    dir: Dir,
    method: Option<String>,
    from: Option<Vec<String>>,
    to: Option<Vec<String>>,
    pred: Option<Pred>,
    what: String,
    limit: Option<u64>,
    action: Action,
}

impl Rule {
    fn new(dir: Dir, method: Option<&str>) -> Rule {
        Rule {
            dir,
            method: method.map(str::to_string),
            from: None,
            to: None,
            pred: None,
            what: String::new(),
            limit: None,
            action: Action::Pass,
        }
    }

    /// Requests of `method` (`"Service.Method"`).
    pub fn request(method: &str) -> Rule {
        Rule::new(Dir::Request, Some(method))
    }

    /// Replies of `method`.
    pub fn reply(method: &str) -> Rule {
        Rule::new(Dir::Reply, Some(method))
    }

    /// Requests of any method.
    pub fn any_request() -> Rule {
        Rule::new(Dir::Request, None)
    }

    /// Replies of any method.
    pub fn any_reply() -> Rule {
        Rule::new(Dir::Reply, None)
    }

    /// Sent by `name` (a server name, or the owner label of a client end).
    pub fn from(self, name: &str) -> Rule {
        self.from_any(&[name.to_string()])
    }

    pub fn from_any(mut self, names: &[String]) -> Rule {
        self.from = Some(names.to_vec());
        self
    }

    /// Received by `name`.
    pub fn to(self, name: &str) -> Rule {
        self.to_any(&[name.to_string()])
    }

    pub fn to_any(mut self, names: &[String]) -> Rule {
        self.to = Some(names.to_vec());
        self
    }

    /// Only messages that decode as `T` and satisfy `pred`; `what` describes it in the log.
    pub fn when<T, F>(mut self, what: &str, pred: F) -> Rule
    where
        T: DeserializeOwned,
        F: Fn(&T) -> bool + Send + Sync + 'static,
    {
        self.pred = Some(Arc::new(move |bytes: &[u8]| {
            labcodec::decode::<T>(bytes).is_ok_and(|m| pred(&m))
        }));
        self.what = what.to_string();
        self
    }

    /// Applies to the first `n` matching messages only.
    pub fn first(mut self, n: u64) -> Rule {
        self.limit = Some(n);
        self
    }

    /// What the rule does to the messages it matches.
    ///
    /// # Panics
    ///
    /// On a rule for replies that would duplicate them: a caller takes one answer per call,
    /// so the copy could reach nobody (see the module's documentation).
    pub fn then(mut self, action: Action) -> Rule {
        if self.dir == Dir::Reply && matches!(action, Action::Duplicate | Action::DuplicateLater) {
            panic!(
                "labrpc::script: a reply cannot be duplicated (a caller takes one answer per \
                 call); hold it and release it after later replies instead: {}",
                self.then(Action::Pass).describe()
            );
        }
        self.action = action;
        self
    }

    pub fn pass(self) -> Rule {
        self.then(Action::Pass)
    }
    pub fn drop_it(self) -> Rule {
        self.then(Action::Drop)
    }
    pub fn hold(self) -> Rule {
        self.then(Action::Hold)
    }
    pub fn delay(self, d: Duration) -> Rule {
        self.then(Action::Delay(d))
    }
    pub fn duplicate(self) -> Rule {
        self.then(Action::Duplicate)
    }
    pub fn duplicate_later(self) -> Rule {
        self.then(Action::DuplicateLater)
    }
    pub fn crash(self, f: impl Fn() + Send + Sync + 'static) -> Rule {
        self.then(Action::Crash(Arc::new(f)))
    }

    fn matches(&self, m: &Msg<'_>) -> bool {
        let names_match = |names: &Option<Vec<String>>, n: &str| {
            names.as_ref().is_none_or(|l| l.iter().any(|x| x == n))
        };
        self.dir == m.dir
            && self.method.as_deref().is_none_or(|x| x == m.method)
            && names_match(&self.from, m.from)
            && names_match(&self.to, m.to)
            && self.pred.as_ref().is_none_or(|p| p(m.bytes))
    }

    fn describe(&self) -> String {
        let dir = match self.dir {
            Dir::Request => "request",
            Dir::Reply => "reply",
        };
        let list = |l: &Option<Vec<String>>| l.as_ref().map_or("*".to_string(), |l| l.join("|"));
        let mut s = format!(
            "{:?} {dir} {} {}->{}",
            self.action,
            self.method.as_deref().unwrap_or("*"),
            list(&self.from),
            list(&self.to)
        );
        if !self.what.is_empty() {
            s.push_str(&format!(" ({})", self.what));
        }
        if let Some(n) = self.limit {
            s.push_str(&format!(" first {n}"));
        }
        s
    }
}

/// A message as the script sees it.
pub(crate) struct Msg<'a> {
    pub dir: Dir,
    pub method: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub bytes: &'a [u8],
}

/// A rule's handle.
pub type RuleId = u64;
/// A held message's handle.
pub type HeldId = u64;

/// A held message, as the test sees it.
#[derive(Debug, Clone)]
pub struct Held {
    pub id: HeldId,
    pub dir: Dir,
    pub method: String,
    pub from: String,
    pub to: String,
    /// The encoded message (decode it with `labcodec` to look inside).
    pub bytes: Vec<u8>,
    /// A copy made by `DuplicateLater` (its reply goes nowhere).
    pub copy: bool,
}

impl Held {
    pub fn decode<T: DeserializeOwned>(&self) -> Option<T> {
        labcodec::decode(&self.bytes).ok()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeldState {
    Waiting,
    Released,
    Dropped,
    Delivered,
}

struct HeldSlot {
    info: Held,
    state: HeldState,
}

struct RuleSlot {
    id: RuleId,
    rule: Rule,
    matched: u64,
}

#[derive(Default)]
struct ScriptState {
    rules: Vec<RuleSlot>,
    held: Vec<HeldSlot>,
    events: Vec<String>,
    done: bool,
}

/// The script of one network. Cheap to clone.
#[derive(Clone, Default)]
pub struct Script {
    inner: Arc<ScriptInner>,
}

#[derive(Default)]
struct ScriptInner {
    state: Mutex<ScriptState>,
    cv: Condvar,
    next_id: AtomicU64,
    /// Rules present: the network skips the script entirely while there are none.
    active: std::sync::atomic::AtomicBool,
}

/// What the network is to do with a message, once the script has decided.
pub(crate) enum Verdict {
    /// Deliver it; if it was held, tell [`Script::delivered`] once it has been.
    Deliver(Option<HeldId>),
    Drop,
    Duplicate,
    DuplicateLater,
}

/// How long [`Script::release`] waits for a released message to be delivered.
const DELIVERY_WAIT: Duration = Duration::from_secs(10);

impl Script {
    pub(crate) fn is_active(&self) -> bool {
        self.inner.active.load(Ordering::Acquire)
    }

    fn note(&self, st: &mut ScriptState, line: String) {
        log::info!(target: "labrpc::script", "{line}");
        st.events.push(line);
    }

    /// Adds a rule after the existing ones; returns its handle.
    pub fn add(&self, rule: Rule) -> RuleId {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut st = self.inner.state.lock();
        let line = format!("rule {id} added: {}", rule.describe());
        self.note(&mut st, line);
        st.rules.push(RuleSlot {
            id,
            rule,
            matched: 0,
        });
        self.inner.active.store(true, Ordering::Release);
        id
    }

    /// Removes a rule (messages it holds stay held).
    pub fn remove(&self, id: RuleId) {
        let mut st = self.inner.state.lock();
        st.rules.retain(|r| r.id != id);
        self.note(&mut st, format!("rule {id} removed"));
        self.refresh_active(&st);
    }

    /// Removes every rule; held messages stay held.
    pub fn clear_rules(&self) {
        let mut st = self.inner.state.lock();
        st.rules.clear();
        self.note(&mut st, "rules cleared".to_string());
        self.refresh_active(&st);
    }

    /// Removes every rule and releases every held message.
    pub fn clear(&self) {
        let mut st = self.inner.state.lock();
        st.rules.clear();
        for h in st.held.iter_mut() {
            if h.state == HeldState::Waiting {
                h.state = HeldState::Released;
            }
        }
        self.note(
            &mut st,
            "cleared: no rules, held messages released".to_string(),
        );
        self.refresh_active(&st);
        self.inner.cv.notify_all();
    }

    fn refresh_active(&self, st: &ScriptState) {
        let active = !st.rules.is_empty() || st.held.iter().any(|h| h.state == HeldState::Waiting);
        self.inner.active.store(active, Ordering::Release);
    }

    /// How many messages rule `id` has matched.
    pub fn matched(&self, id: RuleId) -> u64 {
        self.inner
            .state
            .lock()
            .rules
            .iter()
            .find(|r| r.id == id)
            .map_or(0, |r| r.matched)
    }

    /// Every decision so far, in order.
    pub fn events(&self) -> Vec<String> {
        self.inner.state.lock().events.clone()
    }

    /// The messages held now, oldest first.
    pub fn held(&self) -> Vec<Held> {
        self.inner
            .state
            .lock()
            .held
            .iter()
            .filter(|h| h.state == HeldState::Waiting)
            .map(|h| h.info.clone())
            .collect()
    }

    /// Waits up to `timeout` until at least `n` messages are held; returns them (oldest
    /// first), or `None` on timeout.
    pub fn wait_held(&self, n: usize, timeout: Duration) -> Option<Vec<Held>> {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.state.lock();
        loop {
            let held: Vec<Held> = st
                .held
                .iter()
                .filter(|h| h.state == HeldState::Waiting)
                .map(|h| h.info.clone())
                .collect();
            if held.len() >= n {
                return Some(held);
            }
            if st.done || self.inner.cv.wait_until(&mut st, deadline).timed_out() {
                return None;
            }
        }
    }

    /// Moves held message `id`, if it is still waiting, to `to` (released or dropped) and
    /// notes it as `verb`; false if it is not a waiting held message.
    fn decide_held(&self, st: &mut ScriptState, id: HeldId, to: HeldState, verb: &str) -> bool {
        let Some(held) = st
            .held
            .iter_mut()
            .find(|h| h.info.id == id && h.state == HeldState::Waiting)
        else {
            return false;
        };
        held.state = to;
        let line = format!("{verb} held {id}: {}", describe_held(&held.info));
        self.note(st, line);
        true
    }

    /// Lets held message `id` go on and waits until it has been delivered (a request: its
    /// handler returned; a reply: handed to the caller), so that releasing several one after
    /// another delivers them in that order. False if it was not held or not delivered in
    /// time.
    pub fn release(&self, id: HeldId) -> bool {
        let mut st = self.inner.state.lock();
        if !self.decide_held(&mut st, id, HeldState::Released, "release") {
            return false;
        }
        self.inner.cv.notify_all();
        let deadline = Instant::now() + DELIVERY_WAIT;
        loop {
            match st.held.iter().find(|h| h.info.id == id).map(|h| h.state) {
                Some(HeldState::Delivered) | None => {
                    st.held.retain(|h| h.info.id != id);
                    self.refresh_active(&st);
                    return true;
                }
                // The network was cleaned up, or the message's server went away meanwhile.
                Some(HeldState::Dropped) => {
                    st.held.retain(|h| h.info.id != id);
                    self.refresh_active(&st);
                    return false;
                }
                _ => {}
            }
            if st.done || self.inner.cv.wait_until(&mut st, deadline).timed_out() {
                return false;
            }
        }
    }

    /// Loses held message `id`.
    pub fn drop_held(&self, id: HeldId) -> bool {
        let mut st = self.inner.state.lock();
        if !self.decide_held(&mut st, id, HeldState::Dropped, "drop") {
            return false;
        }
        st.held.retain(|h| h.info.id != id);
        self.refresh_active(&st);
        self.inner.cv.notify_all();
        true
    }

    /// Wakes every held message (they are lost) and stops holding: the network is shut down.
    pub(crate) fn shutdown(&self) {
        let mut st = self.inner.state.lock();
        st.done = true;
        for h in st.held.iter_mut() {
            h.state = HeldState::Dropped;
        }
        self.inner.cv.notify_all();
    }

    /// Decides what happens to `m`: holds (blocking the calling thread), delays or crashes
    /// here, and tells the network the rest.
    pub(crate) fn decide(&self, m: &Msg<'_>) -> Verdict {
        let (action, rule_id) = {
            let mut st = self.inner.state.lock();
            let Some(slot) = st
                .rules
                .iter_mut()
                .find(|r| r.rule.limit.is_none_or(|n| r.matched < n) && r.rule.matches(m))
            else {
                return Verdict::Deliver(None);
            };
            slot.matched += 1;
            (slot.rule.action.clone(), slot.id)
        };
        let desc = format!(
            "{} {} {}->{} ({} bytes)",
            match m.dir {
                Dir::Request => "request",
                Dir::Reply => "reply",
            },
            m.method,
            m.from,
            m.to,
            m.bytes.len()
        );
        match action {
            Action::Pass => {
                self.event(format!("rule {rule_id}: pass {desc}"));
                Verdict::Deliver(None)
            }
            Action::Drop => {
                self.event(format!("rule {rule_id}: drop {desc}"));
                Verdict::Drop
            }
            Action::Delay(d) => {
                self.event(format!("rule {rule_id}: delay {d:?} {desc}"));
                self.sleep(d);
                Verdict::Deliver(None)
            }
            Action::Duplicate => {
                self.event(format!("rule {rule_id}: duplicate {desc}"));
                Verdict::Duplicate
            }
            Action::DuplicateLater => {
                self.event(format!(
                    "rule {rule_id}: deliver, and hold a copy of {desc}"
                ));
                Verdict::DuplicateLater
            }
            Action::Crash(f) => {
                self.event(format!("rule {rule_id}: crash, then lose {desc}"));
                f();
                Verdict::Drop
            }
            Action::Hold => {
                let id = self.hold(m, false, rule_id, &desc);
                if self.wait_released(id) {
                    Verdict::Deliver(Some(id))
                } else {
                    Verdict::Drop
                }
            }
        }
    }

    fn event(&self, line: String) {
        let mut st = self.inner.state.lock();
        self.note(&mut st, line);
    }

    /// Registers `m` as held; returns its handle.
    pub(crate) fn hold(&self, m: &Msg<'_>, copy: bool, rule_id: RuleId, desc: &str) -> HeldId {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut st = self.inner.state.lock();
        let line = format!(
            "rule {rule_id}: hold {}{desc} as {id}",
            if copy { "a copy of " } else { "" }
        );
        self.note(&mut st, line);
        let state = if st.done {
            HeldState::Dropped
        } else {
            HeldState::Waiting
        };
        st.held.push(HeldSlot {
            info: Held {
                id,
                dir: m.dir,
                method: m.method.to_string(),
                from: m.from.to_string(),
                to: m.to.to_string(),
                bytes: m.bytes.to_vec(),
                copy,
            },
            state,
        });
        self.inner.active.store(true, Ordering::Release);
        self.inner.cv.notify_all();
        id
    }

    /// Blocks until held message `id` is released (true) or dropped (false).
    pub(crate) fn wait_released(&self, id: HeldId) -> bool {
        let mut st = self.inner.state.lock();
        loop {
            match st.held.iter().find(|h| h.info.id == id).map(|h| h.state) {
                Some(HeldState::Released) => return true,
                Some(HeldState::Waiting) => {}
                _ => return false,
            }
            self.inner.cv.wait(&mut st);
        }
    }

    /// Marks held message `id` delivered (wakes `release`).
    pub(crate) fn delivered(&self, id: HeldId) {
        let mut st = self.inner.state.lock();
        if let Some(h) = st.held.iter_mut().find(|h| h.info.id == id) {
            h.state = HeldState::Delivered;
        }
        self.inner.cv.notify_all();
    }

    fn sleep(&self, d: Duration) {
        let deadline = Instant::now() + d;
        let mut st = self.inner.state.lock();
        while !st.done {
            if self.inner.cv.wait_until(&mut st, deadline).timed_out() {
                return;
            }
        }
    }
}

fn describe_held(h: &Held) -> String {
    format!(
        "{}{} {} {}->{}",
        if h.copy { "copy of " } else { "" },
        match h.dir {
            Dir::Request => "request",
            Dir::Reply => "reply",
        },
        h.method,
        h.from,
        h.to
    )
}
