//! `r3map migrate seed`: the source of a migration.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use r3map_core::Backend;
use r3map_migration::{hook, Hook, Seeder, SeederHooks, SeederPhase};
use r3map_mount::{format_bytes, parse_size};

use super::transport::{self, ServeArgs};
use crate::frontend::{Frontend, Mounted};

/// Serve a resource to a destination host while the application keeps using it
///
/// The application reaches the resource through --frontend at TARGET (a FUSE file, a disk, a
/// slice socket for programs' memory), or not at all (the resource is moved as it is). Writes
/// are recorded while a destination pulls. When the destination finalizes, the application is
/// suspended (--pid: SIGSTOP and SIGCONT; --suspend/--resume: commands), the frontend is
/// flushed and the last dirty chunks are handed over. Once the destination has every chunk,
/// the source stays suspended for good (its copy is stale) and this command exits.
///
/// SIGINT/SIGTERM before the handoff aborts the migration (the application resumes, the
/// destination never takes over) and exits. While a destination holds the final dirty list or
/// still pulls after taking over, the first signal says what stopping would do and the second
/// stops at once.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The resource as a backend specification, e.g. file:/var/tmp/disk.img
    resource: String,
    /// Where the frontend appears: a directory (file, disk) or a socket path (slice)
    target: Option<PathBuf>,
    /// How the application reaches the resource [default: no frontend]
    #[arg(long, value_enum)]
    frontend: Option<Frontend>,
    /// Name of the file in a file frontend
    #[arg(long, default_value = "data")]
    name: String,
    /// The application's process: stopped with SIGSTOP at finalize, resumed with SIGCONT on abort
    #[arg(long, conflicts_with_all = ["suspend", "resume", "pid_file"])]
    pid: Option<u32>,
    /// Like --pid, for an application started after this command (e.g. one that uses its
    /// frontend): the process id is read from this file when the application is suspended
    #[arg(long, conflicts_with_all = ["suspend", "resume"])]
    pid_file: Option<PathBuf>,
    /// Shell command that suspends the application at finalize
    #[arg(long)]
    suspend: Option<String>,
    /// Shell command that resumes the application after an abort
    #[arg(long)]
    resume: Option<String>,
    /// Unit of transfer and dirty tracking
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    chunk_size: u64,
    /// Address the seeder listens on (TCP); loopback unless told otherwise
    #[arg(long, default_value = "127.0.0.1:1337")]
    listen: String,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    stores: crate::remote::StoreArgs,
    #[command(flatten)]
    metrics: crate::metrics::MetricsArgs,
}

pub async fn run(args: Args) -> Result<()> {
    let signals = crate::ShutdownSignals::catch()?;
    if let Some(frontend) = args.frontend {
        frontend.check_supported()?;
        if args.target.is_none() {
            bail!("--frontend {frontend:?} needs a TARGET (a directory, or a socket path for slice)");
        }
    }
    let metrics = args.metrics.start().await?;
    let remote = r3map_mount::RemoteOptions {
        stores: args.stores.credentials()?,
        ..Default::default()
    };
    let resource = crate::remote::open(&args.resource, None, &remote).await?;
    let size = resource.size();
    let application = match (args.pid, &args.pid_file, &args.suspend, &args.resume) {
        (Some(pid), _, _, _) => SeederHooks::process(pid),
        (None, Some(path), _, _) => SeederHooks::process_in_file(path.clone()),
        (None, None, None, None) => SeederHooks::default(),
        (None, None, suspend, resume) => SeederHooks::commands(suspend.clone(), resume.clone()),
    };
    // The frontend exists only after the seeder whose backend it offers, so the flush finds it
    // through this cell.
    let flushed: Arc<OnceLock<Mounted>> = Arc::new(OnceLock::new());
    let hooks = match args.frontend {
        Some(_) => application.with_flush(flush_hook(flushed.clone())),
        None => application,
    };
    let seeder = Seeder::new(resource.clone(), args.chunk_size, hooks)?;
    metrics.seeder(&seeder);
    if let (Some(frontend), Some(target)) = (args.frontend, &args.target) {
        let mounted = Mounted::open(frontend, seeder.backend(), target, &args.name, &metrics).await?;
        eprintln!(
            "the application reaches the resource at {}",
            mounted.path().display()
        );
        let _ = flushed.set(mounted);
    }
    let listening = transport::serve(seeder.clone(), &args.listen, &args.serve).await?;
    eprintln!(
        "seeding {} ({}) at {}",
        args.resource,
        format_bytes(size),
        listening.uri()
    );
    let outcome = follow(&seeder, signals).await;
    listening.stop().await;
    if let Some(mounted) = Arc::into_inner(flushed).and_then(OnceLock::into_inner) {
        close_frontend(mounted).await;
    }
    outcome
}

/// What `run` does after the seeder is reachable, shared with `leech --then-seed`: prints
/// every phase change and ends when the destination has everything, or on signals.
pub async fn follow(seeder: &Arc<Seeder>, mut signals: crate::ShutdownSignals) -> Result<()> {
    let mut phases = seeder.watch_phase();
    let mut warned = false;
    loop {
        let phase = *phases.borrow_and_update();
        if phase == SeederPhase::Closed {
            eprintln!("migration complete: the destination holds every chunk and is authoritative; this copy is stale and the application here stays suspended");
            return Ok(());
        }
        tokio::select! {
            changed = phases.changed() => {
                if changed.is_err() {
                    bail!("the seeder ended unexpectedly");
                }
                eprintln!("seeder: {}", *phases.borrow());
            }
            _ = signals.recv() => match phase {
                SeederPhase::Serving => return Ok(()),
                SeederPhase::Tracking { .. } => {
                    seeder.abort().await.context("cannot abort the migration")?;
                    eprintln!("aborted: the destination will not take over; stopped");
                    return Ok(());
                }
                SeederPhase::Synced { .. } if !warned => {
                    warned = true;
                    eprintln!("the application is suspended and a destination holds the final dirty list; it may be taking over right now. Signal again to abort (the application resumes here and the destination's commit fails)");
                }
                SeederPhase::Synced { .. } => match seeder.abort().await {
                    Ok(_) => {
                        eprintln!("aborted: the application runs here again; stopped");
                        return Ok(());
                    }
                    Err(err) => eprintln!("cannot abort: {err}"),
                },
                SeederPhase::HandedOff { .. } if !warned => {
                    warned = true;
                    eprintln!("the destination is authoritative but may still pull chunks from here; stopping now can leave it incomplete. Signal again to stop anyway");
                }
                SeederPhase::HandedOff { .. } => {
                    bail!("stopped after the handoff, before the destination confirmed it has every chunk: it reports which chunks it lacks");
                }
                SeederPhase::Closed => return Ok(()),
            },
        }
    }
}

/// Flushes what the frontend still holds (mapped pages in the page cache, a slice region's
/// dirty pages) into the seeder's backend.
fn flush_hook(mounted: Arc<OnceLock<Mounted>>) -> Hook {
    hook(move || {
        let mounted = mounted.clone();
        async move {
            match mounted.get() {
                Some(mounted) => mounted.flush().await.map_err(|err| format!("{err:#}")),
                None => Ok(()),
            }
        }
    })
}

/// Unmounts the frontend; one the suspended application still holds open is detached lazily.
async fn close_frontend(mut mounted: Mounted) {
    if let Err(err) = mounted.close().await {
        eprintln!(
            "{} is still in use ({err:#}); detached it",
            mounted.path().display()
        );
    }
}
