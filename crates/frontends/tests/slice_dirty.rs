//! Slice frontend: write tracking (async write-protect + PAGEMAP_SCAN, and the sync fallback).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::{pattern_byte, shared, PatternBackend, PAGE};
use r3map_core::{Backend, MemoryBackend};
use r3map_frontends::slice::{Region, RegionOptions, TrackingMode, WriteTracking};
use rand::{Rng, SeedableRng};

fn region(pages: u64, chunk: u64, tracking: WriteTracking) -> Region {
    let (_, backend) = shared(PatternBackend::new(pages * PAGE));
    Region::new(
        backend,
        RegionOptions {
            chunk_size: chunk,
            write_tracking: tracking,
            ..RegionOptions::default()
        },
    )
    .unwrap()
}

/// Rounds of random writes (and reads, and zero chunks) with one page per chunk: every written
/// page is reported, nothing else is, and tracking is re-armed after each scan.
fn exact_tracking(tracking: WriteTracking, expected_mode: TrackingMode) {
    let pages = 1024;
    let mut region = region(pages, PAGE, tracking);
    assert_eq!(region.tracking_mode(), expected_mode);
    region.mark_zero([1000, 1001]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Pages installed by the puller and read by the app are not dirty.
    let puller = region
        .start_puller(r3map_core::stages::PullerOptions::default())
        .unwrap();
    r3map_core::testing::block_on(puller.wait()).unwrap();
    assert_eq!(region.take_dirty().unwrap(), Vec::<u64>::new());
    for round in 0..6 {
        let mut written = BTreeSet::new();
        let mem = region.as_mut_slice();
        for _ in 0..rng.gen_range(1..80) {
            let page = rng.gen_range(0..pages);
            std::hint::black_box(mem[(page * PAGE) as usize + 9]); // reads never count
            if rng.gen_bool(0.5) {
                mem[(page * PAGE + rng.gen_range(0..PAGE)) as usize] ^= 0xff;
                written.insert(page);
            }
        }
        if round == 3 {
            // Writing a zero-page chunk counts too.
            mem[(1000 * PAGE) as usize] = 1;
            written.insert(1000);
        }
        let dirty: BTreeSet<u64> = region.take_dirty().unwrap().into_iter().collect();
        assert_eq!(dirty, written, "round {round}");
        assert!(
            region.take_dirty().unwrap().is_empty(),
            "re-armed after round {round}"
        );
    }
}

#[test]
fn async_dirty_tracking_is_exact() {
    exact_tracking(WriteTracking::Auto, TrackingMode::AsyncWriteProtect);
}

#[test]
fn sync_dirty_tracking_fallback_is_exact() {
    exact_tracking(WriteTracking::Sync, TrackingMode::SyncWriteProtect);
}

#[test]
fn dirty_state_is_per_chunk_and_faulted_writes_count() {
    let chunk = 16 * PAGE;
    let mut region = region(64 * 16, chunk, WriteTracking::Auto);
    let mem = region.as_mut_slice();
    // First touch is a write (missing fault, then the write itself).
    mem[(3 * chunk + 5 * PAGE) as usize] = 1;
    mem[(3 * chunk + 9 * PAGE) as usize] = 1;
    mem[(40 * chunk) as usize] = 1;
    std::hint::black_box(mem[(41 * chunk) as usize]);
    assert_eq!(region.take_dirty().unwrap(), vec![3, 40]);
    assert!(region.take_dirty().unwrap().is_empty());
}

#[test]
fn discarded_pages_read_zero_and_count_as_dirty() {
    for tracking in [WriteTracking::Auto, WriteTracking::Sync] {
        let chunk = 4 * PAGE;
        let mut region = region(64, chunk, tracking);
        let mem = region.as_mut_slice();
        std::hint::black_box(mem[0]);
        std::hint::black_box(mem[(5 * chunk) as usize]);
        assert!(region.take_dirty().unwrap().is_empty());
        // Drop one page of chunk 0 and all of chunk 5 (installed), and chunk 9 (never touched).
        region.discard(PAGE as usize, PAGE as usize).unwrap();
        region.discard((5 * chunk) as usize, chunk as usize).unwrap();
        region.discard((9 * chunk) as usize, chunk as usize).unwrap();
        let mem = region.as_slice();
        assert!(mem[PAGE as usize..2 * PAGE as usize].iter().all(|&b| b == 0));
        assert_eq!(
            mem[2 * PAGE as usize],
            pattern_byte(2 * PAGE),
            "rest of chunk 0 kept"
        );
        assert!(mem[(5 * chunk) as usize..(6 * chunk) as usize]
            .iter()
            .all(|&b| b == 0));
        assert!(mem[(9 * chunk) as usize..(10 * chunk) as usize]
            .iter()
            .all(|&b| b == 0));
        assert_eq!(mem[(10 * chunk) as usize], pattern_byte(10 * chunk));
        assert_eq!(region.take_dirty().unwrap(), vec![0, 5, 9], "{tracking:?}");
        // Writing a refilled page is tracked again.
        region.as_mut_slice()[PAGE as usize] = 7;
        assert_eq!(region.take_dirty().unwrap(), vec![0], "{tracking:?}");
    }
}

#[test]
fn push_dirty_writes_changed_chunks_back() {
    let chunk = 8 * PAGE;
    let memory = Arc::new(MemoryBackend::new(32 * chunk));
    let initial = r3map_core::testing::pattern(3, 32 * chunk as usize);
    r3map_core::testing::block_on(memory.write_at(0, &initial)).unwrap();
    let mut region = Region::new(
        memory.clone(),
        RegionOptions {
            chunk_size: chunk,
            ..RegionOptions::default()
        },
    )
    .unwrap();
    let mut model = initial.clone();
    for &(at, value) in &[(5u64, 1u8), (chunk * 7 + 3, 2), (chunk * 31 + chunk - 1, 3)] {
        region.as_mut_slice()[at as usize] = value;
        model[at as usize] = value;
    }
    let pushed = r3map_core::testing::block_on(region.push_dirty()).unwrap();
    assert_eq!(pushed, vec![0, 7, 31]);
    let mut back = vec![0u8; model.len()];
    r3map_core::testing::block_on(memory.read_at(0, &mut back)).unwrap();
    assert!(back == model, "backend holds the region's writes");
    assert!(region.take_dirty().unwrap().is_empty());
}

#[test]
fn tracking_off_refuses_take_dirty() {
    let region = region(16, PAGE, WriteTracking::Off);
    assert_eq!(region.tracking_mode(), TrackingMode::Off);
    assert!(region.take_dirty().is_err());
}
