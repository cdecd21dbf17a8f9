//! Lab 3 (3A–3D): the tests of the Go labs' `raft1/raft_test.go` (Spring 2025), in
//! `tests/raft/lab.rs`, run twice in this one binary:
//! - `lab::` on the labs' `Persister`, as the Go tests run;
//! - `file::tests::` unchanged, with every peer keeping its Raft state in a crash-safe
//!   `storage::FileLog` in a temporary directory (`tests/raft/file.rs`).
//!
//! `cargo test --release --test raft 3b` runs one part on both; `-- lab::` only the lab's own
//! run, `-- file::` only the file log's. Both sets mostly sleep, so they run side by side and
//! the binary lasts about as long as its longest test, not the two sets in a row.

// `tests/raft/lab.rs` is loaded twice on purpose: once per harness.
#![allow(clippy::duplicate_mod)]

/// The labs' harness, with the child-process runner pointed at this binary's `lab::` names.
mod harness {
    pub use raftkv::tester::raft::*;

    /// Runs test `name` of `tests/raft/lab.rs` (here `lab::<name>`) in a child process.
    pub fn run_test_in_child(name: &str, env: &[(&str, &str)]) -> (bool, String) {
        raftkv::tester::run_test_in_child(&format!("lab::{name}"), env)
    }
}

#[path = "raft/file.rs"]
mod file;
#[path = "raft/lab.rs"]
mod lab;
