//! Raft beyond the lab tests: what `kill()` guarantees, bad persisted state, a storage that
//! fails, and ReadIndex (a deposed leader answers no read).
//!
//! These tests count the process's `raft-*` threads, so they take a lock that runs them one
//! at a time (other test files are separate processes).

use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver};
use parking_lot::Mutex;
use raftkv::labcodec;
use raftkv::labrpc::{Network, Server};
use raftkv::raft::log::Entry;
use raftkv::raft::{
    ApplyMsg, HardState, Raft, RaftError, ReadIndexError, Restored, Storage, StorageError,
};
use raftkv::tester::{Persister, PersisterStorage, RaftRpcService};

static SERIAL: Mutex<()> = Mutex::new(());

/// Threads of this process whose name starts with `prefix` (Linux: /proc/self/task).
fn threads_named(prefix: &str) -> usize {
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

/// Waits up to a second for the count to settle at `want` (a new thread names itself only
/// once it runs).
fn settle_threads_named(prefix: &str, want: usize) -> usize {
    let t0 = Instant::now();
    loop {
        let n = threads_named(prefix);
        if n == want || t0.elapsed() > Duration::from_secs(1) {
            return n;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn cluster(net: &Network, n: usize) -> (Vec<Arc<Raft>>, Vec<Receiver<ApplyMsg>>) {
    cluster_with(net, n, None)
}

/// A cluster whose apply channels hold `cap` messages (`None`: any number).
fn cluster_with(
    net: &Network,
    n: usize,
    cap: Option<usize>,
) -> (Vec<Arc<Raft>>, Vec<Receiver<ApplyMsg>>) {
    let mut rafts = Vec::new();
    let mut rxs = Vec::new();
    for i in 0..n {
        let ends: Vec<_> = (0..n)
            .map(|j| {
                let e = net.make_end(&format!("end-{i}-{j}")).unwrap();
                net.connect(e.name(), &format!("server-{j}"));
                net.enable(e.name(), true);
                e
            })
            .collect();
        let (tx, rx) = cap.map_or_else(channel::unbounded, channel::bounded);
        let raft = Arc::new(Raft::new(ends, i, Persister::new(), tx).unwrap());
        let mut server = Server::new();
        server.add_service(raft.rpc_service());
        net.add_server(&format!("server-{i}"), server);
        rafts.push(raft);
        rxs.push(rx);
    }
    (rafts, rxs)
}

fn wait_leader(rafts: &[Arc<Raft>]) -> usize {
    let t0 = Instant::now();
    loop {
        if let Some(l) = (0..rafts.len()).find(|&i| rafts[i].get_state().1) {
            return l;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no leader within 5 s"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kill_stops_threads_rpcs_and_closes_apply_channel() {
    let _serial = SERIAL.lock();
    let net = Network::new();
    let (rafts, rxs) = cluster(&net, 3);
    assert_eq!(
        settle_threads_named("raft-", 9),
        9,
        "ticker, applier and syncer per peer"
    );
    let leader = wait_leader(&rafts);
    let (index, _, ok) = rafts[leader].start(vec![1, 2, 3]);
    assert!(ok);
    for (i, rx) in rxs.iter().enumerate() {
        match rx.recv_timeout(Duration::from_secs(2)) {
            Ok(ApplyMsg::Command {
                index: got,
                command,
                ..
            }) => {
                assert_eq!((got, command), (index, vec![1, 2, 3]), "peer {i}");
            }
            other => panic!("peer {i}: expected the command, got {other:?}"),
        }
    }
    for r in &rafts {
        r.kill();
        assert!(r.killed());
    }
    // kill() joins the threads; the kernel may list a joined thread in /proc for a moment
    // longer, hence the short settle.
    assert_eq!(
        settle_threads_named("raft-", 0),
        0,
        "raft threads still running after kill()"
    );
    for (i, rx) in rxs.iter().enumerate() {
        assert!(
            rx.recv_timeout(Duration::from_secs(1)).is_err(),
            "peer {i}: apply channel must be closed and empty after kill"
        );
    }
    // Calls sent before kill may still be on their way; none may start after.
    thread::sleep(Duration::from_millis(200));
    let sent = net.total_count();
    thread::sleep(Duration::from_millis(1000));
    assert_eq!(net.total_count(), sent, "a killed Raft sent RPCs");
    assert!(
        !rafts[leader].start(vec![9]).2,
        "a killed Raft accepts no command"
    );
    net.cleanup();
}

#[test]
fn corrupt_persisted_state_is_an_error() {
    let _serial = SERIAL.lock();
    let net = Network::new();
    let end = |name: &str| net.make_end(name).unwrap();

    // Garbage bytes.
    let p = Persister::new();
    p.save(vec![0xff; 37], None);
    let (tx, _rx) = channel::unbounded();
    match Raft::new(vec![end("a0")], 0, p, tx) {
        Err(RaftError::CorruptState { peer: 0, reason }) => assert!(!reason.is_empty()),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("garbage state accepted"),
    }

    // A real state, truncated: take one from a running peer.
    let good = Persister::new();
    let (tx, rx) = channel::unbounded();
    {
        let raft = Raft::new(vec![end("b0")], 0, good.clone(), tx).unwrap();
        let t0 = Instant::now();
        while !raft.get_state().1 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "a one-peer cluster elects itself"
            );
            thread::sleep(Duration::from_millis(10));
        }
        raft.start(labcodec::encode(&"hello").unwrap());
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(2)),
            Ok(ApplyMsg::Command { index: 1, .. })
        ));
        raft.kill();
    }
    let state = good.read_raft_state();
    assert!(!state.is_empty());
    for cut in [1, state.len() / 2, state.len() - 1] {
        let p = Persister::new();
        p.save(state[..cut].to_vec(), None);
        let (tx, _rx) = channel::unbounded();
        let r = Raft::new(vec![end(&format!("c{cut}"))], 0, p, tx);
        assert!(
            matches!(r, Err(RaftError::CorruptState { .. })),
            "state truncated to {cut} of {} bytes accepted",
            state.len()
        );
    }

    // And the whole state restores: the log survives a restart.
    let (tx, rx) = channel::unbounded();
    let raft = Raft::new(vec![end("d0")], 0, good.copy(), tx).unwrap();
    let t0 = Instant::now();
    while !raft.get_state().1 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        thread::sleep(Duration::from_millis(10));
    }
    let (index, _, _) = raft.start(vec![7]);
    assert_eq!(index, 2, "the restored log holds entry 1");
    let mut seen = Vec::new();
    while let Ok(ApplyMsg::Command { index, .. }) = rx.recv_timeout(Duration::from_secs(2)) {
        seen.push(index);
        if index == 2 {
            break;
        }
    }
    assert_eq!(
        seen,
        vec![1, 2],
        "restored peer re-applies its log in order"
    );
    raft.kill();
    net.cleanup();
}

