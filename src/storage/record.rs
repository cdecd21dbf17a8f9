//! The framing of every file the log writes:
//! `len: u32 LE | crc(len): u32 LE | crc(payload): u32 LE | payload[len]`, both CRC32C. The
//! length has its own checksum so that a damaged length is told apart from a record cut short
//! by a crash. Segment payloads start with a kind byte.

/// Bytes before a record's payload.
pub const HEADER: usize = 12;
/// The largest payload accepted: a command of a few MB is already unusual for Raft.
pub const MAX_PAYLOAD: usize = 64 << 20;
/// Disks write whole sectors: a crash can leave a record's last sectors unwritten (zeros).
const SECTOR: usize = 512;

/// A log entry: `KIND_ENTRY | index u64 | term u64 | command`.
pub const KIND_ENTRY: u8 = 1;
/// The last record of a full segment: `KIND_SEAL | next_first u64`. A sealed segment promises
/// that the segment starting at `next_first` exists.
pub const KIND_SEAL: u8 = 2;

/// Appends one framed record holding `payload` to `out`.
pub fn frame_into(out: &mut Vec<u8>, payload: &[u8]) {
    let len = (payload.len() as u32).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc32c::crc32c(&len).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Appends a framed entry record to `out`.
pub fn entry_into(out: &mut Vec<u8>, index: u64, term: u64, command: &[u8]) {
    let mut payload = Vec::with_capacity(17 + command.len());
    payload.push(KIND_ENTRY);
    payload.extend_from_slice(&index.to_le_bytes());
    payload.extend_from_slice(&term.to_le_bytes());
    payload.extend_from_slice(command);
    frame_into(out, &payload);
}

/// A framed seal record.
pub fn seal(next_first: u64) -> Vec<u8> {
    let mut payload = vec![KIND_SEAL];
    payload.extend_from_slice(&next_first.to_le_bytes());
    let mut out = Vec::new();
    frame_into(&mut out, &payload);
    out
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
        entry_into(&mut buf, 7, 3, b"hello");
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
}
