//! The file log (`storage::FileLog`) against the labs' persister:
//!
//! - `append_fsync_100b`: append one 100-byte entry and sync (one fsync).
//! - `group_commit/N`: N entries per sync (1, 16, 256); throughput in entries.
//! - `recovery`: open and restore a log of `RAFTKV_BENCH_RECOVERY_MB` MB (default 1024) of
//!   4 KB entries.
//! - `persist_vs_log_length/{persister,file_log}/L`: one append + sync on a log already holding
//!   L entries of 100 bytes: the persister encodes the entry and saves a header plus a range
//!   of the entries it keeps encoded; the file log appends a record.
//!
//! Data directories go under `RAFTKV_BENCH_DIR` (default: the system temp dir); an fsync's
//! cost is the disk's.

use std::path::PathBuf;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use raftkv::raft::Storage;
use raftkv::raft::log::Entry;
use raftkv::storage::{FileLog, FileLogOptions};
use raftkv::tester::{Persister, PersisterStorage};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let base = std::env::var_os("RAFTKV_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("raftkv-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create bench dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn entry(len: usize) -> Entry {
    Entry {
        term: 1,
        command: vec![0x5a; len],
    }
}

fn open(dir: &TempDir) -> (FileLog, u64) {
    let log = FileLog::open(&dir.0, FileLogOptions::default()).expect("open");
    let last = log.restore().expect("restore").log.last_index();
    (log, last)
}

fn append_fsync(c: &mut Criterion) {
    let dir = TempDir::new("append");
    let (log, mut last) = open(&dir);
    let e = [entry(100)];
    c.bench_function("append_fsync_100b", |b| {
        b.iter(|| {
            log.append(last + 1, &e).unwrap();
            log.sync().unwrap();
            last += 1;
        })
    });
}

fn group_commit(c: &mut Criterion) {
    let mut g = c.benchmark_group("group_commit");
    for n in [1u64, 16, 256] {
        let dir = TempDir::new(&format!("group-{n}"));
        let (log, mut last) = open(&dir);
        let batch: Vec<Entry> = (0..n).map(|_| entry(100)).collect();
        g.throughput(Throughput::Elements(n));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                log.append(last + 1, &batch).unwrap();
                log.sync().unwrap();
                last += n;
            })
        });
    }
    g.finish();
}

fn recovery(c: &mut Criterion) {
    let mb: u64 = std::env::var("RAFTKV_BENCH_RECOVERY_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let dir = TempDir::new("recovery");
    let n = mb * 256; // 4 KB entries
    {
        let (log, _) = open(&dir);
        let batch: Vec<Entry> = (0..256).map(|_| entry(4096 - 29)).collect();
        let mut next = 1;
        while next <= n {
            log.append(next, &batch).unwrap();
            log.sync().unwrap();
            next += batch.len() as u64;
        }
    }
    let mut g = c.benchmark_group("recovery");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.bench_function(format!("{mb}MB"), |b| {
        b.iter(|| {
            let (log, last) = open(&dir);
            assert!(last >= n);
            drop(log);
        })
    });
    g.finish();
}

fn persist_vs_log_length(c: &mut Criterion) {
    let mut g = c.benchmark_group("persist_vs_log_length");
    g.sample_size(20);
    let e = [entry(100)];
    for len in [1_000u64, 10_000, 100_000] {
        let prefill: Vec<Entry> = (0..len).map(|_| entry(100)).collect();

        let p = PersisterStorage::new(Persister::new());
        p.restore().unwrap();
        p.append(1, &prefill).unwrap();
        p.sync().unwrap();
        let mut last = len;
        g.bench_with_input(BenchmarkId::new("persister", len), &len, |b, _| {
            b.iter(|| {
                p.append(last + 1, &e).unwrap();
                p.sync().unwrap();
                last += 1;
            })
        });

        let dir = TempDir::new(&format!("len-{len}"));
        let (log, _) = open(&dir);
        log.append(1, &prefill).unwrap();
        log.sync().unwrap();
        let mut last = len;
        g.bench_with_input(BenchmarkId::new("file_log", len), &len, |b, _| {
            b.iter(|| {
                log.append(last + 1, &e).unwrap();
                log.sync().unwrap();
                last += 1;
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    append_fsync,
    group_commit,
    persist_vs_log_length,
    recovery
);
criterion_main!(benches);