/// A storage that works until told to fail, then fails every sync.
struct FailingStorage {
    inner: PersisterStorage,
    fail: Arc<AtomicBool>,
}

impl Storage for FailingStorage {
    fn restore(&self) -> Result<Restored, StorageError> {
        self.inner.restore()
    }
    fn set_hard_state(&self, hs: HardState) -> Result<(), StorageError> {
        self.inner.set_hard_state(hs)
    }
    fn append(&self, first: u64, entries: &[Entry]) -> Result<(), StorageError> {
        self.inner.append(first, entries)
    }
    fn truncate_after(&self, index: u64) -> Result<(), StorageError> {
        self.inner.truncate_after(index)
    }
    fn save_snapshot(&self, index: u64, term: u64, data: &[u8]) -> Result<(), StorageError> {
        self.inner.save_snapshot(index, term, data)
    }
    fn sync(&self) -> Result<(), StorageError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StorageError::Io {
                path: "test-disk".to_string(),
                op: "fsync",
                reason: "injected failure".to_string(),
            });
        }
        self.inner.sync()
    }
    fn state_size(&self) -> usize {
        self.inner.state_size()
    }
}

#[test]
fn storage_failure_stops_the_peer() {
    let _serial = SERIAL.lock();
    let net = Network::new();
    let end = net.make_end("f0").unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let p = Persister::new();
    let storage: Box<dyn Storage> = Box::new(FailingStorage {
        inner: PersisterStorage::new(p.clone()),
        fail: fail.clone(),
    });
    let (tx, rx) = channel::unbounded();
    let raft = Raft::new(vec![end], 0, storage, tx).unwrap();
    let t0 = Instant::now();
    while !raft.get_state().1 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "a one-peer cluster elects itself"
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(raft.start(vec![1]).0, 1);
    assert!(matches!(
        rx.recv_timeout(Duration::from_secs(2)),
        Ok(ApplyMsg::Command { index: 1, .. })
    ));
    let saved = p.read_raft_state();

    fail.store(true, Ordering::SeqCst);
    let (index, _, ok) = raft.start(vec![2]);
    assert!(ok && index == 2, "the leader takes the command");
    let t0 = Instant::now();
    while !raft.killed() {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "a peer whose storage fails must stop"
        );
        thread::sleep(Duration::from_millis(10));
    }
    // Nothing it could not save is delivered, and the apply channel closes.
    assert!(
        matches!(
            rx.recv_timeout(Duration::from_secs(2)),
            Err(channel::RecvTimeoutError::Disconnected)
        ),
        "the unsaved command was delivered, or the channel stayed open"
    );
    assert_eq!(p.read_raft_state(), saved, "nothing more reached the disk");
    assert!(!raft.start(vec![3]).2, "a stopped peer takes no command");
    raft.kill();
    net.cleanup();
}

