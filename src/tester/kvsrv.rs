//! The tester's side of Lab 2 (the Go labs' `kvsrv1/test.go`): one KV server on a fresh
//! network, and clerks that each get their own test client.

use std::sync::Arc;

use crate::kvsrv::{Clerk, KvServer};
use crate::labrpc::{ClientEnd, IService};
use crate::tester::kvtest::{ClerkMaker, KvTest, TestClerk};
use crate::tester::{Clnts, Config, GRP0, KvSvc, Persister, Tgid, server_name};

/// The tester's start function for Lab 2: one KV server, no peers, nothing persisted.
pub fn start_kv_server(
    _ends: Vec<ClientEnd>,
    _gid: Tgid,
    _srv: usize,
    _persister: Persister,
) -> Vec<Arc<dyn IService>> {
    vec![Arc::new(KvSvc::new(Arc::new(KvServer::new()), || {}))]
}

struct Maker {
    cfg: Arc<Config>,
}

impl ClerkMaker for Maker {
    fn make_clerk(&self) -> TestClerk {
        let clnt = self.cfg.clnts().make_client();
        TestClerk {
            ck: Arc::new(Clerk::new(clnt.clone(), &server_name(GRP0, 0))),
            clnt,
        }
    }

    fn delete_clerk(&self, ck: &TestClerk) {
        let clnts: &Clnts = self.cfg.clnts();
        clnts.delete_client(&ck.clnt);
    }
}

/// A Lab 2 test: one KV server, reliable network or not.
pub fn make_test_kv(reliable: bool) -> Arc<KvTest> {
    let cfg = Config::new(1, reliable, Arc::new(start_kv_server));
    let maker = Arc::new(Maker { cfg: cfg.clone() });
    Arc::new(KvTest::new(cfg, false, maker))
}
