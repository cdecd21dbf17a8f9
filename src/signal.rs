//! Process signals, for the `raftkv` binary and the chaos driver: sending `SIGKILL`,
//! `SIGSTOP`, `SIGCONT`, `SIGINT` or `SIGTERM` to a child process, and turning
//! `SIGINT`/`SIGTERM` into a flag the main loop polls (so a Ctrl-C stops the cluster cleanly
//! instead of killing the driver with its children still running).
//!
//! A signal is only ever sent to a child, through its [`Child`] handle, after checking that it
//! has not been reaped: once reaped, its pid may belong to any other process (the sender
//! itself included, in a different life of the machine's pid space), and there is no way to
//! send to a process group or to "every process" from here.
//!
//! The handler only stores the signal's number in an atomic: nothing else is safe inside a
//! signal handler.

use std::io;
use std::process::Child;
use std::sync::atomic::{AtomicI32, Ordering};

/// The signals raftkv sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Kill,
    Stop,
    Cont,
    Int,
    Term,
}

impl Signal {
    fn number(self) -> libc::c_int {
        match self {
            Signal::Kill => libc::SIGKILL,
            Signal::Stop => libc::SIGSTOP,
            Signal::Cont => libc::SIGCONT,
            Signal::Int => libc::SIGINT,
            Signal::Term => libc::SIGTERM,
        }
    }
}

/// Sends `signal` to `child` unless it has exited (an error then, and nothing is sent). The
/// check reaps an exited child; since the handle is borrowed mutably, nobody else can reap it
/// between the check and the `kill(2)`, so the pid still names this child (a zombie at worst,
/// to which a signal does nothing).
pub fn to_child(child: &mut Child, signal: Signal) -> io::Result<()> {
    match child.try_wait()? {
        Some(status) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "process {} has exited ({status}); not signalled",
                child.id()
            ),
        )),
        None => send(child.id(), signal),
    }
}

/// Sends `signal` to the one process `pid` (never 0 or a negative number, which would name a
/// process group or every process).
fn send(pid: u32, signal: Signal) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("pid {pid}")))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal.number()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// From now on a write past the file-size limit (`RLIMIT_FSIZE`) fails with EFBIG ("File
/// too large") instead of ending the process with `SIGXFSZ`: the storage then stops the node
/// naming the file and the error, as it does on a full disk (PostgreSQL ignores the signal
/// for the same reason).
pub fn ignore_file_size_signal() -> io::Result<()> {
    // SAFETY: installs the SIG_IGN disposition; no handler code runs.
    if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the running `child`'s soft file-size limit (`RLIMIT_FSIZE`) to `bytes`, or back to
/// its hard limit with `None`, unless it has exited (an error then; as for [`to_child`], the
/// pid is used only while the borrowed handle shows the child unreaped). A write past the
/// limit then fails as on a full disk.
pub fn set_child_file_size_limit(child: &mut Child, bytes: Option<u64>) -> io::Result<()> {
    if let Some(status) = child.try_wait()? {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("process {} has exited ({status}); not limited", child.id()),
        ));
    }
    let pid = libc::pid_t::try_from(child.id())
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: prlimit(2) reads and writes only the two rlimit structs given, both ours.
    unsafe {
        let mut current: libc::rlimit = std::mem::zeroed();
        if libc::prlimit(pid, libc::RLIMIT_FSIZE, std::ptr::null(), &mut current) != 0 {
            return Err(io::Error::last_os_error());
        }
        let wanted = libc::rlimit {
            rlim_cur: bytes.map_or(current.rlim_max, |b| b.min(current.rlim_max)),
            rlim_max: current.rlim_max,
        };
        if libc::prlimit(pid, libc::RLIMIT_FSIZE, &wanted, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The last stop signal received (0: none).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn record_stop_signal(signal: libc::c_int) {
    STOP_SIGNAL.store(signal, Ordering::SeqCst);
}

/// From now on `SIGINT` and `SIGTERM` no longer end the process: they set the flag
/// [`stop_requested`] reads.
pub fn catch_stop_signals() -> io::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid value of the plain C struct; the handler is
        // an extern "C" function that only does an atomic store, which is async-signal-safe.
        let failed = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = record_stop_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut()) != 0
        };
        if failed {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The name of the stop signal received since [`catch_stop_signals`], if any.
pub fn stop_requested() -> Option<&'static str> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        libc::SIGINT => Some("SIGINT"),
        libc::SIGTERM => Some("SIGTERM"),
        _ => Some("a stop signal"),
    }
}
