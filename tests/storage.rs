//! The crash-safe file log (`raftkv::storage`): recovery after crashes at every byte of the
//! last records, bit flips, missing segments, an interrupted truncation, a second process on
//! the same directory, and a writer killed with SIGKILL while appending.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
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
    FileLogOptions {
        segment_bytes,
        ..FileLogOptions::default()
    }
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

/// A child this process spawns holds a copy of every open descriptor from its fork until its
/// exec, the log's directory lock among them. Closing and reopening a log while other threads
/// spawn children must still succeed every time (the kernel lets go of the lock at the child's
/// exec, so open waits for that rather than reporting the directory as held elsewhere).
#[test]
fn reopen_while_this_process_spawns_children_is_never_refused() {
    let tmp = TempDir::new("spawning");
    drop(FileLog::open(&tmp.0, opts(400)).unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let spawners: Vec<_> = (0..2)
        .map(|_| {
            let done = done.clone();
            thread::spawn(move || {
                let mut spawned = 0u32;
                while !done.load(Ordering::Relaxed) && spawned < 20_000 {
                    let status = Command::new("true")
                        .stdout(Stdio::null())
                        .status()
                        .expect("spawn true");
                    assert!(status.success());
                    spawned += 1;
                }
                spawned
            })
        })
        .collect();
    let t0 = Instant::now();
    let mut opened = 0u32;
    let mut failure = None;
    while opened < 2_000 && t0.elapsed() < Duration::from_secs(20) {
        match FileLog::open(&tmp.0, opts(400)) {
            Ok(log) => drop(log),
            Err(e) => {
                failure = Some(format!(
                    "open {opened} of the log in {}: {e}",
                    tmp.0.display()
                ));
                break;
            }
        }
        opened += 1;
    }
    done.store(true, Ordering::Relaxed);
    let spawned: u32 = spawners.into_iter().map(|h| h.join().unwrap()).sum();
    if let Some(f) = failure {
        panic!("{f} (while {spawned} children were spawned)");
    }
    assert!(
        spawned > 0 && opened > 100,
        "{opened} opens, {spawned} children"
    );
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
        assert_eq!(
            log.state_size(),
            record::max_payload(record::KIND_HARD_STATE) + record::HEADER,
            "only the hard state"
        );
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

/// One limit per record kind: the largest command the log writes reads back after a reopen;
/// one byte more is refused by the writer with an error, and nothing is written.
#[test]
fn largest_entry_reads_back_and_one_byte_more_is_refused() {
    let tmp = TempDir::new("largest");
    let big = Entry {
        term: 1,
        command: vec![0xab; record::MAX_COMMAND],
    };
    {
        let log = FileLog::open(&tmp.0, opts(1 << 30)).unwrap();
        log.restore().unwrap();
        log.set_hard_state(HardState {
            term: 1,
            voted_for: None,
        })
        .unwrap();
        log.append(1, std::slice::from_ref(&big)).unwrap();
        log.sync().unwrap();
        let bytes_before: u64 = segments(&tmp.0)
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum();
        let over = Entry {
            term: 1,
            command: vec![0xab; record::MAX_COMMAND + 1],
        };
        let e = log.append(2, &[over]).unwrap_err();
        assert!(
            e.to_string().contains(&record::MAX_COMMAND.to_string()),
            "the refusal names the limit: {e}"
        );
        log.sync().unwrap();
        let bytes_after: u64 = segments(&tmp.0)
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(
            bytes_before, bytes_after,
            "nothing written for the refused entry"
        );
    }
    let r = reopen(&tmp.0).unwrap();
    assert_eq!(r.log.last_index(), 1);
    assert_eq!(entries_of(&r), vec![big]);
}

/// A snapshot above the old 64 MiB record limit is written in chunks and reads back whole and
/// piece by piece; the bytes Raft restores are the bytes saved.
#[test]
fn snapshot_above_the_old_record_limit_reads_back() {
    let tmp = TempDir::new("bigsnap");
    let data: Vec<u8> = (0..(70u64 << 20)).map(|i| (i % 251) as u8).collect();
    {
        let log = FileLog::open(&tmp.0, opts(400)).unwrap();
        log.restore().unwrap();
        log.save_snapshot(7, 2, &data).unwrap();
        log.sync().unwrap();
    }
    let log = FileLog::open(&tmp.0, opts(400)).unwrap();
    let src = log.snapshot_source().expect("a snapshot source");
    assert_eq!(
        (src.index(), src.term(), src.len()),
        (7, 2, data.len() as u64)
    );
    assert_eq!(src.crc(), crc32c::crc32c(&data));
    let off = (3 << 20) + 12345;
    assert_eq!(
        src.read(off, 5 << 20).unwrap(),
        &data[off as usize..off as usize + (5 << 20)]
    );
    assert_eq!(
        src.read(data.len() as u64 - 3, 100).unwrap(),
        &data[data.len() - 3..]
    );
    let r = log.restore().unwrap();
    assert_eq!(r.log.base_index(), 7);
    assert!(r.snapshot == data, "the snapshot read back differs");
}

/// Damage inside a snapshot chunk is corruption naming the snapshot file and the offset of
/// the damaged record.
#[test]
fn snapshot_damage_names_file_and_offset() {
    let tmp = TempDir::new("snapdamage");
    let data = vec![0x42u8; 3 * record::SNAPSHOT_CHUNK + 10];
    {
        let log = FileLog::open(&tmp.0, opts(400)).unwrap();
        log.restore().unwrap();
        log.save_snapshot(9, 1, &data).unwrap();
        log.sync().unwrap();
    }
    let path = tmp.0.join("snapshot");
    let mut bytes = fs::read(&path).unwrap();
    // Header record (12 + 25), then chunk records of 12 + 1 + SNAPSHOT_CHUNK: damage the
    // third chunk's data.
    let chunk_rec = (record::HEADER + 1 + record::SNAPSHOT_CHUNK) as u64;
    let third = (record::HEADER + 25) as u64 + 2 * chunk_rec;
    bytes[third as usize + 500] ^= 0x10;
    fs::write(&path, &bytes).unwrap();
    match reopen(&tmp.0) {
        Err(StorageError::Corrupt { path, offset, .. }) => {
            assert!(path.ends_with("snapshot"), "{path}");
            assert_eq!(offset, third, "the damaged chunk's offset");
        }
        other => panic!(
            "damage not reported: {:?}",
            other.map(|r| r.log.base_index())
        ),
    }
}

/// Writes `payload` framed as format 1 did (no kind byte required).
fn old_frame(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_le_bytes();
    let mut out = len.to_vec();
    out.extend_from_slice(&crc32c::crc32c(&len).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A directory written by the format before versions were recorded (format 1: hard state as
/// term and vote without a kind byte, the snapshot as one record, no `format` file) is
/// refused with a message naming both formats, not read as damage at some offset; so is a
/// directory of a newer format.
#[test]
fn older_or_newer_format_is_refused_naming_both_versions() {
    let tmp = TempDir::new("oldformat");
    let mut hs = 3u64.to_le_bytes().to_vec();
    hs.extend_from_slice(&1u64.to_le_bytes());
    fs::write(tmp.0.join("hardstate"), old_frame(&hs)).unwrap();
    let mut snap = 5u64.to_le_bytes().to_vec();
    snap.extend_from_slice(&2u64.to_le_bytes());
    snap.extend_from_slice(b"old service state");
    fs::write(tmp.0.join("snapshot"), old_frame(&snap)).unwrap();
    let mut seg = Vec::new();
    for i in 6..=8u64 {
        let mut p = vec![record::KIND_ENTRY];
        p.extend_from_slice(&i.to_le_bytes());
        p.extend_from_slice(&3u64.to_le_bytes());
        p.extend_from_slice(b"old command");
        seg.extend_from_slice(&old_frame(&p));
    }
    fs::write(tmp.0.join("log-00000000000000000006"), &seg).unwrap();
    let before: Vec<(PathBuf, Vec<u8>)> = ["hardstate", "snapshot", "log-00000000000000000006"]
        .iter()
        .map(|n| (tmp.0.join(n), fs::read(tmp.0.join(n)).unwrap()))
        .collect();
    match reopen(&tmp.0) {
        Err(e @ StorageError::Format { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("format 1") && msg.contains("format 3"),
                "names both versions: {msg}"
            );
            assert!(matches!(
                e,
                StorageError::Format {
                    found: 1,
                    supported: 3,
                    ..
                }
            ));
        }
        Err(e) => panic!("an old directory reported as {e}"),
        Ok(r) => panic!(
            "an old-format directory was opened: log ({}..={}]",
            r.log.base_index(),
            r.log.last_index()
        ),
    }
    for (path, bytes) in &before {
        assert_eq!(
            &fs::read(path).unwrap(),
            bytes,
            "{} left as it was",
            path.display()
        );
    }
    assert!(
        !tmp.0.join("format").exists(),
        "no format file written into it"
    );

    // A newer format: refused the same way, naming both.
    let newer = TempDir::new("newformat");
    drop(FileLog::open(&newer.0, opts(400)).unwrap());
    fs::write(newer.0.join("format"), format_record(4)).unwrap();
    match reopen(&newer.0) {
        Err(e @ StorageError::Format { found: 4, .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("format 4") && msg.contains("format 3"),
                "names both versions: {msg}"
            );
        }
        other => panic!(
            "a newer format opened: {:?}",
            other.map(|r| r.log.last_index())
        ),
    }
    assert_eq!(fs::read(newer.0.join("format")).unwrap(), format_record(4));
}

/// The `format` file of on-disk format `version`.
fn format_record(version: u32) -> Vec<u8> {
    let mut p = vec![record::KIND_FORMAT];
    p.extend_from_slice(b"raftkv-log");
    p.extend_from_slice(&version.to_le_bytes());
    old_frame(&p)
}

/// A directory of format 2 (the records of format 3, before configuration entries could be
/// in the log) is upgraded in place: opened with every entry, its hard state and snapshot as
/// written, and its `format` file now says 3, so a format 2 build would refuse it. The
/// version this build writes is 3.
#[test]
fn format_2_directory_is_upgraded_in_place_to_format_3() {
    assert_eq!(raftkv::storage::FORMAT_VERSION, 3);
    let tmp = TempDir::new("format2");
    let written = write_log(&tmp.0, 40, 400);
    {
        let log = FileLog::open(&tmp.0, opts(400)).unwrap();
        log.restore().unwrap();
        log.save_snapshot(12, entry(12).term, b"service state through 12")
            .unwrap();
        log.sync().unwrap();
    }
    assert_eq!(fs::read(tmp.0.join("format")).unwrap(), format_record(3));
    fs::write(tmp.0.join("format"), format_record(2)).unwrap();
    let r = reopen(&tmp.0).expect("a format 2 directory opens");
    assert_eq!(r.hard_state.term, entry(40).term);
    assert_eq!(r.hard_state.voted_for, Some(1));
    assert_eq!((r.log.base_index(), r.log.last_index()), (12, 40));
    assert_eq!(entries_of(&r), written[12..].to_vec());
    assert!(r.snapshot == b"service state through 12");
    assert_eq!(
        fs::read(tmp.0.join("format")).unwrap(),
        format_record(3),
        "the format file was not upgraded"
    );
    // Upgraded once: opens again as format 3.
    let again = reopen(&tmp.0).unwrap();
    assert_eq!(again.log.last_index(), 40);
}

/// A snapshot streamed in pieces: pieces out of order are answered with the offset wanted,
/// a new snapshot's first piece restarts the transfer, a bad whole-data checksum restarts it,
/// and a complete one is installed atomically and survives a reopen.
#[test]
fn streamed_snapshot_is_assembled_checked_and_installed() {
    use raftkv::raft::{ChunkOutcome, SnapshotChunk};
    let tmp = TempDir::new("recv");
    write_log(&tmp.0, 30, 400);
    let data: Vec<u8> = (0..(2 * record::SNAPSHOT_CHUNK + 77))
        .map(|i| (i % 253) as u8)
        .collect();
    let crc = crc32c::crc32c(&data);
    let c = record::SNAPSHOT_CHUNK;
    let piece = |index: u64, offset: usize, crc: u32| SnapshotChunk {
        leader: 1,
        index,
        term: 9,
        offset: offset as u64,
        total: data.len() as u64,
        crc,
        data: &data[offset..(offset + c).min(data.len())],
        done: offset + c >= data.len(),
    };
    let next = |o: ChunkOutcome| match o {
        ChunkOutcome::Next(n) => n,
        ChunkOutcome::Complete(_) => panic!("complete too early"),
        ChunkOutcome::Busy => panic!("busy with no snapshot received"),
        ChunkOutcome::Refused => panic!("refused within the limits"),
    };
    let log = FileLog::open(&tmp.0, opts(400)).unwrap();
    log.restore().unwrap();
    // Not the start: start over.
    assert_eq!(
        next(log.receive_snapshot_chunk(piece(40, c, 0)).unwrap()),
        0
    );
    assert_eq!(
        next(log.receive_snapshot_chunk(piece(40, 0, 0)).unwrap()),
        c as u64
    );
    // A repeat and a gap: the offset wanted.
    assert_eq!(
        next(log.receive_snapshot_chunk(piece(40, 0, 0)).unwrap()),
        c as u64
    );
    assert_eq!(
        next(log.receive_snapshot_chunk(piece(40, 2 * c, 0)).unwrap()),
        c as u64
    );
    // Another snapshot's first piece restarts.
    assert_eq!(
        next(log.receive_snapshot_chunk(piece(41, 0, 0)).unwrap()),
        c as u64
    );
    assert_eq!(
        next(log.receive_snapshot_chunk(piece(41, c, 0)).unwrap()),
        2 * c as u64
    );
    // The whole-data checksum does not match: restart.
    assert_eq!(
        next(
            log.receive_snapshot_chunk(piece(41, 2 * c, crc ^ 1))
                .unwrap()
        ),
        0
    );
    let tmps = |d: &Path| {
        fs::read_dir(d)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".tmp")
            })
            .count()
    };
    assert_eq!(tmps(&tmp.0), 0, "a failed transfer leaves no file");
    let mut complete = None;
    for off in (0..data.len()).step_by(c) {
        match log.receive_snapshot_chunk(piece(41, off, crc)).unwrap() {
            ChunkOutcome::Next(n) => assert_eq!(n, (off + c) as u64),
            ChunkOutcome::Complete(s) => complete = Some(s),
            ChunkOutcome::Busy => panic!("busy before the snapshot was complete"),
            ChunkOutcome::Refused => panic!("refused within the limits"),
        }
    }
    let src = complete.expect("complete after the last piece");
    assert_eq!(
        (src.index(), src.term(), src.len()),
        (41, 9, data.len() as u64)
    );
    assert!(
        fs::read(tmp.0.join("snapshot")).is_err(),
        "not installed before asked"
    );
    // While it is checked or installed, the leader's repeat of the same snapshot is left
    // unanswered and replaces nothing: the very file received is the one installed.
    for off in [0, c] {
        assert!(matches!(
            log.receive_snapshot_chunk(piece(41, off, crc)).unwrap(),
            ChunkOutcome::Busy
        ));
    }
    assert_eq!(tmps(&tmp.0), 1, "the received file, and no second transfer");
    log.install_received_snapshot(&src).unwrap();
    log.sync().unwrap();
    assert_eq!(tmps(&tmp.0), 0, "the temporary file was renamed into place");
    drop(log);
    let r = reopen(&tmp.0).unwrap();
    assert_eq!((r.log.base_index(), r.log.last_index()), (41, 41));
    assert!(r.snapshot == data, "installed snapshot differs");
}

/// Every `.tmp` file in `dir` (snapshots being written or received).
fn tmp_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect()
}

/// One limit on snapshots for the writer and the receiver: a snapshot of exactly the limit is
/// written by one log, streamed in pieces into another log given the same limit, installed,
/// and read back; one byte more is refused by both — the writer with an error naming the
/// sizes and nothing written, the receiver at the first piece with nothing written (no
/// temporary file) and the transfer it had under way kept. A receiver whose disk would keep
/// less than its reserve refuses the same way.
#[test]
fn snapshot_at_the_limit_is_written_and_received_and_one_byte_more_is_refused_by_both() {
    use raftkv::raft::{ChunkOutcome, SnapshotChunk};
    let limit = 2 * record::SNAPSHOT_CHUNK as u64 + 5;
    let limited = FileLogOptions {
        segment_bytes: 400,
        max_snapshot_bytes: limit,
        min_free_bytes: 0,
    };
    let (writer_dir, receiver_dir) = (TempDir::new("limitw"), TempDir::new("limitr"));
    let writer = FileLog::open(&writer_dir.0, limited.clone()).unwrap();
    writer.restore().unwrap();
    let data: Vec<u8> = (0..limit).map(|i| (i % 241) as u8 + 1).collect();
    writer.save_snapshot(9, 2, &data).unwrap();
    writer.sync().unwrap();
    let src = writer.snapshot_source().expect("the written snapshot");
    assert_eq!(src.len(), limit);

    let receiver = FileLog::open(&receiver_dir.0, limited.clone()).unwrap();
    receiver.restore().unwrap();
    let c = record::SNAPSHOT_CHUNK;
    let mut complete = None;
    for offset in (0..limit).step_by(c) {
        let bytes = src.read(offset, c).unwrap();
        let done = offset + bytes.len() as u64 == limit;
        let piece = SnapshotChunk {
            leader: 0,
            index: src.index(),
            term: src.term(),
            offset,
            total: limit,
            crc: if done { src.crc() } else { 0 },
            data: &bytes,
            done,
        };
        match receiver.receive_snapshot_chunk(piece).unwrap() {
            ChunkOutcome::Next(n) => assert_eq!(n, offset + bytes.len() as u64),
            ChunkOutcome::Complete(s) => complete = Some(s),
            ChunkOutcome::Busy => panic!("busy before the snapshot was complete"),
            ChunkOutcome::Refused => panic!("a snapshot at the limit was refused at {offset}"),
        }
    }
    let received = complete.expect("complete after the last piece");
    receiver.install_received_snapshot(&received).unwrap();
    receiver.sync().unwrap();
    drop(receiver);
    let back = FileLog::open(&receiver_dir.0, limited.clone()).unwrap();
    let r = back.restore().unwrap();
    assert_eq!(r.log.base_index(), 9);
    assert!(
        r.snapshot == data,
        "the snapshot at the limit did not read back"
    );

    // One byte more: the writer refuses it, nothing written.
    let over: Vec<u8> = vec![7; limit as usize + 1];
    match writer.save_snapshot(10, 2, &over) {
        Err(e @ StorageError::SnapshotTooLarge { .. }) => {
            assert_eq!(
                e,
                StorageError::SnapshotTooLarge {
                    index: 10,
                    len: limit + 1,
                    limit
                }
            );
            let msg = e.to_string();
            assert!(msg.contains(&format!("{}", limit + 1)) && msg.contains(&format!("{limit}")));
        }
        other => panic!("a snapshot above the limit was taken: {other:?}"),
    }
    writer.sync().unwrap();
    assert_eq!(writer.snapshot_source().unwrap().index(), 9);
    assert_eq!(tmp_files(&writer_dir.0), Vec::<String>::new());
    // Written ahead (Raft's path for the service's snapshots), the same limit: at it, written
    // and read back; one byte more refused with the same error, no file left.
    let ahead = writer
        .write_snapshot(12, 2, &data)
        .unwrap()
        .expect("the file log writes ahead");
    assert_eq!(ahead.len(), limit);
    writer.save_written_snapshot(&ahead).unwrap();
    writer.sync().unwrap();
    assert_eq!(writer.snapshot_source().unwrap().len(), limit);
    match writer.write_snapshot(13, 2, &over) {
        Err(e) => assert_eq!(
            e,
            StorageError::SnapshotTooLarge {
                index: 13,
                len: limit + 1,
                limit
            }
        ),
        Ok(_) => panic!("a snapshot above the limit was written ahead"),
    }
    assert_eq!(tmp_files(&writer_dir.0), Vec::<String>::new());
    drop(writer);
    let r = FileLog::open(&writer_dir.0, limited.clone())
        .unwrap()
        .restore()
        .unwrap();
    assert!(
        r.log.base_index() == 12 && r.snapshot == data,
        "the snapshot written ahead at the limit did not read back"
    );

    // … and the receiver refuses its first piece, keeping the transfer it has under way.
    let piece = |index: u64, offset: u64, total: u64, data: &'static [u8]| SnapshotChunk {
        leader: 2,
        index,
        term: 3,
        offset,
        total,
        crc: 0,
        data,
        done: false,
    };
    static BYTES: [u8; 1000] = [9; 1000];
    assert!(matches!(
        back.receive_snapshot_chunk(piece(20, 0, limit, &BYTES))
            .unwrap(),
        ChunkOutcome::Next(1000)
    ));
    let under_way = tmp_files(&receiver_dir.0);
    assert_eq!(under_way.len(), 1, "one transfer under way");
    for total in [limit + 1, u64::MAX] {
        assert!(
            matches!(
                back.receive_snapshot_chunk(piece(21, 0, total, &BYTES))
                    .unwrap(),
                ChunkOutcome::Refused
            ),
            "a transfer of {total} bytes was taken"
        );
    }
    assert_eq!(tmp_files(&receiver_dir.0), under_way, "nothing written");
    assert!(matches!(
        back.receive_snapshot_chunk(piece(20, 1000, limit, &BYTES))
            .unwrap(),
        ChunkOutcome::Next(2000)
    ));
    drop(back);

    // A disk that would keep less than the reserve: refused the same way.
    let reserve_dir = TempDir::new("reserve");
    let reserved = FileLog::open(
        &reserve_dir.0,
        FileLogOptions {
            min_free_bytes: u64::MAX / 2,
            ..limited
        },
    )
    .unwrap();
    reserved.restore().unwrap();
    assert!(matches!(
        reserved
            .receive_snapshot_chunk(piece(20, 0, 1000, &BYTES))
            .unwrap(),
        ChunkOutcome::Refused
    ));
    assert_eq!(tmp_files(&reserve_dir.0), Vec::<String>::new());
}

