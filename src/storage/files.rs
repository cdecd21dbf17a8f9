//! The small files replaced whole: `format` and `hardstate`, each one framed record written
//! atomically (temp, fsync, rename, directory fsync).

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::Path;

use super::{FORMAT_MAGIC, FORMAT_VERSION, UPGRADED_FORMAT, corrupt, io_err, record};
use crate::raft::{HardState, StorageError};

pub(super) fn fsync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, "fsync directory", e))
}

/// Writes `bytes` to `dir/name` atomically: temp file, fsync, rename, directory fsync.
pub(super) fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, "create", e))?;
    f.write_all(bytes).map_err(|e| io_err(&tmp, "write", e))?;
    f.sync_all().map_err(|e| io_err(&tmp, "fsync", e))?;
    fs::rename(&tmp, &path).map_err(|e| io_err(&path, "rename", e))?;
    fsync_dir(dir)
}

/// Reads a small file written by [`replace_file`] holding one framed record; `None` if
/// absent.
pub(super) fn read_framed(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    let len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "stat", e)),
    };
    if len > 4096 {
        return Err(corrupt(
            path,
            0,
            format!("{len} bytes, far more than its one small record"),
        ));
    }
    let buf = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "read", e)),
    };
    match record::read_at(&buf, 0) {
        record::Read::Record(payload, end) if end == buf.len() => Ok(Some(payload.to_vec())),
        record::Read::Record(_, end) => Err(corrupt(path, end as u64, "bytes after the record")),
        record::Read::Short => Err(corrupt(path, 0, "cut short")),
        record::Read::Bad => Err(corrupt(path, 0, "bad checksum")),
    }
}

pub(super) fn encode_hard_state(hs: HardState) -> Vec<u8> {
    record::small(
        record::KIND_HARD_STATE,
        &[
            &hs.term.to_le_bytes(),
            &hs.voted_for.map_or(u64::MAX, |v| v as u64).to_le_bytes(),
        ],
    )
}

pub(super) fn encode_format() -> Vec<u8> {
    record::small(
        record::KIND_FORMAT,
        &[FORMAT_MAGIC, &FORMAT_VERSION.to_le_bytes()],
    )
}

/// Checks the directory's format, or records it in a directory with no data yet. Runs before
/// anything else reads or writes the directory.
pub(super) fn check_format(dir: &Path) -> Result<(), StorageError> {
    let path = dir.join("format");
    match read_framed(&path)? {
        Some(p) => {
            let n = 1 + FORMAT_MAGIC.len();
            if p.len() != n + 4 || p[0] != record::KIND_FORMAT || &p[1..n] != FORMAT_MAGIC {
                return Err(corrupt(&path, 0, "not a raftkv format record"));
            }
            let found = u32::from_le_bytes(p[n..n + 4].try_into().expect("4 bytes"));
            if found == UPGRADED_FORMAT {
                // Only the version changes: see `UPGRADED_FORMAT` for why that is safe.
                replace_file(dir, "format", &encode_format())?;
                log::info!(target: "storage", "{}: on-disk format {found} upgraded in place to format {FORMAT_VERSION}", dir.display());
                return Ok(());
            }
            if found != FORMAT_VERSION {
                return Err(StorageError::Format {
                    path: dir.display().to_string(),
                    found,
                    supported: FORMAT_VERSION,
                });
            }
            Ok(())
        }
        None => {
            let mut has_data = false;
            for de in fs::read_dir(dir).map_err(|e| io_err(dir, "read directory", e))? {
                let de = de.map_err(|e| io_err(dir, "read directory", e))?;
                let name = de.file_name().to_string_lossy().into_owned();
                has_data |= name == "hardstate" || name == "snapshot" || name.starts_with("log-");
            }
            if has_data {
                // Written before the format was recorded.
                return Err(StorageError::Format {
                    path: dir.display().to_string(),
                    found: 1,
                    supported: FORMAT_VERSION,
                });
            }
            replace_file(dir, "format", &encode_format())
        }
    }
}

pub(super) fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}
