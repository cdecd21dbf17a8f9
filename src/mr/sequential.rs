//! The single-process reference: map every file, sort, reduce each key, write `mr-out-0`
//! (Go's `mrsequential`). The tests compare the distributed output against this.

use std::path::Path;

use crate::mr::error::{read_text, write_atomically};
use crate::mr::worker::{MapFn, ReduceFn, reduce_sorted};
use crate::mr::{KeyValue, MrError};

/// Runs the whole job in this process and writes the result to `output`.
pub fn run_sequential(
    files: &[String],
    map: MapFn,
    reduce: ReduceFn,
    output: &Path,
) -> Result<(), MrError> {
    let mut kvs: Vec<KeyValue> = Vec::new();
    for file in files {
        let contents = read_text(Path::new(file))?;
        kvs.extend(map(file, &contents));
    }
    write_atomically(output, reduce_sorted(kvs, reduce).as_bytes())
}

/// Checks that every input file can be read and is UTF-8 text, so a job with a bad input
/// fails at once with a clear message instead of part-way through.
pub fn check_inputs(files: &[String]) -> Result<(), MrError> {
    for file in files {
        read_text(Path::new(file))?;
    }
    Ok(())
}
