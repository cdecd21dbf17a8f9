//! A node's status file, `DIR/status`: one JSON object that `raftkv serve` rewrites (atomically)
//! every 250 ms, read by `raftkv local`'s status line, the chaos driver and the cluster tests to
//! find the leader.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file's name inside a node's data directory.
pub const STATUS_FILE: &str = "status";

/// What a node last said about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatusFile {
    /// Its current Raft term.
    pub term: u64,
    /// It believed it led in that term.
    pub leader: bool,
    /// The highest log index its state machine has applied.
    pub applied: u64,
    /// Client commands it has executed.
    pub commands: u64,
    /// Keys in its store.
    pub keys: usize,
    /// Where Redis clients reach it (empty if not listening).
    pub client: String,
    /// What it is in its configuration: `voter`, `learner`, `removed` (a membership change
    /// took it out: it takes no part and may be stopped), `waiting to be added`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub member: String,
    /// Set in the node's last status when it stopped on an error: why (for a disk error the
    /// operation, the file and the OS error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

impl NodeStatusFile {
    /// The status file of the node whose data directory is `data`.
    pub fn path(data: &Path) -> PathBuf {
        data.join(STATUS_FILE)
    }

    /// Writes the file atomically (temporary file, then rename), so a reader never sees half
    /// of it.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let text = serde_json::to_string(self).map_err(io::Error::other)?;
        write_atomically(path, &(text + "\n"))
    }

    /// Writes the file as [`write`](Self::write) does or, if that fails (a full disk has no
    /// room for a temporary file), over the old file in place: a page it already has needs
    /// no new space. A reader may then see a torn file, which reads as `None`.
    pub fn write_last(&self, path: &Path) -> io::Result<()> {
        let Err(first) = self.write(path) else {
            return Ok(());
        };
        let text = serde_json::to_string(self).map_err(io::Error::other)? + "\n";
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|_| first)?;
        f.write_all(text.as_bytes())?;
        f.set_len(text.len() as u64)?;
        f.sync_all()
    }

    /// Reads the file; `None` when it is missing or does not parse (a node that has not
    /// written one yet, or another program's file).
    pub fn read(path: &Path) -> Option<NodeStatusFile> {
        let text = fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// Replaces `path` with `contents`: a temporary file beside it, fsynced, renamed over it.
pub fn write_atomically(path: &Path, contents: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_status_reads_back_and_garbage_reads_as_none() {
        let dir = std::env::temp_dir().join(format!("raftkv-status-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = NodeStatusFile::path(&dir);
        let status = NodeStatusFile {
            term: u64::MAX,
            leader: true,
            applied: 7,
            commands: 9,
            keys: 3,
            client: "127.0.0.1:7001".into(),
            member: "voter".into(),
            stopped: None,
        };
        status.write(&path).unwrap();
        assert_eq!(NodeStatusFile::read(&path), Some(status.clone()));
        let stopped = NodeStatusFile {
            stopped: Some("storage failed (sync): write x: No space left on device".into()),
            ..status
        };
        stopped.write_last(&path).unwrap();
        assert_eq!(NodeStatusFile::read(&path), Some(stopped));
        fs::write(&path, "term 1 leader 1").unwrap();
        assert_eq!(NodeStatusFile::read(&path), None);
        fs::remove_file(&path).unwrap();
        assert_eq!(NodeStatusFile::read(&path), None);
        let _ = fs::remove_dir_all(&dir);
    }
}
