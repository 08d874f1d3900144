//! Property test: random and mutated server byte streams (compact and extended headers) never
//! panic the client, never hang it past its deadlines, and every pending request ends with an
//! error or correct data. Runs on a
//! paused clock, so the client's own timeouts pass instantly and a hang shows up as the outer
//! deadline firing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::Duration;

use proptest::prelude::*;
use r3map_nbd::testing::{self, Fed};

/// Panics anywhere in the process (client tasks included; tokio would swallow those).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

const SIZE: usize = 4096;

fn content() -> Vec<u8> {
    (0..SIZE).map(|i| (i * 7 % 251) as u8).collect()
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Set { at: usize, byte: u8 },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
    Truncate { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..24))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..24).prop_map(|(at, len)| Mutation::Remove { at, len }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match mutation {
        Mutation::Flip { at, bit } => {
            let at = at % bytes.len();
            bytes[at] ^= 1 << bit;
        }
        Mutation::Set { at, byte } => {
            let at = at % bytes.len();
            bytes[at] = *byte;
        }
        Mutation::Insert { at, bytes: extra } => {
            let at = at % (bytes.len() + 1);
            bytes.splice(at..at, extra.iter().copied());
        }
        Mutation::Remove { at, len } => {
            let at = at % bytes.len();
            let end = (at + len).min(bytes.len());
            bytes.drain(at..end);
        }
        Mutation::Truncate { at } => bytes.truncate(at % bytes.len()),
    }
}

fn reads() -> impl Strategy<Value = Vec<(u64, usize)>> {
    proptest::collection::vec((0u64..(SIZE as u64 - 1), 1usize..600), 1..5).prop_map(|reads| {
        reads
            .into_iter()
            .map(|(offset, len)| (offset, len.min(SIZE - offset as usize)))
            .collect()
    })
}

/// Runs the client against `bytes` on a paused clock and checks the outcome.
fn check(bytes: &[u8], freeze: bool, reads: &[(u64, usize)], valid: bool) -> Result<(), TestCaseError> {
    count_panics();
    let before = PANICS.load(Ordering::SeqCst);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let options = testing::hostile_options();
    // Handshake deadline + request deadline, with room to spare: anything longer is a hang.
    let deadline = options.connect_timeout + options.request_timeout.unwrap() + Duration::from_secs(60);
    let outcome = runtime.block_on(async {
        tokio::time::timeout(deadline, testing::feed_client(bytes, freeze, reads, options)).await
    });
    drop(runtime);
    prop_assert_eq!(PANICS.load(Ordering::SeqCst), before, "the client panicked");
    let Ok(fed) = outcome else {
        return Err(TestCaseError::fail("the client hung past its deadlines"));
    };
    let content = content();
    match fed {
        Fed::Refused(message) => {
            prop_assert!(!valid, "a valid handshake was refused: {}", message);
            prop_assert!(!message.is_empty());
        }
        Fed::Served(results) => {
            prop_assert_eq!(results.len(), reads.len());
            for (result, &(offset, len)) in results.iter().zip(reads) {
                match result {
                    // Data that came back must be right unless the stream was mutated, and
                    // then it must at least have the asked length.
                    Ok(data) if valid => {
                        prop_assert_eq!(&data[..], &content[offset as usize..offset as usize + len])
                    }
                    Ok(data) => prop_assert_eq!(data.len(), len),
                    Err(err) => {
                        prop_assert!(!valid, "a valid read failed: {}", err);
                        prop_assert!(!err.to_string().is_empty());
                    }
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The unmutated transcript serves every read correctly (the baseline the mutations break).
    #[test]
    fn a_valid_stream_serves_every_read(reads in reads(), freeze in any::<bool>(), extended in any::<bool>()) {
        let transcript = testing::valid_transcript(&content(), &reads, extended);
        check(&transcript, freeze, &reads, true)?;
    }

    /// Mutated valid transcripts: errors, never panics or hangs.
    #[test]
    fn mutated_streams_never_panic_or_hang(
        reads in reads(),
        mutations in proptest::collection::vec(mutation(), 1..4),
        freeze in any::<bool>(),
        extended in any::<bool>(),
    ) {
        let mut bytes = testing::valid_transcript(&content(), &reads, extended);
        for mutation in &mutations {
            apply(&mut bytes, mutation);
        }
        check(&bytes, freeze, &reads, false)?;
    }

    /// Random bytes, alone or after a valid handshake.
    #[test]
    fn random_streams_never_panic_or_hang(
        reads in reads(),
        junk in proptest::collection::vec(any::<u8>(), 0..512),
        after_handshake in any::<bool>(),
        freeze in any::<bool>(),
        extended in any::<bool>(),
    ) {
        let mut bytes = if after_handshake {
            testing::valid_transcript(&content(), &[], extended)
        } else {
            Vec::new()
        };
        bytes.extend_from_slice(&junk);
        check(&bytes, freeze, &reads, false)?;
    }
}
