//! The linearizability checker on hand-made histories of a register and of the versioned KV
//! store, on large generated histories, and its visualization.

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use crate::kvapi::KvErr;
use crate::porcupine::history::EventFault;
use crate::porcupine::kv::{KvInput, KvModel, KvOp, KvOutput, KvState};
use crate::porcupine::{
    CheckOptions, CheckResult, Event, EventKind, EventValue, Model, Operation, check_events,
    check_events_verbose, check_operations, check_operations_timeout, check_operations_verbose,
    check_operations_with, visualize,
};
use crate::tester::histgen::{KvHistoryConfig, linearizable_kv_history};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------------------------
// A read/write register of integers, initially 0.

#[derive(Clone, Debug)]
enum RegisterInput {
    Write(i64),
    Read,
}

struct Register;

impl Model for Register {
    type State = i64;
    type Input = RegisterInput;
    /// What a Read returned; ignored for a Write.
    type Output = i64;

    fn init(&self) -> i64 {
        0
    }

    fn step(&self, state: &i64, input: &RegisterInput, output: &i64) -> Option<i64> {
        match input {
            RegisterInput::Write(value) => Some(*value),
            RegisterInput::Read => (output == state).then_some(*state),
        }
    }

    fn open_output(&self, input: &RegisterInput) -> Option<i64> {
        matches!(input, RegisterInput::Write(_)).then_some(0)
    }
}

fn write(
    client_id: usize,
    value: i64,
    call: i64,
    return_time: i64,
) -> Operation<RegisterInput, i64> {
    Operation {
        client_id,
        input: RegisterInput::Write(value),
        call,
        output: 0,
        return_time,
    }
}

fn read(client_id: usize, seen: i64, call: i64, return_time: i64) -> Operation<RegisterInput, i64> {
    Operation {
        client_id,
        input: RegisterInput::Read,
        call,
        output: seen,
        return_time,
    }
}

#[test]
fn register_empty_history_is_ok() {
    assert_eq!(check_operations(&Register, &[]), CheckResult::Ok);
    assert_eq!(check_events(&Register, &[]).unwrap(), CheckResult::Ok);
    let (result, info) = check_operations_verbose(&Register, &[], None);
    assert_eq!(result, CheckResult::Ok);
    let mut html = Vec::new();
    visualize(&Register, &info, &mut html).unwrap();
}

#[test]
fn register_sequential_ok_and_illegal() {
    let legal = [
        write(0, 1, 0, 10),
        read(1, 1, 20, 30),
        write(0, 2, 40, 50),
        read(1, 2, 60, 70),
    ];
    assert_eq!(check_operations(&Register, &legal), CheckResult::Ok);
    let illegal = [
        write(0, 1, 0, 10),
        read(1, 1, 20, 30),
        write(0, 2, 40, 50),
        read(1, 1, 60, 70),
    ];
    assert_eq!(check_operations(&Register, &illegal), CheckResult::Illegal);
}

#[test]
fn register_concurrent_reads_may_see_either_side_of_a_write() {
    // The write overlaps both reads, so one read can precede it and the other follow it.
    let history = [
        write(0, 100, 0, 100),
        read(1, 100, 25, 75),
        read(2, 0, 30, 60),
    ];
    assert_eq!(check_operations(&Register, &history), CheckResult::Ok);
}

#[test]
fn register_read_cannot_go_back_in_time() {
    // Client 1 saw 200 before 30, so the write took effect before 30; a read starting at 40
    // cannot see the initial 0.
    let history = [
        write(0, 200, 0, 100),
        read(1, 200, 10, 30),
        read(2, 0, 40, 90),
    ];
    assert_eq!(check_operations(&Register, &history), CheckResult::Illegal);
}

#[test]
fn register_touching_intervals_count_as_concurrent() {
    // The read is called at the instant the write returns: either order is allowed.
    let history = [write(0, 5, 0, 10), read(1, 0, 10, 20)];
    assert_eq!(check_operations(&Register, &history), CheckResult::Ok);
}

#[test]
fn register_odd_times_do_not_panic() {
    // A return time before its call is read as equal to the call.
    let history = [write(0, 7, 50, 40), read(1, 7, 60, 60), read(1, 7, 60, 60)];
    assert_eq!(check_operations(&Register, &history), CheckResult::Ok);
}

