//! The applier: the one thread that delivers to the service, in index order.

use crossbeam::channel::{Receiver, Sender, TrySendError, select};

use super::ApplyMsg;
use super::state::Core;
use super::storage::SnapshotData;

impl Core {
    pub(super) fn run_applier(&self, apply_tx: Sender<ApplyMsg>, kill_rx: Receiver<()>) {
        loop {
            // `durable_to`: how far what is delivered is known durable on this peer.
            let (msgs, snapshot, durable_to) = {
                let mut st = self.state.lock();
                while !self.is_dead() && !st.snapshot_pending && st.last_applied >= st.commit_index
                {
                    self.applier_cv.wait(&mut st);
                }
                if self.is_dead() {
                    break;
                }
                if st.snapshot_pending {
                    st.snapshot_pending = false;
                    let index = st.log.base_index();
                    debug_assert!(
                        index > st.last_applied,
                        "raft-{} snapshot {index} would move the service back from {}",
                        self.me,
                        st.last_applied
                    );
                    st.last_applied = index;
                    log::debug!(target: "raft::apply", "raft-{} t{}: deliver snapshot through {index}", self.me, st.term);
                    // Its bytes are read below, outside the lock.
                    (
                        Vec::new(),
                        Some((index, st.log.base_term(), st.snapshot.clone())),
                        index,
                    )
                } else {
                    let from = st.last_applied + 1;
                    let to = st.commit_index;
                    debug_assert!(
                        from > st.log.base_index(),
                        "raft-{} applying {from} inside snapshot through {}",
                        self.me,
                        st.log.base_index()
                    );
                    let msgs: Vec<ApplyMsg> = st
                        .log
                        .slice(from, to)
                        .iter()
                        .zip(from..)
                        .map(|(e, index)| ApplyMsg::Command {
                            index,
                            term: e.term,
                            command: e.command.clone(),
                        })
                        .collect();
                    st.last_applied = to;
                    log::trace!(target: "raft::apply", "raft-{} t{}: deliver [{from}..={to}]", self.me, st.term);
                    (msgs, None, to.min(st.durable))
                }
            };
            let msgs = match snapshot {
                None => msgs,
                Some((index, term, snap)) => {
                    // Outside the lock: the service may call back into Raft (snapshot)
                    // meanwhile. A snapshot is delivered only once durable here.
                    if !self.sync_storage() {
                        return;
                    }
                    match Self::snapshot_bytes(snap) {
                        Ok(data) => vec![ApplyMsg::Snapshot { index, term, data }],
                        Err(e) => {
                            let mut st = self.state.lock();
                            self.storage_failed(&mut st, "read snapshot", &e);
                            return;
                        }
                    }
                }
            };
            // Entries are delivered once committed, without waiting for this peer's own
            // sync: a committed entry is durable on a majority, which a crash of this peer
            // cannot take back (§10.2.1; a one-peer leader commits only what it synced). The
            // leader's own fsync is then off the path of a reply. What a service may record
            // as this peer's state (`delivered`) counts only what is durable here; a later
            // sync raises it (`log_synced`).
            self.delivered
                .fetch_max(durable_to, std::sync::atomic::Ordering::SeqCst);
            for m in msgs {
                if self.is_dead() {
                    return;
                }
                // Room in the buffer (the usual case): no select.
                let m = match apply_tx.try_send(m) {
                    Ok(()) => continue,
                    Err(TrySendError::Disconnected(_)) => return,
                    Err(TrySendError::Full(m)) => m,
                };
                select! {
                    send(apply_tx, m) -> res => if res.is_err() { return; },
                    recv(kill_rx) -> _ => return,
                }
            }
        }
    }

    /// A snapshot's bytes for the service: taken over from memory when Raft holds the only
    /// reference, read from the storage otherwise.
    fn snapshot_bytes(snap: SnapshotData) -> Result<Vec<u8>, super::StorageError> {
        match snap {
            SnapshotData::Mem(bytes) => {
                Ok(std::sync::Arc::try_unwrap(bytes).unwrap_or_else(|b| b.as_ref().clone()))
            }
            stored => stored.read_all(),
        }
    }
}
