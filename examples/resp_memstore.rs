//! The RESP front end over a plain in-memory map, to try `redis-cli` or `redis-benchmark`
//! against the protocol layer alone (no Raft, no disk):
//!
//! ```sh
//! cargo run --release --example resp_memstore -- 127.0.0.1:7379
//! redis-cli -p 7379 set k v
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use raftkv::resp::command::NOT_AN_INTEGER;
use raftkv::resp::server::{RespOptions, RespServer};
use raftkv::resp::{Command, Reply};

/// Key → (value, version).
type Versioned = HashMap<Vec<u8>, (Vec<u8>, u64)>;

fn main() {
    let bind = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7379".into());
    let data: Mutex<Versioned> = Mutex::new(HashMap::new());
    let handler = move |command: Command| -> Reply {
        let mut data = data.lock();
        let value =
            |v: Option<&(Vec<u8>, u64)>| v.map_or(Reply::Null, |(v, _)| Reply::Bulk(v.clone()));
        match command {
            Command::Ping(None) => Reply::Simple("PONG".into()),
            Command::Ping(Some(message)) => Reply::Bulk(message),
            Command::Get(key) => value(data.get(&key)),
            Command::Set { key, value } => {
                let version = data.get(&key).map_or(0, |(_, ver)| *ver) + 1;
                data.insert(key, (value, version));
                Reply::ok()
            }
            Command::Del(keys) => {
                Reply::Integer(keys.iter().filter(|k| data.remove(*k).is_some()).count() as i64)
            }
            Command::Exists(keys) => {
                Reply::Integer(keys.iter().filter(|k| data.contains_key(*k)).count() as i64)
            }
            Command::Incr(key) => {
                let (old, version) = data.get(&key).cloned().unwrap_or((b"0".to_vec(), 0));
                match std::str::from_utf8(&old)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                {
                    Some(n) if n < i64::MAX => {
                        data.insert(key, ((n + 1).to_string().into_bytes(), version + 1));
                        Reply::Integer(n + 1)
                    }
                    _ => Reply::Error(NOT_AN_INTEGER.into()),
                }
            }
            Command::MGet(keys) => Reply::Array(keys.iter().map(|k| value(data.get(k))).collect()),
            Command::VGet(key) => data
                .get(&key)
                .map_or(Reply::Null, |(v, ver)| Reply::versioned(v.clone(), *ver)),
            Command::VSet {
                key,
                value,
                version,
            } => {
                if data.get(&key).map_or(0, |(_, ver)| *ver) != version {
                    return Reply::err_version();
                }
                data.insert(key, (value, version + 1));
                Reply::ok()
            }
            Command::DbSize => Reply::Integer(data.len() as i64),
            Command::Quit => Reply::ok(),
            Command::Member(_) => Reply::Error("ERR no membership here".into()),
        }
    };
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
