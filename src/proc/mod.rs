//! The process kit of the `raftkv` cluster: what runs a node as a process and what starts and
//! watches such processes.
//!
//! * [`status`]: a node's status file (`DIR/status`, JSON), written by `serve`, read by
//!   `local`, the chaos driver and the cluster tests;
//! * [`spawn`]: the one `raftkv serve` spawner ([`ServeSpec`], [`NodeProcess`]: own process
//!   group, `--stop-on-stdin-eof`, signals only to a child not yet reaped) and [`leader_of`];
//! * [`serve`]: `raftkv serve`, the node's main loop;
//! * [`local`]: `raftkv local`, the supervisor of a local cluster;
//! * [`member`]: `raftkv member`, the operator's membership commands;
//! * [`ports`]: loopback ports for local clusters, claimed against every other process
//!   picking them while the cluster lives.
//!
//! `src/bin/raftkv.rs` only parses the command line and calls these.

pub mod local;
pub mod member;
pub mod ports;
pub mod serve;
pub mod spawn;
pub mod status;

pub use spawn::{NodeProcess, ServeSpec, leader_of};
pub use status::NodeStatusFile;
