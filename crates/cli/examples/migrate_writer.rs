//! A program that keeps changing its state while `r3map migrate` moves it: the workload of the
//! migration tests.
//!
//! Usage:
//!   migrate_writer file PATH RATE HOT    writes 4 KiB blocks into the file at PATH
//!   migrate_writer slice SOCKET BYTES RATE HOT
//!                                        hands its memory to `r3map migrate seed --frontend
//!                                        slice` at SOCKET, then writes 4 KiB blocks into it
//!
//! Blocks land at pseudo-random offsets within the first HOT bytes (the working set; 0: all of
//! it) with pseudo-random content, RATE blocks per second (0: as fast as it can). It prints `writing` once the first block is written and then runs
//! until it is killed; the migration's seeder stops it (SIGSTOP) at finalize, so what the
//! destination must hold is exactly the state at that moment.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use r3map_frontends::slice::hand_over;

const BLOCK: usize = 4096;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Calls `write(offset, block)` RATE times a second (or flat out) forever, within `hot` bytes.
fn write_forever(len: usize, hot: usize, rate: u64, mut write: impl FnMut(usize, &[u8])) -> ! {
    let len = if hot == 0 { len } else { hot.min(len) };
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id()));
    let blocks = (len / BLOCK).max(1) as u64;
    let mut block = vec![0u8; BLOCK];
    let started = Instant::now();
    for written in 0u64.. {
        let offset = (rng.next() % blocks) as usize * BLOCK;
        let value = rng.next();
        for (i, byte) in block.iter_mut().enumerate() {
            *byte = (value >> ((i % 8) * 8)) as u8 ^ i as u8;
        }
        write(offset, &block);
        if written == 0 {
            println!("writing");
            let _ = std::io::stdout().flush();
        }
        if rate > 0 {
            // A steady workload, not synchronisation: the next block is due at written/rate.
            let due = started + Duration::from_secs_f64((written + 1) as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    unreachable!()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("file") if args.len() == 5 => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&args[2])?;
            let len = file.metadata()?.len() as usize;
            let rate: u64 = args[3].parse()?;
            let hot: usize = args[4].parse()?;
            write_forever(len, hot, rate, |offset, block| {
                file.write_all_at(block, offset as u64)
                    .expect("write to the migrated file");
            })
        }
        Some("slice") if args.len() == 6 => {
            let len: usize = args[3].parse()?;
            let rate: u64 = args[4].parse()?;
            let hot: usize = args[5].parse()?;
            let (mut memory, _served_while_open) =
                hand_over(Path::new(&args[2]), len, std::time::Duration::from_secs(60))?;
            let memory = memory.as_mut_slice();
            write_forever(len, hot, rate, |offset, block| {
                memory[offset..offset + block.len()].copy_from_slice(block);
            })
        }
        _ => Err(
            "usage: migrate_writer file PATH RATE HOT | migrate_writer slice SOCKET BYTES RATE HOT".into(),
        ),
    }
}
