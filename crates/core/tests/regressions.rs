//! Proptest replays a committed regression file before new cases, but only if it finds the file
//! from the path of the test's source. This checks that every regression file in the workspace
//! is found that way, so CI (which runs the tests from each package's directory) replays them.

use std::path::{Path, PathBuf};

use proptest::test_runner::{FailurePersistence, FileFailurePersistence};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/core lies two levels below the workspace root")
        .to_path_buf()
}

/// Every regression file under `dir`, with the source file (relative to the workspace root, as
/// `file!()` names it) whose tests it belongs to.
fn regression_files(root: &Path, dir: &Path, found: &mut Vec<(PathBuf, String)>) {
    for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                regression_files(root, &path, found);
            }
            continue;
        }
        let relative = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        // Next to a source outside `src/` (integration tests): `tests/x.proptest-regressions`.
        if let Some(stem) = relative.strip_suffix(".proptest-regressions") {
            found.push((path.clone(), format!("{stem}.rs")));
        }
        // For sources under `src/`: `CRATE/proptest-regressions/a/b.txt` for `CRATE/src/a/b.rs`.
        if let Some((krate, rest)) = relative.split_once("/proptest-regressions/") {
            if let Some(stem) = rest.strip_suffix(".txt") {
                found.push((path.clone(), format!("{krate}/src/{stem}.rs")));
            }
        }
    }
}

#[test]
fn every_committed_regression_file_is_replayed() {
    let root = workspace_root();
    let mut found = Vec::new();
    regression_files(&root, &root.join("crates"), &mut found);
    assert!(
        found
            .iter()
            .any(|(_, source)| source == "crates/core/tests/stages_puller.rs"),
        "the puller's regression file is missing: {found:?}"
    );
    for (file, source) in found {
        assert!(
            root.join(&source).is_file(),
            "{} belongs to no source file ({source} does not exist)",
            file.display()
        );
        let source: &'static str = Box::leak(source.into_boxed_str());
        let seeds = FileFailurePersistence::default().load_persisted_failures2(Some(source));
        assert!(
            !seeds.is_empty(),
            "proptest does not find the seeds of {} from {source}, so they are never replayed",
            file.display()
        );
    }
}
