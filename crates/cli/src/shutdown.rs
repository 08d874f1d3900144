//! How a mount ends after SIGINT/SIGTERM, within a stated bound.
//!
//! The first signal starts the close: the frontend is flushed and unmounted and every write
//! held locally is pushed, once. The close runs as long as the remote keeps taking data, but it
//! is given up when the bytes pushed have not grown for one remote request deadline plus
//! [`GRACE`]. Since every remote request fails at its deadline (the reconnect stage) and a push
//! stops at its first failure, a dead or frozen remote ends the close within
//! `--remote-timeout` + [`GRACE`]. A second signal gives up at once. Giving up exits non-zero
//! with an account of the bytes not pushed and where they are.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use r3map_mount::format_bytes;

use crate::ShutdownSignals;

/// Time a close may take past one remote request deadline (unmounting, local syncs).
pub const GRACE: Duration = Duration::from_secs(5);

/// How often a running close's progress is looked at.
const PROGRESS_CHECK: Duration = Duration::from_millis(100);

/// Why a close was abandoned.
#[derive(Debug)]
pub enum Abandoned {
    /// Another SIGINT/SIGTERM arrived.
    Signalled,
    /// Nothing was pushed for this long.
    Stalled(Duration),
}

impl std::fmt::Display for Abandoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Abandoned::Signalled => write!(f, "stopped by a second signal"),
            Abandoned::Stalled(limit) => write!(
                f,
                "the remote took no data for {:.0} s (--remote-timeout + {} s)",
                limit.as_secs_f64(),
                GRACE.as_secs()
            ),
        }
    }
}

/// Runs `close` to its end, unless a signal arrives first or `pushed()` (bytes pushed so far)
/// stands still for `stall_limit`.
pub async fn bounded<T>(
    close: impl Future<Output = T>,
    signals: &mut ShutdownSignals,
    pushed: impl Fn() -> u64,
    stall_limit: Duration,
) -> Result<T, Abandoned> {
    let watchdog = async {
        let mut last = pushed();
        let mut since = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(PROGRESS_CHECK).await;
            let now = pushed();
            if now != last {
                (last, since) = (now, tokio::time::Instant::now());
            } else if since.elapsed() >= stall_limit {
                return Abandoned::Stalled(stall_limit);
            }
        }
    };
    tokio::select! {
        done = close => Ok(done),
        _ = signals.recv() => Err(Abandoned::Signalled),
        why = watchdog => Err(why),
    }
}

/// Where a mount keeps the writes it has not pushed.
#[derive(Debug, Clone)]
pub enum Holder {
    /// A direct mount holds nothing: writes go to the remote before they return.
    Direct,
    /// The managed mount's cache is in memory: unpushed writes die with the process.
    Memory,
    /// The managed mount's persistent cache directory: they are pushed on the next start.
    Persistent(PathBuf),
}

/// What a mount that gives up could not finish: `unpushed` bytes not on `remote`.
pub fn account(unpushed: u64, remote: &str, holder: &Holder) -> String {
    match holder {
        Holder::Direct => format!(
            "direct mount: nothing is held locally (writes the application saw succeed are on \
             {remote}, failed ones returned errors), but {remote} did not confirm a final flush"
        ),
        Holder::Memory if unpushed == 0 => {
            format!("every write was pushed, but {remote} did not confirm a final flush")
        }
        Holder::Memory => format!(
            "{} ({unpushed} bytes) written through the mount were not pushed to {remote} and \
             are lost: the cache was in memory (mount with --cache DIR to keep unpushed writes \
             across exits and push them on the next start)",
            format_bytes(unpushed)
        ),
        Holder::Persistent(dir) => format!(
            "{} ({unpushed} bytes) written through the mount were not pushed to {remote}; they \
             are kept in the cache at {} and pushed when it is mounted again with --cache {}",
            format_bytes(unpushed),
            dir.display(),
            dir.display()
        ),
    }
}

/// Whether a failed close failed because of the remote (a push or flush), as opposed to the
/// frontend being busy.
pub fn remote_failed(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| cause.is::<r3map_core::Error>())
}

/// Drops a value on another thread and waits for that at most `limit`: a frontend whose
/// teardown blocks (a FUSE session with requests still waiting) cannot hold up the exit.
pub fn drop_within<T: Send + 'static>(value: T, limit: Duration) {
    let (done, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(value);
        let _ = done.send(());
    });
    let _ = wait.recv_timeout(limit);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_account_says_how_much_and_where() {
        let remote = "nbd://127.0.0.1:1/x";
        let memory = account(3 << 20, remote, &Holder::Memory);
        assert!(memory.contains("3.00 MiB (3145728 bytes)"), "{memory}");
        assert!(
            memory.contains("lost") && memory.contains("--cache DIR"),
            "{memory}"
        );
        let kept = account(64 << 10, remote, &Holder::Persistent("/var/cache/r3".into()));
        assert!(kept.contains("kept in the cache at /var/cache/r3"), "{kept}");
        assert!(!kept.contains("lost"), "{kept}");
        let direct = account(0, remote, &Holder::Direct);
        assert!(direct.contains("nothing is held locally"), "{direct}");
    }

    #[test]
    fn remote_failures_are_told_apart_from_busy_frontends() {
        let remote =
            anyhow::Error::new(r3map_core::Error::Timeout(Duration::from_secs(1))).context("flushing failed");
        assert!(remote_failed(&remote));
        let busy = anyhow::anyhow!("/dev/loop0 is mounted at /mnt; unmount it first");
        assert!(!remote_failed(&busy));
    }
}
