//! The RESP front end over the plain in-memory map a node's state machine executes with, to try `redis-cli` or `redis-benchmark`
//! against the protocol layer alone (no Raft, no disk):
//!
//! ```sh
//! cargo run --release --example resp_memstore -- 127.0.0.1:7379
//! redis-cli -p 7379 set k v
//! ```

use std::sync::Arc;

use parking_lot::Mutex;
use raftkv::kvapi::{KvCmd, KvMap};
use raftkv::resp::Reply;
use raftkv::resp::server::{RespOptions, RespServer};

fn main() {
    let bind = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7379".into());
    // The same executor as a node's state machine, without the log.
    let data = Mutex::new(KvMap::new());
    let handler = move |command: KvCmd| -> Reply { data.lock().execute(&command).into() };
    let server = match RespServer::start(
        "mem",
        bind.as_str(),
        RespOptions::default(),
        Arc::new(handler),
    ) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("resp_memstore: cannot listen on {bind}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("resp_memstore: RESP on {}", server.local_addr());
    loop {
        std::thread::park();
    }
}
