//! `mrsequential APP inputfiles...`: runs the whole job in one process and writes `mr-out-0`.

use std::path::Path;
use std::process::ExitCode;

use raftkv::mr::cli::{command_line, fail, init_logging};
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
    let args = match command_line(&usage, |args| match args.socket {
        Some(_) => Err(MrError::Usage("mrsequential takes no --socket".into())),
        None => Ok(args.positional.len() >= 2),
    }) {
        Ok(args) => args,
        Err(code) => return code,
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
