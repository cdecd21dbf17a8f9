//! The seven scenarios of the lab's `test-mr.sh`, run against the real binaries: each test
//! gets its own directory (generated input in `in/`: the books' size, 3.2 MB, for `wc`,
//! `indexer` and `crash`, as the lab runs them; 800 kB for the scheduling scenarios;
//! processes run in `run/`) and its own
//! socket, so the tests can run in parallel. Every process a test starts is killed when the
//! test ends, pass or fail.
//!
//! Pass conditions and timeouts are the script's: 45 s per process (120 s in the crash test),
//! outputs compared as sorted non-empty lines of `mr-out*` against `mrsequential`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use raftkv::mr::textgen::{GenConfig, write_corpus};

/// At most four jobs at once however many test threads run this binary: they need the CPU.
#[path = "kit/heavy.rs"]
mod heavy;

const TIMEOUT: Duration = Duration::from_secs(45);
const CRASH_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(25);

/// One test's directory, socket and child processes.
struct Job {
    root: PathBuf,
    run: PathBuf,
    socket: PathBuf,
    inputs: Vec<String>,
    children: Mutex<Vec<Arc<Mutex<Child>>>>,
    /// Given back after the children are killed (fields drop after `Drop::drop`).
    _slot: heavy::Slot,
}

/// A child process with a deadline.
struct Proc {
    what: String,
    child: Arc<Mutex<Child>>,
    deadline: Instant,
}

impl Job {
    /// A job on eight small generated files (100 kB each): the scenarios about scheduling,
    /// where input size does not matter and CPU is better spent elsewhere.
    fn new(test: &str) -> Job {
        Job::with_input(
            test,
            &GenConfig {
                files: 8,
                bytes_per_file: 100_000,
                ..GenConfig::default()
            },
        )
    }

    /// A job on input the size of the lab's eight books (8 files, 3.2 MB), as the lab's
    /// script runs `wc`, `indexer` and `crash`.
    fn books_sized(test: &str) -> Job {
        Job::with_input(test, &GenConfig::default())
    }

