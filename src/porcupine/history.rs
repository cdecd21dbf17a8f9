//! Normalising a partition, whether given as timed operations or as ordered events, into one
//! shape: a list of operations and the real-time order of their calls and returns.

use std::collections::HashMap;
use std::fmt;

use super::model::{Event, EventKind, EventValue, Model, Operation};

/// One operation of a partition. `return_time` is `None` for an operation that was called but
/// never returned (event histories only); it is then not required to be linearized.
#[derive(Clone, Debug)]
pub(crate) struct HistOp<I, O> {
    pub client_id: usize,
    pub input: I,
    pub output: O,
    pub call_time: i64,
    pub return_time: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MarkKind {
    Call,
    Return,
}

/// A call or a return of operation `op`, at its place in real time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mark {
    pub op: usize,
    pub kind: MarkKind,
}

/// A partition ready to check: `timeline` lists every call, and every return, in real-time
/// order; each operation's call precedes its return.
#[derive(Clone, Debug)]
pub(crate) struct PartitionHistory<I, O> {
    pub ops: Vec<HistOp<I, O>>,
    pub timeline: Vec<Mark>,
}

impl<I, O> PartitionHistory<I, O> {
    /// Number of operations that must be linearized (those that returned).
    pub fn completed_count(&self) -> usize {
        self.ops
            .iter()
            .filter(|op| op.return_time.is_some())
            .count()
    }
}

/// Builds a partition from timed operations.
///
/// At equal times calls sort before returns, so operations that merely touch count as
/// concurrent (the lenient reading, as porcupine does). A return time earlier than its call is
/// taken as equal to the call rather than rejected: the history is the caller's clock readings,
/// and a checker that panics on them would hide the real verdict.
pub(crate) fn from_operations<I: Clone, O: Clone>(
    operations: &[Operation<I, O>],
) -> PartitionHistory<I, O> {
    let ops: Vec<HistOp<I, O>> = operations
        .iter()
        .map(|op| HistOp {
            client_id: op.client_id,
            input: op.input.clone(),
            output: op.output.clone(),
            call_time: op.call,
            return_time: Some(op.return_time.max(op.call)),
        })
        .collect();
    let mut timed: Vec<(i64, MarkKind, usize)> = Vec::with_capacity(ops.len() * 2);
    for (index, op) in ops.iter().enumerate() {
        timed.push((op.call_time, MarkKind::Call, index));
        timed.push((
            op.return_time.unwrap_or(op.call_time),
            MarkKind::Return,
            index,
        ));
    }
    // Stable sort on (time, call-before-return): an operation's own call can never come after
    // its return, since its return time is at least its call time.
    timed.sort_by_key(|&(time, kind, _)| (time, kind == MarkKind::Return));
    let timeline = timed
        .into_iter()
        .map(|(_, kind, op)| Mark { op, kind })
        .collect();
    PartitionHistory { ops, timeline }
}

/// Why an event history cannot be checked: the first malformed event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventError {
    /// The event's position in the history.
    pub position: usize,
    /// Its operation id.
    pub id: usize,
    pub reason: EventFault,
}

/// What is wrong with an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventFault {
    /// A call with an id already called.
    DuplicateCall,
    /// A return with no earlier call of its id.
    ReturnWithoutCall,
    /// A second return of the same id.
    DuplicateReturn,
    /// A call carrying an output, or a return carrying an input.
    WrongPayload,
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.reason {
            EventFault::DuplicateCall => "a second call with this id",
            EventFault::ReturnWithoutCall => "a return without an earlier call",
            EventFault::DuplicateReturn => "a second return",
            EventFault::WrongPayload => "a payload of the wrong kind",
        };
        write!(
            f,
            "malformed history: event #{} (id {}) is {what}",
            self.position, self.id
        )
    }
}

impl std::error::Error for EventError {}

