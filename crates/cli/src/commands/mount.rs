//! `r3map mount`: a remote as a local file or block device, direct or managed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use r3map_core::stages::{Arbitrary, Priority, PullerOptions, PusherOptions};
use r3map_core::{Backend, ChunkLayout, MemoryBackend, SharedBackend};
use r3map_mount::{
    format_bytes, parse_duration, parse_size, ManagedMount, ManagedOptions, PersistentCache, SyncTo,
};
use r3map_nbd::{Export, Server, ServerConfig};

use crate::frontend::{Frontend, Mounted};
use crate::metrics::Role;
use crate::progress::throughput;
use crate::shutdown::{self, Holder};

/// Mount a remote as a local file or block device
///
/// Direct (default): every read and write goes to the remote. Managed (--managed): reads are
/// served from a local cache that background workers fill, writes land locally and are pushed
/// to the remote every --push-interval and on exit. Every remote request has a deadline
/// (--remote-timeout): past it the application gets EIO and the connection is made anew.
///
/// Runs until SIGINT/SIGTERM, then flushes, pushes once more and unmounts (the slice frontend
/// first writes back what connected programs changed since their last sync, then stops serving
/// them: pages they never touched raise SIGBUS). A remote that takes
/// no data for --remote-timeout + 5 s (dead or frozen) ends this: the mount exits with an error
/// saying how many bytes were not pushed and where they are (kept in the --cache directory and
/// pushed on the next start, or lost with the in-memory cache). A second signal exits at once
/// with the same account. If a frontend is busy (e.g. a filesystem is mounted on the loop
/// device), it says so and keeps running: signal again after freeing it.
/// The third signal gives up and detaches it.
///
/// Without REMOTE it runs a demo: an embedded NBD server (loopback TCP) with 256 MiB of demo
/// data is mounted, the file is read and written through the kernel, the writes are pushed and
/// verified, and it unmounts (add --hold to keep it mounted until Ctrl-C).
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Remote, e.g. nbd://127.0.0.1:10809/default [default: embedded demo server]
    remote: Option<String>,
    /// Directory to mount the file frontend on, or the socket path for the slice frontend
    /// [default: in a new temporary directory]
    target: Option<PathBuf>,
    /// Managed mount: local cache, background pull and push
    #[arg(long)]
    managed: bool,
    /// How the resource appears: file (FUSE), disk (a loop device over the FUSE file), nbd (the
    /// kernel's NBD client, /dev/nbdN), ublk (a userspace block device, /dev/ublkbN), or slice
    /// (memory of programs that hand their userfaultfd to TARGET, a UNIX socket)
    #[arg(long, value_enum, default_value_t = Frontend::File)]
    frontend: Frontend,
    /// Persistent cache directory for a managed mount (survives restarts) [default: memory]
    #[arg(long, requires = "managed")]
    cache: Option<PathBuf>,
    /// Name of the file in the mount
    #[arg(long, default_value = "data")]
    name: String,
    /// Unit of transfer and tracking
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    chunk_size: u64,
    /// Concurrent background pulls (managed)
    #[arg(long, default_value_t = 512)]
    pull_workers: usize,
    /// Pull order (managed): sequential, reverse, or ranges-first (the byte ranges of
    /// --pull-ranges first, in the order listed, then the rest from the start)
    #[arg(long, value_enum, default_value_t = PullOrder::Sequential)]
    pull_order: PullOrder,
    /// File of byte ranges to pull first, one `OFFSET LENGTH` a line (sizes like 4KiB allowed,
    /// `#` comments), e.g. a database's header and index pages; implies --pull-order ranges-first
    #[arg(long, value_name = "FILE")]
    pull_ranges: Option<PathBuf>,
    /// Pull everything before the mount appears (managed)
    #[arg(long)]
    pull_first: bool,
    /// Fetch the remote's holes too (managed). By default the background pull asks the remote
    /// where its holes are (NBD base:allocation) and makes chunks that lie wholly in one local
    /// zeros without a transfer
    #[arg(long)]
    pull_holes: bool,
    /// What an fsync waits for (managed): remote (the remote holds the writes), or cache (the
    /// --cache directory holds them durably and the background push takes them to the remote
    /// when it can: reads of local chunks and writes go on while the remote is away)
    #[arg(long, value_enum, default_value_t = SyncTarget::Remote)]
    sync_to: SyncTarget,
    /// Concurrent pushes (managed)
    #[arg(long, default_value_t = 64)]
    push_workers: usize,
    /// Time between background pushes (managed)
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    push_interval: Duration,
    /// Turn on FUSE over io_uring in this kernel before mounting (file and disk frontends):
    /// writes Y to /sys/module/fuse/parameters/enable_uring, which changes it for every FUSE
    /// filesystem mounted afterwards (root only; `echo N` there turns it off again). Without
    /// this flag the mount uses io_uring only if it is already on, else /dev/fuse
    #[arg(long)]
    fuse_uring: bool,
    /// Keep the demo mounted until Ctrl-C instead of running its checks
    #[arg(long)]
    hold: bool,
    /// After the demo's checks and unmount, keep serving the demo remote until Ctrl-C, so other
    /// NBD clients can look at what the server holds
    #[arg(long, conflicts_with_all = ["remote", "hold"])]
    keep_serving: bool,
    /// Keep this process's memory in RAM (mlockall, each page from its first use): needed when
    /// the device is swap (`mkswap` + `swapon` on the nbd or ublk frontend), so that the
    /// process serving the swap device is never swapped out to it. Needs CAP_IPC_LOCK or a
    /// large enough RLIMIT_MEMLOCK
    #[arg(long)]
    mlock: bool,
    #[command(flatten)]
    remote_options: crate::remote::RemoteArgs,
    #[command(flatten)]
    metrics: crate::metrics::MetricsArgs,
}