/// Reads `rx` until the command at `index` arrives.
fn wait_applied(rx: &Receiver<ApplyMsg>, peer: usize, index: u64) {
    let t0 = Instant::now();
    loop {
        let left = Duration::from_secs(5).saturating_sub(t0.elapsed());
        match rx.recv_timeout(left) {
            Ok(ApplyMsg::Command { index: got, .. }) if got >= index => return,
            Ok(_) => {}
            Err(e) => panic!("peer {peer}: index {index} not applied within 5 s: {e}"),
        }
    }
}

/// Cuts peer `p` off from every other peer, both ways, or joins it back.
fn connect_peer(net: &Network, n: usize, p: usize, on: bool) {
    for j in (0..n).filter(|&j| j != p) {
        net.enable(&format!("end-{p}-{j}"), on);
        net.enable(&format!("end-{j}-{p}"), on);
    }
}

#[test]
fn read_index_needs_a_majority_and_a_deposed_leader_answers_none() {
    let _serial = SERIAL.lock();
    let net = Network::new();
    let n = 3;
    let (rafts, rxs) = cluster(&net, n);
    let old = wait_leader(&rafts);
    let (old_term, _) = rafts[old].get_state();
    // No entry of its term has committed yet: its commit index may be behind.
    assert_eq!(
        rafts[old].read_index(Duration::from_secs(1)),
        Err(ReadIndexError::NotReady),
        "raft-{old} t{old_term}: a fresh leader vouched for a read"
    );
    let (first, _, ok) = rafts[old].start(vec![1]);
    assert!(ok);
    for (i, rx) in rxs.iter().enumerate() {
        wait_applied(rx, i, first);
    }
    let got = rafts[old].read_index(Duration::from_secs(2));
    assert!(
        matches!(got, Ok(i) if i >= first),
        "raft-{old} t{old_term}: read index {got:?}, want >= {first}"
    );
    for f in (0..n).filter(|&f| f != old) {
        assert_eq!(
            rafts[f].read_index(Duration::from_secs(1)),
            Err(ReadIndexError::NotLeader),
            "follower raft-{f} vouched for a read"
        );
    }

    // Cut the leader off; the others elect a new one and commit a write it never sees.
    connect_peer(&net, n, old, false);
    let t0 = Instant::now();
    let new = loop {
        if let Some(l) = (0..n).find(|&i| i != old && rafts[i].get_state().1) {
            break l;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no new leader within 5 s"
        );
        thread::sleep(Duration::from_millis(20));
    };
    let (second, new_term, ok) = rafts[new].start(vec![2]);
    assert!(ok, "raft-{new} took no command");
    for i in (0..n).filter(|&i| i != old) {
        wait_applied(&rxs[i], i, second);
    }
    // The old leader, still believing it leads (no check-quorum), must not vouch for a read:
    // the write at `second` committed after its last confirmed read.
    let still_leader = rafts[old].get_state();
    let got = rafts[old].read_index(Duration::from_secs(1));
    assert!(
        got.is_err(),
        "deposed raft-{old} (t{old_term}, state {still_leader:?}) vouched for a read at {got:?} \
         after raft-{new} t{new_term} committed {second}"
    );
    assert_eq!(
        rafts[new]
            .read_index(Duration::from_secs(2))
            .map(|i| i >= second),
        Ok(true),
        "raft-{new} t{new_term}: the new leader cannot serve reads"
    );

    // Back together: the old leader steps down and still answers none.
    connect_peer(&net, n, old, true);
    let t0 = Instant::now();
    while rafts[old].get_state().1 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "raft-{old} still leads 5 s after rejoining"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        rafts[old].read_index(Duration::from_secs(1)),
        Err(ReadIndexError::NotLeader)
    );
    for r in &rafts {
        r.kill();
    }
    assert_eq!(
        rafts[new].read_index(Duration::from_secs(1)),
        Err(ReadIndexError::Stopped)
    );
    net.cleanup();
}

