//! The GitHub workflows in `.github/workflows/` are valid YAML of the right shape: every job
//! runs somewhere and has steps that each run a command or use an action; the scripts they
//! call exist; the nightly run covers every distributed lab's test suite under
//! ThreadSanitizer and under stress.

use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

/// The suites the nightly run must cover, when their test file exists.
const NIGHTLY_SUITES: [&str; 6] = ["raft", "kvraft", "rsm", "kvsrv", "lock", "shardkv"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn load(name: &str) -> Yaml {
    let path = root().join(".github/workflows").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut docs = YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
    assert_eq!(docs.len(), 1, "{name}: one document expected");
    docs.remove(0)
}

/// Checks the common shape and returns the `run` commands of every step.
fn check_shape(name: &str, wf: &Yaml) -> Vec<String> {
    assert!(wf["name"].as_str().is_some(), "{name}: no name");
    assert!(!wf["on"].is_badvalue(), "{name}: no `on`");
    let jobs = wf["jobs"]
        .as_hash()
        .unwrap_or_else(|| panic!("{name}: no jobs"));
    assert!(!jobs.is_empty(), "{name}: no jobs");
    let mut runs = Vec::new();
    for (job_name, job) in jobs {
        let job_name = job_name.as_str().unwrap_or("?");
        assert!(
            job["runs-on"].as_str().is_some(),
            "{name}: job {job_name} has no runs-on"
        );
        let steps = job["steps"]
            .as_vec()
            .unwrap_or_else(|| panic!("{name}: job {job_name} has no steps"));
        for step in steps {
            let run = step["run"].as_str();
            let uses = step["uses"].as_str();
            assert!(
                run.is_some() != uses.is_some(),
                "{name}: job {job_name}: a step must either run or use: {step:?}"
            );
            if let Some(run) = run {
                runs.push(run.to_string());
            }
        }
    }
    for run in &runs {
        for word in run.split_whitespace() {
            if word.starts_with("scripts/") || word.starts_with(".ci/") {
                assert!(
                    root().join(word).is_file(),
                    "{name}: runs {word}, which does not exist"
                );
            }
        }
    }
    runs
}

#[test]
fn ci_workflow_runs_the_ci_script_on_push() {
    let wf = load("ci.yml");
    let runs = check_shape("ci.yml", &wf);
    assert!(!wf["on"]["push"].is_badvalue(), "ci.yml: not run on push");
    assert!(
        runs.iter().any(|r| r.trim() == ".ci/run"),
        "ci.yml does not run .ci/run"
    );
}

#[test]
fn nightly_workflow_covers_every_suite_under_tsan_and_stress() {
    let wf = load("nightly.yml");
    check_shape("nightly.yml", &wf);
    let cron = wf["on"]["schedule"][0]["cron"].as_str();
    assert!(
        cron.is_some_and(|c| c.split_whitespace().count() == 5),
        "nightly.yml: no valid schedule"
    );
    for job in ["tsan", "stress"] {
        let suites: Vec<&str> = wf["jobs"][job]["strategy"]["matrix"]["suite"]
            .as_vec()
            .unwrap_or_else(|| panic!("nightly.yml: job {job} has no suite matrix"))
            .iter()
            .filter_map(Yaml::as_str)
            .collect();
        for suite in NIGHTLY_SUITES {
            if root().join("tests").join(format!("{suite}.rs")).is_file() {
                assert!(
                    suites.contains(&suite),
                    "nightly.yml: job {job} does not run the {suite} suite"
                );
            }
        }
        let text = format!("{:?}", wf["jobs"][job]["steps"]);
        assert!(
            text.contains("upload-artifact"),
            "nightly.yml: job {job} keeps no logs of failed runs"
        );
    }
}
