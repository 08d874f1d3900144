//! `r3map mirror`: a managed mount of a remote into a local cache, end to end — background pull
//! with progress, a write workload while pulling, push back on sync, and a byte-for-byte check.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use r3map_core::stages::{PullerOptions, PusherOptions};
use r3map_core::{Backend, MemoryBackend, SharedBackend};
use r3map_mount::{format_bytes, parse_size, ManagedMount, ManagedOptions};
use rand::{Rng, SeedableRng};

use crate::progress::throughput;

/// Mirror a remote into a local cache (managed mount): pull, write, push back, verify
///
/// Pulls every chunk in the background (with a progress bar), applies a random write workload
/// while pulling, pushes the writes back, and verifies byte for byte that the remote and the
/// local view agree. Without arguments it runs on an embedded remote (in-process memory filled with demo data).
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Remote backend specification [default: embedded memory filled with demo data]
    #[arg(long)]
    remote: Option<String>,
    /// Local cache backend specification [default: memory of the remote's size]
    #[arg(long)]
    cache: Option<String>,
    /// Size of the embedded remote
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    size: u64,
    /// Unit of transfer and tracking
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    chunk_size: u64,
    /// Concurrent background pulls
    #[arg(long, default_value_t = 64)]
    pull_workers: usize,
    /// Concurrent pushes per flush
    #[arg(long, default_value_t = 64)]
    push_workers: usize,
    /// Time between background pushes, in milliseconds
    #[arg(long, default_value_t = 1000)]
    push_interval_ms: u64,
    /// Share of the resource to overwrite with random writes while pulling
    /// [default: 10 on the embedded remote, 0 on a remote you name, whose data it would change]
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=100))]
    write_percent: Option<u64>,
    /// Seed for the demo data and the write workload
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    remote_options: crate::remote::RemoteArgs,
    #[command(flatten)]
    metrics: crate::metrics::MetricsArgs,
}

pub async fn run(args: Args) -> Result<()> {
    let metrics = args.metrics.start().await?;
    let options = metrics.remote_options(args.remote_options.options()?);
    let (remote, remote_name, default_writes) = match &args.remote {
        Some(spec) => (crate::remote::open(spec, None, &options).await?, spec.clone(), 0),
        None => (
            embedded_remote(args.size, args.seed).await?,
            format!("embedded memory:{}", format_bytes(args.size)),
            10,
        ),
    };
    let remote = metrics.meter(remote, crate::metrics::Role::remote);
    let size = remote.size();
    let cache = match &args.cache {
        Some(spec) => crate::remote::open(spec, Some(size), &args.remote_options.options()?).await?,
        None => Arc::new(MemoryBackend::new(size)),
    };
    if cache.size() != size {
        bail!(
            "the cache has {} but the remote has {}; they must be the same size",
            format_bytes(cache.size()),
            format_bytes(size)
        );
    }
    let options = ManagedOptions {
        chunk_size: args.chunk_size,
        puller: PullerOptions {
            workers: args.pull_workers,
            ..Default::default()
        },
        pusher: PusherOptions {
            workers: args.push_workers,
            interval: Duration::from_millis(args.push_interval_ms),
        },
        ..Default::default()
    };
    eprintln!(
        "mirroring {remote_name} ({}) into {} in {} chunks",
        format_bytes(size),
        args.cache.as_deref().unwrap_or("memory"),
        format_bytes(args.chunk_size)
    );

    let started = Instant::now();
    let mount = ManagedMount::open(remote.clone(), cache, options)
        .await
        .context("cannot open the managed mount")?;
    metrics.managed_mount(&mount);
    let writes = tokio::spawn(write_workload(
        mount.backend(),
        args.write_percent.unwrap_or(default_writes),
        args.chunk_size,
        args.seed,
    ));
    crate::progress::follow_pull(&mount).await;
    mount.wait_pulled().await.context("the background pull failed")?;
    let pulled_in = started.elapsed();
    let (written_bytes, write_count) = writes.await.context("the write workload panicked")??;

    let sync_started = Instant::now();
    mount.sync().await.context("pushing the writes back failed")?;
    let synced_in = sync_started.elapsed();
    let stats = mount.stats();
    let checksum = verify_equal(&*mount.backend(), &*remote).await?;
    mount.close().await.context("the final sync failed")?;

    println!(
        "pulled   {} in {:.2} s ({}) with {} workers",
        format_bytes(size),
        pulled_in.as_secs_f64(),
        throughput(size, pulled_in),
        args.pull_workers
    );
    println!(
        "wrote    {} locally in {write_count} random writes while pulling",
        format_bytes(written_bytes)
    );
    println!(
        "pushed   {} to the remote (final sync {:.1} ms)",
        format_bytes(stats.pushed_bytes),
        synced_in.as_secs_f64() * 1e3
    );
    println!("verified remote and local view are identical (crc32 {checksum:08x})");
    Ok(())
}

/// A memory remote filled with reproducible demo data.
async fn embedded_remote(size: u64, seed: u64) -> Result<SharedBackend> {
    Ok(Arc::new(crate::demo::memory(size, seed).await?))
}

/// Random unaligned writes covering about `percent`% of the resource; returns (bytes, count).
async fn write_workload(
    backend: SharedBackend,
    percent: u64,
    chunk_size: u64,
    seed: u64,
) -> Result<(u64, u64)> {
    let size = backend.size();
    let budget = size / 100 * percent;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let (mut written, mut count) = (0u64, 0u64);
    while written < budget {
        let len = rng.gen_range(1..=(2 * chunk_size).min(size).min(budget - written));
        let offset = rng.gen_range(0..=size - len);
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data[..]);
        backend
            .write_at(offset, &data)
            .await
            .with_context(|| format!("writing {len} bytes at {offset}"))?;
        written += len;
        count += 1;
    }
    Ok((written, count))
}

/// Compares two backends piece by piece; returns the CRC-32 of their (equal) content.
async fn verify_equal(local: &dyn Backend, remote: &dyn Backend) -> Result<u32> {
    let size = local.size();
    let mut hasher = crc32fast::Hasher::new();
    let (mut a, mut b) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    let mut offset = 0;
    while offset < size {
        let n = a.len().min((size - offset) as usize);
        local.read_at(offset, &mut a[..n]).await?;
        remote.read_at(offset, &mut b[..n]).await?;
        if a[..n] != b[..n] {
            let at = offset + a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(0) as u64;
            bail!("verification failed: the remote differs from the local view at byte {at}");
        }
        hasher.update(&a[..n]);
        offset += n as u64;
    }
    Ok(hasher.finalize())
}
