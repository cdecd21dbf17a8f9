//! The snapshot file: a snapshot of any size as a sequence of framed records ([`record`]),
//! each checksummed on its own, so no record limit applies to the whole snapshot and memory
//! stays bounded by one chunk when it is written, verified, read back or sent.
//!
//! ```text
//! KIND_SNAP_HEAD  | index u64 | term u64 | len u64
//! KIND_SNAP_CHUNK | data (at most SNAPSHOT_CHUNK bytes)      × ceil(len / SNAPSHOT_CHUNK)
//! KIND_SNAP_END   | len u64 | crc32c(all data) u32 | chunks u64
//! ```
//!
//! A snapshot file is written under a temporary name, fsynced, and only then renamed into
//! place (by the caller, who also fsyncs the directory): `snapshot` is never partly written,
//! so any damage in it is corruption, reported with the file and the offset of the bad record.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use super::record::{self, KIND_SNAP_CHUNK, KIND_SNAP_END, KIND_SNAP_HEAD, SNAPSHOT_CHUNK};
use super::{corrupt, io_err};
use crate::raft::{SnapshotSource, StorageError};

/// Where one chunk's data lives: its offset in the data, its record's offset in the file, and
/// its length.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    data_off: u64,
    file_off: u64,
    len: u32,
}

/// A complete, verified snapshot file, open for reading. Reads go through this handle, so a
/// transfer keeps reading the snapshot it started with even after a newer one was renamed
/// over the name.
pub struct FileSnapshot {
    /// The file's current name (it changes once, when a temporary file is renamed into place).
    path: Mutex<PathBuf>,
    file: File,
    index: u64,
    term: u64,
    len: u64,
    crc: u32,
    chunks: Vec<Chunk>,
}

impl FileSnapshot {
    pub(super) fn path(&self) -> PathBuf {
        self.path.lock().clone()
    }

    pub(super) fn set_path(&self, path: PathBuf) {
        *self.path.lock() = path;
    }

    /// Opens and verifies the snapshot file at `path`, reading it one record at a time;
    /// `None` if there is none.
    pub(super) fn open(path: &Path) -> Result<Option<FileSnapshot>, StorageError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(path, "open", e)),
        };
        let mut r = BufReader::with_capacity(256 << 10, &file);
        let mut buf = Vec::new();
        let mut offset = 0u64;
        let head = next_record(&mut r, &mut buf, path, offset)?
            .ok_or_else(|| corrupt(path, 0, "empty snapshot file"))?;
        if head.len() != 25 || head[0] != KIND_SNAP_HEAD {
            return Err(corrupt(path, 0, "not a snapshot header"));
        }
        let (index, term, len) = (u64_at(head, 1), u64_at(head, 9), u64_at(head, 17));
        offset += (record::HEADER + head.len()) as u64;
        let mut chunks = Vec::new();
        let mut crc = 0u32;
        let mut data_off = 0u64;
        loop {
            let at = offset;
            let p = next_record(&mut r, &mut buf, path, at)?
                .ok_or_else(|| corrupt(path, at, "cut short: no end record"))?;
            offset += (record::HEADER + p.len()) as u64;
            match p[0] {
                KIND_SNAP_CHUNK => {
                    let data = &p[1..];
                    if data.is_empty() || data_off + data.len() as u64 > len {
                        return Err(corrupt(path, at, "chunk beyond the snapshot's length"));
                    }
                    crc = crc32c::crc32c_append(crc, data);
                    chunks.push(Chunk {
                        data_off,
                        file_off: at,
                        len: data.len() as u32,
                    });
                    data_off += data.len() as u64;
                }
                KIND_SNAP_END if p.len() == 21 => {
                    let (end_len, end_crc) = (u64_at(p, 1), u32_at(p, 9));
                    let count = u64_at(p, 13);
                    if end_len != len || data_off != len || count != chunks.len() as u64 {
                        return Err(corrupt(
                            path,
                            at,
                            format!(
                                "end record says {end_len} bytes in {count} chunks, found {data_off} in {}",
                                chunks.len()
                            ),
                        ));
                    }
                    if end_crc != crc {
                        return Err(corrupt(path, at, "checksum of the whole data differs"));
                    }
                    let mut extra = [0u8; 1];
                    if r.read(&mut extra).map_err(|e| io_err(path, "read", e))? != 0 {
                        return Err(corrupt(path, offset, "bytes after the end record"));
                    }
                    drop(r);
                    return Ok(Some(FileSnapshot {
                        path: Mutex::new(path.to_path_buf()),
                        file,
                        index,
                        term,
                        len,
                        crc,
                        chunks,
                    }));
                }
                _ => return Err(corrupt(path, at, "unknown record in a snapshot")),
            }
        }
    }
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

/// Reads the next record from `r` into `buf` and returns its payload; `None` at a clean end
/// of file. Never buffers more than a snapshot record may hold.
fn next_record<'b>(
    r: &mut impl Read,
    buf: &'b mut Vec<u8>,
    path: &Path,
    offset: u64,
) -> Result<Option<&'b [u8]>, StorageError> {
    let mut header = [0u8; record::HEADER];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(corrupt(path, offset, "cut short in a record header")),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(path, "read", e)),
        }
    }
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    if crc32c::crc32c(&header[0..4]) != u32::from_le_bytes(header[4..8].try_into().expect("4")) {
        return Err(corrupt(path, offset, "bad checksum of a record length"));
    }
    if len == 0 || len > record::max_payload(KIND_SNAP_CHUNK) {
        return Err(corrupt(
            path,
            offset,
            format!("record of {len} bytes in a snapshot"),
        ));
    }
    buf.clear();
    buf.extend_from_slice(&header);
    buf.resize(record::HEADER + len, 0);
    r.read_exact(&mut buf[record::HEADER..]).map_err(|e| {
        if e.kind() == ErrorKind::UnexpectedEof {
            corrupt(path, offset, "cut short in a record")
        } else {
            io_err(path, "read", e)
        }
    })?;
    match record::read_at(buf, 0) {
        record::Read::Record(p, _) => Ok(Some(p)),
        _ => Err(corrupt(path, offset, "bad checksum")),
    }
}

