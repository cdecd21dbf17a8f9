//! What the checker checks: the [`Model`] of a sequential object, and the two shapes of history
//! it accepts ([`Operation`]s with times, or an ordered list of call/return [`Event`]s).

use std::fmt::Debug;
use std::hash::Hash;

/// A sequential specification: the checker asks whether a concurrent history could have been
/// produced by some one-at-a-time execution of this model.
///
/// The state must be `Eq + Hash` because the checker memoises every (set of linearized
/// operations, state) pair it has already explored; two states the model calls equal must hash
/// alike (with the default [`Model::equal`] that is automatic).
///
/// The model is shared by reference across the threads that check partitions in parallel,
/// hence `Sync` on the model, its inputs and its outputs.
pub trait Model: Sync {
    type State: Clone + Debug + Eq + Hash;
    type Input: Clone + Debug + Sync;
    type Output: Clone + Debug + Sync;

    /// Split a history into parts that can be checked independently (P-compositionality: a
    /// history of a map is linearizable iff each key's sub-history is). Default: one part.
    fn partition(
        &self,
        history: &[Operation<Self::Input, Self::Output>],
    ) -> Vec<Vec<Operation<Self::Input, Self::Output>>> {
        vec![history.to_vec()]
    }

    /// [`Model::partition`] for event histories. Default: one part.
    fn partition_events(
        &self,
        history: &[Event<Self::Input, Self::Output>],
    ) -> Vec<Vec<Event<Self::Input, Self::Output>>> {
        vec![history.to_vec()]
    }

    /// The state before any operation.
    fn init(&self) -> Self::State;

    /// `Some(next state)` if `input` answered with `output` is a legal operation in `state`.
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: &Self::Output,
    ) -> Option<Self::State>;

    /// Whether two states are the same for the model's purposes. Default: `==`.
    fn equal(&self, a: &Self::State, b: &Self::State) -> bool {
        a == b
    }

    /// The output to assume for an operation whose call has no return in an event history
    /// (the caller gave up waiting, so the operation may or may not have taken effect).
    ///
    /// `None` (the default) drops such an operation from the check: right for reads, whose
    /// effect nobody saw. A model with writes should return an output its `step` accepts in
    /// every state, so that the write may linearize anywhere after its call, or never.
    fn open_output(&self, input: &Self::Input) -> Option<Self::Output> {
        let _ = input;
        None
    }

    /// Whether `input` answered with `output` is read-only: in every state where
    /// [`Model::step`] accepts it, it leaves the state unchanged (an equal state). Default:
    /// `false`, which checks exactly as porcupine does.
    ///
    /// Returning `true` lets the checker place such an operation as soon as it is legal and
    /// never try alternatives to it. That is sound: if a read-only operation is callable and
    /// legal now, any linearization of the rest can be rearranged to put it first. It turns
    /// the search's worst case on read-heavy histories from exponential in the number of
    /// concurrent reads to linear. A `true` for an operation that can change the state makes
    /// the checker unsound (it may report Illegal for a linearizable history).
    fn is_read_only(&self, input: &Self::Input, output: &Self::Output) -> bool {
        let _ = (input, output);
        false
    }

    /// One line describing an operation, for the visualization.
    fn describe_operation(&self, input: &Self::Input, output: &Self::Output) -> String {
        format!("{input:?} -> {output:?}")
    }

    /// One line describing a state, for the visualization.
    fn describe_state(&self, state: &Self::State) -> String {
        format!("{state:?}")
    }
}

/// One completed operation: `input` was invoked at `call` and answered `output` at
/// `return_time` (both in nanoseconds on any clock shared by all clients).
#[derive(Clone, Debug)]
pub struct Operation<I, O> {
    pub client_id: usize,
    pub input: I,
    pub call: i64,
    pub output: O,
    pub return_time: i64,
}

/// Whether an [`Event`] is an invocation or a response.
#[derive(Clone, Debug)]
pub enum EventKind {
    Call,
    Return,
}

/// The payload of an [`Event`]: a call carries the input, a return the output.
#[derive(Clone, Debug)]
pub enum EventValue<I, O> {
    Input(I),
    Output(O),
}

/// One half of an operation in an event history, where the order of the events (not a clock)
/// gives real time. A call and its return share an `id`; ids need only be unique per operation.
#[derive(Clone, Debug)]
pub struct Event<I, O> {
    pub client_id: usize,
    pub kind: EventKind,
    pub value: EventValue<I, O>,
    pub id: usize,
}

/// The verdict of a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckResult {
    /// Some linearization exists.
    Ok,
    /// No linearization exists.
    Illegal,
    /// The check was stopped (timeout) before it could decide.
    Unknown,
}
