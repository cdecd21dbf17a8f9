//! What the MapReduce binaries share: the `--socket` flag, error exits, and a small stderr
//! logger switched on by `MR_LOG` (silent unless asked).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::mr::MrError;

/// The environment variable that turns logging on: `error`, `warn`, `info`, `debug` or `trace`.
pub const LOG_ENV: &str = "MR_LOG";

/// A parsed command line: the common flags and the positional arguments.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Args {
    /// `--socket PATH` or `--socket=PATH`.
    pub socket: Option<PathBuf>,
    /// `-h` or `--help`.
    pub help: bool,
    /// Everything else, in order; everything after `--` lands here untouched.
    pub positional: Vec<String>,
}

/// Parses `[--socket PATH] [-h|--help] [--] ARGS...`. Unknown flags and non-UTF-8 arguments
/// are usage errors.
pub fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Args, MrError> {
    let mut parsed = Args::default();
    let mut args = args.into_iter();
    let mut flags_done = false;
    while let Some(arg) = args.next() {
        let arg = arg
            .into_string()
            .map_err(|a| MrError::Usage(format!("argument {a:?} is not valid UTF-8")))?;
        if flags_done || !arg.starts_with('-') || arg == "-" {
            parsed.positional.push(arg);
            continue;
        }
        match arg.as_str() {
            "--" => flags_done = true,
            "-h" | "--help" => parsed.help = true,
            "--socket" => {
                let path = args
                    .next()
                    .ok_or_else(|| MrError::Usage("--socket needs a path".into()))?;
                parsed.socket = Some(PathBuf::from(path));
            }
            _ => match arg.strip_prefix("--socket=") {
                Some(path) if !path.is_empty() => parsed.socket = Some(PathBuf::from(path)),
                _ => return Err(MrError::Usage(format!("unknown flag {arg:?}"))),
            },
        }
    }
    Ok(parsed)
}

/// The running program's file name, for messages.
pub fn program_name() -> String {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "mr".into())
}

/// Prints `err` (and `usage`, for usage errors) on stderr and returns the exit code for it:
/// 2 for a bad command line, 1 for everything else.
pub fn fail(err: &MrError, usage: &str) -> ExitCode {
    let program = program_name();
    match err {
        MrError::Usage(text) if text == usage => {
            eprintln!("{usage}");
            ExitCode::from(2)
        }
        MrError::Usage(_) | MrError::UnknownApp(_) => {
            eprintln!("{program}: {err}\n{usage}");
            ExitCode::from(2)
        }
        _ => {
            eprintln!("{program}: {err}");
            ExitCode::from(1)
        }
    }
}

struct StderrLogger {
    level: log::LevelFilter,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "[{} {} {}] {}",
                std::process::id(),
                record.level(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

/// Installs the stderr logger at the level named by `$MR_LOG`; does nothing if it is unset or
/// a logger is already installed.
pub fn init_logging() {
    let Some(level) = std::env::var(LOG_ENV)
        .ok()
        .and_then(|v| v.parse::<log::LevelFilter>().ok())
    else {
        return;
    };
    let logger = Box::new(StderrLogger { level });
    if log::set_boxed_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, MrError> {
        parse_args(args.iter().map(OsString::from))
    }

    #[test]
    fn socket_flag_forms() {
        let a = parse(&["--socket", "/tmp/s", "wc"]).unwrap();
        assert_eq!(a.socket, Some(PathBuf::from("/tmp/s")));
        assert_eq!(a.positional, vec!["wc"]);
        let b = parse(&["wc", "--socket=/tmp/t"]).unwrap();
        assert_eq!(b.socket, Some(PathBuf::from("/tmp/t")));
        let c = parse(&["--", "--socket", "x"]).unwrap();
        assert_eq!(c.socket, None);
        assert_eq!(c.positional, vec!["--socket", "x"]);
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        assert!(matches!(parse(&["--bogus"]), Err(MrError::Usage(_))));
        assert!(matches!(parse(&["--socket"]), Err(MrError::Usage(_))));
        assert!(matches!(parse(&["--socket="]), Err(MrError::Usage(_))));
    }
}
