//! `mrgen [--files N] [--bytes-per-file B] [--vocabulary V] [--seed S] DIR`: writes a
//! deterministic corpus of Zipf-distributed word-like text into DIR (created if missing) and
//! prints the file paths, one a line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use raftkv::mr::MrError;
use raftkv::mr::cli::fail;
use raftkv::mr::textgen::{GenConfig, write_corpus};

/// Writes a deterministic corpus of Zipf-distributed word-like text into DIR (created if
/// missing) and prints the file paths, one a line.
#[derive(Parser)]
#[command(
    name = "mrgen",
    help_template = "{about-with-newline}\nusage: {usage}\n\n{all-args}"
)]
struct Cli {
    /// Files to write.
    #[arg(long, default_value_t = GenConfig::default().files)]
    files: usize,
    /// Bytes per file.
    #[arg(long, default_value_t = GenConfig::default().bytes_per_file)]
    bytes_per_file: usize,
    /// Distinct words.
    #[arg(long, default_value_t = GenConfig::default().vocabulary)]
    vocabulary: usize,
    /// The generator's seed.
    #[arg(long, default_value_t = GenConfig::default().seed)]
    seed: u64,
    /// Where the files go.
    dir: PathBuf,
}

fn main() -> ExitCode {
    raftkv::mr::cli::init_logging();
    let cli = Cli::parse();
    let dir = cli.dir;
    let config = GenConfig {
        files: cli.files,
        bytes_per_file: cli.bytes_per_file,
        vocabulary: cli.vocabulary,
        seed: cli.seed,
    };
    let usage = "usage: mrgen [--files N] [--bytes-per-file B] [--vocabulary V] [--seed S] DIR";
    if let Err(source) = std::fs::create_dir_all(&dir) {
        return fail(&MrError::Write { path: dir, source }, usage);
    }
    match write_corpus(&dir, &config) {
        Ok(paths) => {
            for path in paths {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e, usage),
    }
}
