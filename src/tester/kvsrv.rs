//! The tester's side of Lab 2 (the Go labs' `kvsrv1/test.go`): one KV server on a fresh
//! network, and clerks that each get their own test client.

use std::sync::Arc;

use crate::kvapi::KvClerk;
use crate::kvsrv::{Clerk, KvServer};
use crate::labrpc::{ClientEnd, IService};
use crate::tester::Clnt;
use crate::tester::kvtest::{ClerkFactory, KvTest};
use crate::tester::{Config, GRP0, KvSvc, Persister, Tgid, server_name};

/// The tester's start function for Lab 2: one KV server, no peers, nothing persisted.
pub fn start_kv_server(
    _ends: Vec<ClientEnd>,
    _gid: Tgid,
    _srv: usize,
    _persister: Persister,
) -> Vec<Arc<dyn IService>> {
    vec![Arc::new(KvSvc::new(Arc::new(KvServer::new()), || {}))]
}

/// A Lab 2 test: one KV server, reliable network or not.
pub fn make_test_kv(reliable: bool) -> Arc<KvTest> {
    let cfg = Config::new(1, reliable, Arc::new(start_kv_server));
    let maker = Arc::new(ClerkFactory::new(cfg.clone(), |clnt: &Arc<Clnt>| {
        Arc::new(Clerk::new(clnt.clone(), &server_name(GRP0, 0))) as Arc<dyn KvClerk>
    }));
    Arc::new(KvTest::new(cfg, false, maker))
}
