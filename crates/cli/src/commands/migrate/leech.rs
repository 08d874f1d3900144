//! `r3map migrate leech`: the destination of a migration.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use r3map_core::stages::Priority;
use r3map_core::{Backend, SharedBackend};
use r3map_migration::{
    CompleteReport, FinalizeReport, Leecher, LeecherOptions, MigrationError, RoundPolicy, SeederHooks,
};
use r3map_mount::{format_bytes, BackendSpec};

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
/// Signals: before finalize, SIGINT/SIGTERM abandons the migration (the source keeps running).
/// During finalize (the source is suspended) the first signal explains and a second aborts the
/// migration, so the source resumes (waiting at most 10 s for the seeder to confirm). After
/// finalize (this copy is authoritative) the first explains and a second stops at once, naming
/// the chunks that never arrived.
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
    #[command(flatten)]
    stores: crate::remote::StoreArgs,
    #[command(flatten)]
    metrics: crate::metrics::MetricsArgs,
}

pub async fn run(args: Args) -> Result<()> {
    let mut signals = crate::ShutdownSignals::catch()?;
    if let Some(frontend) = args.frontend {
        frontend.check_supported()?;
        if args.target.is_none() {
            bail!("--frontend {frontend:?} needs a TARGET (a directory, or a socket path for slice)");
        }
    }
    let to: BackendSpec = args
        .to
        .parse()
        .map_err(|err| anyhow::anyhow!("invalid --to {:?}: {err}", args.to))?;
    let memory_only = matches!(to, BackendSpec::Memory { .. });
    if memory_only && args.frontend.is_none() && args.then_seed.is_none() {
        bail!("nothing would keep the migrated resource: give --to SPEC (e.g. file:/var/tmp/copy.img), a --frontend, or --then-seed");
    }
    let metrics = args.metrics.start().await?;
    let started = Instant::now();
    let link = metrics.seeder_link(transport::connect(&args.seeder, &args.link).await?);
    let info = link.info().await.context("cannot reach the seeder")?;
    let remote = r3map_mount::RemoteOptions {
        stores: args.stores.credentials()?,
        ..Default::default()
    };
    let local: SharedBackend = to
        .open_with(Some(info.size), &remote)
        .await
        .with_context(|| format!("cannot open --to {}", args.to))?;
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
    metrics.leecher(&leecher);
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
            let mounted = Mounted::open(frontend, leecher.backend(), target, &args.name, &metrics).await?;
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
    eprintln!("finalizing: suspending the source and taking over");
    let finalized = match finalize(&leecher, &args, &mut signals).await {
        Ok(finalized) => finalized,
        Err(err) => {
            drop(mounted.take());
            return Err(err);
        }
    };
    metrics.finalized(&finalized);
    eprintln!(
        "finalized: {} dirty chunks pulled first; downtime {:.1} ms (at most {:.1} ms by this host's clock); this copy is authoritative",
        finalized.dirty_chunks,
        finalized.downtime.as_secs_f64() * 1e3,
        finalized.downtime_bound.as_secs_f64() * 1e3
    );
    follow_pull(&leecher, "completing").await;
    let completed = complete(&leecher, args.verify, &mut signals).await?;
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
        metrics.seeder(&seeder);
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

/// How long giving up during finalize may wait for the seeder to confirm the abort.
const ABORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Finalize, watching signals: the source is suspended meanwhile, so the first signal says what
/// stopping would do, and the second aborts the migration (the source resumes) unless the
/// commit already landed, in which case this copy is authoritative and finalize goes on.
async fn finalize(
    leecher: &Leecher,
    args: &Args,
    signals: &mut crate::ShutdownSignals,
) -> Result<FinalizeReport> {
    let finalize = leecher.finalize();
    tokio::pin!(finalize);
    let mut warned = false;
    let result = loop {
        tokio::select! {
            result = &mut finalize => break result,
            _ = signals.recv() => {}
        }
        if !warned {
            warned = true;
            eprintln!("finalizing: the source is suspended until this copy takes over. Signal again to abort the migration (the source resumes and stays authoritative)");
            continue;
        }
        // Abort and commit are serialised on the seeder: exactly one of them wins.
        eprintln!("aborting the migration: asking the seeder to resume the source");
        match tokio::time::timeout(ABORT_TIMEOUT, transport::abort_migration(&args.seeder, &args.link)).await {
            Ok(Ok(before)) => bail!(
                "gave up during finalize: the migration was aborted (the seeder was {before}); the source runs again and stays authoritative, and this copy is discarded"
            ),
            Ok(Err(MigrationError::HandedOff { .. })) => {
                eprintln!("the source had already handed off: this copy is authoritative, so finalize goes on");
                break finalize.await;
            }
            Ok(Err(err)) => bail!(
                "gave up during finalize, and the abort failed ({err}); the source may stay suspended: resume it with `r3map migrate abort {}`",
                args.seeder
            ),
            Err(_) => bail!(
                "gave up during finalize; the seeder did not confirm an abort within {} s, so the source may stay suspended: resume it with `r3map migrate abort {}`",
                ABORT_TIMEOUT.as_secs(),
                args.seeder
            ),
        }
    };
    result.map_err(|err| {
        let hint = if matches!(err, MigrationError::Timeout { .. }) || err.is_connection_loss() {
            format!(
                "; the source may stay suspended: if this copy is not going to take over, resume it with `r3map migrate abort {}`",
                args.seeder
            )
        } else {
            String::new()
        };
        anyhow::anyhow!("finalize failed, this copy did not take over: {err}{hint}")
    })
}

/// Completion, watching signals: this copy is authoritative, so stopping leaves it without the
/// chunks still at the source. The first signal says so, the second stops anyway.
async fn complete(
    leecher: &Leecher,
    verify: bool,
    signals: &mut crate::ShutdownSignals,
) -> Result<CompleteReport> {
    let complete = leecher.complete(verify);
    tokio::pin!(complete);
    let mut warned = false;
    let result = loop {
        tokio::select! {
            result = &mut complete => break result,
            _ = signals.recv() => {}
        }
        let missing = leecher.missing_chunks();
        let total = leecher.status().total_chunks;
        if !warned {
            warned = true;
            eprintln!(
                "completing: this copy is authoritative but {} of {total} chunks are still only at the source; stopping now leaves it without them. Signal again to stop anyway",
                missing.len()
            );
            continue;
        }
        bail!(
            "stopped before completion: {} of {total} chunks never arrived (first missing: {:?}); this copy is authoritative but incomplete, and the source (handed off) holds them until it stops",
            missing.len(),
            &missing[..missing.len().min(8)]
        );
    };
    result.map_err(|err| match err {
        MigrationError::Incomplete { missing, total } => anyhow::anyhow!(
            "the seeder went away before {} of {total} chunks arrived (first missing: {:?}); reads of them fail here, nothing is made up",
            missing.len(),
            &missing[..missing.len().min(8)]
        ),
        other => other.into(),
    })
}
