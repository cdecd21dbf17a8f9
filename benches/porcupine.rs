//! How long the checker takes on the history size the KV tests produce: 10,000 operations by
//! 50 clients on 5 keys, generated linearizable (so the whole search runs to a verdict).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use raftkv::porcupine::kv::KvModel;
use raftkv::porcupine::{CheckResult, check_operations, check_operations_verbose};
use raftkv::tester::histgen::{KvHistoryConfig, linearizable_kv_history};

fn check_kv_10k(c: &mut Criterion) {
    let history = linearizable_kv_history(&KvHistoryConfig::default());
    assert_eq!(check_operations(&KvModel, &history), CheckResult::Ok);
    let mut group = c.benchmark_group("porcupine");
    group.sample_size(20);
    group.bench_function("kv_10k_ops_50_clients", |b| {
        b.iter(|| check_operations(&KvModel, black_box(&history)))
    });
    group.bench_function("kv_10k_ops_50_clients_verbose", |b| {
        b.iter(|| check_operations_verbose(&KvModel, black_box(&history), None))
    });
    group.finish();
}

criterion_group!(benches, check_kv_10k);
criterion_main!(benches);
