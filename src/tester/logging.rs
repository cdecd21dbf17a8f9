//! A small `log` backend for tests and binaries: nothing is printed unless `RUST_LOG` asks.
//!
//! `RUST_LOG` takes a default level and per-target levels, comma separated, like
//! `RUST_LOG=info` or `RUST_LOG=warn,raft::election=debug,labrpc=trace`. A target matches a
//! directive when it equals it or starts with it followed by `::`.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

use log::{LevelFilter, Log, Metadata, Record};

struct Logger {
    default: LevelFilter,
    targets: Vec<(String, LevelFilter)>,
    start: Instant,
}

impl Logger {
    fn level_for(&self, target: &str) -> LevelFilter {
        // The longest matching directive wins.
        self.targets
            .iter()
            .filter(|(t, _)| {
                target == t
                    || (target.starts_with(t.as_str()) && target[t.len()..].starts_with("::"))
            })
            .max_by_key(|(t, _)| t.len())
            .map_or(self.default, |(_, l)| *l)
    }
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= self.level_for(m.target())
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let t = self.start.elapsed();
        let line = format!(
            "{:>4}.{:06} {:<5} {}: {}\n",
            t.as_secs(),
            t.subsec_micros(),
            r.level(),
            r.target(),
            r.args()
        );
        // One write per line so lines from different threads do not interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

fn parse_level(s: &str) -> Option<LevelFilter> {
    s.trim().parse::<LevelFilter>().ok()
}

/// Installs the logger once per process; later calls do nothing.
pub fn init() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let spec = std::env::var("RUST_LOG").unwrap_or_default();
        let mut logger = Logger {
            default: LevelFilter::Off,
            targets: Vec::new(),
            start: Instant::now(),
        };
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some((target, level)) => {
                    if let Some(l) = parse_level(level) {
                        logger.targets.push((target.trim().to_string(), l));
                    }
                }
                None => match parse_level(part) {
                    Some(l) => logger.default = l,
                    // A bare target name means "everything from it".
                    None => logger.targets.push((part.to_string(), LevelFilter::Trace)),
                },
            }
        }
        let max = logger
            .targets
            .iter()
            .map(|(_, l)| *l)
            .chain(std::iter::once(logger.default))
            .max()
            .unwrap_or(LevelFilter::Off);
        if log::set_boxed_logger(Box::new(logger)).is_ok() {
            log::set_max_level(max);
        }
    });
}