/// Checks that every event is well formed: each id called once, returned at most once and
/// only after its call, with an input on the call and an output on the return.
pub(crate) fn validate_events<I, O>(events: &[Event<I, O>]) -> Result<(), EventError> {
    // id -> returned yet
    let mut seen: HashMap<usize, bool> = HashMap::new();
    for (position, event) in events.iter().enumerate() {
        let fault = |reason| EventError {
            position,
            id: event.id,
            reason,
        };
        match (&event.kind, &event.value) {
            (EventKind::Call, EventValue::Input(_)) => {
                if seen.insert(event.id, false).is_some() {
                    return Err(fault(EventFault::DuplicateCall));
                }
            }
            (EventKind::Return, EventValue::Output(_)) => match seen.get_mut(&event.id) {
                None => return Err(fault(EventFault::ReturnWithoutCall)),
                Some(true) => return Err(fault(EventFault::DuplicateReturn)),
                Some(returned) => *returned = true,
            },
            _ => return Err(fault(EventFault::WrongPayload)),
        }
    }
    Ok(())
}

/// Builds a partition from ordered events; an event's index is its time.
///
/// The whole history has passed [`validate_events`]; anything malformed here is a bug in the
/// model's partitioning, and is skipped with an error log. A call without a return stays open
/// with the model's [`Model::open_output`], or is dropped when that is `None`.
pub(crate) fn from_events<M: Model>(
    model: &M,
    events: &[Event<M::Input, M::Output>],
) -> PartitionHistory<M::Input, M::Output> {
    struct Pending<I, O> {
        client_id: usize,
        input: I,
        output: Option<O>,
        call_time: i64,
        return_time: Option<i64>,
    }
    let mut pending: Vec<Pending<M::Input, M::Output>> = Vec::new();
    let mut op_of_id: HashMap<usize, usize> = HashMap::new();
    let mut raw_timeline: Vec<Mark> = Vec::with_capacity(events.len());
    for (position, event) in events.iter().enumerate() {
        let time = i64::try_from(position).unwrap_or(i64::MAX);
        match (&event.kind, &event.value) {
            (EventKind::Call, EventValue::Input(input)) if !op_of_id.contains_key(&event.id) => {
                op_of_id.insert(event.id, pending.len());
                raw_timeline.push(Mark {
                    op: pending.len(),
                    kind: MarkKind::Call,
                });
                pending.push(Pending {
                    client_id: event.client_id,
                    input: input.clone(),
                    output: None,
                    call_time: time,
                    return_time: None,
                });
            }
            (EventKind::Return, EventValue::Output(output))
                if op_of_id
                    .get(&event.id)
                    .is_some_and(|&op| pending[op].return_time.is_none()) =>
            {
                let op = op_of_id[&event.id];
                pending[op].output = Some(output.clone());
                pending[op].return_time = Some(time);
                raw_timeline.push(Mark {
                    op,
                    kind: MarkKind::Return,
                });
            }
            _ => log::error!(
                "porcupine: skipping malformed event #{position} of a partition (id {}, {:?})",
                event.id,
                event.kind
            ),
        }
    }

    // Give each open call its assumed output, drop those without one, and renumber densely.
    let mut new_index: Vec<Option<usize>> = Vec::with_capacity(pending.len());
    let mut ops = Vec::with_capacity(pending.len());
    for op in pending {
        let output = match op.output {
            Some(output) => Some(output),
            None => model.open_output(&op.input),
        };
        match output {
            Some(output) => {
                new_index.push(Some(ops.len()));
                ops.push(HistOp {
                    client_id: op.client_id,
                    input: op.input,
                    output,
                    call_time: op.call_time,
                    return_time: op.return_time,
                });
            }
            None => new_index.push(None),
        }
    }
    let timeline = raw_timeline
        .into_iter()
        .filter_map(|mark| new_index[mark.op].map(|op| Mark { op, ..mark }))
        .collect();
    PartitionHistory { ops, timeline }
}