#[test]
fn register_events_with_open_write() {
    let call = |id, input| Event {
        client_id: id,
        kind: EventKind::Call,
        value: EventValue::Input(input),
        id,
    };
    let ret = |id, output| Event {
        client_id: id,
        kind: EventKind::Return,
        value: EventValue::Output(output),
        id,
    };
    // Write(3) never returns: a later read may see it, or not.
    let saw_write = [
        call(0, RegisterInput::Write(3)),
        call(1, RegisterInput::Read),
        ret(1, 3),
    ];
    assert_eq!(
        check_events(&Register, &saw_write).unwrap(),
        CheckResult::Ok
    );
    let missed_write = [
        call(0, RegisterInput::Write(3)),
        call(1, RegisterInput::Read),
        ret(1, 0),
    ];
    assert_eq!(
        check_events(&Register, &missed_write).unwrap(),
        CheckResult::Ok
    );
    // But the read cannot see it if the read returned before the write was called.
    let before_call = [
        call(1, RegisterInput::Read),
        ret(1, 3),
        call(0, RegisterInput::Write(3)),
    ];
    assert_eq!(
        check_events(&Register, &before_call).unwrap(),
        CheckResult::Illegal
    );
    // An open read constrains nothing.
    let open_read = [
        call(0, RegisterInput::Write(3)),
        ret(0, 0),
        call(1, RegisterInput::Read),
    ];
    assert_eq!(
        check_events(&Register, &open_read).unwrap(),
        CheckResult::Ok
    );
}

#[test]
fn register_malformed_events_are_errors() {
    let call = |id, input| Event {
        client_id: 0,
        kind: EventKind::Call,
        value: EventValue::Input(input),
        id,
    };
    let ret = |id, output| Event {
        client_id: 0,
        kind: EventKind::Return,
        value: EventValue::Output(output),
        id,
    };
    let wrong_payload = Event {
        client_id: 0,
        kind: EventKind::Call,
        value: EventValue::Output(9),
        id: 8,
    };
    let write = |v| RegisterInput::Write(v);
    type Case = (Vec<Event<RegisterInput, i64>>, usize, EventFault);
    let cases: Vec<Case> = vec![
        (vec![ret(7, 9)], 0, EventFault::ReturnWithoutCall),
        (
            vec![call(1, write(1)), wrong_payload],
            1,
            EventFault::WrongPayload,
        ),
        (
            vec![call(1, write(1)), call(1, write(2))],
            1,
            EventFault::DuplicateCall,
        ),
        (
            vec![call(1, write(1)), ret(1, 0), ret(1, 0)],
            2,
            EventFault::DuplicateReturn,
        ),
        // A legal history followed by a bad event: the verdict must not be a silent Ok.
        (
            vec![call(2, RegisterInput::Read), ret(2, 0), ret(3, 0)],
            2,
            EventFault::ReturnWithoutCall,
        ),
    ];
    for (history, position, reason) in cases {
        let e = check_events(&Register, &history).expect_err("a malformed history was checked");
        assert_eq!((e.position, e.reason), (position, reason), "{e}");
        assert!(e.to_string().contains(&format!("event #{position}")), "{e}");
        assert!(check_events_verbose(&Register, &history, None).is_err());
    }
}

#[test]
fn worker_count_is_the_callers_and_does_not_change_the_verdict() {
    let history = linearizable_kv_history(&KvHistoryConfig {
        seed: 7,
        ..Default::default()
    });
    for workers in [1, 2, 5] {
        let opts = CheckOptions {
            workers: NonZeroUsize::new(workers),
            ..CheckOptions::default()
        };
        let (result, _) = check_operations_with(&KvModel, &history, &opts);
        assert_eq!(result, CheckResult::Ok, "{workers} workers");
    }
}

#[test]
fn register_pathological_history_times_out_as_unknown() {
    // 40 mutually concurrent writes of distinct values, then a read of a value nobody wrote:
    // proving it illegal means trying ~40 * 2^39 (set, last write) configurations.
    let writers = 40;
    let mut history: Vec<_> = (0..writers)
        .map(|client| write(client, client as i64 + 1, 0, 1_000))
        .collect();
    history.push(read(writers, -1, 2_000, 3_000));
    let started = Instant::now();
    let result = check_operations_timeout(&Register, &history, Duration::from_millis(200));
    assert_eq!(result, CheckResult::Unknown);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    let (result, info) =
        check_operations_verbose(&Register, &history, Some(Duration::from_millis(100)));
    assert_eq!(result, CheckResult::Unknown);
    assert_eq!(info.partitions[0].result, CheckResult::Unknown);
}

// ---------------------------------------------------------------------------------------------
// The versioned KV store.

fn get(
    client_id: usize,
    key: &str,
    seen: (&str, u64),
    call: i64,
    return_time: i64,
) -> Operation<KvInput, KvOutput> {
    let (value, version) = seen;
    Operation {
        client_id,
        input: KvInput::get(key),
        call,
        output: KvOutput::got(
            value,
            version,
            if version == 0 {
                KvErr::NoKey
            } else {
                KvErr::Ok
            },
        ),
        return_time,
    }
}

