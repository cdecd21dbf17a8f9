//! The worker: ask the coordinator for a task, run it, report, repeat; exit when told the job
//! is over or when the coordinator can no longer be reached (it exits only after the job).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::labcodec;
use crate::mr::MrError;
use crate::mr::error::{read_text, write_atomically};
use crate::mr::rpc::{self, Assignment, CallError, Reply, Request, TaskId, TaskReport};

/// One key/value pair emitted by a map function.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

impl KeyValue {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
        }
    }
}

/// The lab's key hash: 32-bit FNV-1a, top bit cleared. A key goes to reduce bucket
/// `ihash(key) % n_reduce`.
pub fn ihash(key: &str) -> u32 {
    const OFFSET_BASIS: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    let hash = key
        .bytes()
        .fold(OFFSET_BASIS, |h, b| (h ^ u32::from(b)).wrapping_mul(PRIME));
    hash & 0x7fff_ffff
}

/// A map function: (input file name, its contents) to key/value pairs.
pub type MapFn<'a> = &'a dyn Fn(&str, &str) -> Vec<KeyValue>;
/// A reduce function: (key, all values for that key) to the output value.
pub type ReduceFn<'a> = &'a dyn Fn(&str, &[String]) -> String;

/// Why a worker stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// The coordinator said the job is over.
    JobDone,
    /// The coordinator could not be reached, so the job is over (or never started).
    CoordinatorGone,
}

/// How long a worker waits before asking again when every task is running elsewhere.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Consecutive failed exchanges with a reachable coordinator before the worker gives up.
const MAX_CALL_FAILURES: u32 = 20;
/// How long a worker keeps trying to reach a coordinator it has never reached (one that is
/// starting up has created its socket file but may not listen yet).
const FIRST_CONTACT_PATIENCE: Duration = Duration::from_secs(2);

/// The intermediate file of map task `map_task` for reduce bucket `bucket`.
pub fn intermediate_name(map_task: usize, bucket: usize) -> String {
    format!("mr-{map_task}-{bucket}")
}

/// The output file of reduce task `reduce_task`.
pub fn output_name(reduce_task: usize) -> String {
    format!("mr-out-{reduce_task}")
}

