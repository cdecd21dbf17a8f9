//! The coordinator: a [`Schedule`] behind a mutex, served on a Unix-domain socket by one
//! named thread that handles one short request per connection.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, RecvTimeoutError};
use parking_lot::Mutex;

use crate::mr::MrError;
use crate::mr::rpc::{self, Reply, Request, TaskReport};
use crate::mr::schedule::{ReportOutcome, Schedule};

/// How long the server thread sleeps after a failed accept, so it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// How long dropping a coordinator waits for its server thread to stop.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// A running coordinator. Dropping it stops the server thread and removes the socket file.
pub struct Coordinator {
    schedule: Arc<Mutex<Schedule>>,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
    /// Disconnects when the server thread ends.
    server_gone: Receiver<()>,
}

impl Coordinator {
    /// Starts serving a job of one map task per file and `n_reduce` reduce tasks on `socket`,
    /// replacing any stale socket file there.
    pub fn start(
        files: Vec<String>,
        n_reduce: usize,
        socket: &Path,
    ) -> Result<Coordinator, MrError> {
        if n_reduce == 0 {
            return Err(MrError::Usage("n_reduce must be at least 1".into()));
        }
        Coordinator::start_with(Schedule::new(files, n_reduce), socket)
    }

    /// Starts serving `schedule` on `socket`.
    pub fn start_with(schedule: Schedule, socket: &Path) -> Result<Coordinator, MrError> {
        let socket_err = |source| MrError::Socket {
            path: socket.to_path_buf(),
            source,
        };
        match std::fs::remove_file(socket) {
            Ok(()) => log::info!(target: "mr", "removed stale socket {}", socket.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(socket_err(e)),
        }
        let listener = UnixListener::bind(socket).map_err(socket_err)?;
        let schedule = Arc::new(Mutex::new(schedule));
        let stop = Arc::new(AtomicBool::new(false));
        let (gone_tx, server_gone) = crossbeam::channel::bounded::<()>(0);
        let server = std::thread::Builder::new()
            .name("mr-coordinator-rpc".into())
            .spawn({
                let schedule = Arc::clone(&schedule);
                let stop = Arc::clone(&stop);
                move || {
                    let _gone = gone_tx; // dropped when this thread ends
                    serve(listener, &schedule, &stop)
                }
            })
            .map_err(socket_err)?;
        log::info!(target: "mr", "coordinator listening on {}", socket.display());
        Ok(Coordinator {
            schedule,
            socket: socket.to_path_buf(),
            stop,
            server: Some(server),
            server_gone,
        })
    }

    /// True once the whole job has finished (or failed; see [`Coordinator::failure`]).
    pub fn done(&self) -> bool {
        self.schedule.lock().is_done()
    }

    /// Why the job failed, if a worker reported a task that cannot run.
    pub fn failure(&self) -> Option<String> {
        self.schedule.lock().failure().map(str::to_owned)
    }

    /// The socket path this coordinator serves on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept() so the thread sees the flag. If the socket file was
        // removed or taken over by someone else, no wake-up arrives: then leave the thread
        // blocked rather than hang here (it holds only the listener and the schedule).
        let _ = UnixStream::connect(&self.socket);
        match self.server_gone.recv_timeout(STOP_WAIT) {
            Err(RecvTimeoutError::Disconnected) => {
                if let Some(server) = self.server.take() {
                    let _ = server.join();
                }
                // Only now, with our listener closed, is the file at this path surely ours.
                let _ = std::fs::remove_file(&self.socket);
            }
            _ => log::warn!(target: "mr", "coordinator server thread did not stop; leaving it"),
        }
    }
}

fn serve(listener: UnixListener, schedule: &Mutex<Schedule>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok(_) if stop.load(Ordering::SeqCst) => break,
            Ok((mut stream, _)) => {
                if let Err(e) = handle(&mut stream, schedule) {
                    log::warn!(target: "mr", "dropped a connection: {e}");
                }
            }
            Err(e) => {
                log::warn!(target: "mr", "accept failed: {e}");
                // Do not spin if accept keeps failing (out of descriptors, say).
                std::thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
    log::debug!(target: "mr", "coordinator server stopped");
}

/// Answers one request. Requests are tiny and the lock is held only to update the schedule, so
/// serving connections one at a time on a single thread keeps up with any number of workers;
/// the I/O timeouts stop one stuck peer from holding up the rest for long.
fn handle(stream: &mut UnixStream, schedule: &Mutex<Schedule>) -> io::Result<()> {
    stream.set_read_timeout(Some(rpc::IO_TIMEOUT))?;
    stream.set_write_timeout(Some(rpc::IO_TIMEOUT))?;
    let request: Request = rpc::read_frame(stream)?;
    let reply = match request {
        Request::GetTask => {
            let assignment = schedule.lock().assign(Instant::now());
            log::debug!(target: "mr", "assign {assignment:?}");
            Reply::Task(assignment)
        }
        Request::Report(report) => {
            let mut schedule = schedule.lock();
            let outcome = schedule.report(&report);
            let (maps_left, reduces_left) = schedule.remaining();
            drop(schedule);
            match (&report, outcome) {
                (TaskReport::Failed { task, reason }, _) => {
                    log::error!(target: "mr", "{task:?} failed: {reason}")
                }
                (TaskReport::Finished(task), ReportOutcome::Accepted) => log::info!(
                    target: "mr",
                    "{task:?} done; {maps_left} maps and {reduces_left} reduces left"
                ),
                (TaskReport::Finished(task), outcome) => {
                    log::debug!(target: "mr", "{task:?} report {outcome:?}")
                }
            }
            Reply::Ack
        }
    };
    rpc::write_frame(stream, &reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mr::rpc::{Assignment, TaskId, call};

    #[test]
    fn serves_tasks_and_cleans_up_socket() {
        let socket = std::env::temp_dir().join(format!("rkv-mr-unit-{}.sock", std::process::id()));
        let c = Coordinator::start(vec!["a".into()], 1, &socket).unwrap();
        assert!(socket.exists());
        let reply = call(&socket, &Request::GetTask).unwrap();
        assert!(matches!(
            reply,
            Reply::Task(Assignment::Map { task: 0, .. })
        ));
        let done = Request::Report(TaskReport::Finished(TaskId::Map(0)));
        assert_eq!(call(&socket, &done).unwrap(), Reply::Ack);
        let reply = call(&socket, &Request::GetTask).unwrap();
        assert!(matches!(
            reply,
            Reply::Task(Assignment::Reduce { task: 0, .. })
        ));
        assert!(!c.done());
        let done = Request::Report(TaskReport::Finished(TaskId::Reduce(0)));
        call(&socket, &done).unwrap();
        assert!(c.done());
        assert_eq!(
            call(&socket, &Request::GetTask).unwrap(),
            Reply::Task(Assignment::Exit)
        );
        drop(c);
        assert!(!socket.exists());
        assert!(matches!(
            call(&socket, &Request::GetTask),
            Err(rpc::CallError::Unreachable(_))
        ));
    }

    #[test]
    fn stops_even_if_socket_file_was_removed() {
        let socket =
            std::env::temp_dir().join(format!("rkv-mr-unit-rm-{}.sock", std::process::id()));
        let c = Coordinator::start(vec!["a".into()], 1, &socket).unwrap();
        std::fs::remove_file(&socket).unwrap();
        let t = std::time::Instant::now();
        drop(c); // must not hang
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "drop took {:?}",
            t.elapsed()
        );
        assert!(Coordinator::start(Vec::new(), 0, &socket).is_err());
    }
}
