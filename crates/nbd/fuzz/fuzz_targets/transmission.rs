//! Arbitrary bytes in the transmission phase after a valid handshake (the first byte picks
//! simple or structured replies, with or without `base:allocation`).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let prefix = common::handshake_prefix(mode & 1 != 0, mode & 2 != 0);
    let backend = common::run(&prefix, rest);
    let magic = r3map_nbd::wire::REQUEST_MAGIC.to_be_bytes();
    if !rest.windows(4).any(|w| w == magic) {
        let all = common::runtime().block_on(common::contents(&backend));
        assert!(all.iter().all(|&b| b == 0), "data changed without a request");
    }
});