/// mlockall: what is mapped now and later stays in RAM once touched (MCL_ONFAULT: thread stacks
/// and buffers are not populated in full up front).
fn lock_memory() -> Result<()> {
    use nix::sys::mman::{mlockall, MlockAllFlags};
    let flags = MlockAllFlags::MCL_CURRENT
        | MlockAllFlags::MCL_FUTURE
        | MlockAllFlags::from_bits_retain(nix::libc::MCL_ONFAULT);
    mlockall(flags)
        .context("--mlock: mlockall failed (needs CAP_IPC_LOCK or a larger RLIMIT_MEMLOCK, see ulimit -l)")
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SyncTarget {
    Remote,
    Cache,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PullOrder {
    Sequential,
    Reverse,
    RangesFirst,
}

pub async fn run(args: Args) -> Result<()> {
    let mut signals = crate::ShutdownSignals::catch()?;
    args.frontend.check_supported()?;
    if args.fuse_uring {
        crate::frontend::turn_on_fuse_uring();
    }
    if args.mlock {
        lock_memory()?;
    }
    let metrics = args.metrics.start().await?;
    let demo = args.remote.is_none();
    // The demo server lives as long as this function.
    let (uri, demo_export) = match &args.remote {
        Some(uri) => (uri.clone(), None),
        None => {
            let (uri, export) = demo_server().await?;
            eprintln!("demo: serving 256 MiB of demo data at {uri}");
            (uri, Some(export))
        }
    };
    let options = metrics.remote_options(args.remote_options.options()?);
    let remote = metrics.meter(crate::remote::open(&uri, None, &options).await?, Role::remote);
    let size = remote.size();
    let slice = matches!(args.frontend, Frontend::Slice);
    if slice && demo && !args.hold {
        bail!("the slice frontend serves other programs: give a remote or --hold, then point a program at the socket");
    }
    let (_temp_dir, target) = match &args.target {
        Some(path) if slice => (None, path.clone()),
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            (None, dir.clone())
        }
        None => {
            let dir = tempfile::Builder::new()
                .prefix("r3map-mount-")
                .tempdir()
                .context("cannot create a mountpoint")?;
            let path = if slice {
                dir.path().join("r3map.sock")
            } else {
                dir.path().to_path_buf()
            };
            (Some(dir), path)
        }
    };

    let started = Instant::now();
    let managed = if args.managed || demo {
        let mount = open_managed(&args, &uri, remote.clone(), size).await?;
        metrics.managed_mount(&mount);
        Some(mount)
    } else {
        None
    };
    let backend: SharedBackend = match &managed {
        Some(mount) => mount.backend(),
        None => Arc::new(Arbitrary::new(remote.clone(), args.chunk_size)?),
    };
    let mut mounted = Mounted::open(args.frontend, backend, &target, &args.name, &metrics).await?;
    let kind = if managed.is_some() { "managed" } else { "direct" };
    eprintln!(
        "mounted {} ({}, {kind}) at {}",
        uri,
        format_bytes(size),
        mounted.path().display()
    );
    if let Some(transport) = mounted.fuse_transport() {
        eprintln!("FUSE transport: {transport}");
    }

    // A signal during the background pull stops waiting for it and goes straight to unmounting.
    let mut signalled = false;
    if let Some(mount) = &managed {
        tokio::select! {
            _ = show_pull_progress(mount) => {}
            _ = signals.recv() => signalled = true,
        }
    }
    if let (Some(export), false, false) = (demo_export, args.hold, signalled) {
        let outcome = demo_checks(mounted.path(), size).await;
        let mount = managed.context("the demo mount is managed")?;
        finish_demo(&mut mounted, mount, started).await?;
        let (read, written) = outcome?;
        println!(
            "demo: read {} through the kernel ({read}) and verified it",
            format_bytes(size)
        );
        let mut on_server = vec![0u8; DEMO_WRITE.1 as usize];
        export.read_at(DEMO_WRITE.0, &mut on_server).await?;
        if on_server != demo_pattern() {
            bail!("the server does not hold the demo's writes after the final push");
        }
        println!(
            "demo: wrote {} through the file; pushed and verified on the server",
            format_bytes(written)
        );
        if args.keep_serving {
            eprintln!("demo: still serving {uri} until Ctrl-C or SIGTERM");
            signals.recv().await;
        }
        return Ok(());
    }
    let stall_limit = args.remote_options.timeout() + shutdown::GRACE;
    eprintln!(
        "Ctrl-C or SIGTERM flushes, pushes and unmounts (giving up once the remote takes no data \
         for {:.0} s; a second signal exits at once)",
        stall_limit.as_secs_f64()
    );
    let holder = match (&managed, &args.cache) {
        (None, _) => Holder::Direct,
        (Some(_), None) => Holder::Memory,
        (Some(_), Some(dir)) => Holder::Persistent(dir.clone()),
    };
    let unpushed = |managed: &Option<ManagedMount>| managed.as_ref().map_or(0, |m| m.stats().dirty_bytes);
    for attempt in 1..=GIVE_UP_AFTER {
        if attempt > 1 || !signalled {
            signals.recv().await;
        }
        if let Some(mount) = &managed {
            eprintln!(
                "unmounting and pushing {} to {uri}",
                format_bytes(mount.stats().dirty_bytes)
            );
        }
        let pushed = || managed.as_ref().map_or(0, |m| m.stats().pushed_bytes);
        let close = async {
            mounted.close().await?;
            match &managed {
                Some(mount) => mount.sync().await.context("the final push failed"),
                None => Ok(()),
            }
        };
        let failure = match shutdown::bounded(close, &mut signals, pushed, stall_limit).await {
            Ok(Ok(())) => {
                return finish(
                    mounted,
                    managed,
                    started,
                    &mut signals,
                    stall_limit,
                    &uri,
                    &holder,
                )
                .await
            }
            Ok(Err(err)) if !shutdown::remote_failed(&err) && attempt < GIVE_UP_AFTER => {
                eprintln!(
                    "cannot unmount yet: {err}; still mounted. Signal again to retry ({} more to give up)",
                    GIVE_UP_AFTER - attempt
                );
                continue;
            }
            Ok(Err(err)) => format!("{err:#}"),
            Err(abandoned) => abandoned.to_string(),
        };
        let account = shutdown::account(unpushed(&managed), &uri, &holder);
        give_up(mounted, managed);
        bail!("gave up unmounting cleanly: {failure}; {account}");
    }
    unreachable!("the loop returns")
}

/// Detaches the frontend (lazily if it is busy) and drops the mount without waiting for
/// anything that still waits for the remote.
fn give_up(mounted: Mounted, managed: Option<ManagedMount>) {
    shutdown::drop_within((mounted, managed), Duration::from_secs(1));
}

/// After the frontend is unmounted and everything pushed: closes the managed mount (its final
/// remote flush, bounded like the push) and prints a summary.
async fn finish(
    mounted: Mounted,
    managed: Option<ManagedMount>,
    started: Instant,
    signals: &mut crate::ShutdownSignals,
    stall_limit: Duration,
    uri: &str,
    holder: &Holder,
) -> Result<()> {
    drop(mounted);
    let Some(mount) = managed else {
        eprintln!("unmounted after {:.1} s", started.elapsed().as_secs_f64());
        return Ok(());
    };
    let (fetched, stats) = (mount.fetched_chunks(), mount.stats());
    match shutdown::bounded(mount.close(), signals, || 0, stall_limit).await {
        Ok(Ok(())) => {
            eprintln!(
                "unmounted after {:.1} s: fetched {fetched} chunks from the remote, pushed {}",
                started.elapsed().as_secs_f64(),
                format_bytes(stats.pushed_bytes)
            );
            Ok(())
        }
        Ok(Err(err)) => bail!(
            "the final flush failed: {err}; {}",
            shutdown::account(stats.dirty_bytes, uri, holder)
        ),
        Err(abandoned) => bail!(
            "gave up the final flush: {abandoned}; {}",
            shutdown::account(stats.dirty_bytes, uri, holder)
        ),
    }
}

/// The demo's unmount and final push (its remote is in this process).
async fn finish_demo(mounted: &mut Mounted, mount: ManagedMount, started: Instant) -> Result<()> {
    mounted.close().await.context("unmounting failed")?;
    let (fetched, stats) = (mount.fetched_chunks(), mount.stats());
    mount.close().await.context("the final push failed")?;
    eprintln!(
        "unmounted after {:.1} s: fetched {fetched} chunks from the remote, pushed {}",
        started.elapsed().as_secs_f64(),
        format_bytes(stats.pushed_bytes)
    );
    Ok(())
}

async fn open_managed(args: &Args, uri: &str, remote: SharedBackend, size: u64) -> Result<ManagedMount> {
    let priority = match (args.pull_order, &args.pull_ranges) {
        (PullOrder::Sequential | PullOrder::RangesFirst, Some(path)) => {
            let ranges = crate::pull_ranges::read(path, size)?;
            Priority::ranges_first(ChunkLayout::new(size, args.chunk_size)?, ranges)
        }
        (PullOrder::RangesFirst, None) => {
            bail!("--pull-order ranges-first needs --pull-ranges FILE (the byte ranges to pull first)")
        }
        (PullOrder::Reverse, Some(_)) => {
            bail!("--pull-ranges sets the pull order: drop --pull-order reverse")
        }
        (PullOrder::Sequential, None) => Priority::sequential(),
        (PullOrder::Reverse, None) => Priority::reverse(),
    };
    let options = ManagedOptions {
        chunk_size: args.chunk_size,
        puller: PullerOptions {
            workers: args.pull_workers,
            priority,
        },
        pusher: PusherOptions {
            workers: args.push_workers,
            interval: args.push_interval,
        },
        pull_first: args.pull_first,
        skip_holes: !args.pull_holes,
        sync_to: match (args.sync_to, &args.cache) {
            (SyncTarget::Remote, _) => SyncTo::Remote,
            (SyncTarget::Cache, Some(_)) => SyncTo::Cache,
            (SyncTarget::Cache, None) => {
                bail!("--sync-to cache needs --cache DIR: an fsync to the in-memory cache would keep nothing")
            }
        },
        ..Default::default()
    };
    let mount = match &args.cache {
        Some(dir) => {
            let cache = PersistentCache::open(dir, size, args.chunk_size, uri)?;
            ManagedMount::open_cached(remote, cache, options).await
        }
        None => ManagedMount::open(remote, Arc::new(MemoryBackend::new(size)), options).await,
    };
    mount.context("cannot start the managed mount")
}

async fn show_pull_progress(mount: &ManagedMount) {
    let started = Instant::now();
    crate::progress::follow_pull(mount).await;
    match mount.wait_pulled().await {
        Ok(()) => eprintln!(
            "pulled: {} local after {:.2} s ({} fetched from the remote, {} skipped as holes)",
            format_bytes(mount.stats().local_bytes),
            started.elapsed().as_secs_f64(),
            mount.fetched_chunks(),
            mount.skipped_chunks()
        ),
        Err(err) => {
            eprintln!("background pull stopped: {err}; reads of missing chunks still fetch on demand")
        }
    }
}

/// Signals after which a mount that cannot flush gives up and detaches.
const GIVE_UP_AFTER: u32 = 3;

/// Size and seed of the demo remote's data.
const DEMO_SIZE: u64 = 256 << 20;
const DEMO_SEED: u64 = 1;

/// Where the demo writes (offset, length).
const DEMO_WRITE: (u64, u64) = (100 << 20, 16 << 20);

fn demo_pattern() -> Vec<u8> {
    (0..DEMO_WRITE.1).map(|i| (i % 251) as u8).collect()
}

/// An in-process NBD server with demo data on loopback; returns its URI and its export.
async fn demo_server() -> Result<(String, SharedBackend)> {
    let export: SharedBackend = Arc::new(crate::demo::memory(DEMO_SIZE, DEMO_SEED).await?);
    let server = Server::bind_tcp(
        ServerConfig::new(vec![Export::new("demo", export.clone())]),
        "127.0.0.1:0",
    )
    .await?;
    let uri = server.uri("demo");
    tokio::spawn(async move {
        if let Err(err) = server.serve(std::future::pending()).await {
            eprintln!("demo server stopped: {err}");
        }
    });
    Ok((uri, export))
}

/// Reads the whole file through the kernel and compares it with the demo data, then writes a
/// pattern and reads it back. Returns (read throughput, bytes written).
async fn demo_checks(path: &Path, size: u64) -> Result<(String, u64)> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<(String, u64)> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
        let started = Instant::now();
        let (mut got, mut expected) = (vec![0u8; crate::demo::PIECE], vec![0u8; crate::demo::PIECE]);
        for (i, offset) in (0..size).step_by(got.len()).enumerate() {
            file.read_exact_at(&mut got, offset)?;
            crate::demo::fill_piece(DEMO_SEED, i as u64, &mut expected[..]);
            if got != expected {
                bail!("the mounted file differs from the demo data near byte {offset}");
            }
        }
        let read = throughput(size, started.elapsed());
        let pattern = demo_pattern();
        file.write_all_at(&pattern, DEMO_WRITE.0)?;
        file.sync_all()?;
        let mut back = vec![0u8; pattern.len()];
        file.read_exact_at(&mut back, DEMO_WRITE.0)?;
        if back != pattern {
            bail!("the written pattern did not read back");
        }
        Ok((read, DEMO_WRITE.1))
    })
    .await?
}
