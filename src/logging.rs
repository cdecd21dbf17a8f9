//! The one `log` back end of every binary and of the test harness: `env_logger`, switched on by
//! `RUST_LOG` in its filter syntax (a default level and per-target levels, comma separated:
//! `RUST_LOG=info`, `RUST_LOG=warn,raft::election=debug`). Nothing is printed unless asked.
//! Lines go to stderr, one write each, as `<elapsed> <who> <LEVEL> <target>: <message>`.

use std::io::Write;
use std::time::Instant;

/// The environment variable read, as the `log` ecosystem names it.
pub const LOG_ENV: &str = "RUST_LOG";

/// Installs the logger once per process (later calls do nothing). `who` prefixes every line
/// (`node2`, `local`, a program's name); `fallback_env` is read when `RUST_LOG` is unset
/// (`MR_LOG` for the MapReduce programs).
pub fn init(who: &str, fallback_env: Option<&str>) {
    let spec = std::env::var(LOG_ENV)
        .ok()
        .or_else(|| fallback_env.and_then(|name| std::env::var(name).ok()))
        .unwrap_or_default();
    let start = Instant::now();
    let who = who.to_string();
    let mut builder = env_logger::Builder::new();
    builder
        .filter_level(log::LevelFilter::Off)
        .parse_filters(&spec)
        .format(move |buf, record| {
            let t = start.elapsed();
            let who = if who.is_empty() {
                String::new()
            } else {
                format!("{who} ")
            };
            writeln!(
                buf,
                "{:>4}.{:06} {who}{:<5} {}: {}",
                t.as_secs(),
                t.subsec_micros(),
                record.level(),
                record.target(),
                record.args()
            )
        });
    // An error means a logger is already installed: keep it.
    let _ = builder.try_init();
}
