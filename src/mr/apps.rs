//! The lab's applications (Go's `mrapps/*.go` plugins), chosen by name instead of loaded from a
//! shared object: `mrworker wc`, `mrsequential wc files...`.
//!
//! Several are instruments for the tests rather than real jobs: they sleep, count concurrently
//! live workers through marker files in the current directory, or exit the process at random.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;

use crate::mr::{KeyValue, MrError};

/// A named pair of map and reduce functions.
#[derive(Clone, Copy)]
pub struct App {
    pub name: &'static str,
    pub map: fn(&str, &str) -> Vec<KeyValue>,
    pub reduce: fn(&str, &[String]) -> String,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "App({})", self.name)
    }
}

const APPS: &[App] = &[
    App {
        name: "wc",
        map: wc_map,
        reduce: wc_reduce,
    },
    App {
        name: "indexer",
        map: indexer_map,
        reduce: indexer_reduce,
    },
    App {
        name: "mtiming",
        map: mtiming_map,
        reduce: sorted_joined,
    },
    App {
        name: "rtiming",
        map: rtiming_map,
        reduce: rtiming_reduce,
    },
    App {
        name: "jobcount",
        map: jobcount_map,
        reduce: jobcount_reduce,
    },
    App {
        name: "early_exit",
        map: early_exit_map,
        reduce: early_exit_reduce,
    },
    App {
        name: "crash",
        map: crash_map,
        reduce: crash_reduce,
    },
    App {
        name: "nocrash",
        map: nocrash_map,
        reduce: sorted_joined,
    },
];

/// The names of all applications.
pub fn names() -> Vec<&'static str> {
    APPS.iter().map(|app| app.name).collect()
}

/// The application called `name`.
pub fn lookup(name: &str) -> Result<App, MrError> {
    APPS.iter()
        .find(|app| app.name == name)
        .copied()
        .ok_or_else(|| MrError::UnknownApp(name.to_owned()))
}

/// The words of `text`: maximal runs of letters, as Go's `strings.FieldsFunc(s, !IsLetter)`.
pub fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_alphabetic())
        .filter(|w| !w.is_empty())
}

fn wc_map(_file: &str, contents: &str) -> Vec<KeyValue> {
    words(contents).map(|w| KeyValue::new(w, "1")).collect()
}

fn wc_reduce(_key: &str, values: &[String]) -> String {
    values.len().to_string()
}

fn indexer_map(document: &str, contents: &str) -> Vec<KeyValue> {
    let distinct: std::collections::BTreeSet<&str> = words(contents).collect();
    distinct
        .into_iter()
        .map(|w| KeyValue::new(w, document))
        .collect()
}

fn indexer_reduce(_key: &str, values: &[String]) -> String {
    let mut documents = values.to_vec();
    documents.sort();
    format!("{} {}", documents.len(), documents.join(","))
}

fn sorted_joined(_key: &str, values: &[String]) -> String {
    let mut values = values.to_vec();
    values.sort();
    values.join(" ")
}

/// Whether process `pid` is alive (present and not a zombie), from `/proc`.
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// How many workers are in `phase` at once: drops a marker file `mr-worker-<phase>-<pid>`,
/// counts the markers of live processes, waits a second so others can overlap, and cleans up.
fn nparallel(phase: &str) -> usize {
    let pid = std::process::id();
    let prefix = format!("mr-worker-{phase}-");
    let marker = format!("{prefix}{pid}");
    if let Err(e) = std::fs::write(&marker, b"") {
        log::warn!(target: "mr", "cannot create {marker}: {e}");
    }
    let count = std::fs::read_dir(".")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    name.strip_prefix(&prefix)?.parse::<u32>().ok()
                })
                .filter(|&pid| process_alive(pid))
                .count()
        })
        .unwrap_or(0);
    std::thread::sleep(Duration::from_secs(1));
    let _ = std::fs::remove_file(&marker);
    count
}

fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn mtiming_map(_file: &str, _contents: &str) -> Vec<KeyValue> {
    let start = unix_seconds();
    let n = nparallel("map");
    let pid = std::process::id();
    vec![
        KeyValue::new(format!("times-{pid}"), format!("{start:.1}")),
        KeyValue::new(format!("parallel-{pid}"), n.to_string()),
    ]
}

fn rtiming_map(_file: &str, _contents: &str) -> Vec<KeyValue> {
    ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
        .into_iter()
        .map(|k| KeyValue::new(k, "1"))
        .collect()
}

fn rtiming_reduce(_key: &str, _values: &[String]) -> String {
    nparallel("reduce").to_string()
}

/// Map calls made by this process, for `jobcount`'s marker names.
static JOBCOUNT_CALLS: AtomicUsize = AtomicUsize::new(0);
const JOBCOUNT_PREFIX: &str = "mr-worker-jobcount";

fn jobcount_map(_file: &str, _contents: &str) -> Vec<KeyValue> {
    let call = JOBCOUNT_CALLS.fetch_add(1, Ordering::SeqCst);
    let marker = format!("{JOBCOUNT_PREFIX}-{}-{call}", std::process::id());
    if let Err(e) = std::fs::write(&marker, b"x") {
        log::warn!(target: "mr", "cannot create {marker}: {e}");
    }
    let millis = 2000 + rand::thread_rng().gen_range(0..3000);
    std::thread::sleep(Duration::from_millis(millis));
    vec![KeyValue::new("a", "x")]
}

fn jobcount_reduce(_key: &str, _values: &[String]) -> String {
    let count = std::fs::read_dir(".")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(JOBCOUNT_PREFIX))
                .count()
        })
        .unwrap_or(0);
    count.to_string()
}

fn early_exit_map(file: &str, _contents: &str) -> Vec<KeyValue> {
    vec![KeyValue::new(file, "1")]
}

fn early_exit_reduce(key: &str, values: &[String]) -> String {
    // Some reduces run long, so a worker that exits early would leave outputs unfinished.
    if key.contains("sherlock") || key.contains("tom") {
        std::thread::sleep(Duration::from_secs(3));
    }
    values.len().to_string()
}

/// One time in three exit the process; one in three stall for up to ten seconds.
fn maybe_crash() {
    let mut rng = rand::thread_rng();
    let roll = rng.gen_range(0..1000);
    if roll < 330 {
        std::process::exit(1);
    } else if roll < 660 {
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..10_000)));
    }
}

fn nocrash_map(file: &str, contents: &str) -> Vec<KeyValue> {
    vec![
        KeyValue::new("a", file),
        KeyValue::new("b", file.len().to_string()),
        KeyValue::new("c", contents.len().to_string()),
        KeyValue::new("d", "xyzzy"),
    ]
}

fn crash_map(file: &str, contents: &str) -> Vec<KeyValue> {
    maybe_crash();
    nocrash_map(file, contents)
}

fn crash_reduce(key: &str, values: &[String]) -> String {
    maybe_crash();
    sorted_joined(key, values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_on_non_letters() {
        let got: Vec<&str> = words("Hello, world! It's 42nd-street café").collect();
        assert_eq!(
            got,
            vec!["Hello", "world", "It", "s", "nd", "street", "café"]
        );
    }

    #[test]
    fn lookup_knows_all_eight() {
        for name in [
            "wc",
            "indexer",
            "mtiming",
            "rtiming",
            "jobcount",
            "early_exit",
            "crash",
            "nocrash",
        ] {
            assert_eq!(lookup(name).unwrap().name, name);
        }
        assert!(matches!(lookup("wc.so"), Err(MrError::UnknownApp(_))));
    }

    #[test]
    fn indexer_lists_each_document_once() {
        let kvs = indexer_map("doc", "b a b");
        assert_eq!(
            kvs,
            vec![KeyValue::new("a", "doc"), KeyValue::new("b", "doc")]
        );
        let docs = ["y".to_string(), "x".to_string()];
        assert_eq!(indexer_reduce("a", &docs), "2 x,y");
    }

    #[test]
    fn this_process_is_alive() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX));
    }
}
