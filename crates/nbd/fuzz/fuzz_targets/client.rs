//! Arbitrary server bytes fed to the NBD client (the first byte picks whether the stream ends
//! or freezes after them): the client must never panic, and must end every read it started
//! with data or an error within its deadlines (a paused clock makes those instant).
#![no_main]

use libfuzzer_sys::fuzz_target;
use r3map_nbd::testing::{self, Fed};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, server_bytes)) = data.split_first() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("tokio runtime");
    let reads = [(0, 512), (4096, 4096), (100, 1)];
    let options = testing::hostile_options();
    let deadline = options.connect_timeout + options.request_timeout.expect("set") * 2;
    let fed = runtime.block_on(async {
        tokio::time::timeout(
            deadline,
            testing::feed_client(server_bytes, mode & 1 != 0, &reads, options),
        )
        .await
    });
    match fed.expect("the client hung past its deadlines") {
        Fed::Refused(message) => assert!(!message.is_empty()),
        Fed::Served(results) => {
            assert_eq!(results.len(), reads.len());
            for (result, (_, len)) in results.iter().zip(reads) {
                if let Ok(data) = result {
                    assert_eq!(data.len(), len);
                }
            }
        }
    }
});
