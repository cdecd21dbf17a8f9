//! The recorded history of a chaos run: the JSON-lines file `--history FILE` writes (so that
//! another checker can verify a run on its own; the shape is in `docs/chaos-history.md`), and
//! the one sound tightening applied before the check: bounding the return of a write whose
//! outcome is unknown by the first read that saw its value.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::client::Record;
use crate::kvapi::KvErr;
use crate::porcupine::kv::{KvInput, KvOp, KvOutput};

/// Version of the history file's shape; written in every line.
pub const HISTORY_FORMAT: u32 = 1;

/// One operation, as one line of the history file. Times are nanoseconds since the run
/// started, on one monotonic clock shared by every client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryLine {
    pub format: u32,
    /// The client (one connection at a time, one operation at a time).
    pub client: usize,
    /// `"get"` (`VGET key`) or `"put"` (`VSET key value version`).
    pub op: String,
    pub key: String,
    /// The value a put writes (unique in the run); empty for a get.
    pub value: String,
    /// The version a put expects; 0 for a get.
    pub version: u64,
    pub call_ns: i64,
    /// `None`: no answer came, so the put may or may not have taken effect (a get without an
    /// answer is not recorded at all).
    pub return_ns: Option<i64>,
    /// What was answered: for a get the value and version (`""`, 0 for a missing key), for a
    /// put `"ok"` or `"version"` in `err`. Absent when `return_ns` is.
    pub output: Option<HistoryOutput>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryOutput {
    pub value: String,
    pub version: u64,
    /// The labs' name: `"OK"`, or `"ErrVersion"` for a put whose expected version did not
    /// match (`-ERRVERSION`).
    pub err: String,
}

const ERRS: [KvErr; 6] = [
    KvErr::Ok,
    KvErr::NoKey,
    KvErr::Version,
    KvErr::Maybe,
    KvErr::WrongLeader,
    KvErr::WrongGroup,
];

fn parse_err(name: &str) -> Option<KvErr> {
    ERRS.into_iter().find(|e| e.as_str() == name)
}

impl HistoryLine {
    pub fn from_record(record: &Record) -> HistoryLine {
        let get = record.input.op == KvOp::Get;
        HistoryLine {
            format: HISTORY_FORMAT,
            client: record.client,
            op: if get { "get" } else { "put" }.into(),
            key: record.input.key.clone(),
            value: if get {
                String::new()
            } else {
                record.input.value.clone()
            },
            version: if get { 0 } else { record.input.version },
            call_ns: record.call,
            return_ns: record.ret,
            output: record.ret.map(|_| HistoryOutput {
                value: record.output.value.clone(),
                version: record.output.version,
                err: record.output.err.as_str().into(),
            }),
        }
    }

    /// The operation as the checker takes it; `None` for a line that is not one this version
    /// writes (an unknown op or error name).
    pub fn to_record(&self) -> Option<Record> {
        let op = match self.op.as_str() {
            "get" => KvOp::Get,
            "put" => KvOp::Put,
            _ => return None,
        };
        let output = match &self.output {
            Some(out) => KvOutput::got(out.value.clone(), out.version, parse_err(&out.err)?),
            None => KvOutput::put(KvErr::Maybe),
        };
        Some(Record {
            client: self.client,
            input: KvInput {
                op,
                key: self.key.clone(),
                value: self.value.clone(),
                version: self.version,
            },
            output,
            call: self.call_ns,
            ret: self.return_ns,
        })
    }
}

/// Writes `records` to `path`, one JSON object a line, in call order.
pub fn write_history(path: &Path, records: &[Record]) -> io::Result<()> {
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.call, r.client));
    let mut out = BufWriter::new(fs::File::create(path)?);
    for record in sorted {
        serde_json::to_writer(&mut out, &HistoryLine::from_record(record))?;
        out.write_all(b"\n")?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Reads a history file back; an error names the line.
pub fn read_history(path: &Path) -> io::Result<Vec<Record>> {
    let text = fs::read_to_string(path)?;
    let mut records = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} line {}: {why}", path.display(), n + 1),
            )
        };
        let parsed: HistoryLine = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        if parsed.format != HISTORY_FORMAT {
            return Err(bad(format!(
                "history format {} (this build reads {HISTORY_FORMAT})",
                parsed.format
            )));
        }
        records.push(
            parsed
                .to_record()
                .ok_or_else(|| bad(format!("unknown op or error in {line}")))?,
        );
    }
    Ok(records)
}

