//! The test harness: persister, server groups, clients and the per-test configuration, in the
//! shape of the Go labs' `tester1` package.

mod adapters;
mod clients;
mod config;
mod group;
pub mod kvtest;
pub mod logging;
mod persister;

pub use crate::labrpc::IService;
pub use adapters::{KvSvc, LabrpcRaftTransport, RaftRpcService, RaftSvc, kv_service, raft_service};
pub use clients::{Clnt, Clnts};
pub use config::{Config, TEST_TIME_LIMIT};
pub use group::{GRP0, ServerGrp, StartFn, Tgid, server_name};
pub use persister::{Persister, PersisterStorage};

use rand::Rng;

/// `n` random characters from the URL-safe base64 alphabet, for end names and client ids.
pub fn randstring(n: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}
