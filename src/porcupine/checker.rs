//! The search for a linearization of one partition (Wing & Gong's algorithm with Lowe's
//! memoisation, as porcupine implements it), and the driver that checks partitions in parallel.
//!
//! The timeline of calls and returns is a doubly linked list. The search walks it from the
//! front: at a call, it tries to linearize that operation now (the model must accept it and the
//! resulting configuration must be new); if so, the call and its return are unlinked ("lifted")
//! and the walk restarts from the front. Reaching a return means its operation must already
//! have been linearized but was not, so the last choice is undone ("unlifted") and the walk
//! resumes just after that operation's call. Success is when every operation that returned is
//! linearized; failure is needing to undo with nothing left to undo.
//!
//! One addition to porcupine: operations the model declares read-only
//! ([`Model::is_read_only`]) are placed as soon as they are legal, without trying alternatives
//! to them (a partial-order reduction). Without it, concurrent reads that all see the same
//! state are tried in every order and every subset whenever the search backtracks across them,
//! which is exponential in the number of concurrent reads.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

use super::cache::{Bitset, ConfigurationCache};
use super::history::{MarkKind, PartitionHistory};
use super::model::Model;

/// How many search steps between looks at the clock and the kill flag: often enough to stop
/// within microseconds, rarely enough that `Instant::now` does not show in profiles.
const STEPS_BETWEEN_STOP_CHECKS: u32 = 256;

/// Upper bound on checker threads; partitions beyond it wait for a free worker.
const MAX_WORKERS: usize = 8;

/// End of the linked list.
const NIL: u32 = u32::MAX;
/// The sentinel node before the first mark.
const HEAD: u32 = 0;

/// The verdict for one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Linearizable,
    Illegal,
    /// Stopped by the deadline, or by another partition's Illegal verdict.
    Stopped,
}

/// What the search of one partition found.
#[derive(Clone, Debug)]
pub(crate) struct PartitionOutcome {
    pub verdict: Verdict,
    /// A full linearization if linearizable; otherwise the longest linearizable prefix found
    /// (only tracked when explanations are wanted).
    pub linearization: Vec<usize>,
    /// The operation whose return stopped the longest prefix from growing.
    pub unplaceable: Option<usize>,
}

/// When to give up: a shared flag (another partition was Illegal, or the deadline passed) and
/// an optional deadline.
pub(crate) struct StopSignal {
    pub kill: AtomicBool,
    pub deadline: Option<Instant>,
}

impl StopSignal {
    fn should_stop(&self) -> bool {
        if self.kill.load(Ordering::Relaxed) {
            return true;
        }
        if self
            .deadline
            .is_some_and(|deadline| Instant::now() >= deadline)
        {
            self.kill.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }
}

#[derive(Clone, Copy)]
struct Node {
    prev: u32,
    next: u32,
    op: u32,
    /// For a call: its return's node, or NIL if the operation never returned.
    return_node: u32,
    is_call: bool,
}

/// The timeline as a linked list whose nodes can be unlinked and relinked in LIFO order
/// (dancing links): an unlinked node keeps its own prev/next, which stay valid as long as
/// every later unlink has been undone first.
struct Timeline {
    nodes: Vec<Node>,
}

impl Timeline {
    fn new<I, O>(history: &PartitionHistory<I, O>) -> Self {
        let mut nodes = Vec::with_capacity(history.timeline.len() + 1);
        nodes.push(Node {
            prev: NIL,
            next: NIL,
            op: u32::MAX,
            return_node: NIL,
            is_call: false,
        });
        let mut call_node_of_op = vec![NIL; history.ops.len()];
        for mark in &history.timeline {
            let index = nodes.len() as u32;
            let prev = index - 1;
            nodes[prev as usize].next = index;
            let is_call = mark.kind == MarkKind::Call;
            if is_call {
                call_node_of_op[mark.op] = index;
            } else {
                let call_node = call_node_of_op[mark.op];
                debug_assert!(call_node != NIL, "op {} returns before its call", mark.op);
                nodes[call_node as usize].return_node = index;
            }
            nodes.push(Node {
                prev,
                next: NIL,
                op: mark.op as u32,
                return_node: NIL,
                is_call,
            });
        }
        Timeline { nodes }
    }

