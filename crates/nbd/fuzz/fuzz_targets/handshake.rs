//! Arbitrary bytes as everything a client sends, from its flags on: the server must never
//! panic and never change stored data (no request magic can be reached without a handshake
//! that this input would have to contain).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let backend = common::run(&[], data);
    let magic = r3map_nbd::wire::REQUEST_MAGIC.to_be_bytes();
    if !data.windows(4).any(|w| w == magic) {
        let all = common::runtime().block_on(common::contents(&backend));
        assert!(all.iter().all(|&b| b == 0), "data changed without a request");
    }
});
