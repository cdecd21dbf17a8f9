//! A linearizability checker: the algorithm of porcupine (the checker the Go labs use), in Rust.
//!
//! Given a [`Model`] of a sequential object and a concurrent history of operations on it, the
//! checker decides whether each operation can be given a single instant between its call and
//! its return such that the operations, run one at a time in that order, behave as the model
//! says ([`CheckResult::Ok`]), or not ([`CheckResult::Illegal`]). The search is exponential in
//! the worst case, so it can be given a timeout, after which it answers
//! [`CheckResult::Unknown`].
//!
//! How it is fast enough: histories are split by [`Model::partition`] into parts checked
//! independently and in parallel (a map is linearizable iff each key is); each part is searched
//! depth-first over a linked list of calls and returns, remembering every (set of linearized
//! operations, state) pair already explored so that no configuration is searched twice.
//!
//! The verbose variants also return a [`LinearizationInfo`], which [`visualize`] renders as a
//! self-contained HTML page showing where linearization got stuck.
//!
//! [`kv`] holds the model of the labs' versioned key/value store (`tester::histgen` generates
//! linearizable KV histories of it for tests and benchmarks).

mod cache;
mod checker;
mod history;
mod info;
pub mod kv;
mod model;
#[cfg(all(test, feature = "testing"))]
mod tests;
mod visualize;

use std::num::NonZeroUsize;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use checker::{StopSignal, Verdict};
use history::PartitionHistory;

pub use history::{EventError, EventFault};

pub use info::{LinearizationInfo, LinearizedStep, OpInfo, PartitionInfo};
pub use model::{CheckResult, Event, EventKind, EventValue, Model, Operation};
pub use visualize::{visualize, visualize_to_file};

/// Checks a history of completed operations, with no time limit.
pub fn check_operations<M: Model>(
    model: &M,
    history: &[Operation<M::Input, M::Output>],
) -> CheckResult {
    check_operations_with(model, history, &CheckOptions::default()).0
}

/// Checks a history of completed operations, answering [`CheckResult::Unknown`] if not decided
/// within `timeout`. As in porcupine, a zero timeout means no limit.
pub fn check_operations_timeout<M: Model>(
    model: &M,
    history: &[Operation<M::Input, M::Output>],
    timeout: Duration,
) -> CheckResult {
    let opts = CheckOptions {
        timeout: Some(timeout),
        ..CheckOptions::default()
    };
    check_operations_with(model, history, &opts).0
}

/// Checks a history of completed operations and explains the verdict. `None` or a zero
/// timeout means no limit.
///
/// Unlike the other variants, an Illegal partition does not stop the others: each partition is
/// searched to its own verdict (or the deadline) so that the info covers all of them.
pub fn check_operations_verbose<M: Model>(
    model: &M,
    history: &[Operation<M::Input, M::Output>],
    timeout: Option<Duration>,
) -> (CheckResult, LinearizationInfo) {
    let opts = CheckOptions {
        timeout,
        explain: true,
        ..CheckOptions::default()
    };
    check_operations_with(model, history, &opts)
}

/// Checks an event history, with no time limit. The order of the events is real time. A call
/// with no return is an operation still in flight; see [`Model::open_output`]. A malformed
/// history (a return without its call, an id called twice, a second return, a payload of the
/// wrong kind) is an error naming the first bad event.
pub fn check_events<M: Model>(
    model: &M,
    history: &[Event<M::Input, M::Output>],
) -> Result<CheckResult, EventError> {
    check_events_with(model, history, &CheckOptions::default()).map(|(r, _)| r)
}

/// [`check_events`] with a timeout (zero means no limit).
pub fn check_events_timeout<M: Model>(
    model: &M,
    history: &[Event<M::Input, M::Output>],
    timeout: Duration,
) -> Result<CheckResult, EventError> {
    let opts = CheckOptions {
        timeout: Some(timeout),
        ..CheckOptions::default()
    };
    check_events_with(model, history, &opts).map(|(r, _)| r)
}

/// [`check_operations_verbose`] for event histories.
pub fn check_events_verbose<M: Model>(
    model: &M,
    history: &[Event<M::Input, M::Output>],
    timeout: Option<Duration>,
) -> Result<(CheckResult, LinearizationInfo), EventError> {
    let opts = CheckOptions {
        timeout,
        explain: true,
        ..CheckOptions::default()
    };
    check_events_with(model, history, &opts)
}

/// How to check: the time limit, the worker threads, and whether to explain the verdict.
#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    /// `None` or zero: no limit; past it the answer is [`CheckResult::Unknown`].
    pub timeout: Option<Duration>,
    /// Threads that check partitions side by side; `None`: the available parallelism
    /// (at most 8).
    pub workers: Option<NonZeroUsize>,
    /// Fill in the [`LinearizationInfo`] (every partition then runs to its own verdict).
    pub explain: bool,
}

/// Checks a history of completed operations as `opts` says.
pub fn check_operations_with<M: Model>(
    model: &M,
    history: &[Operation<M::Input, M::Output>],
    opts: &CheckOptions,
) -> (CheckResult, LinearizationInfo) {
    check_prepared(model, operation_partitions(model, history), opts)
}

/// Checks an event history as `opts` says; a malformed history is an error.
pub fn check_events_with<M: Model>(
    model: &M,
    history: &[Event<M::Input, M::Output>],
    opts: &CheckOptions,
) -> Result<(CheckResult, LinearizationInfo), EventError> {
    history::validate_events(history)?;
    Ok(check_prepared(
        model,
        event_partitions(model, history),
        opts,
    ))
}

fn operation_partitions<M: Model>(
    model: &M,
    history: &[Operation<M::Input, M::Output>],
) -> Vec<PartitionHistory<M::Input, M::Output>> {
    model
        .partition(history)
        .iter()
        .map(|part| history::from_operations(part))
        .collect()
}

fn event_partitions<M: Model>(
    model: &M,
    history: &[Event<M::Input, M::Output>],
) -> Vec<PartitionHistory<M::Input, M::Output>> {
    model
        .partition_events(history)
        .iter()
        .map(|part| history::from_events(model, part))
        .collect()
}

fn check_prepared<M: Model>(
    model: &M,
    partitions: Vec<PartitionHistory<M::Input, M::Output>>,
    opts: &CheckOptions,
) -> (CheckResult, LinearizationInfo) {
    let explain = opts.explain;
    let stop = StopSignal {
        kill: AtomicBool::new(false),
        // A deadline too far away to represent is no deadline.
        deadline: opts
            .timeout
            .filter(|timeout| !timeout.is_zero())
            .and_then(|timeout| Instant::now().checked_add(timeout)),
    };
    let outcomes = checker::check_partitions(model, &partitions, &stop, explain, opts.workers);

    // Illegal anywhere is decisive even if another partition ran out of time.
    let verdict_is = |wanted| outcomes.iter().any(|outcome| outcome.verdict == wanted);
    let result = if verdict_is(Verdict::Illegal) {
        CheckResult::Illegal
    } else if verdict_is(Verdict::Stopped) {
        CheckResult::Unknown
    } else {
        CheckResult::Ok
    };

    let mut info = LinearizationInfo::default();
    if explain {
        info.partitions = partitions
            .iter()
            .zip(&outcomes)
            .map(|(partition, outcome)| info::describe_partition(model, partition, outcome))
            .collect();
    }
    (result, info)
}