    fn unlink(&mut self, index: u32) {
        let Node { prev, next, .. } = self.nodes[index as usize];
        self.nodes[prev as usize].next = next;
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        }
    }

    fn relink(&mut self, index: u32) {
        let Node { prev, next, .. } = self.nodes[index as usize];
        self.nodes[prev as usize].next = index;
        if next != NIL {
            self.nodes[next as usize].prev = index;
        }
    }

    /// Removes an operation (its call, and its return if any) from the timeline.
    fn lift(&mut self, call_node: u32) {
        self.unlink(call_node);
        let return_node = self.nodes[call_node as usize].return_node;
        if return_node != NIL {
            self.unlink(return_node);
        }
    }

    /// Undoes the most recent [`Timeline::lift`] still in effect.
    fn unlift(&mut self, call_node: u32) {
        let return_node = self.nodes[call_node as usize].return_node;
        if return_node != NIL {
            self.relink(return_node);
        }
        self.relink(call_node);
    }
}

/// A linearized operation and the state before it, so that it can be undone.
struct Choice<S> {
    call_node: u32,
    op: usize,
    /// Linearized as soon as it was legal, with no alternatives to try instead.
    read_only: bool,
    state_before: S,
}

/// The longest linearizable prefix seen so far, and the operation that stopped it.
///
/// Kept incrementally: the recorded prefix agrees with the current choice stack up to the
/// lowest depth the stack has been popped to since the recording (`shared_depth`), so a new
/// record copies only the part that changed. Copying the whole stack at every new maximum
/// would be quadratic on long partitions.
#[derive(Default)]
struct LongestPrefix {
    ops: Vec<usize>,
    unplaceable: Option<usize>,
    recorded: bool,
    shared_depth: usize,
}

impl LongestPrefix {
    fn popped_to(&mut self, depth: usize) {
        self.shared_depth = self.shared_depth.min(depth);
    }

    /// Offers the current stack, stuck on `blocked`'s return.
    fn offer<S>(&mut self, choices: &[Choice<S>], blocked: Option<usize>) {
        if self.recorded && choices.len() <= self.ops.len() {
            return;
        }
        self.ops.truncate(self.shared_depth);
        self.ops
            .extend(choices[self.shared_depth..].iter().map(|choice| choice.op));
        self.shared_depth = choices.len();
        self.unplaceable = blocked;
        self.recorded = true;
    }
}