fn put(
    client_id: usize,
    key: &str,
    value: &str,
    version: u64,
    err: KvErr,
    call: i64,
    return_time: i64,
) -> Operation<KvInput, KvOutput> {
    Operation {
        client_id,
        input: KvInput::put(key, value, version),
        call,
        output: KvOutput::put(err),
        return_time,
    }
}

#[test]
fn kv_sequential_history_ok() {
    let history = [
        get(0, "k", ("", 0), 0, 10),
        put(0, "k", "a", 0, KvErr::Ok, 20, 30),
        put(1, "k", "b", 0, KvErr::Version, 40, 50),
        get(1, "k", ("a", 1), 60, 70),
        put(1, "k", "b", 1, KvErr::Ok, 80, 90),
        get(0, "k", ("b", 2), 100, 110),
    ];
    assert_eq!(check_operations(&KvModel, &history), CheckResult::Ok);
}

#[test]
fn kv_err_maybe_put_may_or_may_not_have_applied() {
    let applied = [
        put(0, "k", "a", 0, KvErr::Maybe, 0, 10),
        get(1, "k", ("a", 1), 20, 30),
    ];
    assert_eq!(check_operations(&KvModel, &applied), CheckResult::Ok);
    let not_applied_wrong_version = [
        put(0, "k", "a", 5, KvErr::Maybe, 0, 10),
        get(1, "k", ("", 0), 20, 30),
    ];
    assert_eq!(
        check_operations(&KvModel, &not_applied_wrong_version),
        CheckResult::Ok
    );
    // With the right version and no concurrent Put, a Maybe Put did apply: as in the Go model,
    // ErrMaybe means "either outcome", decided by the state at the linearization point.
    let must_have_applied = [
        put(0, "k", "a", 0, KvErr::Maybe, 0, 10),
        get(1, "k", ("", 0), 20, 30),
    ];
    assert_eq!(
        check_operations(&KvModel, &must_have_applied),
        CheckResult::Illegal
    );
    // ...unless a concurrent Put took version 0 first.
    let lost_race = [
        put(0, "k", "a", 0, KvErr::Maybe, 0, 10),
        put(1, "k", "b", 0, KvErr::Ok, 0, 10),
        get(1, "k", ("b", 1), 20, 30),
    ];
    assert_eq!(check_operations(&KvModel, &lost_race), CheckResult::Ok);
}

#[test]
fn kv_concurrent_puts_of_one_version_have_one_winner() {
    let puts = [
        put(0, "k", "a", 0, KvErr::Ok, 0, 100),
        put(1, "k", "b", 0, KvErr::Version, 10, 90),
    ];
    let mut winner_seen = puts.to_vec();
    winner_seen.push(get(2, "k", ("a", 1), 200, 210));
    assert_eq!(check_operations(&KvModel, &winner_seen), CheckResult::Ok);
    let mut loser_seen = puts.to_vec();
    loser_seen.push(get(2, "k", ("b", 1), 200, 210));
    assert_eq!(
        check_operations(&KvModel, &loser_seen),
        CheckResult::Illegal
    );
    let two_winners = [
        put(0, "k", "a", 0, KvErr::Ok, 0, 100),
        put(1, "k", "b", 0, KvErr::Ok, 10, 90),
    ];
    assert_eq!(
        check_operations(&KvModel, &two_winners),
        CheckResult::Illegal
    );
}

#[test]
fn kv_stale_read_is_illegal() {
    let history = [
        put(0, "k", "v1", 0, KvErr::Ok, 0, 10),
        put(0, "k", "v2", 1, KvErr::Ok, 20, 30),
        get(1, "k", ("v1", 1), 40, 50),
    ];
    assert_eq!(check_operations(&KvModel, &history), CheckResult::Illegal);
}

#[test]
fn kv_get_version_is_not_checked() {
    // As in the Go model: only the value of a Get is compared.
    let history = [
        put(0, "k", "a", 0, KvErr::Ok, 0, 10),
        get(1, "k", ("a", 7), 20, 30),
    ];
    assert_eq!(check_operations(&KvModel, &history), CheckResult::Ok);
}

