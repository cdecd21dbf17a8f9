//! Lab 2: a single-server key/value store with versioned Puts, and a lock built on it.

pub mod rpc;
