//! Side-by-side benchmark of the block-device frontends over one in-memory backend, run in the
//! guest by `scripts/vm-test --bench`: sequential and random reads and writes (O_DIRECT, one
//! request at a time) through the kernel NBD client (netlink, in-process server over socket
//! pairs), ublk and FUSE + loop, plus the backend called directly as the ceiling.
//!
//! Under TCG the absolute figures mean little (every instruction is emulated); compare the
//! ratios, which come from one run on one machine. Prints a markdown table and
//! `R3MAP-BENCH-DONE`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use r3map_blockdev::{NbdDevice, NbdMethod, NbdOptions, UblkDevice, UblkOptions};
use r3map_core::{Backend, MemoryBackend, SharedBackend};
use r3map_fuse::DiskMount;

const SIZE: u64 = 128 << 20;
const SEQ_BLOCK: usize = 1 << 20;
const RANDOM_BLOCK: usize = 4096;
const RANDOM_OPS: u64 = 4096;
const ALIGN: usize = 4096;

#[derive(Clone, Copy)]
enum Workload {
    SeqWrite,
    SeqRead,
    RandWrite,
    RandRead,
}

const WORKLOADS: [(Workload, &str); 4] = [
    (Workload::SeqWrite, "sequential write 1 MiB"),
    (Workload::SeqRead, "sequential read 1 MiB"),
    (Workload::RandWrite, "random write 4 KiB"),
    (Workload::RandRead, "random read 4 KiB"),
];

/// Offsets of the random workloads (a fixed LCG, so every frontend gets the same ones).
fn random_offsets() -> Vec<u64> {
    let blocks = SIZE / RANDOM_BLOCK as u64;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..RANDOM_OPS)
        .map(|_| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (state >> 33) % blocks * RANDOM_BLOCK as u64
        })
        .collect()
}

struct Aligned {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let mut storage = vec![0xa5u8; len + ALIGN];
        let offset = storage.as_mut_ptr().align_offset(ALIGN);
        Self { storage, offset, len }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

/// Runs `workload` against a block device; returns bytes per second.
fn run_device(path: &Path, workload: Workload) -> Result<f64> {
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let start = Instant::now();
    let bytes = match workload {
        Workload::SeqWrite | Workload::SeqRead => {
            let mut buf = Aligned::new(SEQ_BLOCK);
            for i in 0..SIZE / SEQ_BLOCK as u64 {
                let at = i * SEQ_BLOCK as u64;
                if matches!(workload, Workload::SeqWrite) {
                    file.write_all_at(buf.get(), at)?;
                } else {
                    file.read_exact_at(buf.get(), at)?;
                }
            }
            if matches!(workload, Workload::SeqWrite) {
                file.sync_all()?;
            }
            SIZE
        }
        Workload::RandWrite | Workload::RandRead => {
            let mut buf = Aligned::new(RANDOM_BLOCK);
            for at in random_offsets() {
                if matches!(workload, Workload::RandWrite) {
                    file.write_all_at(buf.get(), at)?;
                } else {
                    file.read_exact_at(buf.get(), at)?;
                }
            }
            if matches!(workload, Workload::RandWrite) {
                file.sync_all()?;
            }
            RANDOM_OPS * RANDOM_BLOCK as u64
        }
    };
    Ok(bytes as f64 / start.elapsed().as_secs_f64())
}

/// The same workload on the backend itself (one request at a time, from a blocking thread).
fn run_backend(backend: &SharedBackend, runtime: &tokio::runtime::Handle, workload: Workload) -> Result<f64> {
    let start = Instant::now();
    let bytes = runtime.block_on(async {
        let r: Result<u64> = async {
            match workload {
                Workload::SeqWrite | Workload::SeqRead => {
                    let mut buf = vec![0xa5u8; SEQ_BLOCK];
                    for i in 0..SIZE / SEQ_BLOCK as u64 {
                        let at = i * SEQ_BLOCK as u64;
                        if matches!(workload, Workload::SeqWrite) {
                            backend.write_at(at, &buf).await?;
                        } else {
                            backend.read_at(at, &mut buf).await?;
                        }
                    }
                    Ok(SIZE)
                }
                Workload::RandWrite | Workload::RandRead => {
                    let mut buf = vec![0xa5u8; RANDOM_BLOCK];
                    for at in random_offsets() {
                        if matches!(workload, Workload::RandWrite) {
                            backend.write_at(at, &buf).await?;
                        } else {
                            backend.read_at(at, &mut buf).await?;
                        }
                    }
                    Ok(RANDOM_OPS * RANDOM_BLOCK as u64)
                }
            }
        }
        .await;
        r
    })?;
    Ok(bytes as f64 / start.elapsed().as_secs_f64())
}

fn mib(rate: f64) -> String {
    format!("{:.1}", rate / f64::from(1 << 20))
}

fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut columns: Vec<(&str, Vec<f64>)> = Vec::new();

