//! Issue 5's table: throughput of the file frontend (FUSE) and the path frontend (loop over
//! FUSE) against the same memory backend called directly: sequential and random reads and
//! writes of 4 KiB and 1 MiB, one request at a time.
//!
//! The FUSE file and the loop device are opened with `O_DIRECT`, so every request goes through
//! the frontend to the backend rather than being served by (or parked in) the page cache: the
//! figures measure the frontend, not memory copies of cached pages. Every path gets a warm-up
//! pass (an eighth of the case) before its measured pass.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use r3map_core::{Backend, MemoryBackend, SharedBackend};
use r3map_fuse::{DiskMount, FileOptions, LoopOptions};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// A 4096-aligned buffer (O_DIRECT needs aligned memory).
pub struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    pub fn new(len: usize) -> Self {
        let storage = vec![0x5Au8; len + 4096];
        let start = storage.as_ptr().align_offset(4096);
        Self { storage, start, len }
    }
    pub fn get(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

#[derive(Clone, Copy)]
struct Case {
    write: bool,
    random: bool,
    block: u64,
    /// Bytes moved per measurement.
    total: u64,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "{} {}",
            if self.random { "random" } else { "sequential" },
            if self.write { "write" } else { "read" }
        )
    }
    fn offsets(&self, size: u64) -> Vec<u64> {
        let count = self.total / self.block;
        let blocks = size / self.block;
        let mut rng = SmallRng::seed_from_u64(42);
        (0..count)
            .map(|i| {
                let index = if self.random {
                    rng.gen_range(0..blocks)
                } else {
                    i % blocks
                };
                index * self.block
            })
            .collect()
    }
}

fn through_file(file: &File, case: Case, offsets: &[u64]) -> Duration {
    let mut buf = Aligned::new(case.block as usize);
    let start = Instant::now();
    for &offset in offsets {
        if case.write {
            file.write_all_at(buf.get(), offset).expect("write");
        } else {
            file.read_exact_at(buf.get(), offset).expect("read");
        }
    }
    start.elapsed()
}

fn direct(rt: &tokio::runtime::Runtime, backend: &SharedBackend, case: Case, offsets: &[u64]) -> Duration {
    let mut buf = vec![0x5Au8; case.block as usize];
    rt.block_on(async {
        let start = Instant::now();
        for &offset in offsets {
            if case.write {
                backend.write_at(offset, &buf).await.expect("write");
            } else {
                backend.read_at(offset, &mut buf).await.expect("read");
            }
        }
        start.elapsed()
    })
}

pub fn open_direct(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|err| panic!("open {} with O_DIRECT: {err}", path.display()))
}

pub fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e6
}

/// Prints the table for a memory backend of `size_mib` MiB mounted with `options`.
pub fn run(rt: &tokio::runtime::Runtime, size_mib: u64, options: &FileOptions) {
    let size = size_mib * MIB;
    let backend: SharedBackend = Arc::new(MemoryBackend::new(size));
    // Touch every page first, so no measurement pays for first-touch page faults.
    rt.block_on(async {
        let chunk = vec![0xA5u8; MIB as usize];
        for offset in (0..size).step_by(MIB as usize) {
            backend.write_at(offset, &chunk).await.unwrap();
        }
    });
    let scratch = tempfile::Builder::new()
        .prefix("r3map-bench-fuse-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut disk = DiskMount::open_with(
        backend.clone(),
        scratch.path(),
        "disk",
        rt.handle().clone(),
        options,
        &LoopOptions::default(),
    )
    .expect("open the disk (run as root)");
    let file = open_direct(disk.file().path());
    let device = open_direct(disk.path());

    println!(
        "backend: memory, {size_mib} MiB; {}; loop device {} (direct I/O {}); one request at a \
         time; FUSE file and loop device opened with O_DIRECT\n",
        disk.file().transport(),
        disk.path().display(),
        if disk.device().direct_io() { "on" } else { "off" }
    );
    println!("| operation | block | direct (MB/s) | FUSE file (MB/s) | file / direct | loop device (MB/s) | loop / direct |");
    println!("|---|---|---|---|---|---|---|");
    for block in [4 * KIB, MIB] {
        for (write, random) in [(false, false), (false, true), (true, false), (true, true)] {
            let total = if block == MIB { size } else { (32 * MIB).min(size) };
            let case = Case {
                write,
                random,
                block,
                total,
            };
            let offsets = case.offsets(size);
            // A warm-up pass of each path (an eighth of the case), then the measured ones.
            let warm_up = Case {
                total: total / 8,
                ..case
            };
            let warm_offsets = &offsets[..offsets.len() / 8];
            let _ = direct(rt, &backend, warm_up, warm_offsets);
            let _ = through_file(&file, warm_up, warm_offsets);
            let _ = through_file(&device, warm_up, warm_offsets);
            let d = mb_per_s(total, direct(rt, &backend, case, &offsets));
            let f = mb_per_s(total, through_file(&file, case, &offsets));
            let l = mb_per_s(total, through_file(&device, case, &offsets));
            let label = if block == MIB {
                "1 MiB".to_string()
            } else {
                "4 KiB".to_string()
            };
            println!(
                "| {} | {label} | {d:.0} | {f:.0} | {:.3} | {l:.0} | {:.3} |",
                case.name(),
                f / d,
                l / d
            );
        }
    }
    drop(file);
    drop(device);
    disk.close_blocking().expect("close");
    println!();
}
