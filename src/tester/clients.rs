//! Test clients: each has its own ends, created on first use, that the tests can cut off.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::randstring;
use crate::labrpc::{ClientEnd, Network, RpcError};

struct ClntState {
    ends: HashMap<String, ClientEnd>,
    /// `None`: every server is allowed; `Some(list)`: only those.
    allowed: Option<Vec<String>>,
    /// Servers cut off one by one with [`Clnt::disconnect`].
    blocked: HashSet<String>,
    /// Set once the client is deleted: its calls fail from then on.
    deleted: bool,
}

impl ClntState {
    fn allows(&self, server: &str) -> bool {
        !self.blocked.contains(server)
            && self
                .allowed
                .as_ref()
                .is_none_or(|l| l.iter().any(|s| s == server))
    }
}

/// A client of the servers on a network, e.g. what a clerk calls through.
pub struct Clnt {
    net: Network,
    state: Mutex<ClntState>,
}

impl Clnt {
    fn new(net: Network, allowed: Option<Vec<String>>) -> Clnt {
        Clnt {
            net,
            state: Mutex::new(ClntState {
                ends: HashMap::new(),
                allowed,
                blocked: HashSet::new(),
                deleted: false,
            }),
        }
    }

    fn end_to(&self, server: &str) -> Option<ClientEnd> {
        let mut st = self.state.lock();
        if st.deleted {
            return None;
        }
        if let Some(e) = st.ends.get(server) {
            return Some(e.clone());
        }
        let end = loop {
            if let Some(e) = self.net.make_end(&randstring(20)) {
                break e;
            }
        };
        self.net.connect(end.name(), server);
        self.net.enable(end.name(), st.allows(server));
        st.ends.insert(server.to_string(), end.clone());
        Some(end)
    }

    /// Calls `method` (`"Service.Method"`) on the server named `server`.
    pub fn call<A: Serialize, R: DeserializeOwned>(
        &self,
        server: &str,
        method: &str,
        args: &A,
    ) -> Result<R, RpcError> {
        match self.end_to(server) {
            Some(end) => end.call(method, args),
            None => Err(RpcError::NoReply),
        }
    }

    /// Allows every server again.
    pub fn connect_all(&self) {
        let mut st = self.state.lock();
        st.allowed = None;
        st.blocked.clear();
        for e in st.ends.values() {
            self.net.enable(e.name(), true);
        }
    }

    /// Allows exactly `servers`.
    pub fn connect_to(&self, servers: &[String]) {
        let mut st = self.state.lock();
        st.allowed = Some(servers.to_vec());
        st.blocked.clear();
        for (name, e) in &st.ends {
            self.net.enable(e.name(), st.allows(name));
        }
    }

    /// Cuts this client off from `server`.
    pub fn disconnect(&self, server: &str) {
        let mut st = self.state.lock();
        st.blocked.insert(server.to_string());
        if let Some(e) = st.ends.get(server) {
            self.net.enable(e.name(), false);
        }
    }

    /// Cuts this client off from every server, including ones it has not called yet.
    pub fn disconnect_all(&self) {
        let mut st = self.state.lock();
        st.allowed = Some(Vec::new());
        for e in st.ends.values() {
            self.net.enable(e.name(), false);
        }
    }

    fn delete_ends(&self) {
        let mut st = self.state.lock();
        st.deleted = true;
        for (_, e) in st.ends.drain() {
            self.net.delete_end(e.name());
        }
    }
}

/// Every client of a test, so that they can be deleted together.
pub struct Clnts {
    net: Network,
    clnts: Mutex<Vec<Arc<Clnt>>>,
}

impl Clnts {
    pub(crate) fn new(net: Network) -> Clnts {
        Clnts {
            net,
            clnts: Mutex::new(Vec::new()),
        }
    }

    /// A client allowed to call every server.
    pub fn make_client(&self) -> Arc<Clnt> {
        self.register(Clnt::new(self.net.clone(), None))
    }

    /// A client allowed to call only `servers`.
    pub fn make_client_to(&self, servers: &[String]) -> Arc<Clnt> {
        self.register(Clnt::new(self.net.clone(), Some(servers.to_vec())))
    }

    fn register(&self, c: Clnt) -> Arc<Clnt> {
        let c = Arc::new(c);
        self.clnts.lock().push(c.clone());
        c
    }

    /// Deletes the client's ends from the network; its later calls get no reply.
    pub fn delete_client(&self, clnt: &Arc<Clnt>) {
        clnt.delete_ends();
        self.clnts.lock().retain(|c| !Arc::ptr_eq(c, clnt));
    }

    pub(crate) fn cleanup(&self) {
        for c in self.clnts.lock().drain(..) {
            c.delete_ends();
        }
    }
}