    let backend: SharedBackend = Arc::new(MemoryBackend::new(SIZE));
    let direct = WORKLOADS
        .iter()
        .map(|(w, _)| run_backend(&backend, &handle, *w))
        .collect::<Result<Vec<_>>>()?;
    columns.push(("backend (direct calls)", direct));

    let backend: SharedBackend = Arc::new(MemoryBackend::new(SIZE));
    let nbd = runtime.block_on(NbdDevice::attach(
        backend,
        NbdOptions {
            connections: cpus.max(2),
            method: NbdMethod::Netlink,
            ..NbdOptions::default()
        },
    ))?;
    let rates = WORKLOADS
        .iter()
        .map(|(w, _)| run_device(nbd.path(), *w))
        .collect::<Result<Vec<_>>>()?;
    runtime.block_on(nbd.disconnect())?;
    columns.push(("NBD (kernel client, netlink)", rates));

    let backend: SharedBackend = Arc::new(MemoryBackend::new(SIZE));
    let ublk = runtime.block_on(UblkDevice::start(
        backend,
        UblkOptions {
            queues: cpus.min(4) as u16,
            depth: 64,
            ..UblkOptions::default()
        },
    ))?;
    let rates = WORKLOADS
        .iter()
        .map(|(w, _)| run_device(ublk.path(), *w))
        .collect::<Result<Vec<_>>>()?;
    runtime.block_on(ublk.stop())?;
    columns.push(("ublk", rates));

    let backend: SharedBackend = Arc::new(MemoryBackend::new(SIZE));
    let mountpoint = Path::new("/tmp/r3map-fuse");
    std::fs::create_dir_all(mountpoint)?;
    match DiskMount::open(backend, mountpoint, "disk", handle.clone()) {
        Ok(mut disk) => {
            let rates = WORKLOADS
                .iter()
                .map(|(w, _)| run_device(disk.path(), *w))
                .collect::<Result<Vec<_>>>()?;
            runtime.block_on(disk.close())?;
            columns.push(("FUSE + loop", rates));
        }
        Err(err) => println!("FUSE + loop unavailable in this guest: {err}"),
    }

    println!();
    println!(
        "Throughput in MiB/s under QEMU TCG ({cpus} vCPUs; absolute figures are distorted by emulation):"
    );
    println!();
    print!("| workload |");
    for (name, _) in &columns {
        print!(" {name} |");
    }
    println!();
    println!("|---|{}", "---:|".repeat(columns.len()));
    for (row, (_, label)) in WORKLOADS.iter().enumerate() {
        print!("| {label} |");
        for (_, rates) in &columns {
            print!(" {} |", mib(rates[row]));
        }
        println!();
    }
    println!();
    println!("Ratios (column / NBD, same run):");
    println!();
    let nbd_rates = columns[1].1.clone();
    print!("| workload |");
    for (name, _) in &columns[1..] {
        print!(" {name} |");
    }
    println!();
    println!("|---|{}", "---:|".repeat(columns.len() - 1));
    for (row, (_, label)) in WORKLOADS.iter().enumerate() {
        print!("| {label} |");
        for (_, rates) in &columns[1..] {
            print!(" {:.2} |", rates[row] / nbd_rates[row]);
        }
        println!();
    }
    println!();
    println!("R3MAP-BENCH-DONE");
    Ok(())
}