impl SnapshotSource for FileSnapshot {
    fn index(&self) -> u64 {
        self.index
    }
    fn term(&self) -> u64 {
        self.term
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn crc(&self) -> u32 {
        self.crc
    }

    fn read(&self, offset: u64, max: usize) -> Result<Vec<u8>, StorageError> {
        let path = self.path();
        if offset > self.len {
            return Err(StorageError::Invalid {
                reason: format!(
                    "read at {offset} of a {}-byte snapshot ({})",
                    self.len,
                    path.display()
                ),
            });
        }
        let end = self.len.min(offset.saturating_add(max as u64));
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut k = self
            .chunks
            .partition_point(|c| c.data_off + u64::from(c.len) <= offset);
        let mut rec = Vec::new();
        while offset + (out.len() as u64) < end {
            let c = self.chunks[k];
            rec.resize(record::HEADER + 1 + c.len as usize, 0);
            self.file
                .read_exact_at(&mut rec, c.file_off)
                .map_err(|e| io_err(&path, "read", e))?;
            let data = match record::read_at(&rec, 0) {
                record::Read::Record(p, _) if p[0] == KIND_SNAP_CHUNK => &p[1..],
                _ => {
                    return Err(corrupt(
                        &path,
                        c.file_off,
                        "bad checksum in a snapshot chunk",
                    ));
                }
            };
            let from = (offset + out.len() as u64 - c.data_off) as usize;
            let take = ((end - c.data_off) as usize).min(data.len());
            out.extend_from_slice(&data[from..take]);
            k += 1;
        }
        Ok(out)
    }
}

/// A snapshot file being written under a temporary name.
pub(super) struct Writer {
    path: PathBuf,
    file: File,
    index: u64,
    term: u64,
    len: u64,
    written: u64,
    crc: u32,
    offset: u64,
    chunks: Vec<Chunk>,
    buf: Vec<u8>,
}

impl Writer {
    /// Creates (or empties) `path` and writes the header of a snapshot of `len` bytes.
    pub(super) fn create(
        path: PathBuf,
        index: u64,
        term: u64,
        len: u64,
    ) -> Result<Writer, StorageError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_err(&path, "create", e))?;
        let mut w = Writer {
            path,
            file,
            index,
            term,
            len,
            written: 0,
            crc: 0,
            offset: 0,
            chunks: Vec::new(),
            buf: Vec::new(),
        };
        let head = record::small(
            KIND_SNAP_HEAD,
            &[
                &index.to_le_bytes(),
                &term.to_le_bytes(),
                &len.to_le_bytes(),
            ],
        );
        w.put(&head)?;
        Ok(w)
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of data written so far.
    pub(super) fn written(&self) -> u64 {
        self.written
    }

    /// CRC32C of the data written so far.
    pub(super) fn crc(&self) -> u32 {
        self.crc
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        self.file
            .write_all(bytes)
            .map_err(|e| io_err(&self.path, "write", e))?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Appends `data` as chunk records; refuses to go past the length in the header.
    pub(super) fn write(&mut self, data: &[u8]) -> Result<(), StorageError> {
        if self.written + data.len() as u64 > self.len {
            return Err(StorageError::Invalid {
                reason: format!(
                    "{}: {} more bytes past the snapshot's {} ",
                    self.path.display(),
                    data.len(),
                    self.len
                ),
            });
        }
        for piece in data.chunks(SNAPSHOT_CHUNK) {
            self.buf.clear();
            let mut payload = Vec::with_capacity(1 + piece.len());
            payload.push(KIND_SNAP_CHUNK);
            payload.extend_from_slice(piece);
            record::frame_into(&mut self.buf, &payload).map_err(|e| StorageError::Invalid {
                reason: e.to_string(),
            })?;
            let at = self.offset;
            let rec = std::mem::take(&mut self.buf);
            let r = self.put(&rec);
            self.buf = rec;
            r?;
            self.chunks.push(Chunk {
                data_off: self.written,
                file_off: at,
                len: piece.len() as u32,
            });
            self.crc = crc32c::crc32c_append(self.crc, piece);
            self.written += piece.len() as u64;
        }
        Ok(())
    }

    /// Writes the end record and fsyncs; the file is then complete (still under its
    /// temporary name).
    pub(super) fn finish(mut self) -> Result<FileSnapshot, StorageError> {
        if self.written != self.len {
            return Err(StorageError::Invalid {
                reason: format!(
                    "{}: snapshot of {} bytes finished after {}",
                    self.path.display(),
                    self.len,
                    self.written
                ),
            });
        }
        let end = record::small(
            KIND_SNAP_END,
            &[
                &self.len.to_le_bytes(),
                &self.crc.to_le_bytes(),
                &(self.chunks.len() as u64).to_le_bytes(),
            ],
        );
        self.put(&end)?;
        self.file
            .sync_all()
            .map_err(|e| io_err(&self.path, "fsync", e))?;
        Ok(FileSnapshot {
            path: Mutex::new(self.path),
            file: self.file,
            index: self.index,
            term: self.term,
            len: self.len,
            crc: self.crc,
            chunks: self.chunks,
        })
    }
}