/// Searches for a linearization of one partition.
pub(crate) fn check_partition<M: Model>(
    model: &M,
    history: &PartitionHistory<M::Input, M::Output>,
    stop: &StopSignal,
    track_longest: bool,
) -> PartitionOutcome {
    let mut remaining_completed = history.completed_count();
    if remaining_completed == 0 {
        return PartitionOutcome {
            verdict: Verdict::Linearizable,
            linearization: Vec::new(),
            unplaceable: None,
        };
    }
    let mut timeline = Timeline::new(history);
    let mut linearized = Bitset::new(history.ops.len());
    let mut explored = ConfigurationCache::new(history.ops.len());
    let mut choices: Vec<Choice<M::State>> = Vec::new();
    let mut state = model.init();
    let mut longest = LongestPrefix::default();
    let mut steps_until_stop_check = STEPS_BETWEEN_STOP_CHECKS;
    let mut cursor = timeline.nodes[HEAD as usize].next;

    let unfinished = |verdict, longest: LongestPrefix| PartitionOutcome {
        verdict,
        linearization: longest.ops,
        unplaceable: longest.unplaceable,
    };

    loop {
        steps_until_stop_check -= 1;
        if steps_until_stop_check == 0 {
            steps_until_stop_check = STEPS_BETWEEN_STOP_CHECKS;
            if stop.should_stop() {
                return unfinished(Verdict::Stopped, longest);
            }
        }

        // Try to linearize the operation called here, before everything still in the timeline.
        if cursor != NIL && timeline.nodes[cursor as usize].is_call {
            let node = timeline.nodes[cursor as usize];
            let op = &history.ops[node.op as usize];
            if let Some(next_state) = model.step(&state, &op.input, &op.output) {
                let read_only = model.is_read_only(&op.input, &op.output);
                linearized.insert(node.op as usize);
                if explored.insert_if_new(model, &linearized, &next_state) {
                    choices.push(Choice {
                        call_node: cursor,
                        op: node.op as usize,
                        read_only,
                        state_before: std::mem::replace(&mut state, next_state),
                    });
                    timeline.lift(cursor);
                    if node.return_node != NIL {
                        remaining_completed -= 1;
                        if remaining_completed == 0 {
                            let linearization = choices.iter().map(|choice| choice.op).collect();
                            return PartitionOutcome {
                                verdict: Verdict::Linearizable,
                                linearization,
                                unplaceable: None,
                            };
                        }
                    }
                    cursor = timeline.nodes[HEAD as usize].next;
                    continue;
                }
                linearized.remove(node.op as usize);
                // Already explored with this read-only op next, and it failed: since a
                // read-only op that is legal now could have gone first in any completion
                // (see `Model::is_read_only`), no other choice here can succeed either.
                if !read_only {
                    cursor = node.next;
                    continue;
                }
            } else {
                cursor = node.next;
                continue;
            }
        }

        // A return (or the end, when only open calls that cannot be placed remain): the
        // operation it belongs to had to be linearized already, so undo the last choice.
        if track_longest {
            let blocked = (cursor != NIL && !timeline.nodes[cursor as usize].is_call)
                .then(|| timeline.nodes[cursor as usize].op as usize);
            longest.offer(&choices, blocked);
        }
        loop {
            let Some(choice) = choices.pop() else {
                return unfinished(Verdict::Illegal, longest);
            };
            longest.popped_to(choices.len());
            let call = timeline.nodes[choice.call_node as usize];
            state = choice.state_before;
            linearized.remove(call.op as usize);
            timeline.unlift(choice.call_node);
            if call.return_node != NIL {
                remaining_completed += 1;
            }
            // A read-only choice had no alternatives worth trying: keep undoing.
            if !choice.read_only {
                cursor = call.next;
                break;
            }
        }
    }
}

/// Checks every partition, on `workers` threads (default: the available parallelism, at most
/// [`MAX_WORKERS`]), largest partitions first.
///
/// Without `explain`, the first Illegal partition stops the others (the verdict is decided).
/// With it, every partition runs to its own verdict or the deadline, so that each has a
/// linearization or a longest prefix to show.
pub(crate) fn check_partitions<M: Model>(
    model: &M,
    partitions: &[PartitionHistory<M::Input, M::Output>],
    stop: &StopSignal,
    explain: bool,
    workers: Option<std::num::NonZeroUsize>,
) -> Vec<PartitionOutcome> {
    let check_one = |index: usize| {
        let outcome = check_partition(model, &partitions[index], stop, explain);
        if outcome.verdict == Verdict::Illegal && !explain {
            stop.kill.store(true, Ordering::Relaxed);
        }
        outcome
    };

    let workers = match workers {
        Some(n) => n.get(),
        None => std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_WORKERS),
    };
    let workers = workers.min(partitions.len());
    if workers <= 1 {
        return (0..partitions.len()).map(check_one).collect();
    }

    let mut order: Vec<usize> = (0..partitions.len()).collect();
    order.sort_by_key(|&index| std::cmp::Reverse(partitions[index].timeline.len()));
    let next_in_order = AtomicUsize::new(0);
    let outcomes: Mutex<Vec<Option<PartitionOutcome>>> = Mutex::new(vec![None; partitions.len()]);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let position = next_in_order.fetch_add(1, Ordering::Relaxed);
                    let Some(&index) = order.get(position) else {
                        break;
                    };
                    let outcome = check_one(index);
                    outcomes.lock()[index] = Some(outcome);
                }
            });
        }
    });
    outcomes
        .into_inner()
        .into_iter()
        .map(|outcome| outcome.expect("every partition is checked by some worker"))
        .collect()
}
