//! `r3map migrate leech`: the destination of a migration.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use r3map_core::stages::Priority;
use r3map_core::{Backend, MemoryBackend, SharedBackend};
use r3map_migration::{Leecher, LeecherOptions, MigrationError, RoundPolicy, SeederHooks};
use r3map_mount::format_bytes;

use super::report::{follow_pull, Report};
use super::transport::{self, LinkArgs, OnwardArgs};
use crate::frontend::{Frontend, Mounted};

/// Take over a resource from a seeder while its application keeps running until finalize
///
/// Pulls every chunk in the background into --to (a backend specification; memory by default)
/// while the application here waits behind a gate (reads and writes through --frontend block).
/// Optional pre-copy rounds (--rounds) re-pull what the source wrote meanwhile, until a round
/// finds at most --max-dirty chunks or stops shrinking. Finalize then suspends the source,
/// pulls its last dirty chunks first and opens the gate: from then on this copy is
/// authoritative. The report gives the downtime, from the source's suspend to the gate opening.
///
/// After completion: with --then-seed ADDR this host seeds onward (A → B → C); with a frontend
/// it keeps serving the application until SIGINT/SIGTERM; otherwise --to holds the resource.
/// A signal before finalize abandons the migration (the source keeps running).
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The seeder, e.g. grpc://127.0.0.1:1337 (grpcs:// for TLS)
    seeder: String,
    /// Where the frontend appears: a directory (file, disk) or a socket path (slice)
    target: Option<PathBuf>,
    /// How the application here reaches the resource [default: no frontend]
    #[arg(long, value_enum)]
    frontend: Option<Frontend>,
    /// Name of the file in a file frontend
    #[arg(long, default_value = "data")]
    name: String,
    /// The local copy, e.g. file:/var/tmp/disk.img (created with the seeder's size)
    #[arg(long, default_value = "memory:")]
    to: String,
    /// Most pre-copy rounds before finalize (0: finalize right after the background pull)
    #[arg(long, default_value_t = 0)]
    rounds: u32,
    /// Stop the pre-copy rounds once a round finds at most this many dirty chunks
    #[arg(long, default_value_t = 0)]
    max_dirty: u64,
    /// Concurrent background pulls (calls share one HTTP/2 connection, so a few dozen fill it)
    #[arg(long, default_value_t = 32)]
    pull_workers: usize,
    /// After completion, compare every chunk's blake3 hash with the seeder's
    #[arg(long)]
    verify: bool,
    /// After completion, seed the resource onward at this address
    #[arg(long)]
    then_seed: Option<String>,
    #[command(flatten)]
    link: LinkArgs,
    #[command(flatten)]
    onward: OnwardArgs,
}

pub async fn run(args: Args) -> Result<()> {
    let mut signals = crate::ShutdownSignals::catch()?;
    if let Some(frontend) = args.frontend {
        frontend.check_supported()?;
        if args.target.is_none() {
            bail!("--frontend {frontend:?} needs a TARGET (a directory, or a socket path for slice)");
        }
    }
    let memory_only = args.to.trim_end_matches(':') == "memory";
    if memory_only && args.frontend.is_none() && args.then_seed.is_none() {
        bail!("nothing would keep the migrated resource: give --to SPEC (e.g. file:/var/tmp/copy.img), a --frontend, or --then-seed");
    }
    let started = Instant::now();
    let link = transport::connect(&args.seeder, &args.link).await?;
    let info = link.info().await.context("cannot reach the seeder")?;
    let local: SharedBackend = if memory_only {
        Arc::new(MemoryBackend::new(info.size))
    } else {
        crate::remote::open(&args.to, Some(info.size), &Default::default()).await?
    };
    let options = LeecherOptions {
        pull_workers: args.pull_workers,
        priority: Priority::sequential(),
        rounds: RoundPolicy {
            max_rounds: args.rounds,
            max_dirty: args.max_dirty,
        },
        ..LeecherOptions::default()
    };
    let leecher = Leecher::open(link, local.clone(), options).await?;
    eprintln!(
        "leeching {} ({} in {} chunks of {}) into {}",
        args.seeder,
        format_bytes(info.size),
        leecher.status().total_chunks,
        format_bytes(info.chunk_size),
        args.to
    );
    let mut mounted = match (args.frontend, &args.target) {
        (Some(frontend), Some(target)) => {
            let mounted = Mounted::open(frontend, leecher.backend(), target, &args.name).await?;
            eprintln!(
                "the application here reaches the resource at {} (its I/O waits until finalize)",
                mounted.path().display()
            );
            Some(mounted)
        }
        _ => None,
    };

    // Until finalize the source is authoritative: a signal abandons the migration.
    let precopied = tokio::select! {
        result = async {
            follow_pull(&leecher, "pulling").await;
            leecher.precopy().await
        } => result,
        _ = signals.recv() => {
            drop(mounted.take());
            leecher.abandon().await.context("abandoned, but the seeder could not be told")?;
            bail!("abandoned before finalize: the source keeps running and stays authoritative");
        }
    };
    let rounds = precopied.context("the migration stopped before finalize; the source keeps running")?;
    for (round, dirty) in rounds.iter().enumerate() {
        eprintln!("pre-copy round {}: {dirty} dirty chunks re-pulled", round + 1);
    }
    let finalized = match leecher.finalize().await {
        Ok(finalized) => finalized,
        Err(err) => {
            let hint = if matches!(err, MigrationError::Timeout { .. }) || err.is_connection_loss() {
                format!("; the source may stay suspended: if this copy is not going to take over, resume it with `r3map migrate abort {}`", args.seeder)
            } else {
                String::new()
            };
            bail!("finalize failed, this copy did not take over: {err}{hint}");
        }
    };
    eprintln!(
        "finalized: {} dirty chunks pulled first; downtime {:.1} ms (at most {:.1} ms by this host's clock); this copy is authoritative",
        finalized.dirty_chunks,
        finalized.downtime.as_secs_f64() * 1e3,
        finalized.downtime_bound.as_secs_f64() * 1e3
    );
    follow_pull(&leecher, "completing").await;
    let completed = leecher.complete(args.verify).await.map_err(|err| match err {
        MigrationError::Incomplete { missing, total } => anyhow::anyhow!(
            "the seeder went away before {} of {total} chunks arrived (first missing: {:?}); reads of them fail here, nothing is made up",
            missing.len(),
            &missing[..missing.len().min(8)]
        ),
        other => other.into(),
    })?;
    local.sync().await.context("cannot flush the local copy")?;
    let status = leecher.status();
    let report = Report {
        total: started.elapsed(),
        chunk_size: info.chunk_size,
        completed,
        finalized,
        status,
    };
    eprint!("{report}");

    if let Some(address) = &args.then_seed {
        let seeder = leecher.into_seeder(SeederHooks::default())?;
        let listening = transport::serve(seeder.clone(), address, &(&args.onward).into()).await?;
        eprintln!("seeding onward at {}", listening.uri());
        let outcome = super::seed::follow(&seeder, signals).await;
        listening.stop().await;
        if let Some(mut mounted) = mounted {
            mounted.close().await?;
        }
        return outcome;
    }
    if let Some(mut mounted) = mounted {
        eprintln!(
            "serving the application at {} until Ctrl-C or SIGTERM",
            mounted.path().display()
        );
        signals.recv().await;
        mounted.close().await?;
        local.sync().await.context("cannot flush the local copy")?;
    }
    Ok(())
}
