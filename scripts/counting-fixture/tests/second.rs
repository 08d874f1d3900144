//! A second binary with a test named like one in `outcomes.rs`, skipping: the skip must be
//! attributed to this binary's test, not the other's.
#![cfg(feature = "fixture")]

#[test]
fn passes() {
    r3map_core::testing::skip("the second binary lacks a tool");
}
