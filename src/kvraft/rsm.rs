//! The Lab 4A rsm as the Go labs shape it: a [`StateMachine`] of untyped requests and replies
//! (`DoOp(any) any`, here bytes), [`Rsm::new`] (`MakeRSM`) and `Rsm::submit` (`Submit`). It
//! is the typed [`crate::rsm`] layer run over a byte state machine; the services of this
//! crate (`KvServer`, the shard groups, the node) use [`crate::rsm`] with their own op and
//! reply types instead.

pub use crate::rsm::{
    DEPOSED_GRACE, GiveUps, LEADERSHIP_POLL, READ_TIMEOUT, ReadError, RestoreError, RsmError,
    SubmitError,
};

/// A replicated state machine over a byte [`StateMachine`].
pub type Rsm = crate::rsm::Rsm<dyn StateMachine>;

/// What the replicated service executes: requests and replies are the service's own encoded
/// values, which the rsm never looks inside.
pub trait StateMachine: Send + Sync {
    /// Executes one committed request and returns its reply. Called on every peer, in log order.
    fn do_op(&self, req: &[u8]) -> Vec<u8>;
    /// The whole state, for a snapshot.
    fn snapshot(&self) -> Vec<u8>;
    /// Replaces the whole state by a snapshot's. An error (a snapshot the service cannot
    /// read) stops the replica: going on would apply later entries to the wrong state.
    fn restore(&self, data: &[u8]) -> Result<(), RestoreError>;
    /// Whether the service wants a snapshot now although the log is not yet long enough.
    fn wants_snapshot(&self) -> bool {
        false
    }
    /// Whether `req` is a request this machine can execute (asked before a follower
    /// persists an entry). The default takes every request.
    fn check_op(&self, _req: &[u8]) -> Result<(), String> {
        Ok(())
    }
    /// Whether `data` is a state [`restore`](Self::restore) would take. The default takes
    /// every state.
    fn check_snapshot(&self, _data: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

impl crate::rsm::StateMachine for dyn StateMachine {
    type Op = Vec<u8>;
    type Reply = Vec<u8>;

    fn apply(&self, ops: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        ops.iter().map(|req| self.do_op(req)).collect()
    }
    fn snapshot(&self) -> Vec<u8> {
        StateMachine::snapshot(self)
    }
    fn restore(&self, data: &[u8]) -> Result<(), RestoreError> {
        StateMachine::restore(self, data)
    }
    fn wants_snapshot(&self) -> bool {
        StateMachine::wants_snapshot(self)
    }
    fn check_op(&self, req: &Vec<u8>) -> Result<(), String> {
        StateMachine::check_op(self, req)
    }
    fn check_snapshot(&self, data: &[u8]) -> Result<(), String> {
        StateMachine::check_snapshot(self, data)
    }
}
