//! The framing of every file the log writes:
//! `len: u32 LE | crc(len): u32 LE | crc(payload): u32 LE | payload[len]`, both CRC32C. The
//! length has its own checksum so that a damaged length is told apart from a record cut short
//! by a crash. Segment and snapshot payloads start with a kind byte.
//!
//! **One limit per record kind, shared by writer and reader.** Each kind has a largest
//! payload ([`max_payload`]); the writer refuses to frame anything above it (an error, nothing
//! written) and the reader refuses anything above it as damage, so nothing written can be
//! unreadable. [`MAX_PAYLOAD`], the largest of them, bounds what the reader will buffer before
//! it knows the kind.

use std::fmt;

/// Bytes before a record's payload.
pub const HEADER: usize = 12;
/// Bytes of an entry payload before its command: kind, index, term.
pub const ENTRY_OVERHEAD: usize = 17;
/// The largest command an entry record holds. Well below the 64 MiB peer frame, so an
/// AppendEntries carrying one such entry can always be sent.
pub const MAX_COMMAND: usize = (32 << 20) - ENTRY_OVERHEAD;
/// The data bytes of one snapshot chunk record (the last chunk may hold fewer).
pub const SNAPSHOT_CHUNK: usize = 1 << 20;
/// The largest payload of any kind: what the reader accepts before it looks at the kind.
pub const MAX_PAYLOAD: usize = ENTRY_OVERHEAD + MAX_COMMAND;
/// Disks write whole sectors: a crash can leave a record's last sectors unwritten (zeros).
const SECTOR: usize = 512;

/// A log entry: `KIND_ENTRY | index u64 | term u64 | command`.
pub const KIND_ENTRY: u8 = 1;
/// The last record of a full segment: `KIND_SEAL | next_first u64`. A sealed segment promises
/// that the segment starting at `next_first` exists.
pub const KIND_SEAL: u8 = 2;
/// The first record of a snapshot file: `KIND_SNAP_HEAD | index u64 | term u64 | len u64`.
pub const KIND_SNAP_HEAD: u8 = 3;
/// A piece of a snapshot's data: `KIND_SNAP_CHUNK | data` (at most [`SNAPSHOT_CHUNK`] bytes).
pub const KIND_SNAP_CHUNK: u8 = 4;
/// The last record of a snapshot file: `KIND_SNAP_END | len u64 | crc32c(data) u32 | chunks u64`.
pub const KIND_SNAP_END: u8 = 5;
/// The on-disk format record (`format` file): `KIND_FORMAT | magic | version u32`.
pub const KIND_FORMAT: u8 = 6;
/// The `hardstate` file's record: `KIND_HARD_STATE | term u64 | vote u64` (`u64::MAX`: none).
pub const KIND_HARD_STATE: u8 = 7;

/// The largest payload of a record of `kind` (0 for an unknown kind).
pub const fn max_payload(kind: u8) -> usize {
    match kind {
        KIND_ENTRY => ENTRY_OVERHEAD + MAX_COMMAND,
        KIND_SEAL => 9,
        KIND_SNAP_HEAD => 25,
        KIND_SNAP_CHUNK => 1 + SNAPSHOT_CHUNK,
        KIND_SNAP_END => 21,
        KIND_FORMAT => 64,
        KIND_HARD_STATE => 17,
        _ => 0,
    }
}

/// A record the writer refused to frame: the reader would refuse it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge {
    pub kind: u8,
    pub bytes: usize,
    pub max: usize,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a record of kind {} with a {}-byte payload exceeds its {}-byte limit",
            self.kind, self.bytes, self.max
        )
    }
}

impl std::error::Error for TooLarge {}

