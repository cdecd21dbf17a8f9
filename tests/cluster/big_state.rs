//! State above the old 64 MiB record and frame limits, on a real three-process cluster over
//! loopback: 110 values of 1 MiB are written while one follower is down; that follower then
//! catches up (its snapshot streamed in chunks; killed once in the middle of the transfer,
//! which then starts over), a restart of the whole cluster serves every key, a brand-new
//! fourth node added with `raftkv member add` catches up and counts as a voter, and no
//! node's peak resident memory reaches three times the live data.
//!
//! Every node is killed and the data directories removed when the test ends, passing or
//! failing (the process kit, `tests/kit`: the cluster's drop, and `--stop-on-stdin-eof` if
//! the test process itself dies).

use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use crate::kit;

use kit::{Cluster, voters};
use raftkv::node::FAULT_ENV;

/// Keys written, each with a value of [`VALUE_BYTES`].
const KEYS: usize = 110;
const VALUE_BYTES: usize = 1 << 20;
/// How long a cluster may take to elect a leader, or a command to succeed after a fault.
const PATIENCE: Duration = Duration::from_secs(30);
/// How long the lagging follower or a new member may take to catch up, and a restarted
/// cluster to serve.
const CATCH_UP: Duration = Duration::from_secs(180);
/// The slot of the node added with `member add` (id 4): started on an empty directory,
/// without `--bootstrap`.
const NEW: usize = 3;

/// How node `i` exited, if it has.
fn exited(cluster: &mut Cluster, i: usize) -> Option<String> {
    cluster
        .exit_status(i)
        .map(|st| format!("node {} exited: {st}", i + 1))
}

