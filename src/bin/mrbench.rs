//! `mrbench [--runs N]` (default 3): times word count with `mrsequential` and with 1, 2 and 4 workers, on
//! the generator's default corpus (about 3.2 MB) and on the books in `/work/shared/data` when
//! present, and prints wall time and speedup over sequential. Uses the `mrsequential`,
//! `mrcoordinator` and `mrworker` binaries next to its own, so build them together:
//!
//! ```text
//! cargo build --release --bins && target/release/mrbench
//! ```
//!
//! A distributed run is timed from starting the coordinator until the last worker exits,
//! which is when the job is done (workers exit on the coordinator's "job over" reply); the
//! coordinator's own one-second linger before exiting is not counted.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use raftkv::mr::textgen::{GenConfig, write_corpus};

const BOOKS_DIR: &str = "/work/shared/data";
const WORKER_COUNTS: [usize; 3] = [1, 2, 4];

struct Bench {
    bin_dir: PathBuf,
    scratch: PathBuf,
    runs: usize,
}

/// Times word count with `mrsequential` and with 1, 2 and 4 workers.
#[derive(clap::Parser)]
#[command(
    name = "mrbench",
    help_template = "{about-with-newline}\nusage: {usage}\n\n{all-args}"
)]
struct Cli {
    /// Timed runs of each configuration (the best is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
}

fn main() -> ExitCode {
    raftkv::mr::cli::init_logging();
    let runs = <Cli as clap::Parser>::parse().runs as usize;
    match run(runs) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mrbench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(runs: usize) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin_dir = exe.parent().ok_or("no binary directory")?.to_path_buf();
    for name in ["mrsequential", "mrcoordinator", "mrworker"] {
        if !bin_dir.join(name).exists() {
            return Err(format!(
                "{name} not found in {}; run `cargo build --release --bins` first",
                bin_dir.display()
            ));
        }
    }
    let scratch = std::env::temp_dir().join(format!("rkv-mrbench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(scratch.join("in")).map_err(|e| e.to_string())?;
    let bench = Bench {
        bin_dir,
        scratch,
        runs,
    };
    let result = bench.all();
    let _ = std::fs::remove_dir_all(&bench.scratch);
    result
}

impl Bench {
    fn all(&self) -> Result<(), String> {
        println!(
            "wc, {} runs each, {} cores; speedup = best sequential / best",
            self.runs,
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        println!(
            "{:<12} {:>8} {:<14} {:>10} {:>10} {:>8}",
            "input", "MB", "run", "best ms", "median ms", "speedup"
        );
        let generated = write_corpus(&self.scratch.join("in"), &GenConfig::default())
            .map_err(|e| e.to_string())?;
        self.dataset("generated", &generated)?;
        let mut books: Vec<PathBuf> = std::fs::read_dir(BOOKS_DIR)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "txt"))
                    .collect()
            })
            .unwrap_or_default();
        books.sort();
        if books.is_empty() {
            println!("books: skipped, no *.txt in {BOOKS_DIR}");
        } else {
            self.dataset("books", &books)?;
        }
        Ok(())
    }

    fn dataset(&self, name: &str, files: &[PathBuf]) -> Result<(), String> {
        let files: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        let bytes: u64 = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        let mb = bytes as f64 / 1e6;
        let mut want = Vec::new();
        let mut times = Vec::new();
        for _ in 0..self.runs {
            let dir = self.fresh_dir()?;
            let start = Instant::now();
            let mut child = self
                .command("mrsequential", &dir)
                .arg("wc")
                .args(&files)
                .spawn_ok()?;
            wait_success(&mut child, "mrsequential")?;
            times.push(start.elapsed());
            want = sorted_output(&dir)?;
        }
        let (sequential, sequential_median) = summary(times);
        println!(
            "{name:<12} {mb:>8.2} {:<14} {:>10.0} {:>10.0} {:>8}",
            "sequential",
            ms(sequential),
            ms(sequential_median),
            "1.00"
        );
        for workers in WORKER_COUNTS {
            let mut times = Vec::new();
            for _ in 0..self.runs {
                let dir = self.fresh_dir()?;
                times.push(self.distributed(&dir, &files, workers)?);
                if sorted_output(&dir)? != want {
                    return Err(format!(
                        "{name}: {workers} workers' output differs from sequential"
                    ));
                }
            }
            let (wall, wall_median) = summary(times);
            println!(
                "{name:<12} {mb:>8.2} {:<14} {:>10.0} {:>10.0} {:>8.2}",
                format!("{workers} worker{}", if workers == 1 { "" } else { "s" }),
                ms(wall),
                ms(wall_median),
                sequential.as_secs_f64() / wall.as_secs_f64()
            );
        }
        Ok(())
    }

    fn distributed(
        &self,
        dir: &Path,
        files: &[String],
        workers: usize,
    ) -> Result<Duration, String> {
        let socket = dir.join("mr.sock");
        let start = Instant::now();
        let mut coordinator = self
            .command("mrcoordinator", dir)
            .arg("--socket")
            .arg(&socket)
            .args(files)
            .spawn_ok()?;
        while !socket.exists() {
            if coordinator.try_wait().map_err(|e| e.to_string())?.is_some() {
                return Err("coordinator exited early".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut children = Vec::new();
        for _ in 0..workers {
            let worker = self
                .command("mrworker", dir)
                .arg("--socket")
                .arg(&socket)
                .arg("wc")
                .spawn_ok();
            match worker {
                Ok(child) => children.push(child),
                Err(e) => {
                    let _ = coordinator.kill();
                    return Err(e);
                }
            }
        }
        for child in &mut children {
            wait_success(child, "mrworker")?;
        }
        let wall = start.elapsed();
        wait_success(&mut coordinator, "mrcoordinator")?;
        Ok(wall)
    }

    fn fresh_dir(&self) -> Result<PathBuf, String> {
        let dir = self.scratch.join("run");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        Ok(dir)
    }

    fn command(&self, binary: &str, dir: &Path) -> Command {
        let mut command = Command::new(self.bin_dir.join(binary));
        command
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        command
    }
}

trait SpawnOk {
    fn spawn_ok(&mut self) -> Result<Child, String>;
}

impl SpawnOk for Command {
    fn spawn_ok(&mut self) -> Result<Child, String> {
        self.spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", self.get_program()))
    }
}

fn wait_success(child: &mut Child, what: &str) -> Result<(), String> {
    let status = child.wait().map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed: {status}"))
    }
}

fn sorted_output(dir: &Path) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        if entry.file_name().to_string_lossy().starts_with("mr-out") {
            let text = std::fs::read_to_string(entry.path()).map_err(|e| e.to_string())?;
            lines.extend(text.lines().filter(|l| !l.is_empty()).map(str::to_owned));
        }
    }
    lines.sort();
    Ok(lines)
}

/// (best, median): on a shared machine the best run is the one least disturbed by others.
fn summary(mut times: Vec<Duration>) -> (Duration, Duration) {
    times.sort();
    (times[0], times[times.len() / 2])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
