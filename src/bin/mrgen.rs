//! `mrgen [--files N] [--bytes-per-file B] [--vocabulary V] [--seed S] DIR`: writes a
//! deterministic corpus of Zipf-distributed word-like text into DIR (created if missing) and
//! prints the file paths, one a line.

use std::path::PathBuf;
use std::process::ExitCode;

use raftkv::mr::MrError;
use raftkv::mr::cli::fail;
use raftkv::mr::textgen::{GenConfig, write_corpus};

const USAGE: &str = "usage: mrgen [--files N] [--bytes-per-file B] [--vocabulary V] [--seed S] DIR\n\
    defaults: 8 files of 400000 bytes, 20000 words, seed 5840";

fn parse() -> Result<Option<(PathBuf, GenConfig)>, MrError> {
    let mut config = GenConfig::default();
    let mut dir = None;
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| {
            a.into_string()
                .map_err(|a| MrError::Usage(format!("argument {a:?} is not valid UTF-8")))
        })
        .collect::<Result<_, _>>()?;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut number = |flag: &str| -> Result<u64, MrError> {
            let value = args
                .next()
                .ok_or_else(|| MrError::Usage(format!("{flag} needs a number")))?;
            value
                .parse()
                .map_err(|_| MrError::Usage(format!("{flag}: {value:?} is not a number")))
        };
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--files" => config.files = number("--files")? as usize,
            "--bytes-per-file" => config.bytes_per_file = number("--bytes-per-file")? as usize,
            "--vocabulary" => config.vocabulary = number("--vocabulary")? as usize,
            "--seed" => config.seed = number("--seed")?,
            flag if flag.starts_with('-') => {
                return Err(MrError::Usage(format!("unknown flag {flag:?}")));
            }
            path if dir.is_none() => dir = Some(PathBuf::from(path)),
            extra => return Err(MrError::Usage(format!("unexpected argument {extra:?}"))),
        }
    }
    let dir = dir.ok_or_else(|| MrError::Usage(USAGE.into()))?;
    Ok(Some((dir, config)))
}

fn main() -> ExitCode {
    let (dir, config) = match parse() {
        Ok(Some(parsed)) => parsed,
        Ok(None) => {
            eprintln!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&e, USAGE),
    };
    if let Err(source) = std::fs::create_dir_all(&dir) {
        return fail(&MrError::Write { path: dir, source }, USAGE);
    }
    match write_corpus(&dir, &config) {
        Ok(paths) => {
            for path in paths {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e, USAGE),
    }
}