/// Appends one framed record holding `payload` (kind byte first) to `out`; refuses an empty
/// payload or one above its kind's limit, leaving `out` as it was.
pub fn frame_into(out: &mut Vec<u8>, payload: &[u8]) -> Result<(), TooLarge> {
    let kind = payload.first().copied().unwrap_or(0);
    let max = max_payload(kind);
    if payload.is_empty() || payload.len() > max {
        return Err(TooLarge {
            kind,
            bytes: payload.len(),
            max,
        });
    }
    let len = (payload.len() as u32).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc32c::crc32c(&len).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// Appends a framed entry record to `out`; a command above [`MAX_COMMAND`] is refused.
pub fn entry_into(
    out: &mut Vec<u8>,
    index: u64,
    term: u64,
    command: &[u8],
) -> Result<(), TooLarge> {
    if command.len() > MAX_COMMAND {
        return Err(TooLarge {
            kind: KIND_ENTRY,
            bytes: ENTRY_OVERHEAD.saturating_add(command.len()),
            max: max_payload(KIND_ENTRY),
        });
    }
    let mut payload = Vec::with_capacity(ENTRY_OVERHEAD + command.len());
    payload.push(KIND_ENTRY);
    payload.extend_from_slice(&index.to_le_bytes());
    payload.extend_from_slice(&term.to_le_bytes());
    payload.extend_from_slice(command);
    frame_into(out, &payload)
}

/// A framed record of `kind` with `fields` after the kind byte (small, fixed-size kinds).
pub fn small(kind: u8, fields: &[&[u8]]) -> Vec<u8> {
    let mut payload = vec![kind];
    for f in fields {
        payload.extend_from_slice(f);
    }
    let mut out = Vec::new();
    frame_into(&mut out, &payload).expect("a fixed-size record fits its kind's limit");
    out
}

/// A framed seal record.
pub fn seal(next_first: u64) -> Vec<u8> {
    small(KIND_SEAL, &[&next_first.to_le_bytes()])
}

/// What is at an offset of a file.
#[derive(Debug, PartialEq, Eq)]
pub enum Read<'a> {
    /// A whole record with matching checksums, and the offset after it.
    Record(&'a [u8], usize),
    /// The file ends before the record does (header or payload): a crash in mid-append.
    Short,
    /// A checksum does not match.
    Bad,
}

/// Reads the record at `offset` in `buf`.
pub fn read_at(buf: &[u8], offset: usize) -> Read<'_> {
    let Some(header) = buf.get(offset..offset.saturating_add(HEADER)) else {
        return Read::Short;
    };
    let u32_at = |o: usize| u32::from_le_bytes(header[o..o + 4].try_into().expect("4 bytes"));
    let (len, len_crc, crc) = (u32_at(0), u32_at(4), u32_at(8));
    if crc32c::crc32c(&header[0..4]) != len_crc || len == 0 || len as usize > MAX_PAYLOAD {
        return Read::Bad;
    }
    // The kind's own limit (the kind is the payload's first byte; a damaged one fails the
    // payload checksum below anyway).
    if let Some(&kind) = buf.get(offset + HEADER)
        && len as usize > max_payload(kind)
        && max_payload(kind) != 0
    {
        return Read::Bad;
    }
    let start = offset + HEADER;
    let Some(payload) = buf.get(start..start + len as usize) else {
        return Read::Short;
    };
    if crc32c::crc32c(payload) != crc {
        return Read::Bad;
    }
    Read::Record(payload, start + len as usize)
}

/// Whether the bad record at `offset`, the last thing in `buf`, looks like a write a crash
/// interrupted rather than damage: it is cut short, or from the record's start or a sector
/// boundary inside it to the end of the file there are only zeros (sectors the disk never
/// wrote). A record whose own data ends in a zero-filled sector is indistinguishable from
/// that; the checksums catch every other change.
pub fn looks_torn(buf: &[u8], offset: usize) -> bool {
    match read_at(buf, offset) {
        Read::Short => true,
        Read::Record(..) => false,
        Read::Bad => {
            let zeros_from = buf.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            let boundary = if zeros_from <= offset {
                offset
            } else {
                zeros_from.div_ceil(SECTOR) * SECTOR
            };
            boundary < buf.len()
        }
    }
}

/// Whether a valid record starts anywhere in `buf` at or after `from`: tells a torn tail
/// (nothing valid follows) from damage in the middle (good records follow the bad one).
pub fn any_valid_after(buf: &[u8], from: usize) -> Option<usize> {
    (from..buf.len().saturating_sub(HEADER - 1))
        .find(|&o| matches!(read_at(buf, o), Read::Record(..)))
}

