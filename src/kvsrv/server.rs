use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::rpc::{GetArgs, GetReply, KvErr, PutArgs, PutReply, Tversion};
use crate::labrpc::{ClientEnd, Service};
use crate::tester::{IService, Persister, Tgid};

/// The KV server: a map from key to value and version. It keeps no per-client state, so its
/// memory does not grow with the number of clients.
#[derive(Default)]
pub struct KvServer {
    data: Mutex<HashMap<String, (String, Tversion)>>,
}

impl KvServer {
    pub fn new() -> KvServer {
        KvServer::default()
    }

    pub fn get(&self, args: GetArgs) -> GetReply {
        match self.data.lock().get(&args.key) {
            Some((value, version)) => GetReply {
                value: value.clone(),
                version: *version,
                err: KvErr::Ok,
            },
            None => GetReply {
                value: String::new(),
                version: 0,
                err: KvErr::NoKey,
            },
        }
    }

    pub fn put(&self, args: PutArgs) -> PutReply {
        let mut data = self.data.lock();
        let err = match data.get_mut(&args.key) {
            Some((value, version)) if *version == args.version => {
                *value = args.value;
                *version += 1;
                KvErr::Ok
            }
            Some(_) => KvErr::Version,
            None if args.version == 0 => {
                data.insert(args.key, (args.value, 1));
                KvErr::Ok
            }
            None => KvErr::NoKey,
        };
        PutReply { err }
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
