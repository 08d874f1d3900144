//! Slice frontend: faults, population, content.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};

use common::{pattern_byte, shared, PatternBackend, PAGE};
use r3map_frontends::slice::{Region, RegionOptions, WriteTracking};

fn options(chunk_size: u64) -> RegionOptions {
    RegionOptions {
        chunk_size,
        ..RegionOptions::default()
    }
}

#[test]
fn fault_fetches_the_whole_chunk_once() {
    if !common::have_userfaultfd() {
        return;
    }
    let chunk = 16 * PAGE;
    let (backend, shared) = shared(PatternBackend::new(4 * chunk));
    let region = Region::new(shared, options(chunk)).unwrap();
    let mem = region.as_slice();
    // One byte in chunk 1: the whole chunk arrives with one fetch.
    assert_eq!(
        mem[(chunk + 5 * PAGE + 3) as usize],
        pattern_byte(chunk + 5 * PAGE + 3)
    );
    assert_eq!(backend.reads.load(Ordering::SeqCst), 1);
    assert!(region.is_installed(1));
    assert_eq!(region.installed_count(), 1);
    for off in chunk..2 * chunk {
        assert_eq!(mem[off as usize], pattern_byte(off), "offset {off}");
    }
    // No further fetch or fault for the rest of chunk 1.
    assert_eq!(backend.reads.load(Ordering::SeqCst), 1);
    assert_eq!(region.stats().faults, 1);
    for (off, byte) in mem.iter().enumerate() {
        assert_eq!(*byte, pattern_byte(off as u64), "offset {off}");
    }
    assert_eq!(backend.reads.load(Ordering::SeqCst), 4);
}

#[test]
fn concurrent_faults_on_one_chunk_fetch_it_once() {
    if !common::have_userfaultfd() {
        return;
    }
    let chunk = 64 * PAGE;
    let (backend, shared) = shared(PatternBackend::new(2 * chunk));
    let region = Region::new(shared, options(chunk)).unwrap();
    let mem = region.as_slice();
    let threads = 8;
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        for t in 0..threads {
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                let off = (t as u64 * 8 + 1) * PAGE + t as u64;
                assert_eq!(mem[off as usize], pattern_byte(off));
            });
        }
    });
    assert_eq!(backend.reads.load(Ordering::SeqCst), 1);
    assert_eq!(region.installed_count(), 1);
}

#[test]
fn short_tail_chunk_and_unaligned_size() {
    if !common::have_userfaultfd() {
        return;
    }
    let chunk = 4 * PAGE;
    let size = 3 * chunk + 1000;
    let (backend, shared) = shared(PatternBackend::new(size));
    let region = Region::new(shared, options(chunk)).unwrap();
    assert_eq!(region.len() as u64, size);
    let mem = region.as_slice();
    assert_eq!(mem[size as usize - 1], pattern_byte(size - 1));
    for (off, byte) in mem.iter().enumerate() {
        assert_eq!(*byte, pattern_byte(off as u64));
    }
    assert_eq!(backend.reads.load(Ordering::SeqCst), 4);
    assert_eq!(region.installed_count(), 4);
}

#[test]
fn zero_chunks_are_installed_without_copy() {
    if !common::have_userfaultfd() {
        return;
    }
    let chunk = 8 * PAGE;
    let memory = Arc::new(r3map_core::MemoryBackend::new(4 * chunk));
    let data = r3map_core::testing::pattern(9, chunk as usize);
    r3map_core::testing::block_on(r3map_core::Backend::write_at(&*memory, chunk, &data)).unwrap();
    let region = Region::new(memory, options(chunk)).unwrap();
    // Chunk 2 declared zero: never fetched.
    region.mark_zero([2]);
    let mem = region.as_slice();
    assert!(mem[..chunk as usize].iter().all(|&b| b == 0));
    assert_eq!(&mem[chunk as usize..2 * chunk as usize], &data[..]);
    assert!(mem[2 * chunk as usize..].iter().all(|&b| b == 0));
    let stats = region.stats();
    assert_eq!(stats.fetches, 3, "chunk 2 is known zero");
    assert_eq!(stats.zero_chunks, 3, "chunks 0, 2 and 3 use the zero page");
    assert_eq!(stats.installed, 4);
}

#[test]
fn region_rejects_bad_chunk_sizes() {
    if !common::have_userfaultfd() {
        return;
    }
    let (_, shared1) = shared(PatternBackend::new(1 << 20));
    assert!(Region::new(shared1.clone(), options(1000)).is_err());
    assert!(Region::new(shared1, options(0)).is_err());
    let (_, empty) = shared(PatternBackend::new(0));
    assert!(Region::new(empty, options(PAGE)).is_err());
}

