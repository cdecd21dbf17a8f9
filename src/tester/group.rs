//! Groups of servers: started, shut down, restarted, connected, disconnected and partitioned
//! the way the Go labs' tester does it.

use std::sync::Arc;

use parking_lot::Mutex;

use super::{Persister, randstring};
use crate::labrpc::{ClientEnd, IService, Network, Server};

/// A group id. Lab 3 and 4 use one group, [`GRP0`]; Lab 5 has several.
pub type Tgid = usize;
pub const GRP0: Tgid = 0;

/// Starts server `srv` of group `gid`: `ends[j]` reaches peer `j` (itself included) and
/// `persister` holds what the previous instance saved. Returns what it runs, in the order
/// they are to be killed.
pub type StartFn =
    Arc<dyn Fn(Vec<ClientEnd>, Tgid, usize, Persister) -> Vec<Arc<dyn IService>> + Send + Sync>;

/// `server-<gid>-<i>`: the network name of server `i` of group `gid`.
pub fn server_name(gid: Tgid, i: usize) -> String {
    format!("server-{gid}-{i}")
}

/// One member's slot: the ends it calls its peers with, its persister and what it runs.
struct Member {
    ends: Vec<ClientEnd>,
    saved: Persister,
    services: Vec<Arc<dyn IService>>,
}

struct GrpState {
    members: Vec<Member>,
    connected: Vec<bool>,
}

pub struct ServerGrp {
    net: Network,
    gid: Tgid,
    start_fn: StartFn,
    state: Mutex<GrpState>,
}

impl ServerGrp {
    pub(crate) fn new(net: Network, gid: Tgid, n: usize, start_fn: StartFn) -> ServerGrp {
        let members = (0..n)
            .map(|_| Member {
                ends: Vec::new(),
                saved: Persister::new(),
                services: Vec::new(),
            })
            .collect();
        ServerGrp {
            net,
            gid,
            start_fn,
            state: Mutex::new(GrpState {
                members,
                connected: vec![false; n],
            }),
        }
    }

    pub fn gid(&self) -> Tgid {
        self.gid
    }

    pub fn n(&self) -> usize {
        self.state.lock().members.len()
    }

    pub fn srv_name(&self, i: usize) -> String {
        server_name(self.gid, i)
    }

    pub fn srv_names(&self) -> Vec<String> {
        (0..self.n()).map(|i| self.srv_name(i)).collect()
    }

    pub fn srv_names_to(&self, to: &[usize]) -> Vec<String> {
        to.iter().map(|&i| self.srv_name(i)).collect()
    }

    /// What server `i` currently runs (empty while it is shut down).
    pub fn services(&self, i: usize) -> Vec<Arc<dyn IService>> {
        self.state.lock().members[i].services.clone()
    }

    pub fn is_connected(&self, i: usize) -> bool {
        self.state.lock().connected[i]
    }

    pub fn get_connected(&self) -> Vec<bool> {
        self.state.lock().connected.clone()
    }

    /// The largest persisted Raft state in the group, in bytes.
    pub fn log_size(&self) -> usize {
        self.largest_saved(Persister::raft_state_size)
    }

    /// The largest persisted snapshot in the group, in bytes.
    pub fn snapshot_size(&self) -> usize {
        self.largest_saved(Persister::snapshot_size)
    }

    /// The largest `size` of what a member persisted.
    fn largest_saved(&self, size: impl Fn(&Persister) -> usize) -> usize {
        let st = self.state.lock();
        st.members.iter().map(|m| size(&m.saved)).max().unwrap_or(0)
    }

    /// RPCs delivered to server `i`.
    pub fn rpc_count(&self, i: usize) -> usize {
        self.net.count(&self.srv_name(i))
    }

    /// The persister server `i` uses now.
    pub fn persister(&self, i: usize) -> Persister {
        self.state.lock().members[i].saved.clone()
    }

