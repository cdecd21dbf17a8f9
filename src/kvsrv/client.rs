use std::sync::Arc;
use std::time::Duration;

use crate::kvapi::{GetArgs, KvClerk, KvErr, KvTransport, PutArgs, Tversion};

/// Pause between retries of a call that got no reply.
const RETRY_INTERVAL: Duration = Duration::from_millis(10);

/// The Lab 2 clerk: talks to one server and retries until it gets a reply.
pub struct Clerk {
    transport: Arc<dyn KvTransport>,
    server: String,
}

impl Clerk {
    /// A clerk of the server named `server`, reached through `transport`.
    pub fn new(transport: Arc<dyn KvTransport>, server: &str) -> Clerk {
        Clerk {
            transport,
            server: server.to_string(),
        }
    }
}

impl KvClerk for Clerk {
    fn get(&self, key: &str) -> (String, Tversion, KvErr) {
        let args = GetArgs {
            key: key.to_string(),
        };
        loop {
            match self.transport.get(&self.server, &args) {
                Ok(r) => return (r.value, r.version, r.err),
                Err(e) => {
                    log::trace!(target: "kvsrv::clerk", "get {key:?} to {}: {e}; retrying", self.server);
                    std::thread::sleep(RETRY_INTERVAL);
                }
            }
        }
    }

    fn put(&self, key: &str, value: &str, version: Tversion) -> KvErr {
        let args = PutArgs {
            key: key.to_string(),
            value: value.to_string(),
            version,
        };
        let mut first = true;
        loop {
            match self.transport.put(&self.server, &args) {
                // A retry that meets ErrVersion cannot tell whether an earlier attempt
                // succeeded (its reply lost) or someone else's Put got in first.
                Ok(r) if r.err == KvErr::Version && !first => {
                    log::info!(target: "kvsrv::clerk", "put {key:?} v{version}: ErrMaybe: an earlier attempt got no reply and may have been executed");
                    return KvErr::Maybe;
                }
                Ok(r) => return r.err,
                Err(e) => {
                    log::trace!(target: "kvsrv::clerk", "put {key:?} v{version} to {}: {e}; retrying", self.server);
                    first = false;
                    std::thread::sleep(RETRY_INTERVAL);
                }
            }
        }
    }
}