/// The running node that leads in the highest term, waiting up to `patience`; an error at
/// once if a node has exited.
fn leader_or_exit(cluster: &mut Cluster, patience: Duration) -> Result<usize, String> {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(i) = cluster.leader_within(Duration::ZERO) {
            return Ok(i);
        }
        for i in 0..cluster.len() {
            if let Some(why) = exited(cluster, i) {
                return Err(why);
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no leader within {patience:?}"));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits up to `patience` until node `i`'s status satisfies `done`; an error naming what
/// it last said (or how it exited) otherwise.
fn wait_status(
    cluster: &mut Cluster,
    i: usize,
    what: &str,
    patience: Duration,
    done: impl Fn(&raftkv::proc::NodeStatusFile) -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + patience;
    loop {
        let status = cluster.status(i);
        if status.as_ref().is_some_and(&done) {
            return Ok(());
        }
        if let Some(why) = exited(cluster, i) {
            return Err(format!("{what}: {why}: {}", cluster.stderr(i)));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{what}: not within {patience:?}; node {} says {status:?}",
                i + 1
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn key(k: usize) -> String {
    format!("big{k:03}")
}

/// A 1 MiB ASCII value that differs per key in every position.
fn value(k: usize) -> String {
    (0..VALUE_BYTES)
        .map(|i| (b'a' + ((i * 7 + k * 3) % 26) as u8) as char)
        .collect()
}

/// Every key through node `i`'s client port, compared with what was written.
fn check_every_key(cluster: &Cluster, i: usize, what: &str) -> Result<(), String> {
    for k in 0..KEYS {
        let got: Option<String> = cluster.try_retry_within(i, what, CATCH_UP, |c| {
            redis::cmd("GET").arg(key(k)).query(c)
        })?;
        match got {
            Some(v) if v == value(k) => {}
            Some(v) => {
                return Err(format!(
                    "{what}: {} has a wrong value ({} bytes)",
                    key(k),
                    v.len()
                ));
            }
            None => return Err(format!("{what}: acknowledged {} lost", key(k))),
        }
    }
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// The peak resident memory of every node that runs, as `(who, bytes)` with `when` in `who`.
fn peaks_now(cluster: &mut Cluster, when: &str) -> Vec<(String, u64)> {
    let mut peaks = Vec::new();
    for i in cluster.running() {
        if exited(cluster, i).is_none() {
            peaks.push((format!("node {} {when}", i + 1), cluster.peak_rss(i)));
        }
    }
    peaks
}

/// A brand-new node (slot [`NEW`], id 4: its own ports, an empty directory, no
/// `--bootstrap`) is added with `raftkv member add` while the cluster holds every key: it gets
/// the snapshot streamed, becomes a voter, and counts in the majority: with one founding
/// node removed and another killed, it and the last founder elect a leader and commit a
/// write, which neither could alone. Restarted with reads from its own state, it holds every
/// value. Peaks of resident memory go to `peaks`.
fn new_member_catches_up(
    cluster: &mut Cluster,
    peaks: &mut Vec<(String, u64)>,
) -> Result<(), String> {
    cluster.start(NEW);
    wait_status(cluster, NEW, "node 4 started", PATIENCE, |s| {
        s.member == "waiting to be added"
    })?;
    let leader = leader_or_exit(cluster, PATIENCE)?;
    let t = Instant::now();
    let add = [
        "add",
        "4",
        &cluster.peer_addr(NEW),
        &cluster.client_addr(NEW),
    ];
    let (code, out, err) = cluster.member_spawn(&[leader], &add).finish(CATCH_UP);
    if code != 0 || !out.contains("node 4 added") {
        return Err(format!("member add 4 exited {code}: {out}{err}"));
    }
    eprintln!("big_state: node 4 added in {:.1?}", t.elapsed());
    wait_status(
        cluster,
        NEW,
        "node 4 a voter with every key",
        CATCH_UP,
        |s| s.member == "voter" && s.keys == KEYS,
    )?;
    let leader = leader_or_exit(cluster, PATIENCE)?;
    let list = cluster.members(&[leader]);
    if voters(&list) != [1, 2, 3, 4] {
        return Err(format!("node 4 added, but the members are {list:?}"));
    }
    peaks.extend(peaks_now(cluster, "once node 4 caught up"));

    // Node 4 counts: a founding follower is removed and stopped, then the leader is killed;
    // of the three voters left (a founder, node 4 and the killed leader) the two running
    // need each other to elect a leader and to commit.
    let gone = (0..3).find(|&i| i != leader).expect("a founding follower");
    let (code, out, err) = cluster.member(&[leader], &["remove", &(gone + 1).to_string()]);
    if code != 0 {
        return Err(format!("member remove {}: {out}{err}", gone + 1));
    }
    let list = cluster.members(&[leader]);
    let mut expect: Vec<usize> = [leader, NEW].iter().map(|i| i + 1).collect();
    expect.extend((0..3).filter(|&i| i != leader && i != gone).map(|i| i + 1));
    expect.sort_unstable();
    if voters(&list) != expect {
        return Err(format!(
            "node {} removed, but the members are {list:?}",
            gone + 1
        ));
    }
    cluster.kill9(gone);
    cluster.kill9(leader);
    let reply: String =
        cluster.try_retry_within(NEW, "SET after node 4 joined", CATCH_UP, |c| {
            redis::cmd("SET").arg("after-new-member").arg("4").query(c)
        })?;
    if reply != "OK" {
        return Err(format!("SET after node 4 joined: {reply}"));
    }

    // Node 4's own replica holds every value: restarted with the deliberate fault that
    // answers reads from the node's own state, its GETs show it.
    peaks.extend(peaks_now(cluster, "before node 4's restart"));
    cluster.kill9(NEW);
    cluster.start_with(NEW, |c| {
        c.env(FAULT_ENV, "local-reads");
    });
    wait_status(cluster, NEW, "node 4 restarted", CATCH_UP, |s| {
        s.keys == KEYS + 1
    })?;
    check_every_key(cluster, NEW, "local GET on node 4")?;
    let got: Option<String> =
        cluster.try_retry_within(NEW, "local GET on node 4", CATCH_UP, |c| {
            redis::cmd("GET").arg("after-new-member").query(c)
        })?;
    if got.as_deref() != Some("4") {
        return Err(format!("node 4 lost the write it helped commit: {got:?}"));
    }
    Ok(())
}

#[test]
fn state_above_64_mib_reaches_a_lagging_follower_and_a_new_member_and_survives_a_full_restart() {
    let t0 = Instant::now();
    let mut cluster = Cluster::start_new_with_spares("bigstate", 3, 1);
    cluster.patience = PATIENCE;
    // A 1 MiB reply on a loaded machine.
    cluster.read_timeout = Duration::from_secs(20);
    let leader = leader_or_exit(&mut cluster, PATIENCE).expect("a first leader");
    // The follower that is down through all the writes.
    let lagging = (leader + 1) % 3;
    cluster.kill9(lagging);
    let live: u64 = (0..KEYS).map(|k| (key(k).len() + VALUE_BYTES) as u64).sum();
    let mut failures: Vec<String> = Vec::new();
    let mut peaks: Vec<(String, u64)> = Vec::new();
    for k in 0..KEYS {
        let v = value(k);
        let reply: String = cluster
            .try_retry_within(leader, "SET of 1 MiB", PATIENCE, |c| {
                redis::cmd("SET").arg(key(k)).arg(&v).query(c)
            })
            .expect("every SET is acknowledged");
        assert_eq!(reply, "OK");
    }
    let written = t0.elapsed();

    // The follower that missed everything starts receiving the snapshot; it is killed in
    // the middle of the transfer (its partial file on disk), and started again: the transfer
    // starts over and the partial file is gone.
    cluster.start(lagging);
    let raft_dir = cluster.data(lagging).join("raft");
    let partial = || -> Option<(PathBuf, u64)> {
        fs::read_dir(&raft_dir).ok()?.flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let len = e.metadata().ok()?.len();
            (name.starts_with("snapshot-recv-") && name.ends_with(".tmp")).then(|| (e.path(), len))
        })
    };
    let t = Instant::now();
    let interrupted = loop {
        if let Some((path, len)) = partial()
            && len >= 8 << 20
        {
            cluster.kill9(lagging);
            let left = fs::metadata(&path).map_or(0, |m| m.len());
            break Ok((path, left));
        }
        if cluster.status(lagging).is_some_and(|s| s.keys == KEYS) {
            break Err("the transfer finished before it could be interrupted".to_string());
        }
        if let Some(why) = exited(&mut cluster, lagging) {
            break Err(why);
        }
        if t.elapsed() > CATCH_UP {
            break Err(format!("no snapshot transfer to node {} seen", lagging + 1));
        }
        thread::sleep(Duration::from_millis(2));
    };
    match &interrupted {
        Ok((_, left)) => {
            eprintln!(
                "big_state: node {} killed with {} MiB of the snapshot received",
                lagging + 1,
                left >> 20
            );
            assert!(*left < live, "the partial file is partial");
            cluster.start(lagging);
        }
        Err(e) => {
            // What the two ends of the transfer said (with RAFTKV_NODE_LOG set).
            let tail = |i: usize| {
                let log = cluster.stderr(i);
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(60)..].join("\n")
            };
            failures.push(format!(
                "interrupted transfer: {e}\nnode {} (leader) said:\n{}\nnode {} said:\n{}",
                leader + 1,
                tail(leader),
                lagging + 1,
                tail(lagging)
            ));
            cluster.kill9(lagging);
            cluster.start(lagging);
        }
    }

    // The follower that missed everything catches up: its state machine holds every key.
    let t1 = Instant::now();
    let caught_up = loop {
        let leader_applied = (0..3)
            .filter(|&i| i != lagging)
            .filter_map(|i| cluster.status(i))
            .map(|s| s.applied)
            .max()
            .unwrap_or(0);
        let (applied, keys) = cluster
            .status(lagging)
            .map_or((0, 0), |s| (s.applied, s.keys));
        if keys == KEYS && applied >= leader_applied && leader_applied > 0 {
            break Ok(t1.elapsed());
        }
        if let Some(why) = exited(&mut cluster, lagging) {
            break Err(why);
        }
        if t1.elapsed() > CATCH_UP {
            break Err(format!(
                "node {} did not catch up within {CATCH_UP:?}: applied {applied}, {keys} keys (the others applied {leader_applied})",
                lagging + 1,
            ));
        }
        thread::sleep(Duration::from_millis(100));
    };
    match &caught_up {
        Ok(d) => eprintln!("big_state: node {} caught up in {d:.1?}", lagging + 1),
        Err(e) => failures.push(format!("lagging follower: {e}")),
    }
    if let (Ok(_), Ok((path, _))) = (&caught_up, &interrupted)
        && path.exists()
    {
        failures.push(format!("{} was left behind", path.display()));
    }
    peaks.extend(peaks_now(&mut cluster, "before the restart"));

    // Every node killed at once, then started again: every key is served.
    for i in 0..3 {
        cluster.kill9(i);
    }
    let t2 = Instant::now();
    for i in 0..3 {
        cluster.start(i);
    }
    let restarted = leader_or_exit(&mut cluster, CATCH_UP)
        .and_then(|l| check_every_key(&cluster, l, "GET after restarting every node").map(|()| l));
    match &restarted {
        Ok(l) => eprintln!(
            "big_state: restarted cluster served every key in {:.1?} (leader node {})",
            t2.elapsed(),
            l + 1
        ),
        Err(e) => failures.push(format!("full restart: {e}")),
    }
    if caught_up.is_ok() && restarted.is_ok() {
        // The node that caught up by snapshot holds every value itself: restarted with the
        // deliberate fault that answers reads from the node's own state (no leader, no log),
        // its GETs show its replica.
        cluster.kill9(lagging);
        cluster.start_with(lagging, |c| {
            c.env(FAULT_ENV, "local-reads");
        });
        let t3 = Instant::now();
        let result = loop {
            let keys = cluster.status(lagging).map_or(0, |s| s.keys);
            if keys == KEYS {
                break check_every_key(&cluster, lagging, "local GET on the caught-up node");
            }
            if t3.elapsed() > CATCH_UP {
                break Err(format!("node {} restarted with {keys} keys", lagging + 1));
            }
            thread::sleep(Duration::from_millis(100));
        };
        if let Err(e) = result {
            failures.push(format!("caught-up node's own state: {e}"));
        }
    }
    peaks.extend(peaks_now(&mut cluster, "after the restart"));

    // A brand-new node joins the cluster that holds all of it.
    if restarted.is_ok() {
        let t4 = Instant::now();
        match new_member_catches_up(&mut cluster, &mut peaks) {
            Ok(()) => eprintln!("big_state: the new member's part took {:.1?}", t4.elapsed()),
            Err(e) => failures.push(format!("new member: {e}")),
        }
        peaks.extend(peaks_now(&mut cluster, "at the end"));
    }
    for (who, peak) in &peaks {
        eprintln!(
            "big_state: {who}: peak RSS {:.0} MiB ({:.2} x the {:.0} MiB live)",
            mib(*peak),
            *peak as f64 / live as f64,
            mib(live)
        );
        if *peak >= 3 * live {
            failures.push(format!(
                "{who}: peak RSS {:.0} MiB is not under 3 x the live data ({:.0} MiB)",
                mib(*peak),
                mib(live)
            ));
        }
    }
    eprintln!(
        "big_state: writes {written:.1?}, whole test {:.1?}",
        t0.elapsed()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
