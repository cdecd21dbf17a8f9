//! `mrworker [--socket PATH] APP`: runs tasks for the coordinator with the named application's
//! map and reduce functions until the job is over.

use std::process::ExitCode;

use raftkv::mr::cli::{fail, init_logging, parse_args};
use raftkv::mr::{MrError, apps, rpc, run_worker};

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
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(args) if args.help => {
            eprintln!("{usage}");
            return ExitCode::SUCCESS;
        }
        Ok(args) if args.positional.len() == 1 => args,
        Ok(_) => return fail(&MrError::Usage(usage.clone()), &usage),
        Err(e) => return fail(&e, &usage),
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