/// Many threads write and read random pages of a 4 GiB sparse region; every byte read must
/// match the model (backend pattern, overlaid with this test's writes).
#[test]
fn many_threads_random_pages_of_sparse_region() {
    if !common::have_userfaultfd() {
        return;
    }
    use rand::{Rng, SeedableRng};
    let size = 4u64 << 30;
    let chunk = 16 * PAGE;
    let (backend, shared) = shared(PatternBackend::new(size));
    let mut region = Region::new(shared, options(chunk)).unwrap();
    let threads = 8usize;
    let part = size as usize / threads;
    let mem = region.as_mut_slice();
    std::thread::scope(|s| {
        for (t, slice) in mem.chunks_mut(part).enumerate() {
            s.spawn(move || {
                let base = (t * part) as u64;
                let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                let mut written = std::collections::HashMap::new();
                for _ in 0..200 {
                    let page = rng.gen_range(0..part as u64 / PAGE);
                    let at = (page * PAGE + rng.gen_range(0..PAGE)) as usize;
                    if rng.gen_bool(0.3) {
                        let value: u8 = rng.gen();
                        slice[at] = value;
                        written.insert(at, value);
                    }
                    let expected = written
                        .get(&at)
                        .copied()
                        .unwrap_or_else(|| pattern_byte(base + at as u64));
                    assert_eq!(slice[at], expected, "thread {t} offset {at}");
                    // A neighbour in the same page came with the same chunk.
                    let near = at ^ 1;
                    let expected = written
                        .get(&near)
                        .copied()
                        .unwrap_or_else(|| pattern_byte(base + near as u64));
                    assert_eq!(slice[near], expected);
                }
            });
        }
    });
    let fetched = backend.reads.load(Ordering::SeqCst);
    assert_eq!(fetched, region.installed_count());
    assert!(fetched <= 1600 && fetched > 100, "{fetched} chunks fetched");
}

#[test]
fn puller_populates_the_region_before_it_is_touched() {
    if !common::have_userfaultfd() {
        return;
    }
    let chunk = 8 * PAGE;
    let count = 64;
    let (backend, shared) = shared(PatternBackend::new(count * chunk));
    let region = Region::new(shared, options(chunk)).unwrap();
    let puller = region.start_puller(Default::default()).unwrap();
    let progress = puller.progress();
    r3map_core::testing::block_on(puller.wait()).unwrap();
    let seen = progress.borrow().clone();
    assert_eq!((seen.pulled, seen.total, seen.finished), (count, count, true));
    assert_eq!(region.installed_count(), count);
    for (off, byte) in region.as_slice().iter().enumerate() {
        assert_eq!(*byte, pattern_byte(off as u64));
    }
    assert_eq!(region.stats().faults, 0, "a populated region does not fault");
    assert_eq!(backend.reads.load(Ordering::SeqCst), count);
}

/// The puller (last chunk first) races threads reading from the front: content is right and
/// every chunk is fetched exactly once.
#[test]
fn background_population_races_faults() {
    if !common::have_userfaultfd() {
        return;
    }
    let chunk = 4 * PAGE;
    let count = 512;
    let (backend, shared) = shared(PatternBackend::new(count * chunk));
    let region = Region::new(shared, options(chunk)).unwrap();
    let puller = region
        .start_puller(r3map_core::stages::PullerOptions {
            workers: 4,
            priority: r3map_core::stages::Priority::reverse(),
        })
        .unwrap();
    let mem = region.as_slice();
    let threads = 4;
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        for t in 0..threads {
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                for (i, piece) in mem.chunks(PAGE as usize).enumerate().skip(t).step_by(threads) {
                    let off = i as u64 * PAGE;
                    assert_eq!(piece[7], pattern_byte(off + 7));
                }
            });
        }
    });
    r3map_core::testing::block_on(puller.wait()).unwrap();
    assert_eq!(region.installed_count(), count);
    assert_eq!(backend.reads.load(Ordering::SeqCst), count, "one fetch per chunk");
    for (off, byte) in mem.iter().enumerate() {
        assert_eq!(*byte, pattern_byte(off as u64));
    }
}

#[test]
fn memfd_region_is_shared_with_other_mappings() {
    if !common::have_userfaultfd() {
        return;
    }
    let chunk = 4 * PAGE;
    let (_, shared) = shared(PatternBackend::new(8 * chunk));
    let region = Region::new(
        shared,
        RegionOptions {
            memory: r3map_frontends::slice::MemoryKind::Memfd,
            write_tracking: WriteTracking::Off,
            ..options(chunk)
        },
    )
    .unwrap();
    assert_eq!(
        region.as_slice()[3 * chunk as usize + 1],
        pattern_byte(3 * chunk + 1)
    );
    let fd = region.memfd().unwrap().try_clone_to_owned().unwrap();
    let mut file = std::fs::File::from(fd);
    let mut buf = vec![0u8; chunk as usize];
    use std::io::{Read, Seek};
    file.seek(std::io::SeekFrom::Start(3 * chunk)).unwrap();
    file.read_exact(&mut buf).unwrap();
    for (i, byte) in buf.iter().enumerate() {
        assert_eq!(*byte, pattern_byte(3 * chunk + i as u64));
    }
}