    /// Starts (or restarts) server `i` from a copy of what it last saved, with fresh ends to
    /// every peer. Enables no ends: call [`connect_one`](Self::connect_one) or
    /// [`connect_all`](Self::connect_all).
    pub fn start_server(&self, i: usize) {
        let n = self.n();
        let ends: Vec<ClientEnd> = (0..n)
            .map(|j| {
                let end = loop {
                    if let Some(e) = self.net.make_end(&randstring(20)) {
                        break e;
                    }
                };
                self.net.connect(end.name(), &self.srv_name(j));
                // The script (exact network control) matches senders by this label.
                self.net.set_end_owner(end.name(), &self.srv_name(i));
                end
            })
            .collect();
        let saved = {
            let mut st = self.state.lock();
            let m = &mut st.members[i];
            m.saved = m.saved.copy();
            m.ends = ends.clone();
            m.saved.clone()
        };
        // Not under the group lock: starting a server may take a while and may call back.
        let services = (self.start_fn)(ends, self.gid, i, saved);
        let mut server = Server::new();
        for s in &services {
            if let Some(svc) = s.clone().rpc_service() {
                server.add_service(svc);
            }
        }
        self.state.lock().members[i].services = services;
        self.net.add_server(&self.srv_name(i), server);
    }

    /// Starts every server, then connects them all.
    pub fn start_servers(&self) {
        for i in 0..self.n() {
            self.start_server(i);
        }
        self.connect_all();
    }

    /// Crashes server `i`: cuts it off, deletes it from the network (in-flight calls to it
    /// fail), keeps what it has persisted so far and kills what it runs. Whatever the killed
    /// instance writes afterwards is lost.
    pub fn shutdown_server(&self, i: usize) {
        let all: Vec<usize> = (0..self.n()).collect();
        self.disconnect(i, &all);
        self.net.delete_server(&self.srv_name(i));
        let services = {
            let mut st = self.state.lock();
            let m = &mut st.members[i];
            m.saved = m.saved.copy();
            std::mem::take(&mut m.services)
        };
        for s in services {
            s.kill();
        }
    }

    pub fn shutdown(&self) {
        for i in 0..self.n() {
            self.shutdown_server(i);
        }
    }

    /// Marks `i` connected and enables its ends to, and the ends from, every connected server
    /// in `to`.
    pub fn connect(&self, i: usize, to: &[usize]) {
        let mut st = self.state.lock();
        st.connected[i] = true;
        for &j in to {
            if st.connected[j] {
                if let Some(e) = st.members[i].ends.get(j) {
                    self.net.enable(e.name(), true);
                }
                if let Some(e) = st.members[j].ends.get(i) {
                    self.net.enable(e.name(), true);
                }
            }
        }
    }

    /// Marks `i` disconnected and disables its ends to, and the ends from, every server in `from`.
    pub fn disconnect(&self, i: usize, from: &[usize]) {
        let mut st = self.state.lock();
        st.connected[i] = false;
        for &j in from {
            if let Some(e) = st.members[i].ends.get(j) {
                self.net.enable(e.name(), false);
            }
            if let Some(e) = st.members[j].ends.get(i) {
                self.net.enable(e.name(), false);
            }
        }
    }

    pub fn connect_one(&self, i: usize) {
        let all: Vec<usize> = (0..self.n()).collect();
        self.connect(i, &all);
    }

    pub fn connect_all(&self) {
        for i in 0..self.n() {
            self.connect_one(i);
        }
    }

    pub fn disconnect_all(&self, i: usize) {
        let all: Vec<usize> = (0..self.n()).collect();
        self.disconnect(i, &all);
    }

    /// Splits the group into `p1` and `p2`; afterwards every server is marked connected.
    pub fn partition(&self, p1: &[usize], p2: &[usize]) {
        for &i in p1 {
            self.disconnect(i, p2);
            self.connect(i, p1);
        }
        for &i in p2 {
            self.disconnect(i, p1);
            self.connect(i, p2);
        }
    }

    /// A majority without `leader`, and the rest with `leader` last.
    pub fn make_partition(&self, leader: usize) -> (Vec<usize>, Vec<usize>) {
        let n = self.n();
        let others: Vec<usize> = (0..n).filter(|&i| i != leader).collect();
        let majority = n / 2 + 1;
        let p1 = others[..majority.min(others.len())].to_vec();
        let mut p2 = others[majority.min(others.len())..].to_vec();
        p2.push(leader);
        (p1, p2)
    }

    /// Kills every service without touching the persisters (test cleanup).
    pub(crate) fn kill_all(&self) {
        let services: Vec<Arc<dyn IService>> = {
            let mut st = self.state.lock();
            st.members
                .iter_mut()
                .flat_map(|m| std::mem::take(&mut m.services))
                .collect()
        };
        for s in services {
            s.kill();
        }
    }
}
