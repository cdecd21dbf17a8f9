//! The crash-safe file log (`raftkv::storage`): recovery after crashes at every byte of the
//! last records, bit flips, missing segments, an interrupted truncation, a second process on
//! the same directory, and a writer killed with SIGKILL while appending.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use raftkv::raft::log::Entry;
use raftkv::raft::{HardState, Restored, Storage, StorageError};
use raftkv::storage::record::{self, Read};
use raftkv::storage::{FileLog, FileLogOptions};

/// A directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "raftkv-storage-{name}-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn opts(segment_bytes: u64) -> FileLogOptions {
    FileLogOptions { segment_bytes }
}

/// Entry `i`: commands of a few dozen bytes, none of them zero (see `record::looks_torn`).
fn entry(i: u64) -> Entry {
    Entry {
        term: 1 + i / 10,
        command: format!("command {i}; ").repeat(3).into_bytes(),
    }
}

/// Writes entries 1..=n to a fresh log in `dir`, syncing every 7, and the hard state.
fn write_log(dir: &Path, n: u64, segment_bytes: u64) -> Vec<Entry> {
    let log = FileLog::open(dir, opts(segment_bytes)).expect("open");
    let r = log.restore().expect("restore");
    assert_eq!(r.log.last_index(), 0);
    log.set_hard_state(HardState {
        term: entry(n).term,
        voted_for: Some(1),
    })
    .unwrap();
    let entries: Vec<Entry> = (1..=n).map(entry).collect();
    for chunk in (1..=n).collect::<Vec<_>>().chunks(7) {
        let first = chunk[0];
        let batch: Vec<Entry> = chunk.iter().map(|&i| entry(i)).collect();
        log.append(first, &batch).unwrap();
        log.sync().unwrap();
    }
    entries
}

fn reopen(dir: &Path) -> Result<Restored, StorageError> {
    FileLog::open(dir, opts(400))?.restore()
}

