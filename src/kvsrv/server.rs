use std::sync::Arc;

use crate::kvapi::{GetArgs, GetReply, PutArgs, PutReply, VersionedStore};
use crate::labrpc::{ClientEnd, Service};
use crate::tester::{IService, Persister, Tgid};

/// The KV server: one [`VersionedStore`]. It keeps no per-client state, so its memory does not
/// grow with the number of clients.
#[derive(Default)]
pub struct KvServer {
    store: VersionedStore,
}

impl KvServer {
    pub fn new() -> KvServer {
        KvServer::default()
    }

    pub fn get(&self, args: GetArgs) -> GetReply {
        self.store.get(&args)
    }

    pub fn put(&self, args: PutArgs) -> PutReply {
        self.store.put(args)
    }
}

impl IService for KvServer {
    fn kill(&self) {}

    fn rpc_service(self: Arc<Self>) -> Option<Service> {
        let getter = self.clone();
        Some(
            Service::new("KVServer")
                .method("Get", move |a: GetArgs| getter.get(a))
                .method("Put", move |a: PutArgs| self.put(a)),
        )
    }
}

/// The tester's start function for Lab 2: one KV server, no peers, nothing persisted.
pub fn start_kv_server(
    _ends: Vec<ClientEnd>,
    _gid: Tgid,
    _srv: usize,
    _persister: Persister,
) -> Vec<Arc<dyn IService>> {
    vec![Arc::new(KvServer::new())]
}
