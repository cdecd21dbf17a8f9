//! Finding a replicated service's leader: every clerk (kvraft's, a shard group's) and the
//! node's forwarding front try the server that last answered as leader first, then each in
//! turn, pausing after every full round without one so an election can finish.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// What one attempt at server `i` came to.
pub enum Step<T> {
    /// Server `i` leads and answered: it becomes the hint, and the search returns `T`.
    Leader(T),
    /// The search ends with `T` (a final answer or error) without moving the hint.
    Stop(T),
    /// Server `i` did not lead or did not answer: try the next one.
    Next,
}

/// When a search gives up.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// Never: only an attempt ends it.
    None,
    /// After this many attempts.
    Attempts(usize),
    /// After the first attempt that ends past this instant (the first attempt is always made).
    Deadline(Instant),
}

impl Limit {
    /// Whether another attempt may be made after `made` of them.
    fn allows(&self, made: usize) -> bool {
        match *self {
            Limit::None => true,
            Limit::Attempts(max) => made < max,
            Limit::Deadline(at) => made == 0 || Instant::now() < at,
        }
    }
}

/// The server that last answered as leader.
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
        attempt: impl FnMut(usize) -> Step<T>,
    ) -> Option<T> {
        let limit = max_attempts.map_or(Limit::None, Limit::Attempts);
        self.search_among(|| (0..n).collect(), pause, limit, attempt)
    }

    /// Tries the servers `servers()` names (in its order, from the hint on, or from its first
    /// when the hint is none of them) with `attempt`; after each round of as many attempts as
    /// it named without an end, sleeps `pause` and asks `servers()` again (the members may
    /// have changed). `None` when it names no server or `limit` is reached first.
    pub fn search_among<T>(
        &self,
        mut servers: impl FnMut() -> Vec<usize>,
        pause: Duration,
        limit: Limit,
        mut attempt: impl FnMut(usize) -> Step<T>,
    ) -> Option<T> {
        let mut list = servers();
        let hint = self.get();
        let mut at = list.iter().position(|&s| s == hint).unwrap_or(0);
        let mut made = 0usize;
        let mut in_round = 0usize;
        while !list.is_empty() && limit.allows(made) {
            let server = list[at % list.len()];
            match attempt(server) {
                Step::Leader(t) => {
                    self.hint.store(server, Ordering::Relaxed);
                    return Some(t);
                }
                Step::Stop(t) => return Some(t),
                Step::Next => {}
            }
            made += 1;
            at += 1;
            in_round += 1;
            if in_round >= list.len() && limit.allows(made) {
                in_round = 0;
                std::thread::sleep(pause);
                list = servers();
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

    #[test]
    fn among_changing_servers_until_a_deadline() {
        let hint = LeaderHint::new(7);
        let mut rounds = 0;
        let mut tried = Vec::new();
        let servers = || {
            rounds += 1;
            if rounds == 1 {
                vec![3, 7, 5]
            } else {
                vec![5, 9]
            }
        };
        let found = hint.search_among(servers, Duration::ZERO, Limit::None, |s| {
            tried.push(s);
            if s == 9 { Step::Leader(s) } else { Step::Next }
        });
        // From the hint (7) on, a round of three, then the new list, counting on (4 % 2).
        assert_eq!(tried, [7, 5, 3, 5, 9]);
        assert_eq!((found, hint.get()), (Some(9), 9));
        // A hint that names none of them starts at the first; a past deadline allows one try.
        let mut count = 0;
        let past = Instant::now();
        let found: Option<()> = hint.search_among(
            || vec![1, 2],
            Duration::ZERO,
            Limit::Deadline(past),
            |s| {
                assert_eq!(s, 1);
                count += 1;
                Step::Next
            },
        );
        assert_eq!((found, count), (None, 1));
        assert_eq!(
            hint.search_among(Vec::new, Duration::ZERO, Limit::None, |_| Step::Stop(1)),
            None
        );
    }
}
