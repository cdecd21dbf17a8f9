//! raftkv: the MIT 6.5840 (Spring 2025) distributed-systems labs in Rust.
//!
//! | lab | module |
//! |---|---|
//! | 1 | [`mr`]: MapReduce coordinator and workers |
//! | 2 | [`kvsrv`]: single-server versioned KV and a lock on it |
//! | 3 | [`raft`]: Raft with persistence and snapshots |
//! | 4 | [`rsm`]: the replicated state machine every service runs on Raft (typed ops and replies); [`kvraft`]: the linearizable KV service on it |
//! | 5 | [`shardkv`]: sharded KV over Raft groups, with a shard controller |
//! | — | [`kvapi`]: the KV request/reply types, clerk trait, versioned store and transport seam every KV lab shares |
//! | — | [`storage`]: `FileLog`, a crash-safe Raft log on disk |
//! | — | [`net`]: RPC over TCP (threads, pipelined calls, re-dial, bounded frames and handlers) and a fault-injecting proxy |
//! | — | [`resp`]: the Redis wire protocol (RESP2) and the command table of the KV service |
//! | — | [`session`]: exactly-once table (client id, sequence number, last reply) for a replicated state machine |
//! | — | [`node`]: one `raftkv` node (Raft over TCP on the file log, the KV state machine, the RESP front end) |
//! | — | [`chaos`]: `raftkv chaos`, faults injected into a local cluster and the clients' history checked for linearizability |
//! | — | [`proc`]: the process kit: a node's status file, the one `raftkv serve` spawner, `serve`'s main loop and the `local` supervisor |
//! | — | [`signal`]: sending signals to child processes (never once reaped), and SIGINT/SIGTERM as a flag |
//! | — | [`logging`]: the one `log` back end (`env_logger`, `RUST_LOG` filter syntax) of every binary and the tests |
//! | — | [`labrpc`], [`labcodec`], [`porcupine`]: simulated network, codec, linearizability checker |
//! | — | [`dispatch`]: the services and methods a server answers, found by `"Service.Method"` (labrpc's and `net`'s one registry) |
//! | — | `tester` and the labs' `harness` modules: test support, built only with the `testing` feature (the tests and benches turn it on) |
//!
//! See `ARCHITECTURE.md` at the repository root for how the parts fit.

pub mod chaos;
pub mod dispatch;
pub mod kvapi;
pub mod kvraft;
pub mod kvsrv;
pub mod labcodec;
#[cfg(feature = "testing")]
pub mod labrpc;
pub mod logging;
pub mod mr;
pub mod net;
pub mod node;
pub mod oneshot;
pub mod porcupine;
pub mod proc;
pub mod raft;
pub mod resp;
pub mod rsm;
pub mod session;
pub mod shardkv;
pub mod signal;
pub mod storage;
#[cfg(feature = "testing")]
pub mod tester;
