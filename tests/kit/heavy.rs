//! At most [`AT_ONCE`] multi-process tests at once in one test binary, however many test
//! threads run it. The lab suites sleep most of the time and run with many test threads
//! (`.cargo/config.toml`); a cluster test runs three or more `raftkv serve` processes, and a
//! MapReduce test a coordinator and its workers (`tests/mr.rs` includes this file alone), and
//! they need the CPU, so each cluster or job takes a [`Slot`]: a test thread beyond the limit
//! waits for one. A thread that already holds a slot (a test with two clusters) takes another
//! without waiting, so no test can wait for itself.

use std::cell::Cell;
use std::sync::{Condvar, Mutex};

/// Clusters (or MapReduce jobs) running at once per test binary: what four test threads gave
/// before.
pub const AT_ONCE: usize = 4;

static RUNNING: Mutex<usize> = Mutex::new(0);
static FREED: Condvar = Condvar::new();

thread_local! {
    /// Slots this thread holds.
    static HELD: Cell<usize> = const { Cell::new(0) };
}

/// One cluster's share of the limit; given back on drop.
pub struct Slot {
    /// Whether this slot counts against [`AT_ONCE`] (the thread's first).
    counted: bool,
}

/// Waits for a slot (at once if this thread holds one already).
pub fn slot() -> Slot {
    let counted = HELD.with(|held| held.get() == 0);
    if counted {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        while *running >= AT_ONCE {
            running = FREED.wait(running).unwrap_or_else(|e| e.into_inner());
        }
        *running += 1;
    }
    HELD.with(|held| held.set(held.get() + 1));
    Slot { counted }
}

impl Drop for Slot {
    fn drop(&mut self) {
        HELD.with(|held| held.set(held.get().saturating_sub(1)));
        if self.counted {
            let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
            *running -= 1;
            FREED.notify_one();
        }
    }
}
