//! The delta codec and engine against a model: a receiver holding `old` (a `Vec<u8>`) and a
//! source holding `new` exchange encoded frames, fed through the decoder in random pieces; the
//! receiver ends with exactly `new`, and exactly the blocks that differ were sent.

use bytes::BytesMut;
use proptest::prelude::*;
use r3map_sync::delta::{apply_size, hash_messages, HashList, Incoming};
use r3map_sync::hashes::block_count;
use r3map_sync::wire::MAX_FRAME;
use r3map_sync::{BlockHashes, Message, Plan};

/// Encodes `messages`, then decodes them from the bytes split at `cuts` (as a socket delivers).
fn through_the_wire(messages: &[Message], cuts: &[usize]) -> (Vec<Message>, usize) {
    let mut encoded = BytesMut::new();
    for message in messages {
        message.encode(&mut encoded);
    }
    let total = encoded.len();
    let mut points: Vec<usize> = cuts.iter().map(|cut| cut % (total + 1)).collect();
    points.push(total);
    points.sort_unstable();
    let mut buf = BytesMut::new();
    let mut decoded = Vec::new();
    let mut at = 0;
    for point in points {
        buf.extend_from_slice(&encoded[at..point]);
        at = point;
        while let Some(message) = Message::decode(&mut buf, MAX_FRAME).unwrap() {
            decoded.push(message);
        }
    }
    assert!(buf.is_empty(), "bytes left after the last frame");
    (decoded, total)
}

/// The blocks of `new` that a holder of `old` lacks, from the bytes themselves.
fn model_changed(old: &[u8], new: &[u8], block_size: usize) -> Vec<u64> {
    new.chunks(block_size)
        .enumerate()
        .filter(|(i, block)| old.chunks(block_size).nth(*i) != Some(*block))
        .map(|(i, _)| i as u64)
        .collect()
}

fn edited(old: &[u8], edits: &[(usize, u8)], new_len: usize) -> Vec<u8> {
    let mut new = old.to_vec();
    new.resize(new_len, 0x5a);
    for (at, value) in edits {
        if !new.is_empty() {
            let at = at % new.len();
            new[at] = new[at].wrapping_add(*value | 1);
        }
    }
    new
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn receiver_ends_with_the_source_version(
        old in proptest::collection::vec(any::<u8>(), 0..6000),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        new_len in 0usize..7000,
        block_size in prop_oneof![Just(512u32), Just(1024), Just(4096)],
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let new = edited(&old, &edits, new_len);
        // Receiver: hashes of what it holds, sent as frames.
        let mut replica = old.clone();
        let mut replica_hashes = BlockHashes::of_bytes(&replica, block_size);
        let (hash_frames, _) = through_the_wire(&hash_messages(&replica_hashes), &cuts);
        // Source: collects them, plans, sends the blocks.
        let source = BlockHashes::of_bytes(&new, block_size);
        let mut list = HashList::new(block_size, source.blocks());
        let mut complete = false;
        for frame in hash_frames {
            let Message::Hashes { size, first, last, hashes } = frame else { panic!("{frame:?}") };
            complete = list.add(size, first, last, &hashes).unwrap();
        }
        prop_assert!(complete);
        let (their_size, theirs) = list.finish();
        prop_assert_eq!(their_size, old.len() as u64);
        let plan = Plan::new(&source, &theirs);
        prop_assert_eq!(&plan.blocks, &model_changed(&old, &new, block_size as usize));
        let mut frames = vec![plan.message()];
        for &index in &plan.blocks {
            let (offset, len) = source.range(index);
            frames.push(Message::Block {
                index,
                data: new[offset as usize..offset as usize + len].to_vec().into(),
            });
        }
        let (frames, wire_bytes) = through_the_wire(&frames, &cuts);
        // Wire cost: the changed bytes plus a bounded header per block.
        let changed_bytes: usize = plan.blocks.iter().map(|&i| source.range(i).1).sum();
        prop_assert!(wire_bytes <= changed_bytes + 17 * plan.blocks.len() + 64);
        // Receiver: checks and applies.
        let mut frames = frames.into_iter();
        let Some(Message::Plan { size, blocks, digest }) = frames.next() else { panic!("no plan") };
        let mut incoming = Incoming::new(size, blocks, digest, block_size, u64::MAX).unwrap();
        apply_size(&mut replica, &mut replica_hashes, size).unwrap();
        for frame in frames {
            let Message::Block { index, data } = frame else { panic!("{frame:?}") };
            incoming.accept(&mut replica, &mut replica_hashes, index, &data).unwrap();
        }
        prop_assert_eq!(incoming.remaining(), 0);
        prop_assert_eq!(replica_hashes.digest(), digest, "digest disagrees with the bytes");
        prop_assert_eq!(&replica, &new);
        prop_assert_eq!(replica_hashes, BlockHashes::of_bytes(&new, block_size));
    }

    #[test]
    fn decoder_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = Message::decode(&mut buf, 1 << 16) {}
    }

    #[test]
    fn hash_lists_that_do_not_match_the_size_are_refused(
        size in 0u64..100_000,
        extra in 1u64..5,
        fewer in any::<bool>(),
    ) {
        let expected = block_count(size, 4096);
        let count = if fewer { expected.saturating_sub(extra) } else { expected + extra };
        prop_assume!(count != expected);
        let mut list = HashList::new(4096, 1000);
        prop_assert!(list.add(size, 0, true, &vec![0; count as usize]).is_err());
    }
}

#[test]
fn a_refused_block_leaves_the_target_untouched() {
    let block_size = 512;
    let old = vec![1u8; 2048];
    let mut replica = old.clone();
    let mut hashes = BlockHashes::of_bytes(&replica, block_size);
    let mut incoming = Incoming::new(2048, 2, [0; 32], block_size, u64::MAX).unwrap();
    // Wrong length, index beyond the end.
    assert!(incoming.accept(&mut replica, &mut hashes, 0, &[2; 100]).is_err());
    assert!(incoming.accept(&mut replica, &mut hashes, 4, &[2; 512]).is_err());
    incoming.accept(&mut replica, &mut hashes, 1, &[2; 512]).unwrap();
    // Out of order, repeated, then more than announced.
    assert!(incoming.accept(&mut replica, &mut hashes, 0, &[3; 512]).is_err());
    assert!(incoming.accept(&mut replica, &mut hashes, 1, &[3; 512]).is_err());
    incoming.accept(&mut replica, &mut hashes, 2, &[2; 512]).unwrap();
    assert!(incoming.accept(&mut replica, &mut hashes, 3, &[3; 512]).is_err());
    let mut expected = old;
    expected[512..1536].fill(2);
    assert_eq!(replica, expected, "a refused block was written");
    // Plans beyond the size limit or with more blocks than the file has.
    assert!(Incoming::new(1 << 40, 0, [0; 32], block_size, 1 << 30).is_err());
    assert!(Incoming::new(1024, 3, [0; 32], block_size, u64::MAX).is_err());
}
