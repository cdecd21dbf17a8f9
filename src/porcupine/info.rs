//! [`LinearizationInfo`]: what a verbose check found, already rendered to text by the model so
//! that it can be kept, printed or visualized without the history's types.

use super::checker::{PartitionOutcome, Verdict};
use super::history::PartitionHistory;
use super::model::{CheckResult, Model};

/// What a verbose check found, per partition.
#[derive(Clone, Debug, Default)]
pub struct LinearizationInfo {
    pub partitions: Vec<PartitionInfo>,
}

/// One partition: its operations, and the linearization (or longest linearizable prefix) found.
#[derive(Clone, Debug)]
pub struct PartitionInfo {
    /// This partition's own verdict (`Unknown` if the deadline stopped it).
    pub result: CheckResult,
    pub ops: Vec<OpInfo>,
    /// The model's initial state, described.
    pub initial_state: String,
    /// If `result` is `Ok`, a full linearization; otherwise the longest linearizable prefix the
    /// search found. Each step names an index into `ops`.
    pub linearization: Vec<LinearizedStep>,
    /// The operation that could not be placed after the longest prefix: its return came before
    /// any state in which the model accepts it (index into `ops`).
    pub unplaceable: Option<usize>,
}

/// One operation, described by the model.
#[derive(Clone, Debug)]
pub struct OpInfo {
    pub client_id: usize,
    /// Call time (ns for operation histories, event index for event histories).
    pub call: i64,
    /// Return time, or `None` for a call that never returned.
    pub return_time: Option<i64>,
    pub description: String,
}

/// One operation of a linearization, and the state it left.
#[derive(Clone, Debug)]
pub struct LinearizedStep {
    pub op: usize,
    pub state_after: String,
}

impl LinearizationInfo {
    /// The partitions whose verdict is Illegal.
    pub fn illegal_partitions(&self) -> impl Iterator<Item = &PartitionInfo> {
        self.partitions
            .iter()
            .filter(|partition| partition.result == CheckResult::Illegal)
    }
}

/// Renders one partition's outcome with the model's descriptions; states along the
/// linearization are recomputed by replaying it, which the search guarantees is legal.
pub(crate) fn describe_partition<M: Model>(
    model: &M,
    history: &PartitionHistory<M::Input, M::Output>,
    outcome: &PartitionOutcome,
) -> PartitionInfo {
    let ops = history
        .ops
        .iter()
        .map(|op| OpInfo {
            client_id: op.client_id,
            call: op.call_time,
            return_time: op.return_time,
            description: model.describe_operation(&op.input, &op.output),
        })
        .collect();
    let initial = model.init();
    let initial_state = model.describe_state(&initial);
    let mut state = initial;
    let mut linearization = Vec::with_capacity(outcome.linearization.len());
    for &op_index in &outcome.linearization {
        let op = &history.ops[op_index];
        let Some(next) = model.step(&state, &op.input, &op.output) else {
            log::error!("porcupine: replay of a found linearization failed at op {op_index}");
            break;
        };
        state = next;
        linearization.push(LinearizedStep {
            op: op_index,
            state_after: model.describe_state(&state),
        });
    }
    let result = match outcome.verdict {
        Verdict::Linearizable => CheckResult::Ok,
        Verdict::Illegal => CheckResult::Illegal,
        Verdict::Stopped => CheckResult::Unknown,
    };
    PartitionInfo {
        result,
        ops,
        initial_state,
        linearization,
        unplaceable: outcome.unplaceable,
    }
}
