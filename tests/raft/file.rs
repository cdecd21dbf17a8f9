//! The Lab 3 tests of `tests/raft/lab.rs`, unchanged, with every peer keeping its Raft state
//! in a `storage::FileLog` in a temporary directory instead of the labs' `Persister`: crashes
//! close the peer's files, restarts recover from them. `cargo test --test raft file::` runs
//! them alone (libtest's filters are substrings, and several are or-ed, not and-ed).
//! The 3D log-size check (`Test::log_size`) reads the file logs' state size: hard state and
//! entry records after the snapshot.

/// What `lab.rs` imports as its harness: the file-backed `Test`, everything else as it is,
/// and the child-process runner pointed at this binary's `file::tests::` names.
mod harness {
    pub use raftkv::tester::raft::file::*;

    /// Runs test `name` of `tests/raft/lab.rs` (here `file::tests::<name>`) in a child process.
    pub fn run_test_in_child(name: &str, env: &[(&str, &str)]) -> (bool, String) {
        raftkv::tester::run_test_in_child(&format!("file::tests::{name}"), env)
    }
}

// Named `tests`, not `lab`: a filter `lab::` then selects the labs' own run alone.
#[path = "lab.rs"]
mod tests;
