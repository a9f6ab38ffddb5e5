//! Replays the committed fuzz inputs through `pullgate::fuzzing` on the stable toolchain, so
//! CI keeps every input the fuzzers ever found interesting (and every crash they ever found)
//! passing without running a fuzzer: `fuzz/seeds/<target>/` (hand-made, `fuzz/make_seeds.py`),
//! `fuzz/corpus/<target>/` (minimised by `scripts/fuzz.sh`) and `fuzz/regressions/<target>/`
//! (inputs that once crashed, each also a unit test next to the code it broke).
//! Takes seconds; a failure names the file.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use pullgate::fuzzing::TARGETS;

const SETS: &[&str] = &["seeds", "corpus", "regressions"];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// Runs every file of every set through its target; returns (files run, failures).
fn replay() -> (usize, Vec<String>) {
    let mut run = 0;
    let mut failures = Vec::new();
    for (name, target) in TARGETS {
        for set in SETS {
            for file in files(&fuzz_dir().join(set).join(name)) {
                let data = std::fs::read(&file).unwrap();
                run += 1;
                if catch_unwind(AssertUnwindSafe(|| target(&data))).is_err() {
                    failures.push(file.display().to_string());
                }
            }
        }
    }
    (run, failures)
}

#[test]
fn every_committed_fuzz_input_replays_without_a_crash() {
    // Keep the panic messages (they say what broke) but name the files at the end.
    let (run, failures) = replay();
    assert!(
        failures.is_empty(),
        "{} of {run} fuzz inputs crashed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The seeds alone are ~100 files: finding none means the paths are wrong, not a pass.
    assert!(
        run >= 50,
        "only {run} fuzz inputs found under {:?}",
        fuzz_dir()
    );
}

#[test]
fn every_fuzz_input_directory_names_a_target() {
    let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    for set in SETS {
        let Ok(rd) = std::fs::read_dir(fuzz_dir().join(set)) else {
            continue;
        };
        for e in rd.filter_map(Result::ok).filter(|e| e.path().is_dir()) {
            let dir = e.file_name().to_string_lossy().into_owned();
            assert!(
                names.contains(&dir.as_str()),
                "fuzz/{set}/{dir} is not a target ({names:?}): its files would never replay"
            );
        }
    }
}

#[test]
fn every_target_has_seeds() {
    for (name, _) in TARGETS {
        assert!(
            !files(&fuzz_dir().join("seeds").join(name)).is_empty(),
            "fuzz/seeds/{name} is empty: run fuzz/make_seeds.py"
        );
    }
}
