//! One test per outcome scripts/test must count (see scripts/check-test-counting, which knows the
//! expected totals). Only with `--features fixture`: the normal suite compiles none of them.
#![cfg(feature = "fixture")]

use r3map_core::testing::skip;

#[test]
fn passes() {}

#[test]
fn fails() {
    panic!("failing on purpose");
}

#[test]
fn crashes() {
    std::process::abort();
}

/// Terminated by nextest's per-test timeout (.config/nextest.toml gives it 2 s).
#[test]
fn hangs() {
    std::thread::sleep(std::time::Duration::from_secs(3600));
}

#[test]
#[ignore = "filtered out: nextest counts it as skipped"]
fn ignored() {}

#[test]
fn skips() {
    skip("the fixture lacks a tool");
}

/// Many calls (a property test's cases, say) record one skip.
#[test]
fn skips_repeatedly() {
    for case in 0..16 {
        skip(&format!("case {case} lacks a device"));
    }
}

/// A test that logged a skip and then failed is a failure, not a skip.
#[test]
fn skips_then_fails() {
    skip("the fixture lacks a kernel feature");
    panic!("failing after the skip");
}

/// The same test name in a second binary is a different test.
mod nested {
    #[test]
    fn passes() {}
}