/// What a segment record holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    Entry {
        index: u64,
        term: u64,
        command: &'a [u8],
    },
    Seal {
        next_first: u64,
    },
}

/// Decodes a segment record's payload; `None` if its kind or size is wrong.
pub fn decode(payload: &[u8]) -> Option<Decoded<'_>> {
    let u64_at = |o: usize| -> Option<u64> {
        Some(u64::from_le_bytes(payload.get(o..o + 8)?.try_into().ok()?))
    };
    match *payload.first()? {
        KIND_ENTRY if payload.len() >= 17 => Some(Decoded::Entry {
            index: u64_at(1)?,
            term: u64_at(9)?,
            command: &payload[17..],
        }),
        KIND_SEAL if payload.len() == 9 => Some(Decoded::Seal {
            next_first: u64_at(1)?,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(r: Read<'_>) -> Option<(Vec<u8>, usize)> {
        match r {
            Read::Record(p, n) => Some((p.to_vec(), n)),
            _ => None,
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let mut buf = Vec::new();
        entry_into(&mut buf, 7, 3, b"hello").unwrap();
        let end = buf.len();
        buf.extend_from_slice(&seal(8));
        let (p, next) = record(read_at(&buf, 0)).unwrap();
        assert_eq!(next, end);
        assert_eq!(
            decode(&p),
            Some(Decoded::Entry {
                index: 7,
                term: 3,
                command: b"hello"
            })
        );
        let (p, _) = record(read_at(&buf, end)).unwrap();
        assert_eq!(decode(&p), Some(Decoded::Seal { next_first: 8 }));
        for i in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[i] ^= 1 << bit;
                let first = record(read_at(&bad, 0));
                let second = record(read_at(&bad, end));
                assert!(
                    first.is_none() || second.is_none(),
                    "flip of bit {bit} at {i} went unnoticed"
                );
                if i >= end {
                    assert!(
                        !looks_torn(&bad, end),
                        "flip of bit {bit} at {i} taken for a torn write"
                    );
                }
            }
        }
        for cut in end + 1..buf.len() {
            assert_eq!(read_at(&buf[..cut], end), Read::Short);
            assert!(looks_torn(&buf[..cut], end));
        }
        let mut zeroed = buf.clone();
        zeroed[end..].fill(0);
        assert!(looks_torn(&zeroed, end), "a zero-filled tail is torn");
        assert_eq!(any_valid_after(&buf, 1), Some(end));
    }

    /// The largest record of each kind the writer frames reads back; one byte more is refused
    /// by the writer, which then leaves its buffer untouched.
    #[test]
    fn writer_and_reader_share_each_kinds_limit() {
        for kind in [
            KIND_ENTRY,
            KIND_SEAL,
            KIND_SNAP_HEAD,
            KIND_SNAP_CHUNK,
            KIND_SNAP_END,
            KIND_FORMAT,
            KIND_HARD_STATE,
        ] {
            let max = max_payload(kind);
            let mut payload = vec![0x5a; max];
            payload[0] = kind;
            let mut buf = Vec::new();
            frame_into(&mut buf, &payload).unwrap();
            let (p, end) = record(read_at(&buf, 0)).unwrap();
            assert_eq!((p.len(), end), (max, buf.len()), "kind {kind} at its limit");
            payload.push(0x5a);
            let mut refused = b"keep".to_vec();
            let e = frame_into(&mut refused, &payload).unwrap_err();
            assert_eq!((e.kind, e.bytes, e.max), (kind, max + 1, max));
            assert_eq!(refused, b"keep", "nothing written for kind {kind}");
        }
        let mut buf = Vec::new();
        let command = vec![7u8; MAX_COMMAND];
        entry_into(&mut buf, 1, 1, &command).unwrap();
        let (p, _) = record(read_at(&buf, 0)).unwrap();
        assert!(
            matches!(decode(&p), Some(Decoded::Entry { command: c, .. }) if c.len() == MAX_COMMAND)
        );
        let mut refused = Vec::new();
        assert!(entry_into(&mut refused, 1, 1, &vec![7u8; MAX_COMMAND + 1]).is_err());
        assert!(refused.is_empty());
        assert!(frame_into(&mut refused, &[]).is_err());
    }
}
