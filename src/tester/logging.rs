//! The tests' `log` back end: the crate's one logger ([`crate::logging`], `env_logger`), so
//! nothing is printed unless `RUST_LOG` asks, in its filter syntax: `RUST_LOG=info` or
//! `RUST_LOG=warn,raft::election=debug,labrpc=trace`.

/// Installs the logger once per process; later calls do nothing.
pub fn init() {
    crate::logging::init("", None);
}
