//! `r3map umount`: stop a mount, or clean up what a crashed run left behind.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use r3map_fuse::{clean, find_stale};

/// Unmount an r3map mount, or clean up stale ones
///
/// With TARGET (a mountpoint of a running `r3map mount`): asks that process to flush, push and
/// unmount (SIGTERM) and waits until it has. Without TARGET: finds FUSE mounts and loop devices
/// left by r3map processes that died (e.g. killed with SIGKILL) and removes them, one message
/// per item.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Mountpoint of a running mount
    target: Option<PathBuf>,
    /// How long to wait for a running mount to finish
    #[arg(long, default_value = "60s", value_parser = r3map_mount::parse_duration)]
    timeout: Duration,
}

pub async fn run(args: Args) -> Result<()> {
    match args.target {
        Some(target) => stop_running(&target, args.timeout).await,
        None => clean_stale(),
    }
}

async fn stop_running(target: &std::path::Path, timeout: Duration) -> Result<()> {
    let target = target
        .canonicalize()
        .with_context(|| format!("cannot find {}", target.display()))?;
    let mounts = r3map_fuse::stale::r3map_mounts().context("cannot read the mount table")?;
    let Some(mount) = mounts.into_iter().find(|m| m.mountpoint == target) else {
        bail!("{} is not an r3map mount", target.display());
    };
    if !mount.alive {
        eprintln!(
            "{} is left by a process that died; cleaning it up",
            target.display()
        );
        return clean_stale();
    }
    let pid = mount.pid.context("the mount does not name its process")?;
    let process = nix::unistd::Pid::from_raw(i32::try_from(pid).context("process id out of range")?);
    nix::sys::signal::kill(process, nix::sys::signal::Signal::SIGTERM)
        .with_context(|| format!("cannot signal process {pid}"))?;
    let deadline = Instant::now() + timeout;
    while let Some(mount) = r3map_fuse::stale::r3map_mounts()?
        .into_iter()
        .find(|m| m.mountpoint == target)
    {
        if !mount.alive {
            eprintln!(
                "process {pid} died before unmounting {}; cleaning up",
                target.display()
            );
            return clean_stale();
        }
        if Instant::now() > deadline {
            bail!(
                "process {pid} has not unmounted {} after {timeout:?}; is the file busy?",
                target.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "unmounted {} (process {pid} flushed and pushed)",
        target.display()
    );
    Ok(())
}

fn clean_stale() -> Result<()> {
    let items = find_stale().context("cannot look for stale mounts")?;
    if items.is_empty() {
        eprintln!("no stale r3map mounts or loop devices found");
        return Ok(());
    }
    let mut failed = 0;
    for item in &items {
        match clean(item) {
            Ok(message) => eprintln!("{message}"),
            Err(err) => {
                failed += 1;
                eprintln!("{item}: {err}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} stale items could not be cleaned", items.len());
    }
    Ok(())
}