#[test]
fn kv_keys_are_independent_and_one_bad_key_is_enough() {
    let history = [
        put(0, "a", "x", 0, KvErr::Ok, 0, 10),
        put(1, "b", "y", 0, KvErr::Ok, 0, 10),
        get(0, "a", ("x", 1), 20, 30),
        get(1, "b", ("", 0), 20, 30),
    ];
    assert_eq!(check_operations(&KvModel, &history), CheckResult::Illegal);
    let (result, info) = check_operations_verbose(&KvModel, &history, None);
    assert_eq!(result, CheckResult::Illegal);
    let results: Vec<_> = info.partitions.iter().map(|p| p.result).collect();
    assert_eq!(
        results,
        [CheckResult::Ok, CheckResult::Illegal],
        "partitions in key order"
    );
    let bad = &info.partitions[1];
    assert_eq!(
        bad.linearization.len(),
        1,
        "the put alone is the longest prefix"
    );
    let stuck = bad.unplaceable.expect("an unplaceable op");
    assert_eq!(
        bad.ops[stuck].description,
        "get('b') -> ('', '0', 'ErrNoKey')"
    );
}

#[test]
fn kv_describe_like_go() {
    let get_op = get(0, "k", ("v", 3), 0, 1);
    assert_eq!(
        KvModel.describe_operation(&get_op.input, &get_op.output),
        "get('k') -> ('v', '3', 'OK')"
    );
    let put_op = put(0, "k", "v", 2, KvErr::Maybe, 0, 1);
    assert_eq!(
        KvModel.describe_operation(&put_op.input, &put_op.output),
        "put('k', 'v', '2') -> ('ErrMaybe')"
    );
}

#[test]
fn kv_events_open_put_may_apply_or_not() {
    let mut events = Vec::new();
    let mut push = |id: usize, kind: EventKind, value| {
        events.push(Event {
            client_id: id,
            kind,
            value,
            id,
        });
    };
    let op = put(0, "k", "a", 0, KvErr::Ok, 0, 0);
    push(0, EventKind::Call, EventValue::Input(op.input));
    let first = get(1, "k", ("", 0), 0, 0);
    push(1, EventKind::Call, EventValue::Input(first.input));
    push(1, EventKind::Return, EventValue::Output(first.output));
    let second = get(2, "k", ("a", 1), 0, 0);
    push(2, EventKind::Call, EventValue::Input(second.input));
    push(2, EventKind::Return, EventValue::Output(second.output));
    assert_eq!(check_events(&KvModel, &events).unwrap(), CheckResult::Ok);

    // A read of the initial value after one that saw the open put is a stale read.
    let third = get(3, "k", ("", 0), 0, 0);
    events.push(Event {
        client_id: 3,
        kind: EventKind::Call,
        value: EventValue::Input(third.input),
        id: 3,
    });
    events.push(Event {
        client_id: 3,
        kind: EventKind::Return,
        value: EventValue::Output(third.output),
        id: 3,
    });
    let (result, info) = check_events_verbose(&KvModel, &events, None).unwrap();
    assert_eq!(result, CheckResult::Illegal);
    let mut html = Vec::new();
    visualize(&KvModel, &info, &mut html).unwrap();
    let html = String::from_utf8(html).unwrap();
    assert!(
        html.contains("returned never"),
        "the open put is drawn as never returning"
    );
}

// ---------------------------------------------------------------------------------------------
// Large generated histories.

#[test]
fn kv_generated_10k_history_is_ok_quickly() {
    let history = linearizable_kv_history(&KvHistoryConfig::default());
    assert_eq!(history.len(), 10_000);
    let started = Instant::now();
    let result = check_operations_timeout(&KvModel, &history, Duration::from_secs(60));
    let elapsed = started.elapsed();
    assert_eq!(result, CheckResult::Ok);
    if !cfg!(debug_assertions) {
        assert!(
            elapsed < Duration::from_millis(500),
            "10k ops took {elapsed:?}"
        );
    }
    let (result, info) = check_operations_verbose(&KvModel, &history, None);
    assert_eq!(result, CheckResult::Ok);
    let linearized: usize = info.partitions.iter().map(|p| p.linearization.len()).sum();
    assert_eq!(
        linearized, 10_000,
        "a full linearization of every partition"
    );
}