/// The service's snapshot written ahead of its queueing (`write_snapshot`, the file log's
/// own file, fsynced, written while other writes sync): installed only by
/// `save_written_snapshot` and the next sync, after which it and the entries after it read
/// back, whatever was appended and synced meanwhile; a file written but never saved (a crash
/// before the save) leaves the old snapshot and the whole log, and is deleted at the next
/// open; a discarded one is deleted at once; a save of anything else is refused.
#[test]
fn snapshot_written_ahead_is_installed_only_when_saved() {
    let d = TempDir::new("ahead");
    write_log(&d.0, 30, 400);
    let snap = |i: u64| format!("state through {i}").repeat(50).into_bytes();
    // The service's snapshot through entry `i`, written ahead.
    let ahead = |log: &FileLog, i: u64| {
        log.write_snapshot(i, entry(i).term, &snap(i))
            .unwrap()
            .expect("the file log writes ahead")
    };
    {
        let log = FileLog::open(&d.0, opts(400)).unwrap();
        log.restore().unwrap();
        let unsaved = ahead(&log, 20);
        assert_eq!(tmp_files(&d.0).len(), 1, "the snapshot's own file");
        // Appended and synced while the written snapshot waits to be saved.
        log.append(31, &[entry(31), entry(32)]).unwrap();
        log.sync().unwrap();
        assert!(
            log.snapshot_source().is_none(),
            "not installed before it is saved"
        );
        // Dropped without a save: as a crash between the write and the save.
        drop(unsaved);
    }
    assert_eq!(tmp_files(&d.0).len(), 1);
    let r = reopen(&d.0).unwrap();
    assert_eq!(
        tmp_files(&d.0),
        Vec::<String>::new(),
        "the unsaved file is deleted at open"
    );
    assert_eq!((r.log.base_index(), r.log.last_index()), (0, 32));
    assert!(r.snapshot.is_empty(), "an unsaved snapshot was installed");
    assert_eq!(entries_of(&r), (1..=32).map(entry).collect::<Vec<_>>());

    let log = FileLog::open(&d.0, opts(400)).unwrap();
    log.restore().unwrap();
    // Discarded: its file goes at once.
    let dropped = ahead(&log, 10);
    log.discard_written_snapshot(&dropped);
    assert_eq!(
        tmp_files(&d.0),
        Vec::<String>::new(),
        "a discarded file stays"
    );
    assert!(matches!(
        log.save_written_snapshot(&dropped),
        Err(StorageError::Invalid { .. })
    ));
    // Written, then entries appended and synced, then saved: the snapshot and every entry
    // after it read back.
    let saved = ahead(&log, 25);
    log.append(33, &[entry(33)]).unwrap();
    log.sync().unwrap();
    log.save_written_snapshot(&saved).unwrap();
    assert!(
        matches!(
            log.save_written_snapshot(&saved),
            Err(StorageError::Invalid { .. })
        ),
        "the same snapshot saved twice"
    );
    log.append(34, &[entry(34)]).unwrap();
    log.sync().unwrap();
    let src = log.snapshot_source().expect("installed by the sync");
    assert_eq!((src.index(), src.term()), (25, entry(25).term));
    assert_eq!(tmp_files(&d.0), Vec::<String>::new());
    drop(log);
    let r = reopen(&d.0).unwrap();
    assert_eq!((r.log.base_index(), r.log.last_index()), (25, 34));
    assert_eq!(r.snapshot, snap(25));
    assert_eq!(entries_of(&r), (26..=34).map(entry).collect::<Vec<_>>());

    // Two written ahead at once: the later saved first, the earlier is refused (the log has
    // moved past it) and its file deleted; the later one stands.
    let log = FileLog::open(&d.0, opts(400)).unwrap();
    log.restore().unwrap();
    let a = ahead(&log, 28);
    let b = ahead(&log, 30);
    assert_eq!(tmp_files(&d.0).len(), 2);
    log.save_written_snapshot(&b).unwrap();
    assert!(matches!(
        log.save_written_snapshot(&a),
        Err(StorageError::Invalid { .. })
    ));
    log.sync().unwrap();
    assert_eq!(tmp_files(&d.0), Vec::<String>::new());
    drop(log);
    let r = reopen(&d.0).unwrap();
    assert_eq!((r.log.base_index(), r.log.last_index()), (30, 34));
    assert_eq!(r.snapshot, snap(30));
}
