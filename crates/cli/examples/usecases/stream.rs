//! Streaming a remote resource: `r3map serve` behind a thin link (the delay proxy, which also
//! counts the bytes it delivers), a managed mount with a pull order, and a reader (sqlite3,
//! ffprobe) started at once. Measures the bytes fetched when the reader has its answer, against
//! the size of the resource, and samples them over time for a plot.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use r3map_delay_proxy::{DelayConfig, DelayProxy};

use crate::procs::{mounted_path, served_uri, Running};

const LONG: Duration = Duration::from_secs(120);

/// The link between the mount and the server.
pub const LINK: DelayConfig = DelayConfig {
    rtt: Duration::from_millis(20),
    rate: Some(8 << 20),
};

/// One streaming run.
pub struct Stream<'a> {
    pub r3map: &'a Path,
    pub image: &'a Path,
    pub frontend: &'a str,
    /// `None`: sequential; `Some(file)`: ranges-first from a `--pull-ranges` file.
    pub ranges: Option<&'a Path>,
    pub work: &'a Path,
}

/// What a run measured.
pub struct Figures {
    pub order: &'static str,
    pub size: u64,
    pub mounted_seconds: f64,
    pub answer_seconds: f64,
    pub answer_bytes: u64,
    pub pulled_seconds: f64,
    pub pulled_bytes: u64,
    /// Chunks the pull fetched, and chunks it skipped as holes of the image (as the mount says).
    pub fetched_chunks: u64,
    pub skipped_chunks: u64,
    /// (seconds since the mount started, bytes fetched) every 10 ms.
    pub trace: Vec<(f64, u64)>,
}

impl Figures {
    pub fn answer_fraction(&self) -> f64 {
        self.answer_bytes as f64 / self.size as f64
    }

    pub fn print(&self, case: &str) {
        println!(
            "figure case={case} order={} size={} mounted_seconds={:.3} answer_seconds={:.3} answer_bytes={} answer_fraction={:.4} pulled_seconds={:.3} pulled_bytes={} fetched_chunks={} skipped_chunks={}",
            self.order,
            self.size,
            self.mounted_seconds,
            self.answer_seconds,
            self.answer_bytes,
            self.answer_fraction(),
            self.pulled_seconds,
            self.pulled_bytes,
            self.fetched_chunks,
            self.skipped_chunks
        );
    }
}

impl Stream<'_> {
    /// Serves the image, mounts it and runs `reader` on the mounted path as soon as the mount
    /// appears; `reader` checks its answer and leaves nothing mounted on the path.
    pub fn run(&self, reader: impl FnOnce(&str) -> Result<()>) -> Result<Figures> {
        let size = std::fs::metadata(self.image)?.len();
        let export = format!("resource=file:{}", self.image.display());
        let mut server = Running::start(self.r3map, &["serve", &export, "--listen", "127.0.0.1:0"])?;
        let uri = served_uri(&server.wait_for("serving nbd", LONG)?)?;
        let upstream = uri
            .trim_start_matches("nbd://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let proxy = runtime.block_on(DelayProxy::start("127.0.0.1:0".parse()?, upstream, LINK))?;
        let proxy = Arc::new(proxy);

        let target = self.work.join(format!("mnt-{}", self.order()));
        let remote = format!("nbd://{}/resource", proxy.local_addr());
        let mut args = vec![
            "mount",
            &remote,
            target.to_str().unwrap_or_default(),
            "--managed",
            "--frontend",
            self.frontend,
            "--chunk-size",
            "64KiB",
            // Few pulls in flight leave room on a thin link for what the reader asks for.
            "--pull-workers",
            "8",
        ];
        let ranges = self.ranges.map(|p| p.display().to_string());
        if let Some(ranges) = &ranges {
            args.extend(["--pull-ranges", ranges]);
        }
        let started = Instant::now();
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let (proxy, sampling) = (proxy.clone(), sampling.clone());
            std::thread::spawn(move || {
                let mut trace = Vec::new();
                while sampling.load(Ordering::Relaxed) {
                    trace.push((started.elapsed().as_secs_f64(), proxy.bytes_downstream()));
                    std::thread::sleep(Duration::from_millis(10)); // a sampling period, not a wait
                }
                trace
            })
        };
        let mut mount = Running::start(self.r3map, &args)?;
        let path = mounted_path(&mount.wait_for("mounted ", LONG)?);
        let mounted_seconds = started.elapsed().as_secs_f64();
        reader(&path)?;
        let (answer_seconds, answer_bytes) = (started.elapsed().as_secs_f64(), proxy.bytes_downstream());
        ensure!(
            !mount.has_said("pulled:"),
            "the background pull finished before the reader answered: the link is too fast for this to show anything"
        );
        let pulled = mount.wait_for("pulled:", LONG)?;
        let (pulled_seconds, pulled_bytes) = (started.elapsed().as_secs_f64(), proxy.bytes_downstream());
        let (fetched_chunks, skipped_chunks) = pull_counts(&pulled)?;
        sampling.store(false, Ordering::Relaxed);
        let trace = sampler.join().unwrap_or_default();
        mount.terminate(LONG)?;
        server.terminate(LONG)?;
        Ok(Figures {
            order: self.order(),
            size,
            mounted_seconds,
            answer_seconds,
            answer_bytes,
            pulled_seconds,
            pulled_bytes,
            fetched_chunks,
            skipped_chunks,
            trace,
        })
    }

    fn order(&self) -> &'static str {
        if self.ranges.is_some() {
            "ranges-first"
        } else {
            "sequential"
        }
    }
}

/// The counts in the mount's `pulled: … (N fetched from the remote, M skipped as holes)` line.
fn pull_counts(line: &str) -> Result<(u64, u64)> {
    let count = |needle: &str| -> Result<u64> {
        let before = line
            .split(needle)
            .next()
            .filter(|head| head.len() < line.len())
            .ok_or_else(|| anyhow::anyhow!("no {needle:?} in {line:?}"))?;
        let number = before
            .rsplit(['(', ' '])
            .find(|w| !w.is_empty())
            .unwrap_or_default();
        number
            .parse()
            .map_err(|_| anyhow::anyhow!("no count before {needle:?} in {line:?}"))
    };
    Ok((count(" fetched from the remote")?, count(" skipped as holes")?))
}

/// Writes the traces of runs as CSV `case,order,seconds,bytes,event`: samples have no event;
/// `answer` and `pulled` mark the reader's answer and the end of the background pull.
pub fn write_trace(path: &PathBuf, case: &str, runs: &[Figures]) -> Result<()> {
    let mut csv = String::from("case,order,seconds,bytes,event\n");
    for run in runs {
        for (t, bytes) in &run.trace {
            csv.push_str(&format!("{case},{},{t:.3},{bytes},\n", run.order));
        }
        csv.push_str(&format!(
            "{case},{},{:.3},{},answer\n",
            run.order, run.answer_seconds, run.answer_bytes
        ));
        csv.push_str(&format!(
            "{case},{},{:.3},{},pulled\n",
            run.order, run.pulled_seconds, run.pulled_bytes
        ));
    }
    std::fs::write(path, csv)?;
    Ok(())
}
