//! Progress and the final report of a migration.

use std::fmt;
use std::time::Duration;

use r3map_migration::{CompleteReport, FinalizeReport, Leecher, LeecherPhase, LeecherStatus};
use r3map_mount::format_bytes;

use crate::progress::byte_bar;

/// Shows the leecher's local chunks as a byte progress bar until the pull in progress has
/// finished (or failed); the message names the phase and, in pre-copy, the round.
pub async fn follow_pull(leecher: &Leecher, message: &'static str) {
    let info = leecher.info();
    let bar = byte_bar(info.size, message);
    let mut progress = leecher.pull_progress();
    let mut phases = leecher.watch_phase();
    loop {
        let status = leecher.status();
        bar.set_position((status.local_chunks * info.chunk_size).min(info.size));
        if let LeecherPhase::PreCopy { round } = status.phase {
            bar.set_message(format!("round {round}"));
        }
        let done = {
            let p = progress.borrow_and_update();
            p.finished || p.error.is_some()
        };
        if done && !matches!(status.phase, LeecherPhase::PreCopy { .. }) {
            break;
        }
        tokio::select! {
            changed = progress.changed() => if changed.is_err() { break },
            changed = phases.changed() => if changed.is_err() { break },
        }
    }
    bar.finish_and_clear();
}

/// What a completed migration did, as the leecher prints it.
pub struct Report {
    pub total: Duration,
    pub chunk_size: u64,
    pub completed: CompleteReport,
    pub finalized: FinalizeReport,
    pub status: LeecherStatus,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        writeln!(f, "migration complete:")?;
        writeln!(f, "  total time      {:.2} s", self.total.as_secs_f64())?;
        writeln!(
            f,
            "  moved           {} in {} chunks",
            format_bytes(self.completed.fetched_bytes),
            self.completed.fetched_chunks
        )?;
        writeln!(
            f,
            "  re-pulled       {} chunks ({})",
            self.status.repulled,
            format_bytes(self.status.repulled * self.chunk_size)
        )?;
        let rounds: Vec<String> = self.status.rounds.iter().map(u64::to_string).collect();
        writeln!(
            f,
            "  pre-copy rounds {} (dirty chunks per round: {})",
            self.status.rounds.len(),
            if rounds.is_empty() {
                "-".into()
            } else {
                rounds.join(", ")
            }
        )?;
        writeln!(f, "  final dirty     {} chunks", self.finalized.dirty_chunks)?;
        writeln!(
            f,
            "  downtime        {:.2} ms (source suspend to gate open; at most {:.2} ms by this host's clock)",
            ms(self.finalized.downtime),
            ms(self.finalized.downtime_bound)
        )?;
        if self.completed.verified_chunks > 0 {
            writeln!(
                f,
                "  verified        {} chunks (blake3)",
                self.completed.verified_chunks
            )?;
        }
        Ok(())
    }
}
