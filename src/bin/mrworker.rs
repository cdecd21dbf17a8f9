//! `mrworker [--socket PATH] APP`: runs tasks for the coordinator with the named application's
//! map and reduce functions until the job is over.

use std::process::ExitCode;

use raftkv::mr::cli::{command_line, fail, init_logging};
use raftkv::mr::{apps, rpc, run_worker};

fn usage() -> String {
    format!(
        "usage: mrworker [--socket PATH] APP\n\
         APP is one of: {}\n\
         the socket defaults to $MR_SOCKET, else /var/tmp/5840-mr-<uid>",
        apps::names().join(", ")
    )
}

fn main() -> ExitCode {
    init_logging();
    let usage = usage();
    let args = match command_line(&usage, |args| Ok(args.positional.len() == 1)) {
        Ok(args) => args,
        Err(code) => return code,
    };
    let app = match apps::lookup(&args.positional[0]) {
        Ok(app) => app,
        Err(e) => return fail(&e, &usage),
    };
    let socket = rpc::socket_path(args.socket.as_deref());
    match run_worker(&socket, &app.map, &app.reduce) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => fail(&e, &usage),
    }
}