/// Bounds the return of every write whose outcome is unknown by the return of the earliest
/// read that saw the value it wrote; returns how many writes were resolved so.
///
/// Why this is sound: every put writes a value no other put writes, so a read that returned
/// that value was linearized after the put took effect; the put's linearization point is
/// therefore before that read's, which is before the read returned. Any linearization of the
/// original history is one of the tightened history, and the converse holds trivially. A read
/// that returned before the write was even called proves nothing here (it is left to the
/// checker, which rejects it), so only reads returning after the call are used.
///
/// An unknown write left open stays concurrent with everything after its call; with many of
/// them the search branches at every step. Bounding them is what lets long runs get a verdict.
pub fn bound_unknown_writes(records: &mut [Record]) -> usize {
    let mut first_seen: HashMap<(&str, &str), i64> = HashMap::new();
    for r in records.iter() {
        if let (KvOp::Get, Some(ret)) = (r.input.op, r.ret) {
            if r.output.value.is_empty() {
                continue;
            }
            let slot = first_seen
                .entry((r.input.key.as_str(), r.output.value.as_str()))
                .or_insert(ret);
            *slot = (*slot).min(ret);
        }
    }
    let bounds: Vec<Option<i64>> = records
        .iter()
        .map(|r| {
            if r.input.op != KvOp::Put || r.ret.is_some() {
                return None;
            }
            let seen = *first_seen.get(&(r.input.key.as_str(), r.input.value.as_str()))?;
            (seen > r.call).then_some(seen)
        })
        .collect();
    let mut resolved = 0;
    for (r, bound) in records.iter_mut().zip(bounds) {
        if let Some(ret) = bound {
            r.ret = Some(ret);
            resolved += 1;
        }
    }
    resolved
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(
        client: usize,
        key: &str,
        value: &str,
        version: u64,
        call: i64,
        ret: Option<i64>,
    ) -> Record {
        Record {
            client,
            input: KvInput::put(key, value, version),
            output: KvOutput::put(if ret.is_some() {
                KvErr::Ok
            } else {
                KvErr::Maybe
            }),
            call,
            ret,
        }
    }

    fn get(client: usize, key: &str, value: &str, version: u64, call: i64, ret: i64) -> Record {
        Record {
            client,
            input: KvInput::get(key),
            output: KvOutput::got(value, version, KvErr::Ok),
            call,
            ret: Some(ret),
        }
    }

    #[test]
    fn an_unknown_write_is_bounded_by_the_first_read_of_its_value() {
        let mut records = vec![
            put(0, "k", "a", 0, 10, None),
            get(1, "k", "a", 1, 50, 60),
            get(2, "k", "a", 1, 20, 40),
            put(0, "k", "b", 1, 70, None),
            put(0, "j", "a", 0, 70, None),
        ];
        assert_eq!(bound_unknown_writes(&mut records), 1);
        assert_eq!(records[0].ret, Some(40));
        assert_eq!(records[3].ret, None, "nobody read b");
        assert_eq!(records[4].ret, None, "a was read on another key");
    }

    #[test]
    fn a_read_before_the_call_does_not_bound_the_write() {
        let mut records = vec![get(1, "k", "a", 1, 0, 5), put(0, "k", "a", 0, 10, None)];
        assert_eq!(bound_unknown_writes(&mut records), 0);
        assert_eq!(records[1].ret, None);
    }

    #[test]
    fn history_file_round_trips_and_names_a_bad_line() {
        let dir = std::env::temp_dir().join(format!("raftkv-history-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.jsonl");
        let records = vec![
            put(0, "k", "a", 0, 10, None),
            get(1, "k", "a", 1, 20, 40),
            put(2, "k", "b", 1, 30, Some(45)),
        ];
        write_history(&path, &records).unwrap();
        let back = read_history(&path).unwrap();
        assert_eq!(back.len(), 3);
        for (a, b) in records.iter().zip(&back) {
            assert_eq!(HistoryLine::from_record(a), HistoryLine::from_record(b));
        }
        fs::write(&path, "{\"format\":1}\n").unwrap();
        let err = read_history(&path).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}
