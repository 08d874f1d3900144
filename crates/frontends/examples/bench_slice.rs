//! Slice frontend benchmark; prints a markdown table.
//!
//! `cargo run --release -p r3map-frontends --example bench_slice [GiB] [chunk KiB]`
//!
//! (a) cold sequential read of the region (copy out into a warm buffer) from a memory backend,
//!     vs memcpy into a fresh anonymous mapping (first touch) and vs warm memcpy;
//! (b) the same after background population by the puller;
//! (c) per-fault latency (one byte per chunk, chunks in random order): median and p99;
//! (d) PAGEMAP_SCAN (`take_dirty`) cost per GiB with 1% of pages dirty.

use std::sync::Arc;
use std::time::{Duration, Instant};

use r3map_core::{Backend, MemoryBackend};
use r3map_frontends::slice::{Region, RegionOptions};
use r3map_frontends::uffd::{page_size, Mapping};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let gib: u64 = args.get(1).map_or(Ok(1), |s| s.parse())?;
    let chunk_kib: u64 = args.get(2).map_or(Ok(256), |s| s.parse())?;
    let size = gib << 30;
    let chunk = chunk_kib << 10;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    // Source data: non-zero so no chunk takes the zero-page path.
    let backend = Arc::new(MemoryBackend::new(size));
    let piece: Vec<u8> = (0..(8u64 << 20)).map(|i| (i * 131 + 7) as u8 | 1).collect();
    runtime.block_on(async {
        for off in (0..size).step_by(piece.len()) {
            backend.write_at(off, &piece).await.expect("fill backend");
        }
    });
    let mut dst = vec![0u8; size as usize];
    dst.iter_mut().step_by(4096).for_each(|b| *b = 1); // warm
    let mut warm_src = vec![1u8; size as usize];
    warm_src.iter_mut().step_by(4096).for_each(|b| *b = 2);

    // Baselines.
    // Best of three, so the baseline is not penalised by a cold start.
    let warm = (0..3)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(&warm_src);
            t.elapsed()
        })
        .min()
        .expect("three runs");
    let mut fresh = Mapping::anonymous(size as usize)?;
    let t = Instant::now();
    fresh.as_mut_slice().copy_from_slice(&warm_src);
    let first_touch = t.elapsed();
    drop(fresh);
    drop(warm_src);

    let options = || RegionOptions {
        chunk_size: chunk,
        ..RegionOptions::default()
    };

    // (a) cold read through faults.
    let region = Region::new(backend.clone(), options())?;
    let t = Instant::now();
    dst.copy_from_slice(region.as_slice());
    let cold = t.elapsed();
    let cold_faults = region.stats().faults;
    drop(region);

    // (b) background population, then read.
    let region = Region::new(backend.clone(), options())?;
    let t = Instant::now();
    let puller = region.start_puller(r3map_core::stages::PullerOptions {
        workers: 4,
        ..Default::default()
    })?;
    runtime.block_on(puller.wait())?;
    let populate = t.elapsed();
    let t = Instant::now();
    dst.copy_from_slice(region.as_slice());
    let populated = t.elapsed();
    let populated_faults = region.stats().faults;

    // (d) PAGEMAP_SCAN with 1% of pages dirty (on the populated region).
    let mut region = region;
    let page = page_size();
    let pages = size / page;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mem = region.as_mut_slice();
    for _ in 0..pages / 100 {
        let p = rng.gen_range(0..pages);
        mem[(p * page) as usize] ^= 1;
    }
    let t = Instant::now();
    let dirty = region.take_dirty()?;
    let scan_dirty = t.elapsed();
    let t = Instant::now();
    let clean = region.take_dirty()?;
    let scan_clean = t.elapsed();
    assert!(clean.is_empty());
    drop(region);

    // (c) per-fault latency: one byte per chunk, random chunk order.
    let region = Region::new(backend.clone(), options())?;
    let mut order: Vec<u64> = (0..size / chunk).collect();
    order.shuffle(&mut rng);
    order.truncate(4096);
    let mem = region.as_slice();
    let mut lat: Vec<Duration> = order
        .iter()
        .map(|&c| {
            let t = Instant::now();
            std::hint::black_box(mem[(c * chunk) as usize]);
            t.elapsed()
        })
        .collect();
    lat.sort();
    let median = lat[lat.len() / 2];
    let p99 = lat[lat.len() * 99 / 100];
    drop(region);

    println!("Slice frontend, {gib} GiB, chunk {chunk_kib} KiB, 2-thread fetch runtime, memory backend\n");
    println!("| measurement | time | GB/s | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| warm memcpy | {warm:.2?} | {:.2} | 1.00 (of warm) |",
        gbps(size, warm)
    );
    println!(
        "| first-touch memcpy (fresh anonymous mapping) | {first_touch:.2?} | {:.2} | {:.2} of warm |",
        gbps(size, first_touch),
        warm.as_secs_f64() / first_touch.as_secs_f64()
    );
    println!(
        "| (a) cold read through the region ({cold_faults} faults) | {cold:.2?} | {:.2} | **{:.2} of first-touch** (target >= 0.5) |",
        gbps(size, cold),
        first_touch.as_secs_f64() / cold.as_secs_f64()
    );
    println!(
        "| (b) background population by the puller | {populate:.2?} | {:.2} | {:.2} of first-touch |",
        gbps(size, populate),
        first_touch.as_secs_f64() / populate.as_secs_f64()
    );
    println!(
        "| (b) read of the populated region ({} faults) | {populated:.2?} | {:.2} | **{:.2} of warm** (target >= 0.9) |",
        populated_faults,
        gbps(size, populated),
        warm.as_secs_f64() / populated.as_secs_f64()
    );
    println!(
        "| (c) per-fault latency, {} faults of one {chunk_kib} KiB chunk | median {median:.1?}, p99 {p99:.1?} | | |",
        lat.len()
    );
    println!(
        "| (d) PAGEMAP_SCAN + re-protect, 1% pages dirty ({} chunks reported) | {:.2?} per GiB | | clean rescan {:.2?} per GiB |",
        dirty.len(),
        scan_dirty / gib as u32,
        scan_clean / gib as u32
    );
    Ok(())
}
