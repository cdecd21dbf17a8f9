//! The model of the labs' versioned key/value store (Go: `models1/kv.go`), against which the KV
//! tests of Labs 2, 4 and 5 check their recorded histories.

use std::collections::{BTreeMap, HashMap};

use super::model::{Event, EventKind, EventValue, Model, Operation};
use crate::kvapi::{KvErr, Tversion};

/// Which RPC an operation was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvOp {
    Get,
    Put,
}

/// What the client asked. For a Get, `value` and `version` are unused.
#[derive(Clone, Debug)]
pub struct KvInput {
    pub op: KvOp,
    pub key: String,
    pub value: String,
    pub version: Tversion,
}

impl KvInput {
    /// A Get of `key`.
    pub fn get(key: impl Into<String>) -> KvInput {
        KvInput {
            op: KvOp::Get,
            key: key.into(),
            value: String::new(),
            version: 0,
        }
    }

    /// A Put of `value` at `key`, conditional on the key's `version`.
    pub fn put(key: impl Into<String>, value: impl Into<String>, version: Tversion) -> KvInput {
        KvInput {
            op: KvOp::Put,
            key: key.into(),
            value: value.into(),
            version,
        }
    }
}

/// What the client was answered. For a Put only `err` is meaningful.
#[derive(Clone, Debug)]
pub struct KvOutput {
    pub value: String,
    pub version: Tversion,
    pub err: KvErr,
}

impl KvOutput {
    /// A Get's answer.
    pub fn got(value: impl Into<String>, version: Tversion, err: KvErr) -> KvOutput {
        KvOutput {
            value: value.into(),
            version,
            err,
        }
    }

    /// A Put's answer: only its error.
    pub fn put(err: KvErr) -> KvOutput {
        KvOutput::got(String::new(), 0, err)
    }
}

/// One key's state: its value and version ("", 0 before the first Put).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KvState {
    pub value: String,
    pub version: Tversion,
}

/// The versioned KV model. Each key is an independent register, so histories are partitioned
/// by key (in key order, so that verdicts and visualizations are deterministic).
#[derive(Clone, Copy, Debug, Default)]
pub struct KvModel;

impl Model for KvModel {
    type State = KvState;
    type Input = KvInput;
    type Output = KvOutput;

    fn partition(
        &self,
        history: &[Operation<KvInput, KvOutput>],
    ) -> Vec<Vec<Operation<KvInput, KvOutput>>> {
        let mut by_key: BTreeMap<&str, Vec<Operation<KvInput, KvOutput>>> = BTreeMap::new();
        for op in history {
            by_key.entry(&op.input.key).or_default().push(op.clone());
        }
        by_key.into_values().collect()
    }

    fn partition_events(
        &self,
        history: &[Event<KvInput, KvOutput>],
    ) -> Vec<Vec<Event<KvInput, KvOutput>>> {
        // A return carries no key: it goes where its call's key sends it.
        let mut key_of_id: HashMap<usize, &str> = HashMap::new();
        for event in history {
            if let (EventKind::Call, EventValue::Input(input)) = (&event.kind, &event.value) {
                key_of_id.entry(event.id).or_insert(&input.key);
            }
        }
        let mut by_key: BTreeMap<&str, Vec<Event<KvInput, KvOutput>>> = BTreeMap::new();
        for event in history {
            match key_of_id.get(&event.id) {
                Some(key) => by_key.entry(key).or_default().push(event.clone()),
                None => log::debug!("porcupine: dropping event id {} with no call", event.id),
            }
        }
        by_key.into_values().collect()
    }

    fn init(&self) -> KvState {
        KvState {
            value: String::new(),
            version: 0,
        }
    }

    fn step(&self, state: &KvState, input: &KvInput, output: &KvOutput) -> Option<KvState> {
        match input.op {
            // The version a Get returns is deliberately not checked, as in the Go model.
            KvOp::Get => (output.value == state.value).then(|| state.clone()),
            // ErrMaybe: a retransmitted Put whose first copy may or may not have applied, so
            // either outcome is legal; the linearization point decides which.
            KvOp::Put if input.version == state.version => {
                matches!(output.err, KvErr::Ok | KvErr::Maybe).then(|| KvState {
                    value: input.value.clone(),
                    version: state.version + 1,
                })
            }
            KvOp::Put => matches!(output.err, KvErr::Version | KvErr::Maybe).then(|| state.clone()),
        }
    }

    /// Gets never change the state, nor does a Put answered ErrVersion (legal only when the
    /// version differs, and then a no-op). An ErrMaybe Put may apply, so it is not read-only.
    fn is_read_only(&self, input: &KvInput, output: &KvOutput) -> bool {
        input.op == KvOp::Get || output.err == KvErr::Version
    }

    /// A Put still in flight may or may not apply, exactly what ErrMaybe means; a Get still in
    /// flight constrains nothing and is dropped.
    fn open_output(&self, input: &KvInput) -> Option<KvOutput> {
        (input.op == KvOp::Put).then(|| KvOutput {
            value: String::new(),
            version: 0,
            err: KvErr::Maybe,
        })
    }

    fn describe_operation(&self, input: &KvInput, output: &KvOutput) -> String {
        match input.op {
            KvOp::Get => format!(
                "get('{}') -> ('{}', '{}', '{}')",
                input.key, output.value, output.version, output.err
            ),
            KvOp::Put => format!(
                "put('{}', '{}', '{}') -> ('{}')",
                input.key, input.value, input.version, output.err
            ),
        }
    }

    fn describe_state(&self, state: &KvState) -> String {
        format!("('{}', '{}')", state.value, state.version)
    }
}
