//! Environment skips: a test that cannot run on this machine (a missing tool, kernel feature or
//! device) says why, once, and the test script counts it as skipped instead of passed.
//!
//! Neither libtest nor nextest can mark a test skipped at run time, so a skipping test still
//! ends as "passed". When `R3MAP_SKIP_LOG` names a file (scripts/test sets it), each skip appends
//! one line `BINARY<TAB>TEST<TAB>REASON` to it, with the same binary and test names nextest
//! reports; the script moves exactly those tests from passed to skipped (a test that logged a
//! skip and then failed stays failed).
//!
//! Rules for callers: decide before the test checks anything, then return at once
//! (`return skip("…")`). A test with an optional part is two tests, so nothing is counted as
//! skipped after it ran half its checks. Reasons must not depend on the run (no temporary paths),
//! so a repeated skip reads the same.

use std::collections::HashSet;
use std::io::Write;
use std::sync::Mutex;

/// Marks the running test as skipped because this machine lacks `reason`. Prints
/// `SKIPPED <test>: <reason>` on stderr and records it in `R3MAP_SKIP_LOG`, once per test even
/// if called again (from a property test's cases, say). Return from the test right after.
pub fn skip(reason: &str) {
    let (binary, test) = current_test();
    // Tab and newline separate the log's fields and lines.
    let reason = reason.to_string().replace(['\t', '\n', '\r'], " ");
    static RECORDED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let first = RECORDED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .get_or_insert_with(HashSet::new)
        .insert(format!("{binary}\t{test}"));
    if !first {
        return;
    }
    eprintln!("SKIPPED {test}: {reason}");
    let Some(log) = std::env::var_os("R3MAP_SKIP_LOG") else {
        return;
    };
    let line = format!("{binary}\t{test}\t{reason}\n");
    // One write of a short line to a file opened for appending: lines of tests that skip at the
    // same time do not interleave.
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut file| file.write_all(line.as_bytes()));
    if let Err(err) = appended {
        // Unrecorded, the skip would be counted as a pass: fail loudly instead.
        panic!(
            "cannot record the skip in {}: {err}",
            std::path::Path::new(&log).display()
        );
    }
}

/// The running test as nextest names it (binary ID and test name). Under `cargo test`, the test
/// binary's name without its hash, and the test thread's name (libtest names it after the test).
fn current_test() -> (String, String) {
    let binary = std::env::var("NEXTEST_BINARY_ID").unwrap_or_else(|_| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.file_name().map(|name| name.to_string_lossy().into_owned()))
            .map(|name| match name.rsplit_once('-') {
                Some((stem, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => stem.into(),
                _ => name,
            })
            .unwrap_or_else(|| "unknown binary".into())
    });
    let test = std::env::var("NEXTEST_TEST_NAME").unwrap_or_else(|_| {
        std::thread::current()
            .name()
            .unwrap_or("unnamed test")
            .to_string()
    });
    (binary, test)
}