fn entries_of(r: &Restored) -> Vec<Entry> {
    r.log
        .slice(r.log.base_index() + 1, r.log.last_index())
        .to_vec()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("log-"))
        })
        .collect();
    v.sort();
    v
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().is_some_and(|n| n != "LOCK") {
            fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// The offset after each whole record of a segment file.
fn record_ends(buf: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut o = 0;
    while let Read::Record(_, next) = record::read_at(buf, o) {
        ends.push(next);
        o = next;
    }
    assert_eq!(o, buf.len(), "a clean segment is whole records");
    ends
}

fn assert_corrupt(r: Result<Restored, StorageError>, file: &Path, what: &str) {
    match r {
        Err(StorageError::Corrupt { path, .. }) => assert!(
            path.ends_with(&*file.file_name().unwrap().to_string_lossy()),
            "{what}: corruption reported in {path}, not {}",
            file.display()
        ),
        Err(e) => panic!("{what}: wrong error {e}"),
        Ok(r) => panic!(
            "{what}: recovered ({}..={}] instead of reporting corruption",
            r.log.base_index(),
            r.log.last_index()
        ),
    }
}

#[test]
fn reopen_recovers_everything() {
    let tmp = TempDir::new("reopen");
    let entries = write_log(&tmp.0, 100, 400);
    assert!(segments(&tmp.0).len() > 3, "several segments");
    let r = reopen(&tmp.0).unwrap();
    assert_eq!(
        r.hard_state,
        HardState {
            term: entry(100).term,
            voted_for: Some(1)
        }
    );
    assert_eq!(entries_of(&r), entries);
    assert!(r.snapshot.is_empty());
}

#[test]
fn truncate_and_snapshot_survive_reopen() {
    let tmp = TempDir::new("truncsnap");
    let mut model = write_log(&tmp.0, 60, 400);
    {
        let log = FileLog::open(&tmp.0, opts(400)).unwrap();
        log.restore().unwrap();
        // A conflicting suffix from 25 on (inside an older segment), replaced.
        log.truncate_after(24).unwrap();
        model.truncate(24);
        let new: Vec<Entry> = (25..=40)
            .map(|i| Entry {
                term: 9,
                command: format!("new {i}").into_bytes(),
            })
            .collect();
        log.append(25, &new).unwrap();
        model.extend(new);
        log.sync().unwrap();
    }
    let r = reopen(&tmp.0).unwrap();
    assert_eq!(entries_of(&r), model);
    {
        let log = FileLog::open(&tmp.0, opts(400)).unwrap();
        log.restore().unwrap();
        log.save_snapshot(30, 9, b"snapshot through 30").unwrap();
        log.sync().unwrap();
        let first = segments(&tmp.0)[0].clone();
        let first_index: u64 = first.file_name().unwrap().to_string_lossy()[4..]
            .parse()
            .unwrap();
        assert!(first_index > 20, "segments below the snapshot deleted");
    }
    let r = reopen(&tmp.0).unwrap();
    assert_eq!(r.log.base_index(), 30);
    assert_eq!(r.log.base_term(), 9);
    assert_eq!(r.snapshot, b"snapshot through 30");
    assert_eq!(entries_of(&r), model[30..].to_vec());
    {
        // A snapshot the log does not match (another term): the whole log goes.
        let log = FileLog::open(&tmp.0, opts(400)).unwrap();
        log.restore().unwrap();
        log.save_snapshot(35, 4, b"other").unwrap();
        log.append(36, &[entry(36)]).unwrap();
        log.sync().unwrap();
    }
    let r = reopen(&tmp.0).unwrap();
    assert_eq!((r.log.base_index(), r.log.last_index()), (35, 36));
    assert_eq!(entries_of(&r), vec![entry(36)]);
}

/// `state_size` (what `maxraftstate` is compared with) counts the hard state and the live
/// entries: it falls when a snapshot compacts entries that share a segment with live ones,
/// and it is the same after a reopen.
#[test]
fn state_size_counts_only_entries_after_the_snapshot() {
    let tmp = TempDir::new("statesize");
    // One large segment: compaction can delete no file.
    write_log(&tmp.0, 50, 1 << 20);
    assert_eq!(segments(&tmp.0).len(), 1);
    let log = FileLog::open(&tmp.0, opts(1 << 20)).unwrap();
    log.restore().unwrap();
    let full = log.state_size();
    let per_entry = fs::metadata(&segments(&tmp.0)[0]).unwrap().len() as usize / 50;
    assert!(full >= 50 * per_entry, "{full} bytes for 50 entries");
    log.save_snapshot(40, entry(40).term, b"through 40")
        .unwrap();
    log.sync().unwrap();
    assert_eq!(segments(&tmp.0).len(), 1, "the segment holds live entries");
    let after = log.state_size();
    assert!(
        after < full - 35 * per_entry && after > 5 * per_entry,
        "state size {after} after compacting 40 of 50 entries (was {full})"
    );
    drop(log);
    let log = FileLog::open(&tmp.0, opts(1 << 20)).unwrap();
    assert_eq!(log.state_size(), after, "state size after reopen");
    // Appends count again.
    log.restore().unwrap();
    log.append(51, &[entry(51)]).unwrap();
    log.sync().unwrap();
    assert!(log.state_size() > after);
}

#[test]
fn second_open_is_refused() {
    let tmp = TempDir::new("lock");
    let first = FileLog::open(&tmp.0, opts(400)).unwrap();
    match FileLog::open(&tmp.0, opts(400)) {
        Err(StorageError::Locked { path }) => assert!(path.contains("raftkv-storage-lock")),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("a locked directory opened twice"),
    }
    drop(first);
    FileLog::open(&tmp.0, opts(400)).expect("free again once closed");
}

/// Cuts the last segment at every byte offset inside its last three records: each crash
/// point recovers exactly the records wholly before the cut.
#[test]
fn torn_tail_at_every_offset() {
    let tmp = TempDir::new("torn");
    let entries = write_log(&tmp.0, 45, 400);
    let segs = segments(&tmp.0);
    let last = segs.last().unwrap().clone();
    let buf = fs::read(&last).unwrap();
    let ends = record_ends(&buf);
    assert!(ends.len() >= 3, "the last segment holds a few records");
    let before_last = (entries.len() - ends.len()) as u64; // entries in earlier segments
    let from = ends[ends.len() - 4.min(ends.len())];
    for cut in from..buf.len() {
        let case = TempDir::new("torn-case");
        copy_dir(&tmp.0, &case.0);
        let f = fs::OpenOptions::new()
            .write(true)
            .open(case.0.join(last.file_name().unwrap()))
            .unwrap();
        f.set_len(cut as u64).unwrap();
        let whole = ends.iter().filter(|&&e| e <= cut).count() as u64;
        let r = reopen(&case.0).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(
            entries_of(&r),
            entries[..(before_last + whole) as usize].to_vec(),
            "cut at {cut} of {}",
            buf.len()
        );
        // And it appends where it was cut.
        let log = FileLog::open(&case.0, opts(400)).unwrap();
        let r = log.restore().unwrap();
        let next = r.log.last_index() + 1;
        log.append(next, &[entry(next)]).unwrap();
        log.sync().unwrap();
        drop(log);
        assert_eq!(reopen(&case.0).unwrap().log.last_index(), next);
    }
}

/// A segment other than the last cut short is damage, not a crash point.
#[test]
fn cut_inside_a_full_segment_is_corruption() {
    let tmp = TempDir::new("cutfull");
    write_log(&tmp.0, 45, 400);
    let segs = segments(&tmp.0);
    let victim = &segs[1];
    let len = fs::metadata(victim).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(victim)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    assert_corrupt(reopen(&tmp.0), victim, "a full segment cut short");
}

/// Flips every bit of the last records, and bits across the other files: each is reported
/// as corruption of that file, never recovered as a shorter log.
#[test]
fn bit_flips_are_corruption() {
    let tmp = TempDir::new("flips");
    let entries = write_log(&tmp.0, 45, 400);
    {
        let log = FileLog::open(&tmp.0, opts(400)).unwrap();
        log.restore().unwrap();
        log.save_snapshot(3, entry(3).term, b"snapshot through 3")
            .unwrap();
        log.sync().unwrap();
    }
    let r = reopen(&tmp.0).unwrap();
    assert_eq!(entries_of(&r), entries[3..].to_vec());

    let mut targets: Vec<(PathBuf, Vec<usize>)> = Vec::new();
    let segs = segments(&tmp.0);
    let last = segs.last().unwrap().clone();
    let last_len = fs::metadata(&last).unwrap().len() as usize;
    let ends = record_ends(&fs::read(&last).unwrap());
    let from = ends[ends.len() - 4.min(ends.len())];
    targets.push((last.clone(), (from..last_len).collect()));
    for seg in &segs[..segs.len() - 1] {
        let len = fs::metadata(seg).unwrap().len() as usize;
        targets.push((seg.clone(), (0..len).step_by(7).collect()));
    }
    for name in ["hardstate", "snapshot"] {
        let p = tmp.0.join(name);
        let len = fs::metadata(&p).unwrap().len() as usize;
        targets.push((p, (0..len).collect()));
    }
    for (file, offsets) in targets {
        for offset in offsets {
            for bit in [0, 3, 7] {
                let case = TempDir::new("flip-case");
                copy_dir(&tmp.0, &case.0);
                let p = case.0.join(file.file_name().unwrap());
                let mut bytes = fs::read(&p).unwrap();
                bytes[offset] ^= 1 << bit;
                fs::write(&p, &bytes).unwrap();
                assert_corrupt(
                    reopen(&case.0),
                    &p,
                    &format!("bit {bit} of byte {offset} of {}", p.display()),
                );
            }
        }
    }
}

#[test]
fn missing_segment_is_corruption() {
    let tmp = TempDir::new("missing");
    write_log(&tmp.0, 60, 400);
    let segs = segments(&tmp.0);
    assert!(segs.len() >= 4);
    for (k, what) in [
        (0, "the first segment"),
        (segs.len() / 2, "a middle segment"),
        (segs.len() - 1, "the last segment"),
    ] {
        let case = TempDir::new("missing-case");
        copy_dir(&tmp.0, &case.0);
        fs::remove_file(case.0.join(segs[k].file_name().unwrap())).unwrap();
        match reopen(&case.0) {
            Err(StorageError::Corrupt { reason, .. }) => {
                assert!(reason.contains("missing"), "{what}: {reason}")
            }
            Err(e) => panic!("{what} deleted: wrong error {e}"),
            Ok(r) => panic!(
                "{what} deleted: recovered ({}..={}]",
                r.log.base_index(),
                r.log.last_index()
            ),
        }
    }
}

/// With a single segment, deleting it must not read as a fresh log: the hard state (and any
/// snapshot) says there was one.
#[test]
fn missing_only_segment_is_corruption() {
    let tmp = TempDir::new("only");
    write_log(&tmp.0, 5, 1 << 20);
    let segs = segments(&tmp.0);
    assert_eq!(segs.len(), 1);
    fs::remove_file(&segs[0]).unwrap();
    match reopen(&tmp.0) {
        Err(StorageError::Corrupt { reason, .. }) => {
            assert!(reason.contains("missing"), "{reason}")
        }
        Err(e) => panic!("the only segment deleted: wrong error {e}"),
        Ok(r) => panic!(
            "the only segment deleted: recovered ({}..={}]",
            r.log.base_index(),
            r.log.last_index()
        ),
    }
    assert!(segments(&tmp.0).is_empty(), "recovery created nothing");
}

/// A snapshot that discards the whole log (its last entry is not in the log) leaves one
/// empty segment after it, on every path: at once, after a reopen, and when a crash left
/// the emptied old segment beside the new one.
#[test]
fn snapshot_discarding_the_log_always_leaves_a_segment() {
    let tmp = TempDir::new("discard");
    write_log(&tmp.0, 30, 400);
    let old_first = segments(&tmp.0)[0].clone();
    {
        let log = FileLog::open(&tmp.0, opts(400)).unwrap();
        log.restore().unwrap();
        log.save_snapshot(50, 99, b"from the leader").unwrap();
        log.sync().unwrap();
        assert_eq!(log.state_size(), 16 + record::HEADER, "only the hard state");
    }
    let segs = segments(&tmp.0);
    assert_eq!(segs.len(), 1);
    assert!(segs[0].to_string_lossy().ends_with("51"), "{segs:?}");
    let r = reopen(&tmp.0).unwrap();
    assert_eq!((r.log.base_index(), r.log.last_index()), (50, 50));
    // The crash window: the emptied old segment is still there beside the new one.
    fs::File::create(&old_first).unwrap();
    let r = reopen(&tmp.0).unwrap();
    assert_eq!((r.log.base_index(), r.log.last_index()), (50, 50));
    assert_eq!(r.snapshot, b"from the leader");
    assert_eq!(segments(&tmp.0).len(), 1, "{:?}", segments(&tmp.0));
}

/// A truncation that crashed after cutting an older segment, before deleting the newer ones:
/// recovery deletes the leftovers and keeps the cut log.
#[test]
fn interrupted_truncation_recovers() {
    let tmp = TempDir::new("interrupted");
    let entries = write_log(&tmp.0, 60, 400);
    let segs = segments(&tmp.0);
    let victim = &segs[1];
    let buf = fs::read(victim).unwrap();
    let ends = record_ends(&buf);
    // Keep two entries of the second segment: drop the rest and its seal.
    fs::OpenOptions::new()
        .write(true)
        .open(victim)
        .unwrap()
        .set_len(ends[1] as u64)
        .unwrap();
    let first_entries = record_ends(&fs::read(&segs[0]).unwrap()).len() - 1; // minus the seal
    let r = reopen(&tmp.0).unwrap();
    assert_eq!(entries_of(&r), entries[..first_entries + 2].to_vec());
    assert_eq!(segments(&tmp.0).len(), 2, "leftover segments deleted");
}

/// `sigkill_while_appending` runs itself in a child with this set to a directory: the child
/// appends and syncs until killed, printing each synced index.
const CHILD_ENV: &str = "RAFTKV_FILELOG_CHILD";

#[test]
fn sigkill_while_appending() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        let log = FileLog::open(&dir, opts(4096)).expect("child: open");
        let mut next = log.restore().expect("child: restore").log.last_index() + 1;
        loop {
            let batch: Vec<Entry> = (next..next + 5).map(entry).collect();
            log.append(next, &batch).expect("child: append");
            log.sync().expect("child: sync");
            next += 5;
            println!("synced {}", next - 1);
        }
    }
    let tmp = TempDir::new("sigkill");
    for round in 0..3 {
        let mut child = Command::new("/proc/self/exe")
            .args(["--exact", "sigkill_while_appending", "--nocapture"])
            .env(CHILD_ENV, &tmp.0)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the writer");
        let stdout = child.stdout.take().unwrap();
        let mut synced = 0u64;
        let t0 = Instant::now();
        let want = 200 * (round + 1);
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("synced ") {
                synced = n.parse().unwrap();
                if synced >= want {
                    break;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "writer too slow: {synced} synced"
            );
        }
        child.kill().expect("SIGKILL the writer"); // SIGKILL on Unix
        child.wait().unwrap();
        let r = reopen(&tmp.0).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(
            r.log.last_index() >= synced,
            "round {round}: {synced} synced, {} recovered",
            r.log.last_index()
        );
        assert_eq!(
            entries_of(&r),
            (1..=r.log.last_index()).map(entry).collect::<Vec<_>>(),
            "round {round}: recovered entries differ"
        );
    }
}