/// Plays a service that reads `rx` until it closes, snapshotting every ten entries if
/// `snapshots`. Returns how far it has applied, kept up to date.
fn service(raft: Arc<Raft>, rx: Receiver<ApplyMsg>, snapshots: bool) -> Arc<AtomicU64> {
    let applied = Arc::new(AtomicU64::new(0));
    let progress = applied.clone();
    thread::spawn(move || {
        for msg in rx {
            match msg {
                ApplyMsg::Command { index, .. } => {
                    if snapshots && index % 10 == 0 {
                        raft.snapshot(index, index.to_le_bytes().to_vec());
                    }
                    progress.store(index, Ordering::SeqCst);
                }
                ApplyMsg::Snapshot { index, .. } => progress.store(index, Ordering::SeqCst),
            }
        }
    });
    applied
}

/// Waits up to 5 s for the service of peer `me` to have applied `index`.
fn wait_for_applied(applied: &AtomicU64, me: usize, index: u64, after: &str) {
    let t0 = Instant::now();
    while applied.load(Ordering::SeqCst) < index {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "peer {me}'s service did not apply {index} within 5 s{after} (applied {})",
            applied.load(Ordering::SeqCst)
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// A follower whose service stops taking entries keeps its persisted state near the log
/// limit, paces the leader instead of drawing a storm of calls, and catches up once the
/// service runs again. (The others never snapshot, so the leader never sends the lagging
/// follower a snapshot instead of entries: only the limit can bound its log.)
#[test]
fn log_limit_bounds_a_follower_whose_service_lags() {
    let _serial = SERIAL.lock();
    const LIMIT: usize = 2000;
    const ENTRY: usize = 100;
    const N: u64 = 100;
    let net = Network::new();
    let n = 3;
    let (rafts, mut rxs) = cluster_with(&net, n, Some(1));
    for r in &rafts {
        r.set_log_limit(Some(LIMIT));
    }
    let leader = wait_leader(&rafts);
    let lagging = (leader + 1) % n;
    let mut applied = Vec::new();
    let mut stalled = None;
    for (i, rx) in rxs.drain(..).enumerate() {
        if i == lagging {
            stalled = Some(rx); // nobody reads it: the applier blocks on it
        } else {
            applied.push((i, service(rafts[i].clone(), rx, false)));
        }
    }
    let stalled = stalled.unwrap();

    let mut last = 0;
    for k in 0..N {
        let (index, term, ok) = rafts[leader].start(vec![k as u8; ENTRY]);
        assert!(ok, "raft-{leader} (t{term}) lost the lead at command {k}");
        last = index;
        thread::sleep(Duration::from_millis(2));
    }
    // The leader and the other follower go on without the lagging one.
    for (i, a) in &applied {
        wait_for_applied(a, *i, last, "");
    }
    thread::sleep(Duration::from_millis(200));
    let rpcs = net.total_count();
    thread::sleep(Duration::from_secs(1));
    let idle_rpcs = net.total_count() - rpcs;
    let size = rafts[lagging].persist_bytes();
    assert!(
        size <= LIMIT + 2 * ENTRY,
        "raft-{lagging}: persisted state {size} bytes with its service stalled (limit {LIMIT})"
    );
    assert!(
        rafts[lagging].term_at(last).is_none(),
        "raft-{lagging} took every entry through {last} although its service took none"
    );
    // Two peers, a heartbeat each 100 ms, and a call per ROOM_WAIT (30 ms) from the held-up
    // follower: about 55 a second (43 measured). A leader that resent at once made 33,661.
    assert!(
        idle_rpcs < 150,
        "{idle_rpcs} RPCs in a second while raft-{lagging} was at its limit"
    );

    // The service runs again: the follower takes, applies and trims the rest.
    let catch_up = service(rafts[lagging].clone(), stalled, true);
    wait_for_applied(&catch_up, lagging, last, " of resuming");
    for r in &rafts {
        r.kill();
    }
    net.cleanup();
}

/// The `.tmp` files in `dir` and their sizes.
fn tmp_files(dir: &std::path::Path) -> Vec<(String, u64)> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().to_string_lossy().into_owned();
                let len = e.metadata().ok()?.len();
                name.ends_with(".tmp").then_some((name, len))
            })
            .collect()
        })
        .unwrap_or_default()
}

