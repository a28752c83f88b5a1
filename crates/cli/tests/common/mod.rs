//! Helpers shared by the CLI tests: run the built binary, find the shared datasets, and decide
//! whether a real-model case runs (always in CI, which fetches; skipped locally when absent).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// Runs `search-r3 ARGS`: (success, stdout, stderr).
pub fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_search-r3"))
        .args(args)
        .output()
        .expect("run search-r3");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `../shared/datasets/scifact`, beside the checkout: `None` with a SKIP line when absent
/// outside CI (datasets are not shipped); in CI its absence fails the test.
pub fn scifact() -> Option<PathBuf> {
    search_r3_core::dataset::dataset_for_tests("scifact")
}

/// Whether the fetched model `name` can be used: in CI always (tests fetch it), locally only
/// when cached (otherwise the case prints SKIP and passes).
pub fn model_available(name: &str) -> bool {
    if search_r3_model::fetch::cached_path(name).is_some() || std::env::var_os("CI").is_some() {
        return true;
    }
    eprintln!("SKIP: {name} not fetched");
    false
}
