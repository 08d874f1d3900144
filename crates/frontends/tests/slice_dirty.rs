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
    if !common::have_async_tracking() {
        return;
    }
    exact_tracking(WriteTracking::Auto, TrackingMode::AsyncWriteProtect);
}

#[test]
fn sync_dirty_tracking_fallback_is_exact() {
    if !common::have_userfaultfd() {
        return;
    }
    exact_tracking(WriteTracking::Sync, TrackingMode::SyncWriteProtect);
}

#[test]
fn dirty_state_is_per_chunk_and_faulted_writes_count() {
    if !common::have_userfaultfd() {
        return;
    }
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
    if !common::have_userfaultfd() {
        return;
    }
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
    if !common::have_userfaultfd() {
        return;
    }
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
    if !common::have_userfaultfd() {
        return;
    }
    let region = region(16, PAGE, WriteTracking::Off);
    assert_eq!(region.tracking_mode(), TrackingMode::Off);
    assert!(region.take_dirty().is_err());
}

/// Whether the page at `addr` of this process is present (bit 63 of its pagemap entry); reading
/// pagemap never faults the page in.
fn page_present(pagemap: &std::fs::File, addr: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut entry = [0u8; 8];
    pagemap.read_exact_at(&mut entry, addr / PAGE * 8).unwrap();
    u64::from_le_bytes(entry) >> 63 == 1
}

/// Sync write-protect: a chunk of zeros installed by the puller path while a thread writes to
/// it the moment its first page appears. The write must fault (and count): zero pages mapped
/// first and protected afterwards would let it through unseen.
#[test]
fn sync_tracking_sees_a_write_racing_the_install_of_a_zero_chunk() {
    if !common::have_userfaultfd() {
        return;
    }
    let chunk = 512 * PAGE;
    let chunks = 24u64;
    let mut region = Region::new(
        Arc::new(MemoryBackend::new(chunks * chunk)),
        RegionOptions {
            chunk_size: chunk,
            write_tracking: WriteTracking::Sync,
            ..RegionOptions::default()
        },
    )
    .unwrap();
    region.mark_zero(0..chunks);
    let handle = region.handle();
    let base = region.addr();
    let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mem = region.as_mut_slice();
    for c in 0..chunks {
        let at = (c * chunk) as usize;
        std::thread::scope(|s| {
            let target = &mut mem[at..at + 1];
            let pagemap = &pagemap;
            s.spawn(move || {
                while !page_present(pagemap, base + c * chunk) {
                    std::hint::spin_loop();
                }
                target[0] = 1;
            });
            r3map_core::testing::block_on(handle.install(c)).unwrap();
        });
    }
    let dirty = region.take_dirty().unwrap();
    assert_eq!(
        dirty,
        (0..chunks).collect::<Vec<_>>(),
        "writes missed by tracking"
    );
    assert!(region.as_slice().iter().step_by(chunk as usize).all(|&b| b == 1));
}

/// Pages dropped from a chunk that was never installed read as zeros afterwards; the rest of
/// the chunk still comes from the backend. In every tracking mode.
#[test]
fn discarding_part_of_a_never_installed_chunk_reads_zeros_there() {
    if !common::have_userfaultfd() {
        return;
    }
    for tracking in [WriteTracking::Off, WriteTracking::Auto, WriteTracking::Sync] {
        let chunk = 4 * PAGE;
        let mut region = region(32, chunk, tracking);
        region
            .discard((3 * chunk + PAGE) as usize, 2 * PAGE as usize)
            .unwrap();
        let mem = region.as_slice();
        for off in 3 * chunk..4 * chunk {
            let dropped = (3 * chunk + PAGE..3 * chunk + 3 * PAGE).contains(&off);
            let expected = if dropped { 0 } else { pattern_byte(off) };
            assert_eq!(mem[off as usize], expected, "{tracking:?} offset {off}");
        }
        if tracking != WriteTracking::Off {
            assert_eq!(region.take_dirty().unwrap(), vec![3], "{tracking:?}");
        }
    }
}

/// A discard while the chunk's fetch is in flight (held in the backend) is not undone when the
/// fetched bytes arrive.
#[test]
fn a_discard_racing_a_fetch_is_not_undone() {
    if !common::have_userfaultfd() {
        return;
    }
    let chunk = 4 * PAGE;
    let gate = Arc::new(common::GateBackend::new(8 * chunk));
    let mut region = Region::new(
        gate.clone(),
        RegionOptions {
            chunk_size: chunk,
            ..RegionOptions::default()
        },
    )
    .unwrap();
    let addr = region.addr();
    let reader = std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        r3map_frontends::uffd::read_process_memory(None, addr + 2 * chunk, &mut byte).map(|()| byte[0])
    });
    let mut started = gate.started.subscribe();
    r3map_core::testing::block_on(started.wait_for(|n| *n == 1)).unwrap();
    // Chunk 2's fetch is in the backend now; drop its third page.
    region
        .discard((2 * chunk + 2 * PAGE) as usize, PAGE as usize)
        .unwrap();
    gate.open();
    assert_eq!(reader.join().unwrap().unwrap(), pattern_byte(2 * chunk));
    let mem = region.as_slice();
    for off in 2 * chunk..3 * chunk {
        let dropped = (2 * chunk + 2 * PAGE..2 * chunk + 3 * PAGE).contains(&off);
        let expected = if dropped { 0 } else { pattern_byte(off) };
        assert_eq!(mem[off as usize], expected, "offset {off}");
    }
    assert_eq!(region.take_dirty().unwrap(), vec![2]);
}
