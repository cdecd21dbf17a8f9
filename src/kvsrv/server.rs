use crate::kvapi::{GetArgs, GetReply, KvService, PutArgs, PutReply, VersionedStore};

/// The KV server: one [`VersionedStore`]. It keeps no per-client state, so its memory does not
/// grow with the number of clients. A transport serves it as a [`KvService`].
#[derive(Default)]
pub struct KvServer {
    store: VersionedStore,
}

impl KvServer {
    pub fn new() -> KvServer {
        KvServer::default()
    }
}

impl KvService for KvServer {
    fn get(&self, args: GetArgs) -> GetReply {
        self.store.get(&args)
    }

    fn put(&self, args: PutArgs) -> PutReply {
        self.store.put(args)
    }
}
