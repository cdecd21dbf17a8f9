//! `mrcoordinator [--socket PATH] inputfiles...`: serves one MapReduce job with ten reduce
//! tasks, polls for completion every second, and exits a second after the job is done.

use std::process::ExitCode;
use std::time::Duration;

use raftkv::mr::cli::{command_line, fail, init_logging};
use raftkv::mr::sequential::check_inputs;
use raftkv::mr::{Coordinator, MrError, N_REDUCE, rpc};

const USAGE: &str = "usage: mrcoordinator [--socket PATH] inputfiles...\n\
    the socket defaults to $MR_SOCKET, else /var/tmp/5840-mr-<uid>";

fn main() -> ExitCode {
    init_logging();
    let args = match command_line(USAGE, |args| Ok(!args.positional.is_empty())) {
        Ok(args) => args,
        Err(code) => return code,
    };
    if let Err(e) = check_inputs(&args.positional) {
        return fail(&e, USAGE);
    }
    let socket = rpc::socket_path(args.socket.as_deref());
    let coordinator = match Coordinator::start(args.positional, N_REDUCE, &socket) {
        Ok(c) => c,
        Err(e) => return fail(&e, USAGE),
    };
    while !coordinator.done() {
        std::thread::sleep(Duration::from_secs(1));
    }
    // Give workers a moment to hear that the job is over before the socket goes away.
    std::thread::sleep(Duration::from_secs(1));
    let failure = coordinator.failure();
    drop(coordinator);
    match failure {
        None => ExitCode::SUCCESS,
        Some(reason) => fail(&MrError::JobFailed(reason), USAGE),
    }
}
