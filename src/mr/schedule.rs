//! The coordinator's task state machine, kept free of sockets, threads and clocks: every
//! method takes `now`, so tests drive time by hand instead of sleeping ten seconds.
//!
//! Each task is `Idle`, `Running` (since some instant) or `Done`. Maps are handed out first;
//! no reduce is handed out until every map is done, because a reduce reads all maps' output.
//! A task still `Running` after [`Schedule::reissue_after`] is presumed lost (its worker
//! crashed or stalled) and is handed out again. A task that nobody times out is handed out
//! exactly once, which is what the job-count test checks.
//!
//! Reports: the first `Finished` for a running task marks it done, whichever attempt sends it
//! (every attempt writes the same files through atomic renames, so any one of them will do).
//! A report for a task already done, or for a task that was never handed out, or naming a task
//! that does not exist, is ignored.

use std::time::{Duration, Instant};

use crate::mr::rpc::{Assignment, TaskId, TaskReport};

/// How long a task may run before the coordinator hands it to someone else, as the lab says.
pub const REISSUE_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskState {
    Idle,
    Running { issued_at: Instant, attempt: u32 },
    Done,
}

/// What became of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportOutcome {
    /// The task is now done.
    Accepted,
    /// The task had failed; the job is over.
    JobFailed,
    /// The task was already done, or was never handed out: a late or stray report.
    Ignored,
    /// No such task.
    Unknown,
}

/// The tasks of one job and where each stands.
#[derive(Debug)]
pub struct Schedule {
    files: Vec<String>,
    n_reduce: usize,
    maps: Vec<TaskState>,
    reduces: Vec<TaskState>,
    maps_left: usize,
    reduces_left: usize,
    reissue_after: Duration,
    failure: Option<String>,
}

impl Schedule {
    /// A job with one map task per input file and `n_reduce` reduce tasks.
    pub fn new(files: Vec<String>, n_reduce: usize) -> Schedule {
        Schedule::with_reissue_after(files, n_reduce, REISSUE_AFTER)
    }

    /// As [`Schedule::new`], re-issuing silent tasks after `reissue_after`.
    pub fn with_reissue_after(
        files: Vec<String>,
        n_reduce: usize,
        reissue_after: Duration,
    ) -> Schedule {
        let n_map = files.len();
        Schedule {
            files,
            n_reduce,
            maps: vec![TaskState::Idle; n_map],
            reduces: vec![TaskState::Idle; n_reduce],
            maps_left: n_map,
            reduces_left: n_reduce,
            reissue_after,
            failure: None,
        }
    }

    /// The time after which a running task is handed out again.
    pub fn reissue_after(&self) -> Duration {
        self.reissue_after
    }

    /// The next thing for a worker asking at `now` to do.
    pub fn assign(&mut self, now: Instant) -> Assignment {
        if self.is_done() {
            return Assignment::Exit;
        }
        if self.maps_left > 0 {
            return match pick("map", &mut self.maps, now, self.reissue_after) {
                Some((task, attempt)) => Assignment::Map {
                    task,
                    attempt,
                    file: self.files[task].clone(),
                    n_reduce: self.n_reduce,
                },
                None => Assignment::Wait,
            };
        }
        match pick("reduce", &mut self.reduces, now, self.reissue_after) {
            Some((task, attempt)) => Assignment::Reduce {
                task,
                attempt,
                n_map: self.maps.len(),
            },
            None => Assignment::Wait,
        }
    }

    /// Takes in a worker's report.
    pub fn report(&mut self, report: &TaskReport) -> ReportOutcome {
        let (task, failure) = match report {
            TaskReport::Finished(task) => (*task, None),
            TaskReport::Failed { task, reason } => (*task, Some(reason)),
        };
        let (states, left, index) = match task {
            TaskId::Map(i) => (&mut self.maps, &mut self.maps_left, i),
            TaskId::Reduce(i) => (&mut self.reduces, &mut self.reduces_left, i),
        };
        let Some(state) = states.get_mut(index) else {
            return ReportOutcome::Unknown;
        };
        if !matches!(state, TaskState::Running { .. }) {
            return ReportOutcome::Ignored;
        }
        if let Some(reason) = failure {
            if self.failure.is_none() {
                self.failure = Some(format!("{task:?}: {reason}"));
            }
            return ReportOutcome::JobFailed;
        }
        *state = TaskState::Done;
        *left -= 1;
        debug_assert!(
            self.maps_left > 0 || self.maps.iter().all(|s| *s == TaskState::Done),
            "maps_left is 0 but some map is not done: {:?}",
            self.maps
        );
        ReportOutcome::Accepted
    }

    /// True once every reduce task is done, or a task has failed.
    pub fn is_done(&self) -> bool {
        self.failure.is_some() || (self.maps_left == 0 && self.reduces_left == 0)
    }

    /// Why the job failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// How many map and reduce tasks are not yet done.
    pub fn remaining(&self) -> (usize, usize) {
        (self.maps_left, self.reduces_left)
    }
}