    fn with_input(test: &str, config: &GenConfig) -> Job {
        let slot = heavy::slot();
        let root = std::env::temp_dir().join(format!("rkv-mr-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let run = root.join("run");
        let input_dir = root.join("in");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::create_dir_all(&input_dir).unwrap();
        let inputs = write_corpus(&input_dir, config)
            .unwrap()
            .iter()
            .map(|p| format!("../in/{}", p.file_name().unwrap().to_string_lossy()))
            .collect();
        Job {
            socket: root.join("mr.sock"),
            root,
            run,
            inputs,
            children: Mutex::new(Vec::new()),
            _slot: slot,
        }
    }

    fn spawn(&self, binary: &str, args: &[&str], timeout: Duration) -> Proc {
        let child = Command::new(binary)
            .args(args)
            .current_dir(&self.run)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        let child = Arc::new(Mutex::new(child));
        self.children.lock().unwrap().push(Arc::clone(&child));
        let name = Path::new(binary).file_name().unwrap().to_string_lossy();
        Proc {
            what: format!("{name} {}", args.last().copied().unwrap_or("")),
            child,
            deadline: Instant::now() + timeout,
        }
    }

    /// Starts the coordinator and waits until its socket exists (the script sleeps 1 s instead).
    fn coordinator(&self, timeout: Duration) -> Proc {
        let socket = self.socket.to_str().unwrap();
        let mut args = vec!["--socket", socket];
        args.extend(self.inputs.iter().map(String::as_str));
        let proc = self.spawn(env!("CARGO_BIN_EXE_mrcoordinator"), &args, timeout);
        let give_up = Instant::now() + Duration::from_secs(10);
        while !self.socket.exists() {
            assert!(
                proc.exited().is_none(),
                "coordinator exited before listening"
            );
            assert!(
                Instant::now() < give_up,
                "coordinator socket never appeared"
            );
            thread::sleep(POLL);
        }
        proc
    }

    fn worker(&self, app: &str, timeout: Duration) -> Proc {
        let socket = self.socket.to_str().unwrap();
        self.spawn(
            env!("CARGO_BIN_EXE_mrworker"),
            &["--socket", socket, app],
            timeout,
        )
    }

    /// Runs `mrsequential app` and returns its sorted output lines.
    fn reference(&self, app: &str) -> Vec<String> {
        let mut args = vec![app];
        args.extend(self.inputs.iter().map(String::as_str));
        let status = self
            .spawn(env!("CARGO_BIN_EXE_mrsequential"), &args, TIMEOUT)
            .wait();
        assert!(status.success(), "mrsequential {app} failed: {status}");
        let out = self.run.join("mr-out-0");
        let mut lines = non_empty_lines(&std::fs::read_to_string(&out).unwrap());
        std::fs::remove_file(&out).unwrap();
        lines.sort();
        lines
    }

    /// `sort mr-out* | grep .`
    fn outputs(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for entry in std::fs::read_dir(&self.run).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name().to_string_lossy().starts_with("mr-out") {
                lines.extend(non_empty_lines(
                    &std::fs::read_to_string(entry.path()).unwrap(),
                ));
            }
        }
        lines.sort();
        lines
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        for child in self.children.lock().unwrap().iter() {
            let mut child = child.lock().unwrap();
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if thread::panicking() {
            eprintln!("test files kept in {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

impl Proc {
    /// The exit status if the process has exited. Kills it and fails the test past its deadline.
    fn exited(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap();
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= self.deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} did not exit in time; killed", self.what);
        }
        None
    }

    fn wait(&self) -> ExitStatus {
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            thread::sleep(POLL);
        }
    }

    fn wait_ok(&self) {
        let status = self.wait();
        assert!(status.success(), "{} failed: {status}", self.what);
    }
}

fn non_empty_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Like `assert_eq!` on two big line lists, but reports the first difference, not everything.
fn assert_same_output(got: &[String], want: &[String], what: &str) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(g, w)| g != w);
    panic!(
        "{what}: output differs from mrsequential: {} lines vs {} expected; first difference at {:?}: got {:?}, want {:?}",
        got.len(),
        want.len(),
        first,
        first.and_then(|i| got.get(i)),
        first.and_then(|i| want.get(i)),
    );
}

#[test]
fn wc() {
    let job = Job::books_sized("wc");
    let want = job.reference("wc");
    let coordinator = job.coordinator(TIMEOUT);
    let workers: Vec<Proc> = (0..3).map(|_| job.worker("wc", TIMEOUT)).collect();
    coordinator.wait_ok();
    assert_same_output(&job.outputs(), &want, "wc");
    for w in &workers {
        w.wait_ok();
    }
}

#[test]
fn indexer() {
    let job = Job::books_sized("indexer");
    let want = job.reference("indexer");
    let coordinator = job.coordinator(TIMEOUT);
    let background = job.worker("indexer", TIMEOUT);
    job.worker("indexer", TIMEOUT).wait_ok();
    // A worker may not exit before the job's output is complete.
    assert_same_output(&job.outputs(), &want, "indexer");
    background.wait_ok();
    coordinator.wait_ok();
}

#[test]
fn map_parallelism() {
    let job = Job::new("map_parallelism");
    let coordinator = job.coordinator(TIMEOUT);
    let background = job.worker("mtiming", TIMEOUT);
    job.worker("mtiming", TIMEOUT).wait_ok();
    let lines = job.outputs();
    let timed = lines.iter().filter(|l| l.starts_with("times-")).count();
    assert_eq!(
        timed, 2,
        "map workers that ran maps: {timed}, want 2\n{lines:#?}"
    );
    let overlapped = lines.iter().any(|l| {
        l.strip_prefix("parallel")
            .is_some_and(|rest| rest.contains(" 2"))
    });
    assert!(
        overlapped,
        "map workers did not run in parallel\n{lines:#?}"
    );
    background.wait_ok();
    coordinator.wait_ok();
}

#[test]
fn reduce_parallelism() {
    let job = Job::new("reduce_parallelism");
    let coordinator = job.coordinator(TIMEOUT);
    let background = job.worker("rtiming", TIMEOUT);
    job.worker("rtiming", TIMEOUT).wait_ok();
    let lines = job.outputs();
    let overlapped = lines
        .iter()
        .filter(|l| {
            let b = l.as_bytes();
            b.len() >= 3 && b[0].is_ascii_lowercase() && &b[1..3] == b" 2"
        })
        .count();
    assert!(
        overlapped >= 2,
        "too few parallel reduces: {overlapped}\n{lines:#?}"
    );
    background.wait_ok();
    coordinator.wait_ok();
}

#[test]
fn job_count() {
    let job = Job::new("job_count");
    let coordinator = job.coordinator(TIMEOUT);
    let first = job.worker("jobcount", TIMEOUT);
    job.worker("jobcount", TIMEOUT).wait_ok();
    // Late workers must not cause any map to run again.
    let third = job.worker("jobcount", TIMEOUT);
    job.worker("jobcount", TIMEOUT).wait_ok();
    let counts: Vec<String> = job
        .outputs()
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect();
    assert_eq!(counts, vec!["8"], "map jobs ran the wrong number of times");
    first.wait_ok();
    third.wait_ok();
    coordinator.wait_ok();
}

#[test]
fn early_exit() {
    let job = Job::new("early_exit");
    let coordinator = job.coordinator(TIMEOUT);
    let mut procs = vec![coordinator];
    procs.extend((0..3).map(|_| job.worker("early_exit", TIMEOUT)));
    // As soon as any process exits, the output must already be final.
    while procs.iter().all(|p| p.exited().is_none()) {
        thread::sleep(POLL);
    }
    let initial = job.outputs();
    for p in &procs {
        p.wait_ok();
    }
    let last = job.outputs();
    assert!(
        !initial.is_empty(),
        "no output when the first process exited"
    );
    assert_eq!(
        initial, last,
        "output changed after the first process exited"
    );
}

#[test]
fn crash() {
    let job = Job::books_sized("crash");
    let want = job.reference("nocrash");
    let done_marker = job.run.join("mr-done");
    let coordinator = job.coordinator(CRASH_TIMEOUT);
    let first = job.worker("crash", CRASH_TIMEOUT);
    thread::scope(|s| {
        thread::Builder::new()
            .name("crash-coordinator-wait".into())
            .spawn_scoped(s, || {
                coordinator.wait_ok();
                std::fs::write(&done_marker, b"").unwrap();
            })
            .unwrap();
        // Keep restarting crashed workers while the coordinator is up, as the script's loops do.
        for i in 0..3 {
            let (job, done_marker) = (&job, &done_marker);
            thread::Builder::new()
                .name(format!("crash-restarter-{i}"))
                .spawn_scoped(s, move || {
                    while job.socket.exists() && !done_marker.exists() {
                        job.worker("crash", CRASH_TIMEOUT).wait();
                        thread::sleep(Duration::from_secs(1));
                    }
                })
                .unwrap();
        }
    });
    first.wait();
    assert_same_output(&job.outputs(), &want, "crash");
}

/// Runs `binary args` in `dir` to completion and returns (exit code, stderr).
fn run_capture(binary: &str, args: &[&str], dir: &Path) -> (Option<i32>, String) {
    let out = Command::new(binary)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .env_remove("MR_SOCKET")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_input_gives_clear_errors() {
    let job = Job::new("bad_input");
    std::fs::write(job.run.join("latin1.txt"), b"caf\xe9\n").unwrap();
    let socket = job.root.join("none.sock");
    let socket = socket.to_str().unwrap();
    let seq = env!("CARGO_BIN_EXE_mrsequential");
    let coord = env!("CARGO_BIN_EXE_mrcoordinator");
    let worker = env!("CARGO_BIN_EXE_mrworker");
    let cases: &[(&str, &[&str], i32, &str)] = &[
        (seq, &["wc", "missing.txt"], 1, "cannot read missing.txt"),
        (
            seq,
            &["wc", "latin1.txt"],
            1,
            "latin1.txt is not valid UTF-8",
        ),
        (
            seq,
            &["wc.so", "latin1.txt"],
            2,
            "unknown application \"wc.so\"",
        ),
        (seq, &["wc"], 2, "usage: mrsequential"),
        (
            coord,
            &["--socket", socket, "missing.txt"],
            1,
            "cannot read missing.txt",
        ),
        (
            coord,
            &["--socket", socket, "latin1.txt"],
            1,
            "not valid UTF-8",
        ),
        (
            coord,
            &["--nreduce", "3", "x.txt"],
            2,
            "unknown flag \"--nreduce\"",
        ),
        (coord, &["--socket"], 2, "--socket needs a path"),
        (
            worker,
            &["--socket", socket, "nosuchapp"],
            2,
            "unknown application",
        ),
        (worker, &[], 2, "usage: mrworker"),
        // No coordinator at the socket: the job is taken to be over, a clean exit.
        (worker, &["--socket", socket, "wc"], 0, ""),
    ];
    for &(binary, args, want_code, want_text) in cases {
        let (code, stderr) = run_capture(binary, args, &job.run);
        let name = Path::new(binary).file_name().unwrap().to_string_lossy();
        assert_eq!(code, Some(want_code), "{name} {args:?}: stderr {stderr:?}");
        assert!(
            stderr.contains(want_text),
            "{name} {args:?}: stderr {stderr:?}"
        );
    }
    assert!(!job.root.join("none.sock").exists());
}

#[test]
fn input_vanishing_mid_job_fails_the_job() {
    let job = Job::new("input_vanishing");
    let coordinator = job.coordinator(TIMEOUT);
    // The coordinator checked its inputs at startup; one disappears before any worker reads it.
    std::fs::remove_file(job.root.join("in/pg-grimm.txt")).unwrap();
    job.worker("wc", TIMEOUT).wait_ok();
    let status = coordinator.wait();
    assert_eq!(
        status.code(),
        Some(1),
        "the coordinator should report the failed job"
    );
}
