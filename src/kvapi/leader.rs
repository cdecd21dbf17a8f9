//! Finding a replicated service's leader: every clerk (kvraft's, a shard group's) and the
//! node's forwarding front try the server that last answered as leader first, then each in
//! turn, pausing after every full round without one so an election can finish.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// What one attempt at server `i` came to.
pub enum Step<T> {
    /// Server `i` leads and answered: it becomes the hint, and the search returns `T`.
    Leader(T),
    /// The search ends with `T` (a final answer or error) without moving the hint.
    Stop(T),
    /// Server `i` did not lead or did not answer: try the next one.
    Next,
}

/// The server that last answered as leader, among `0..n`.
#[derive(Debug)]
pub struct LeaderHint {
    hint: AtomicUsize,
}

impl LeaderHint {
    pub fn new(first: usize) -> LeaderHint {
        LeaderHint {
            hint: AtomicUsize::new(first),
        }
    }

    /// The server to try first.
    pub fn get(&self) -> usize {
        self.hint.load(Ordering::Relaxed)
    }

    /// Tries servers `0..n` from the hint on with `attempt`, sleeping `pause` after each round
    /// of `n` attempts without an end, for at most `max_attempts` attempts (`None`: until an
    /// attempt ends the search). `None` when there is no server or the attempts ran out.
    pub fn search<T>(
        &self,
        n: usize,
        pause: Duration,
        max_attempts: Option<usize>,
        mut attempt: impl FnMut(usize) -> Step<T>,
    ) -> Option<T> {
        if n == 0 {
            return None;
        }
        let first = self.get() % n;
        let mut made = 0usize;
        while max_attempts.is_none_or(|max| made < max) {
            let i = (first + made % n) % n;
            match attempt(i) {
                Step::Leader(t) => {
                    self.hint.store(i, Ordering::Relaxed);
                    return Some(t);
                }
                Step::Stop(t) => return Some(t),
                Step::Next => {}
            }
            made += 1;
            if made.is_multiple_of(n) {
                std::thread::sleep(pause);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_the_hint_rotates_and_remembers_the_leader() {
        let hint = LeaderHint::new(2);
        let mut tried = Vec::new();
        let found = hint.search(3, Duration::ZERO, None, |i| {
            tried.push(i);
            if tried.len() == 5 {
                Step::Leader(i * 10)
            } else {
                Step::Next
            }
        });
        assert_eq!(tried, [2, 0, 1, 2, 0]);
        assert_eq!((found, hint.get()), (Some(0), 0));
        // A stop ends the search and leaves the hint where it was.
        assert_eq!(
            hint.search(3, Duration::ZERO, None, |_| Step::Stop(7)),
            Some(7)
        );
        assert_eq!(hint.get(), 0);
    }

    #[test]
    fn gives_up_after_its_attempts_and_without_servers() {
        let hint = LeaderHint::new(0);
        let mut count = 0;
        let found: Option<()> = hint.search(2, Duration::ZERO, Some(6), |_| {
            count += 1;
            Step::Next
        });
        assert_eq!((found, count), (None, 6));
        assert_eq!(
            hint.search(0, Duration::ZERO, None, |_| Step::Stop(1)),
            None
        );
    }
}