/// Runs the worker loop against the coordinator at `socket`, in the current directory, until
/// the job is over. Errors are local failures (a file that cannot be written, say); a task
/// whose input is bad is reported to the coordinator, which ends the job.
pub fn run_worker(socket: &Path, map: MapFn, reduce: ReduceFn) -> Result<WorkerExit, MrError> {
    let mut failures = 0;
    let started = Instant::now();
    let mut reached = false;
    loop {
        let assignment = match rpc::call(socket, &Request::GetTask) {
            Ok(Reply::Task(assignment)) => {
                failures = 0;
                reached = true;
                assignment
            }
            // A coordinator that is just starting has its socket file before it listens:
            // until it has answered once, keep knocking for a moment.
            Err(CallError::Unreachable(e))
                if !reached && started.elapsed() < FIRST_CONTACT_PATIENCE =>
            {
                log::debug!(target: "mr", "coordinator not answering yet ({e}); retrying");
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
            Ok(Reply::Ack) => {
                log::warn!(target: "mr", "coordinator answered a task request with Ack");
                Assignment::Wait
            }
            Err(CallError::Unreachable(e)) => {
                log::info!(target: "mr", "coordinator unreachable ({e}); exiting");
                return Ok(WorkerExit::CoordinatorGone);
            }
            Err(e @ CallError::Failed(_)) => {
                failures += 1;
                log::warn!(target: "mr", "{e} ({failures} in a row)");
                if failures >= MAX_CALL_FAILURES {
                    return Ok(WorkerExit::CoordinatorGone);
                }
                Assignment::Wait
            }
        };
        let report = match assignment {
            Assignment::Map {
                task,
                attempt,
                file,
                n_reduce,
            } => {
                log::debug!(target: "mr", "map {task} attempt {attempt}: {file}");
                outcome(TaskId::Map(task), run_map(task, &file, n_reduce, map))?
            }
            Assignment::Reduce {
                task,
                attempt,
                n_map,
            } => {
                log::debug!(target: "mr", "reduce {task} attempt {attempt} over {n_map} maps");
                outcome(TaskId::Reduce(task), run_reduce(task, n_map, reduce))?
            }
            Assignment::Wait => {
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
            Assignment::Exit => {
                log::info!(target: "mr", "job done; exiting");
                return Ok(WorkerExit::JobDone);
            }
        };
        match rpc::call(socket, &Request::Report(report)) {
            Ok(_) => {}
            Err(CallError::Unreachable(_)) => return Ok(WorkerExit::CoordinatorGone),
            // The task will be re-issued after the timeout; nothing is lost.
            Err(e) => log::warn!(target: "mr", "report lost: {e}"),
        }
    }
}

/// Turns a task's result into its report. Bad input is the job's problem and goes to the
/// coordinator; failing to write is this worker's problem and stops it (the task is re-issued).
fn outcome(task: TaskId, result: Result<(), MrError>) -> Result<TaskReport, MrError> {
    match result {
        Ok(()) => Ok(TaskReport::Finished(task)),
        Err(e @ MrError::Write { .. }) => Err(e),
        Err(e) => Ok(TaskReport::Failed {
            task,
            reason: e.to_string(),
        }),
    }
}

/// Maps `file` and writes `mr-<task>-<bucket>` for every bucket, empty ones included, so a
/// reduce can tell a missing file (an error) from an empty one.
pub fn run_map(task: usize, file: &str, n_reduce: usize, map: MapFn) -> Result<(), MrError> {
    if n_reduce == 0 {
        return Err(MrError::Usage("n_reduce must be at least 1".into()));
    }
    let contents = read_text(Path::new(file))?;
    let mut buckets: Vec<Vec<KeyValue>> = vec![Vec::new(); n_reduce];
    for kv in map(file, &contents) {
        buckets[ihash(&kv.key) as usize % n_reduce].push(kv);
    }
    for (bucket, kvs) in buckets.iter().enumerate() {
        let name = intermediate_name(task, bucket);
        let bytes = labcodec::encode(kvs).map_err(|source| MrError::Codec {
            what: format!("encoding {name}"),
            source,
        })?;
        write_atomically(Path::new(&name), &bytes)?;
    }
    Ok(())
}

/// Reads bucket `task` of every map's output, groups by key, reduces, and writes `mr-out-<task>`.
pub fn run_reduce(task: usize, n_map: usize, reduce: ReduceFn) -> Result<(), MrError> {
    let mut kvs: Vec<KeyValue> = Vec::new();
    for map_task in 0..n_map {
        let path = PathBuf::from(intermediate_name(map_task, task));
        let bytes = std::fs::read(&path).map_err(|source| MrError::Read {
            path: path.clone(),
            source,
        })?;
        let part: Vec<KeyValue> = labcodec::decode(&bytes).map_err(|source| MrError::Codec {
            what: format!("decoding {}", path.display()),
            source,
        })?;
        kvs.extend(part);
    }
    let output = reduce_sorted(kvs, reduce);
    write_atomically(Path::new(&output_name(task)), output.as_bytes())
}

/// Sorts `kvs` by key, calls `reduce` once per key, and returns the `key value` lines.
pub fn reduce_sorted(mut kvs: Vec<KeyValue>, reduce: ReduceFn) -> String {
    kvs.sort_by(|a, b| a.key.cmp(&b.key));
    let mut output = String::new();
    let mut pairs = kvs.into_iter().peekable();
    let mut values = Vec::new();
    while let Some(first) = pairs.next() {
        values.clear();
        values.push(first.value);
        while let Some(next) = pairs.next_if(|kv| kv.key == first.key) {
            values.push(next.value);
        }
        let result = reduce(&first.key, &values);
        output.push_str(&first.key);
        output.push(' ');
        output.push_str(&result);
        output.push('\n');
    }
    output
}

/// The whole `main` of a worker binary for your own map and reduce functions: parses
/// `[--socket PATH]`, runs the worker in the current directory, and turns the result into an
/// exit code (0 when the job is over, 1 on a local failure, 2 on a bad command line).
pub fn worker_main(
    map: impl Fn(&str, &str) -> Vec<KeyValue>,
    reduce: impl Fn(&str, &[String]) -> String,
) -> ExitCode {
    let program = crate::mr::cli::program_name();
    let usage = format!("usage: {program} [--socket PATH]");
    crate::mr::cli::init_logging();
    let args = match crate::mr::cli::parse_args(std::env::args_os().skip(1)) {
        Ok(args) if args.help => {
            eprintln!("{usage}");
            return ExitCode::SUCCESS;
        }
        Ok(args) if args.positional.is_empty() => args,
        Ok(_) => return crate::mr::cli::fail(&MrError::Usage(usage.clone()), &usage),
        Err(e) => return crate::mr::cli::fail(&e, &usage),
    };
    let socket = rpc::socket_path(args.socket.as_deref());
    match run_worker(&socket, &map, &reduce) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => crate::mr::cli::fail(&e, &usage),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ihash_is_fnv1a_32_masked() {
        // FNV-1a 32 of "" is the offset basis; of "a" is 0xe40c292c.
        assert_eq!(ihash(""), 0x811c_9dc5 & 0x7fff_ffff);
        assert_eq!(ihash("a"), 0xe40c_292c & 0x7fff_ffff);
        assert_eq!(ihash("foobar"), 0xbf9c_f968 & 0x7fff_ffff);
    }

    #[test]
    fn reduce_groups_by_key_in_key_order() {
        let kvs = vec![
            KeyValue::new("b", "1"),
            KeyValue::new("a", "1"),
            KeyValue::new("b", "1"),
        ];
        let out = reduce_sorted(kvs, &|_, vs: &[String]| vs.len().to_string());
        assert_eq!(out, "a 1\nb 2\n");
    }
}
