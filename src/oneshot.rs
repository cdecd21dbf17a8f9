//! A one-value channel for a thread that waits for exactly one answer: an RPC caller, an rsm
//! submitter or reader, a ReadIndex round.
//!
//! A crossbeam channel lets every waiting receiver spin and yield before it parks. With a
//! hundred clerks each waiting on its own reply on two cores, that spends the CPU the answers
//! need (the 128-clerk KV profile showed about 14 % in spinning receives and `sched_yield`).
//! Here at most `MAX_SPINNERS` receivers in the process spin, for at most `SPIN`, and the
//! rest park on a condition variable at once; the value or the sender's drop wakes them.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

struct Slot<T> {
    value: Option<T>,
    sender_gone: bool,
}

struct Inner<T> {
    slot: Mutex<Slot<T>>,
    /// Set once the slot holds the value or the sender is gone: what a spinning receiver
    /// watches.
    ready: AtomicBool,
    cv: Condvar,
}

/// How long a receiver may spin before it parks, and how many may spin at once in the whole
/// process. On a quiet machine an answer often comes within this time, and catching it awake
/// saves the futex wake-up, most of a one-clerk op's cost; under load at most these few
/// spin, yielding as they go.
const SPIN: Duration = Duration::from_micros(100);
const MAX_SPINNERS: usize = 2;
static SPINNERS: AtomicUsize = AtomicUsize::new(0);

/// Spins until `ready` is set or `SPIN` has passed, unless `max_spinners` threads counted in
/// `spinners` already spin.
pub(crate) fn spin_until(ready: &AtomicBool, max_spinners: usize, spinners: &AtomicUsize) {
    if spinners
        .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| {
            (n < max_spinners).then_some(n + 1)
        })
        .is_err()
    {
        return;
    }
    let until = Instant::now() + SPIN;
    let mut n = 0u32;
    while !ready.load(Ordering::Acquire) {
        n = n.wrapping_add(1);
        if n.is_multiple_of(64) {
            if Instant::now() >= until {
                break;
            }
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    spinners.fetch_sub(1, Ordering::Release);
}

/// Sends the one value; dropping it unsent tells the receiver that none will come.
pub struct Sender<T> {
    inner: Arc<Inner<T>>,
}

/// Receives the one value.
pub struct Receiver<T> {
    inner: Arc<Inner<T>>,
}

/// Why [`Receiver::recv_timeout`] returned without a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvTimeoutError {
    Timeout,
    /// The sender was dropped without sending.
    Disconnected,
}

/// The sender was dropped without sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvError;

impl fmt::Display for RecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the sender was dropped without sending")
    }
}

/// A new channel for one value.
pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let inner = Arc::new(Inner {
        slot: Mutex::new(Slot {
            value: None,
            sender_gone: false,
        }),
        ready: AtomicBool::new(false),
        cv: Condvar::new(),
    });
    (
        Sender {
            inner: inner.clone(),
        },
        Receiver { inner },
    )
}

impl<T> Sender<T> {
    /// Hands `value` over. It is dropped if the receiver is gone.
    pub fn send(self, value: T) {
        self.inner.slot.lock().value = Some(value);
        // `Drop` marks the sender gone and wakes the receiver, after the value is in place.
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.inner.slot.lock().sender_gone = true;
        self.inner.ready.store(true, Ordering::Release);
        self.inner.cv.notify_one();
    }
}

impl<T> Receiver<T> {
    /// Waits for the value until `timeout` has passed.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        self.wait(Some(Instant::now() + timeout), true)
    }

    /// [`recv_timeout`](Self::recv_timeout) that parks at once, never spinning: for a wait
    /// known to be long (an fsync at least).
    pub fn recv_timeout_parked(&self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        self.wait(Some(Instant::now() + timeout), false)
    }

    /// Waits for the value for as long as the sender lives.
    pub fn recv(&self) -> Result<T, RecvError> {
        self.wait(None, true).map_err(|_| RecvError)
    }

    /// Waits until the value comes, the sender is dropped, or `deadline` (if any) passes;
    /// with `spin`, spinning first if few others do.
    fn wait(&self, deadline: Option<Instant>, spin: bool) -> Result<T, RecvTimeoutError> {
        if spin {
            spin_until(&self.inner.ready, MAX_SPINNERS, &SPINNERS);
        }
        let mut slot = self.inner.slot.lock();
        loop {
            if let Some(v) = slot.value.take() {
                return Ok(v);
            }
            if slot.sender_gone {
                return Err(RecvTimeoutError::Disconnected);
            }
            match deadline {
                Some(d) => {
                    // Timed out with nothing sent: the checks above get one last look first.
                    if self.inner.cv.wait_until(&mut slot, d).timed_out()
                        && slot.value.is_none()
                        && !slot.sender_gone
                    {
                        return Err(RecvTimeoutError::Timeout);
                    }
                }
                None => self.inner.cv.wait(&mut slot),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn value_sent_before_the_wait_is_received() {
        let (tx, rx) = channel();
        tx.send(7);
        assert_eq!(rx.recv_timeout(Duration::from_millis(1)), Ok(7));
    }

    #[test]
    fn value_sent_during_the_wait_wakes_the_receiver() {
        let (tx, rx) = channel();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            tx.send("x");
        });
        assert_eq!(rx.recv(), Ok("x"));
        t.join().unwrap();
    }

    #[test]
    fn parked_receiver_is_woken_by_the_value_and_times_out_without_one() {
        let (tx, rx) = channel();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            tx.send(5);
        });
        assert_eq!(rx.recv_timeout_parked(Duration::from_secs(10)), Ok(5));
        t.join().unwrap();
        let (_tx, rx) = channel::<u8>();
        assert_eq!(
            rx.recv_timeout_parked(Duration::from_millis(10)),
            Err(RecvTimeoutError::Timeout)
        );
    }

    #[test]
    fn dropped_sender_disconnects() {
        let (tx, rx) = channel::<u8>();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            drop(tx);
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Err(RecvTimeoutError::Disconnected)
        );
        assert_eq!(rx.recv(), Err(RecvError));
        t.join().unwrap();
    }

    #[test]
    fn wait_times_out_while_the_sender_lives() {
        let (tx, rx) = channel::<u8>();
        let start = Instant::now();
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(30)),
            Err(RecvTimeoutError::Timeout)
        );
        assert!(start.elapsed() >= Duration::from_millis(30));
        tx.send(1);
        assert_eq!(rx.recv(), Ok(1));
    }
}