/// Marks the first idle task, or else the first task running longer than `reissue_after`,
/// as running from `now`; returns its index and attempt number.
fn pick(
    kind: &str,
    states: &mut [TaskState],
    now: Instant,
    reissue_after: Duration,
) -> Option<(usize, u32)> {
    let idle = states.iter().position(|s| *s == TaskState::Idle);
    let (index, attempt) = match idle {
        Some(index) => (index, 1),
        None => states.iter().enumerate().find_map(|(index, s)| match *s {
            TaskState::Running { issued_at, attempt }
                if now.saturating_duration_since(issued_at) >= reissue_after =>
            {
                Some((index, attempt + 1))
            }
            _ => None,
        })?,
    };
    if attempt > 1 {
        log::info!(target: "mr", "{kind} {index} silent for {reissue_after:?}: re-issuing as attempt {attempt}");
    }
    states[index] = TaskState::Running {
        issued_at: now,
        attempt,
    };
    Some((index, attempt))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("in-{i}")).collect()
    }

    fn map_task(a: &Assignment) -> usize {
        match a {
            Assignment::Map { task, .. } => *task,
            other => panic!("expected a map, got {other:?}"),
        }
    }

    #[test]
    fn each_task_handed_out_once_when_nothing_fails() {
        let t0 = Instant::now();
        let mut s = Schedule::new(files(3), 2);
        let issued: Vec<usize> = (0..3).map(|_| map_task(&s.assign(t0))).collect();
        assert_eq!(issued, vec![0, 1, 2]);
        // All maps running, none timed out: a late-starting worker waits instead of redoing one.
        assert_eq!(s.assign(t0 + Duration::from_secs(9)), Assignment::Wait);
        for i in 0..3 {
            assert_eq!(
                s.report(&TaskReport::Finished(TaskId::Map(i))),
                ReportOutcome::Accepted
            );
        }
        let r0 = s.assign(t0);
        let r1 = s.assign(t0);
        assert!(matches!(
            r0,
            Assignment::Reduce {
                task: 0,
                attempt: 1,
                n_map: 3
            }
        ));
        assert!(matches!(
            r1,
            Assignment::Reduce {
                task: 1,
                attempt: 1,
                n_map: 3
            }
        ));
        assert_eq!(s.assign(t0), Assignment::Wait);
        assert!(!s.is_done());
        s.report(&TaskReport::Finished(TaskId::Reduce(0)));
        s.report(&TaskReport::Finished(TaskId::Reduce(1)));
        assert!(s.is_done());
        assert_eq!(s.assign(t0), Assignment::Exit);
    }

    #[test]
    fn no_reduce_before_all_maps_done() {
        let t0 = Instant::now();
        let mut s = Schedule::new(files(2), 1);
        s.assign(t0);
        s.assign(t0);
        s.report(&TaskReport::Finished(TaskId::Map(1)));
        assert_eq!(s.assign(t0), Assignment::Wait);
        s.report(&TaskReport::Finished(TaskId::Map(0)));
        assert!(matches!(s.assign(t0), Assignment::Reduce { task: 0, .. }));
    }

    #[test]
    fn silent_task_reissued_after_timeout() {
        let t0 = Instant::now();
        let mut s = Schedule::with_reissue_after(files(1), 1, Duration::from_secs(10));
        assert_eq!(map_task(&s.assign(t0)), 0);
        assert_eq!(
            s.assign(t0 + Duration::from_millis(9_999)),
            Assignment::Wait
        );
        let again = s.assign(t0 + Duration::from_secs(10));
        assert!(
            matches!(
                again,
                Assignment::Map {
                    task: 0,
                    attempt: 2,
                    ..
                }
            ),
            "{again:?}"
        );
        // The re-issue restarts the clock: a third worker waits another full period.
        assert_eq!(s.assign(t0 + Duration::from_secs(15)), Assignment::Wait);
        assert!(matches!(
            s.assign(t0 + Duration::from_secs(20)),
            Assignment::Map {
                task: 0,
                attempt: 3,
                ..
            }
        ));
    }

    #[test]
    fn late_reports_ignored() {
        let t0 = Instant::now();
        let mut s = Schedule::with_reissue_after(files(1), 1, Duration::from_secs(10));
        s.assign(t0);
        s.assign(t0 + Duration::from_secs(11)); // attempt 2 after the first went silent
        let done = TaskReport::Finished(TaskId::Map(0));
        assert_eq!(s.report(&done), ReportOutcome::Accepted);
        // The first attempt wakes up and reports too: already done, ignored, nothing double-counted.
        assert_eq!(s.report(&done), ReportOutcome::Ignored);
        assert_eq!(s.remaining(), (0, 1));
        let reduce_done = TaskReport::Finished(TaskId::Reduce(0));
        // A report for a reduce never handed out, or for a task that does not exist.
        assert_eq!(s.report(&reduce_done), ReportOutcome::Ignored);
        let unknown = TaskReport::Finished(TaskId::Map(7));
        assert_eq!(s.report(&unknown), ReportOutcome::Unknown);
        assert!(matches!(s.assign(t0), Assignment::Reduce { task: 0, .. }));
        assert_eq!(s.report(&reduce_done), ReportOutcome::Accepted);
        assert_eq!(s.report(&reduce_done), ReportOutcome::Ignored);
        assert!(s.is_done());
    }

    #[test]
    fn failure_ends_the_job() {
        let t0 = Instant::now();
        let mut s = Schedule::new(files(2), 1);
        s.assign(t0);
        let failed = TaskReport::Failed {
            task: TaskId::Map(0),
            reason: "in-0 is not valid UTF-8 text".into(),
        };
        assert_eq!(s.report(&failed), ReportOutcome::JobFailed);
        assert!(s.is_done());
        assert!(s.failure().unwrap().contains("UTF-8"));
        assert_eq!(s.assign(t0), Assignment::Exit);
    }

    #[test]
    fn empty_job_is_done_after_reduces() {
        let t0 = Instant::now();
        let mut s = Schedule::new(Vec::new(), 1);
        assert!(matches!(
            s.assign(t0),
            Assignment::Reduce {
                task: 0,
                n_map: 0,
                ..
            }
        ));
        s.report(&TaskReport::Finished(TaskId::Reduce(0)));
        assert!(s.is_done());
    }
}
