//! Lab 2: a single-server key/value store with versioned Puts, and a lock built on it.
//!
//! The server keeps, for each key, a value and a version. A Put names the version it expects;
//! it succeeds and bumps the version only if that matches. The clerk retries lost RPCs, which
//! is why a Put can come back [`KvErr::Maybe`](crate::kvapi::KvErr::Maybe).

mod client;
pub mod lock;
mod server;

pub use client::Clerk;
pub use server::KvServer;
