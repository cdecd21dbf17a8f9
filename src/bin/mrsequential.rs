//! `mrsequential APP inputfiles...`: runs the whole job in one process and writes `mr-out-0`.

use std::path::Path;
use std::process::ExitCode;

use raftkv::mr::cli::{fail, init_logging, parse_args};
use raftkv::mr::sequential::run_sequential;
use raftkv::mr::{MrError, apps};

fn usage() -> String {
    format!(
        "usage: mrsequential APP inputfiles...\nAPP is one of: {}",
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
        Ok(args) if args.socket.is_some() => {
            return fail(
                &MrError::Usage("mrsequential takes no --socket".into()),
                &usage,
            );
        }
        Ok(args) if args.positional.len() >= 2 => args,
        Ok(_) => return fail(&MrError::Usage(usage.clone()), &usage),
        Err(e) => return fail(&e, &usage),
    };
    let app = match apps::lookup(&args.positional[0]) {
        Ok(app) => app,
        Err(e) => return fail(&e, &usage),
    };
    let files = &args.positional[1..];
    match run_sequential(files, &app.map, &app.reduce, Path::new("mr-out-0")) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e, &usage),
    }
}
