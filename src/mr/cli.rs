//! What the MapReduce binaries share: the `--socket` flag, error exits, and the logger
//! (`RUST_LOG`, or `MR_LOG`; silent unless asked).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::mr::MrError;

/// The environment variable that turns logging on when `RUST_LOG` is unset (same syntax).
pub const LOG_ENV: &str = "MR_LOG";

/// A parsed command line: the common flags and the positional arguments.
#[derive(Debug, Default, PartialEq, Eq, clap::Parser)]
#[command(
    no_binary_name = true,
    disable_help_flag = true,
    disable_version_flag = true,
    args_override_self = true
)]
pub struct Args {
    /// `--socket PATH` or `--socket=PATH`.
    #[arg(long, value_parser = clap::builder::TypedValueParser::map(
        clap::builder::NonEmptyStringValueParser::new(),
        PathBuf::from,
    ))]
    pub socket: Option<PathBuf>,
    /// `-h` or `--help`.
    #[arg(short = 'h', long = "help")]
    pub help: bool,
    /// Everything else, in order; everything after `--` lands here untouched.
    pub positional: Vec<String>,
}

/// Parses `[--socket PATH] [-h|--help] [--] ARGS...` (with clap). Unknown flags and non-UTF-8
/// arguments are usage errors, worded as the MapReduce programs always have.
pub fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Args, MrError> {
    use clap::Parser;
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    Args::try_parse_from(args).map_err(|e| {
        let arg = match e.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(arg)) => arg.clone(),
            _ => String::new(),
        };
        MrError::Usage(match e.kind() {
            ErrorKind::UnknownArgument => format!("unknown flag {arg:?}"),
            ErrorKind::InvalidValue | ErrorKind::NoEquals if arg.starts_with("--socket") => {
                "--socket needs a path".into()
            }
            ErrorKind::InvalidUtf8 => "an argument is not valid UTF-8".into(),
            _ => e
                .render()
                .to_string()
                .lines()
                .next()
                .unwrap_or("bad arguments")
                .to_string(),
        })
    })
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

/// Reads this process's command line for a program whose usage is `usage`: `-h` prints the
/// usage and ends the program with success; a line clap cannot parse, or one `accept` refuses
/// (it returns `false` for a wrong shape), prints the usage and ends it with exit status 2.
pub fn command_line(
    usage: &str,
    accept: impl FnOnce(&Args) -> Result<bool, MrError>,
) -> Result<Args, ExitCode> {
    let args = parse_args(std::env::args_os().skip(1)).map_err(|e| fail(&e, usage))?;
    if args.help {
        eprintln!("{usage}");
        return Err(ExitCode::SUCCESS);
    }
    match accept(&args) {
        Ok(true) => Ok(args),
        Ok(false) => Err(fail(&MrError::Usage(usage.into()), usage)),
        Err(e) => Err(fail(&e, usage)),
    }
}

/// Installs the crate's logger ([`crate::logging`], `env_logger`) at what `RUST_LOG` names
/// (its filter syntax), or `$MR_LOG` when `RUST_LOG` is unset; silent if neither is set.
pub fn init_logging() {
    crate::logging::init(
        &format!("{}[{}]", program_name(), std::process::id()),
        Some(LOG_ENV),
    );
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
        let message = |args: &[&str]| match parse(args) {
            Err(MrError::Usage(m)) => m,
            other => panic!("{args:?}: {other:?}"),
        };
        assert_eq!(
            message(&["--nreduce", "3", "x"]),
            "unknown flag \"--nreduce\""
        );
        assert_eq!(message(&["--socket"]), "--socket needs a path");
        assert_eq!(message(&["--socket="]), "--socket needs a path");
        let a = parse(&["--socket", "a", "--socket", "b", "-h"]).unwrap();
        assert_eq!(a.socket, Some(PathBuf::from("b")));
        assert!(a.help);
    }
}
