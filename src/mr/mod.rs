//! Lab 1: MapReduce with real processes talking over a Unix-domain socket.
//!
//! One coordinator process ([`Coordinator`]) hands out map and reduce tasks; any number of
//! worker processes ([`run_worker`]) ask it for work, run the application's map or reduce
//! function, and report back. Workers write intermediate files `mr-X-Y` (map task X, reduce
//! bucket Y) and outputs `mr-out-Y` in their current directory, each through a temporary file
//! and a rename, so nobody ever sees a half-written file.
//!
//! | file | owns |
//! |---|---|
//! | [`schedule`] | the coordinator's task state machine; pure, clock injected, unit-tested |
//! | [`coordinator`] | the RPC server thread around a [`Schedule`] |
//! | [`worker`] | the worker loop, map and reduce execution, [`KeyValue`], [`ihash`] |
//! | [`rpc`] | message types, socket path, length-prefixed frames |
//! | [`apps`] | the lab's eight applications (`wc`, `indexer`, …) |
//! | [`sequential`] | the single-process reference run (`mrsequential`) |
//! | [`textgen`] | the deterministic Zipf-like text generator (`mrgen`) |
//! | [`cli`] | argument parsing and logging shared by the binaries |
//!
//! A worker for your own map and reduce functions is a three-line `main`:
//!
//! ```no_run
//! use raftkv::mr::{KeyValue, apps::words, worker_main};
//!
//! fn map(_file: &str, contents: &str) -> Vec<KeyValue> {
//!     words(contents).map(|w| KeyValue::new(w.to_lowercase(), "1")).collect()
//! }
//!
//! fn reduce(_key: &str, values: &[String]) -> String {
//!     values.len().to_string()
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     worker_main(map, reduce)
//! }
//! ```
//!
//! Nothing here panics on bad input: unreadable or non-UTF-8 files, bad flags and unknown
//! applications come back as [`MrError`].

pub mod apps;
pub mod cli;
pub mod coordinator;
mod error;
pub mod rpc;
pub mod schedule;
pub mod sequential;
pub mod textgen;
pub mod worker;

pub use apps::App;
pub use coordinator::Coordinator;
pub use error::MrError;
pub use schedule::Schedule;
pub use worker::{KeyValue, WorkerExit, ihash, run_worker, worker_main};

/// The number of reduce tasks `mrcoordinator` uses, as in the lab.
pub const N_REDUCE: usize = 10;
