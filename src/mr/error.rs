use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::labcodec::CodecError;

/// Everything that can go wrong in a MapReduce job, with what a person needs to fix it.
#[derive(Debug)]
pub enum MrError {
    /// The command line was wrong; the text says how.
    Usage(String),
    /// No application has this name.
    UnknownApp(String),
    /// An input (or intermediate) file could not be read.
    Read { path: PathBuf, source: io::Error },
    /// An input file is not valid UTF-8 text.
    NotUtf8 { path: PathBuf },
    /// An output or intermediate file could not be written.
    Write { path: PathBuf, source: io::Error },
    /// An intermediate file or RPC message could not be encoded or decoded.
    Codec { what: String, source: CodecError },
    /// The coordinator's socket could not be set up or used.
    Socket { path: PathBuf, source: io::Error },
    /// A worker reported a task it could not run; the job cannot finish.
    JobFailed(String),
}

impl fmt::Display for MrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MrError::Usage(text) => write!(f, "{text}"),
            MrError::UnknownApp(name) => write!(
                f,
                "unknown application {name:?}; known: {}",
                crate::mr::apps::names().join(", ")
            ),
            MrError::Read { path, source } => write!(f, "cannot read {}: {source}", path.display()),
            MrError::NotUtf8 { path } => write!(f, "{} is not valid UTF-8 text", path.display()),
            MrError::Write { path, source } => {
                write!(f, "cannot write {}: {source}", path.display())
            }
            MrError::Codec { what, source } => write!(f, "{what}: {source}"),
            MrError::Socket { path, source } => {
                write!(f, "coordinator socket {}: {source}", path.display())
            }
            MrError::JobFailed(reason) => write!(f, "job failed: {reason}"),
        }
    }
}

impl std::error::Error for MrError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MrError::Read { source, .. }
            | MrError::Write { source, .. }
            | MrError::Socket { source, .. } => Some(source),
            MrError::Codec { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Reads `path` as UTF-8 text, naming the file in any error.
pub(crate) fn read_text(path: &std::path::Path) -> Result<String, MrError> {
    let bytes = std::fs::read(path).map_err(|source| MrError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|_| MrError::NotUtf8 {
        path: path.to_path_buf(),
    })
}

/// Writes `contents` to `dest` atomically: into a temporary file in the same directory, then
/// renamed over `dest`, so a reader sees either the old file or the whole new one.
pub(crate) fn write_atomically(dest: &std::path::Path, contents: &[u8]) -> Result<(), MrError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    // "mr-tmp-" never matches the "mr-out" or "mr-worker-" prefixes the tests look for.
    let temp = dir.join(format!(
        "mr-tmp-{}-{}",
        std::process::id(),
        NEXT_TEMP.fetch_add(1, Ordering::Relaxed)
    ));
    let write_err = |source| MrError::Write {
        path: dest.to_path_buf(),
        source,
    };
    std::fs::write(&temp, contents).map_err(write_err)?;
    std::fs::rename(&temp, dest).map_err(|source| {
        let _ = std::fs::remove_file(&temp);
        write_err(source)
    })
}
