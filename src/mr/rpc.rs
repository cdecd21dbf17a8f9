//! What the coordinator and workers say to each other, and how: one request and one reply per
//! connection on a Unix-domain socket, each a frame of a 4-byte big-endian length followed by
//! the value encoded with [`crate::labcodec`].

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::labcodec;

/// The environment variable that overrides the default socket path.
pub const SOCKET_ENV: &str = "MR_SOCKET";

/// No message comes near this; a larger length prefix means a corrupt or foreign peer.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

/// How long either side waits on a silent peer before giving up on the connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A task by kind and number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskId {
    Map(usize),
    Reduce(usize),
}

/// What the coordinator tells a worker to do next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Assignment {
    /// Run map task `task` on `file`, splitting its output into `n_reduce` buckets.
    Map {
        task: usize,
        attempt: u32,
        file: String,
        n_reduce: usize,
    },
    /// Run reduce task `task` over the intermediate files of all `n_map` map tasks.
    Reduce {
        task: usize,
        attempt: u32,
        n_map: usize,
    },
    /// Nothing to hand out right now (tasks are running elsewhere); ask again shortly.
    Wait,
    /// The job is over; the worker should exit.
    Exit,
}

/// What a worker tells the coordinator about a task it was given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskReport {
    /// The task's output files are in place.
    Finished(TaskId),
    /// The task cannot be run (its input is unreadable, say); retrying will not help.
    Failed { task: TaskId, reason: String },
}

/// A worker's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    GetTask,
    Report(TaskReport),
}

/// The coordinator's reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Task(Assignment),
    Ack,
}

/// The socket path: `flag` if given, else `$MR_SOCKET` if set and non-empty, else the lab's
/// `/var/tmp/5840-mr-<uid>`.
pub fn socket_path(flag: Option<&Path>) -> PathBuf {
    if let Some(path) = flag {
        return path.to_path_buf();
    }
    match std::env::var_os(SOCKET_ENV) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => default_socket_path(),
    }
}

/// The lab's default socket path, `/var/tmp/5840-mr-<uid>`.
pub fn default_socket_path() -> PathBuf {
    PathBuf::from(format!("/var/tmp/5840-mr-{}", real_uid()))
}

/// The real user id, read from `/proc/self/status` (no libc), falling back to the owner of
/// `/proc/self`.
fn real_uid() -> u32 {
    let from_status = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        });
    from_status.unwrap_or_else(|| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(0)
    })
}

/// Writes one frame holding `value`.
pub fn write_frame<T: Serialize>(stream: &mut impl Write, value: &T) -> io::Result<()> {
    let bytes = labcodec::encode(value).map_err(io::Error::other)?;
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|&len| len <= MAX_FRAME_BYTES)
        .ok_or_else(|| io::Error::other(format!("frame of {} bytes is too long", bytes.len())))?;
    let mut frame = Vec::with_capacity(4 + bytes.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&bytes);
    stream.write_all(&frame)?;
    stream.flush()
}

/// Reads one frame and decodes it as a `T`.
pub fn read_frame<T: DeserializeOwned>(stream: &mut impl Read) -> io::Result<T> {
    let mut len_bytes = [0u8; 4];
    stream.read_exact(&mut len_bytes)?;
    let len = u32::from_be_bytes(len_bytes);
    if len > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame length {len} exceeds {MAX_FRAME_BYTES}"),
        ));
    }
    let mut bytes = vec![0u8; len as usize];
    stream.read_exact(&mut bytes)?;
    labcodec::decode(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Why a call did not get a reply.
#[derive(Debug)]
pub enum CallError {
    /// Nobody is listening at the socket path: the coordinator has exited (or never started).
    Unreachable(io::Error),
    /// The coordinator was reached but the exchange failed part-way.
    Failed(io::Error),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(e) => write!(f, "coordinator unreachable: {e}"),
            CallError::Failed(e) => write!(f, "call failed: {e}"),
        }
    }
}

/// Sends `request` to the coordinator at `socket` on a fresh connection and waits for the reply.
pub fn call(socket: &Path, request: &Request) -> Result<Reply, CallError> {
    let mut stream = UnixStream::connect(socket).map_err(CallError::Unreachable)?;
    let exchange = |stream: &mut UnixStream| -> io::Result<Reply> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        write_frame(stream, request)?;
        read_frame(stream)
    };
    exchange(&mut stream).map_err(CallError::Failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        let sent = Request::Report(TaskReport::Failed {
            task: TaskId::Map(3),
            reason: "gone".into(),
        });
        write_frame(&mut buf, &sent).unwrap();
        let got: Request = read_frame(&mut buf.as_slice()).unwrap();
        assert_eq!(got, sent);
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let huge = (MAX_FRAME_BYTES + 1).to_be_bytes();
        assert!(read_frame::<Request>(&mut huge.as_slice()).is_err());
        let truncated = [0u8, 0, 0, 9, 1];
        assert!(read_frame::<Request>(&mut truncated.as_slice()).is_err());
        let garbage = [0u8, 0, 0, 2, 0xff, 0xff];
        assert!(read_frame::<Request>(&mut garbage.as_slice()).is_err());
    }

    #[test]
    fn flag_beats_default() {
        let flag = Path::new("/tmp/x.sock");
        assert_eq!(socket_path(Some(flag)), flag);
        assert!(
            default_socket_path()
                .to_string_lossy()
                .starts_with("/var/tmp/5840-mr-")
        );
    }
}
