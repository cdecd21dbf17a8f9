//! The test harness: persister, server groups, clients and the per-test configuration, in the
//! shape of the Go labs' `tester1` package.

mod adapters;
mod clients;
mod config;
mod group;
pub mod histgen;
pub mod kvraft;
pub mod kvsrv;
pub mod kvtest;
pub mod logging;
mod persister;
pub mod raft;
pub mod shardkv;

pub use crate::labrpc::IService;
pub use adapters::{
    KvSvc, LabrpcRaftTransport, RaftRpcService, RaftSvc, Solo, call_error, kv_service, raft_service,
};
pub use clients::{Clnt, Clnts};
pub use config::{Config, TEST_TIME_LIMIT};
pub use group::{GRP0, ServerGrp, StartFn, Tgid, server_name};
pub use persister::{Persister, PersisterStorage};

use std::any::Any;
use std::thread::JoinHandle;

use rand::Rng;

/// Joins a test's helper thread; if it panicked (a failed check), panics here with the same
/// payload, so the failure fails the test with its message.
pub fn join_helper<T>(h: JoinHandle<T>) -> T {
    match h.join() {
        Ok(v) => v,
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

/// Runs test `name` of the current test binary in a child process with `env` set, and
/// returns whether it passed and everything it printed. For tests that show a harness check
/// fails on a deliberately broken variant (some checks end the process, as Go's do).
pub fn run_test_in_child(name: &str, env: &[(&str, &str)]) -> (bool, String) {
    // /proc/self/exe still runs this binary if a rebuild has replaced its file meanwhile.
    let proc_exe = std::path::PathBuf::from("/proc/self/exe");
    let exe = if proc_exe.exists() {
        proc_exe
    } else {
        match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => panic!("cannot find the test binary: {e}"),
        }
    };
    // The child gets a temporary directory of its own, removed when it has ended: a child
    // that fails exits without running its drops, and would leave its files behind.
    static NEXT_CHILD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = std::env::temp_dir().join(format!(
        "raftkv-child-{}-{}",
        std::process::id(),
        NEXT_CHILD.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    if let Err(e) = std::fs::create_dir_all(&tmp) {
        panic!("cannot create {} for a child test: {e}", tmp.display());
    }
    let out = std::process::Command::new(exe)
        .args(["--exact", name, "--test-threads=1", "--nocapture"])
        .envs(env.iter().copied())
        .env("TMPDIR", &tmp)
        .stdin(std::process::Stdio::null())
        .output();
    let _ = std::fs::remove_dir_all(&tmp);
    match out {
        Ok(out) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => panic!("cannot run test {name} in a child process: {e}"),
    }
}

/// The message a panic carried (`panic!` with a string literal or a formatted string).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// `n` random characters from the URL-safe base64 alphabet, for end names and client ids.
pub fn randstring(n: usize) -> String {
    random_chars(
        n,
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
    )
}

/// `n` characters drawn at random from `alphabet` (ASCII).
pub fn random_chars(n: usize, alphabet: &[u8]) -> String {
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| alphabet[rng.gen_range(0..alphabet.len())] as char)
        .collect()
}