#[test]
fn kv_generated_10k_history_with_a_stale_read_is_illegal() {
    let mut history = linearizable_kv_history(&KvHistoryConfig::default());
    // Pick a Get in the middle that saw version >= 2, and make it return a value whose
    // overwriting Put had returned before the Get was called.
    let victim = (history.len() / 2..history.len())
        .find(|&i| {
            let op = &history[i];
            op.input.op == KvOp::Get && op.output.version >= 3
        })
        .expect("a Get of a key with several versions");
    let key = history[victim].input.key.clone();
    let call = history[victim].call;
    let stale = history[..victim]
        .iter()
        .filter(|op| op.input.key == key && op.input.op == KvOp::Put && op.output.err == KvErr::Ok)
        .find_map(|older| {
            // A later Put on the same key that completed before the Get started.
            let overwritten = history[..victim].iter().any(|newer| {
                newer.input.key == key
                    && newer.input.op == KvOp::Put
                    && newer.output.err == KvErr::Ok
                    && newer.call > older.return_time
                    && newer.return_time < call
            });
            overwritten.then(|| older.input.value.clone())
        })
        .expect("an overwritten value");
    history[victim].output.value = stale;

    let started = Instant::now();
    let (result, info) =
        check_operations_verbose(&KvModel, &history, Some(Duration::from_secs(60)));
    assert_eq!(
        result,
        CheckResult::Illegal,
        "after {:?}",
        started.elapsed()
    );
    assert_eq!(info.illegal_partitions().count(), 1);
}

// ---------------------------------------------------------------------------------------------
// Visualization.

#[test]
fn visualize_writes_self_contained_html_with_descriptions() {
    let history = [
        put(0, "k", "v1", 0, KvErr::Ok, 0, 10),
        put(0, "k", "v2", 1, KvErr::Ok, 20, 30),
        get(1, "k", ("v1", 1), 40, 50),
        get(2, "other", ("", 0), 0, 50),
    ];
    let (result, info) = check_operations_verbose(&KvModel, &history, None);
    assert_eq!(result, CheckResult::Illegal);
    let mut out = Vec::new();
    visualize(&KvModel, &info, &mut out).unwrap();
    let html = String::from_utf8(out).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    for description in [
        "put(&#39;k&#39;, &#39;v1&#39;, &#39;0&#39;) -&gt; (&#39;OK&#39;)",
        "get(&#39;k&#39;) -&gt; (&#39;v1&#39;, &#39;1&#39;, &#39;OK&#39;)",
        "get(&#39;other&#39;) -&gt; (&#39;&#39;, &#39;0&#39;, &#39;ErrNoKey&#39;)",
    ] {
        assert!(html.contains(description), "missing {description}");
    }
    assert!(html.contains("class=\"op bad\""), "the stale get is marked");
    assert!(html.contains("Could not be placed next"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external resources"
    );

    let path = std::env::temp_dir().join(format!("porcupine-test-{}.html", std::process::id()));
    crate::porcupine::visualize_to_file(&KvModel, &info, &path).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), html);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn kv_generated_single_key_20_clients_is_ok() {
    let config = KvHistoryConfig {
        clients: 20,
        keys: 1,
        ..KvHistoryConfig::default()
    };
    let history = linearizable_kv_history(&config);
    let result = check_operations_timeout(&KvModel, &history, Duration::from_secs(60));
    assert_eq!(result, CheckResult::Ok);
}

/// The KV model without the read-only hint: the checker then searches exactly as porcupine.
struct PlainKvModel;

impl Model for PlainKvModel {
    type State = KvState;
    type Input = KvInput;
    type Output = KvOutput;

    fn init(&self) -> KvState {
        KvModel.init()
    }

    fn step(&self, state: &KvState, input: &KvInput, output: &KvOutput) -> Option<KvState> {
        KvModel.step(state, input, output)
    }
}

#[test]
fn kv_read_only_reduction_agrees_with_plain_search() {
    // Small dense histories, half of them corrupted at random: the verdict with the read-only
    // reduction must be the plain search's verdict every time.
    let mut rng = SmallRng::seed_from_u64(7);
    let (mut legal, mut illegal) = (0, 0);
    for seed in 0..400 {
        let config = KvHistoryConfig {
            clients: 4,
            operations: 12,
            keys: 1,
            put_fraction: 0.5,
            maybe_fraction: 0.2,
            seed,
            ..KvHistoryConfig::default()
        };
        let mut history = linearizable_kv_history(&config);
        if rng.gen_bool(0.5) {
            let victim = rng.gen_range(0..history.len());
            let op = &mut history[victim];
            match op.input.op {
                KvOp::Get => op.output.value = format!("c0-{}", rng.gen_range(0..12)),
                KvOp::Put => {
                    op.output.err = [KvErr::Ok, KvErr::Version, KvErr::Maybe][rng.gen_range(0..3)]
                }
            }
        }
        let reduced = check_operations(&KvModel, &history);
        let plain = check_operations(&PlainKvModel, &history);
        assert_eq!(reduced, plain, "seed {seed}: {history:#?}");
        match plain {
            CheckResult::Ok => legal += 1,
            _ => illegal += 1,
        }
    }
    assert!(
        legal > 100 && illegal > 50,
        "{legal} legal, {illegal} illegal: a weak sample"
    );
}
