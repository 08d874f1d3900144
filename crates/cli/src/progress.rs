//! Progress bars and throughput figures for long-running commands.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use r3map_mount::{format_bytes, ManagedMount};

/// A byte progress bar on stderr (hidden automatically when stderr is not a terminal).
pub fn byte_bar(total: u64, message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:>8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message);
    bar
}

/// `bytes` over `elapsed`, e.g. `812.40 MiB/s`.
pub fn throughput(bytes: u64, elapsed: Duration) -> String {
    let per_second = (bytes as f64 / elapsed.as_secs_f64().max(1e-9)) as u64;
    format!("{}/s", format_bytes(per_second))
}

/// Shows a progress bar of a managed mount's background pull until it finishes or fails.
pub async fn follow_pull(mount: &ManagedMount) {
    let bar = byte_bar(mount.stats().total_bytes, "pulling");
    let mut progress = mount.pull_progress();
    loop {
        bar.set_position(mount.stats().local_bytes);
        let done = {
            let p = progress.borrow_and_update();
            p.finished || p.error.is_some()
        };
        if done || progress.changed().await.is_err() {
            break;
        }
    }
    bar.set_position(mount.stats().local_bytes);
    bar.finish_and_clear();
}