/// A follower's own snapshot (here 256 MiB, written with the file log) must not hold up its
/// AppendEntries answers: while the snapshot's file is written and fsynced, an append from
/// the leader is made durable and answered. (Were the answer to wait for the whole write, a
/// leader whose followers snapshot at about the same index would hear from no majority for
/// that long, and CheckQuorum would depose it.)
#[test]
fn a_followers_snapshot_write_does_not_hold_up_its_appendentries_answers() {
    use raftkv::raft::AppendEntriesArgs;
    use raftkv::storage::{FileLog, FileLogOptions};
    const SNAPSHOT_BYTES: usize = 256 << 20;
    let _serial = SERIAL.lock();
    let dir = tempfile::tempdir().unwrap();
    let net = Network::new();
    // Peer 1 of 2; peer 0, the "leader", is this test, calling the handler directly. Its end
    // goes nowhere, so the follower's pre-votes are never answered and its term stays.
    let ends = vec![
        net.make_end("snapwrite-0").unwrap(),
        net.make_end("snapwrite-1").unwrap(),
    ];
    let log = FileLog::open(dir.path(), FileLogOptions::default()).unwrap();
    let (tx, rx) = channel::unbounded();
    let storage: Box<dyn Storage> = Box::new(log);
    let raft = Arc::new(Raft::new(ends, 1, storage, tx).unwrap());
    let handler = raft.handler();
    let entry = |i: u64| Entry {
        term: 1,
        command: labcodec::encode(&i).unwrap(),
    };
    let append = |prev: u64, entries: Vec<Entry>, commit: u64| {
        handler.append_entries(AppendEntriesArgs {
            term: 1,
            leader: 0,
            prev_log_index: prev,
            prev_log_term: if prev == 0 { 0 } else { 1 },
            entries,
            leader_commit: commit,
        })
    };
    let r = append(0, (1..=3).map(entry).collect(), 3).expect("an answer");
    assert!(r.success, "the follower takes entries 1..=3: {r:?}");
    wait_applied(&rx, 1, 3);

    let done = Arc::new(AtomicBool::new(false));
    let snapshotter = {
        let (raft, done) = (raft.clone(), done.clone());
        thread::Builder::new()
            .name("test-snapshotter".into())
            .spawn(move || {
                let t0 = Instant::now();
                raft.snapshot(3, vec![7; SNAPSHOT_BYTES]);
                done.store(true, Ordering::SeqCst);
                t0.elapsed()
            })
            .unwrap()
    };
    // Once the snapshot's file is being written, the leader appends entry 4.
    let t0 = Instant::now();
    while tmp_files(dir.path()).iter().all(|(_, len)| *len == 0) {
        assert!(
            !done.load(Ordering::SeqCst),
            "the snapshot was written before its file was seen"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no snapshot file within 30 s"
        );
        thread::sleep(Duration::from_millis(1));
    }
    let t1 = Instant::now();
    let r = append(3, vec![entry(4)], 3).expect("an answer");
    let answered_in = t1.elapsed();
    // The snapshot's file is renamed into place once written and fsynced: still there under
    // its temporary name, it was being written when the answer came.
    let still_writing = !tmp_files(dir.path()).is_empty();
    let snapshot_took = snapshotter.join().unwrap();
    assert!(r.success, "the follower takes entry 4: {r:?}");
    assert!(
        still_writing,
        "the AppendEntries was answered in {answered_in:?}, only once the snapshot's file \
         was written and in place ({snapshot_took:?} for the whole snapshot)"
    );
    raft.kill();
    drop((raft, handler));
    net.cleanup();
    // The snapshot and entry 4 are durable: both read back.
    let log = FileLog::open(dir.path(), FileLogOptions::default()).unwrap();
    let restored = log.restore().unwrap();
    assert_eq!(
        restored.log.base_index(),
        3,
        "the snapshot through 3 is on disk"
    );
    assert_eq!(restored.log.last_index(), 4, "entry 4 is on disk");
    assert_eq!(restored.snapshot.len(), SNAPSHOT_BYTES);
}
