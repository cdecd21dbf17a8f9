//! Generates KV histories that are linearizable by construction, for the checker's tests and
//! benchmark (and for anyone who wants a realistic history to feed it).
//!
//! Each client runs operations back to back with random gaps and durations. Every operation is
//! given a random linearization point inside its interval; running all operations against a
//! real versioned KV store in the order of those points yields the outputs. So the history is
//! linearizable, with as much overlap as the timing parameters make.

use std::collections::HashMap;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::kvapi::{KvErr, Tversion};
use crate::porcupine::Operation;
use crate::porcupine::kv::{KvInput, KvOutput};

/// The shape of a generated history.
#[derive(Clone, Debug)]
pub struct KvHistoryConfig {
    pub clients: usize,
    /// Total operations, spread evenly over the clients.
    pub operations: usize,
    /// Keys are "k0".."k{keys-1}".
    pub keys: usize,
    /// Fraction of operations that are Puts (the rest are Gets).
    pub put_fraction: f64,
    /// Fraction of Puts that carry the key's current version (the rest are stale or ahead,
    /// and fail with ErrVersion).
    pub matching_version_fraction: f64,
    /// Fraction of Puts whose answer is reported as ErrMaybe, as a clerk does after a
    /// retransmission.
    pub maybe_fraction: f64,
    /// Operation duration range, ns.
    pub min_duration_ns: i64,
    pub max_duration_ns: i64,
    /// Maximum idle time between a client's operations, ns.
    pub max_gap_ns: i64,
    pub seed: u64,
}

impl Default for KvHistoryConfig {
    /// 10,000 operations by 50 clients on 5 keys: the size the checker must decide in well
    /// under a second.
    fn default() -> Self {
        KvHistoryConfig {
            clients: 50,
            operations: 10_000,
            keys: 5,
            put_fraction: 0.4,
            matching_version_fraction: 0.6,
            maybe_fraction: 0.1,
            min_duration_ns: 100_000,
            max_duration_ns: 3_000_000,
            max_gap_ns: 500_000,
            seed: 1,
        }
    }
}

struct Planned {
    client_id: usize,
    call: i64,
    return_time: i64,
    linearization_point: i64,
}

/// Generates a linearizable history, ordered by call time.
pub fn linearizable_kv_history(config: &KvHistoryConfig) -> Vec<Operation<KvInput, KvOutput>> {
    let mut rng = SmallRng::seed_from_u64(config.seed);
    let clients = config.clients.max(1);
    let min_duration = config.min_duration_ns.max(0);
    let max_duration = config.max_duration_ns.max(min_duration);

    let mut planned = Vec::with_capacity(config.operations);
    let mut client_clock_ns = vec![0i64; clients];
    for index in 0..config.operations {
        let client_id = index % clients;
        let call = client_clock_ns[client_id] + rng.gen_range(0..=config.max_gap_ns.max(0));
        let return_time = call + rng.gen_range(min_duration..=max_duration);
        client_clock_ns[client_id] = return_time;
        planned.push(Planned {
            client_id,
            call,
            return_time,
            linearization_point: rng.gen_range(call..=return_time),
        });
    }
    planned.sort_by_key(|op| op.linearization_point);

    let mut store: HashMap<String, (String, Tversion)> = HashMap::new();
    let mut history = Vec::with_capacity(planned.len());
    for (serial, op) in planned.iter().enumerate() {
        let key = format!("k{}", rng.gen_range(0..config.keys.max(1)));
        let (current_value, current_version) = store.get(&key).cloned().unwrap_or_default();
        let (input, output) = if rng.gen_bool(config.put_fraction) {
            let version = if rng.gen_bool(config.matching_version_fraction) {
                current_version
            } else if current_version > 0 && rng.gen_bool(0.7) {
                rng.gen_range(0..current_version)
            } else {
                current_version + 1
            };
            let value = format!("c{}-{serial}", op.client_id);
            let err = if version == current_version {
                store.insert(key.clone(), (value.clone(), current_version + 1));
                KvErr::Ok
            } else {
                KvErr::Version
            };
            let err = if rng.gen_bool(config.maybe_fraction) {
                KvErr::Maybe
            } else {
                err
            };
            let input = KvInput::put(key, value, version);
            let output = KvOutput::put(err);
            (input, output)
        } else {
            let err = if current_version == 0 {
                KvErr::NoKey
            } else {
                KvErr::Ok
            };
            let input = KvInput::get(key);
            let output = KvOutput::got(current_value, current_version, err);
            (input, output)
        };
        history.push(Operation {
            client_id: op.client_id,
            input,
            call: op.call,
            output,
            return_time: op.return_time,
        });
    }
    history.sort_by_key(|op| op.call);
    history
}
