//! `--metrics ADDR` on every long-running command: the Prometheus endpoint, and how each
//! command's parts report to it. The registry, the catalog of names and the `Metered` stage are
//! in `crates/metrics`; this module only connects commands to them.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use r3map_core::SharedBackend;
use r3map_frontends::slice::FaultObserver;
use r3map_metrics::{Metered, Metrics, MetricsServer, Op, Outcome};
use r3map_migration::{
    FinalizeReport, Leecher, LeecherPhase, MigrationError, ResourceInfo, Seeder, SeederLink, SeederPhase,
    SessionId, SyncReport,
};
use r3map_mount::{ManagedMount, RemoteOptions};

pub use r3map_metrics::Role;

/// The `--metrics` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (listed in docs/metrics.md); a bare
    /// PORT or :PORT listens on 127.0.0.1
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Let --metrics listen beyond loopback (metrics have no authentication)
    #[arg(long, requires = "metrics")]
    metrics_public: bool,
}

impl MetricsArgs {
    /// Starts the endpoint when asked for (needs the Tokio runtime); prints where it listens.
    pub async fn start(&self) -> Result<Exporter> {
        let Some(text) = &self.metrics else {
            return Ok(Exporter::default());
        };
        let addr = listen_addr(text, self.metrics_public)?;
        let metrics = Metrics::new();
        let server = r3map_metrics::serve(addr, metrics.clone()).await?;
        eprintln!("metrics at http://{}/metrics", server.local_addr());
        let reconnects = Arc::new(AtomicU64::new(0));
        metrics.counter_from("r3map_reconnects_total", {
            let reconnects = reconnects.clone();
            move || reconnects.load(Ordering::Relaxed)
        });
        Ok(Exporter {
            enabled: Some(Enabled {
                metrics,
                reconnects,
                registered: Default::default(),
                _server: server,
            }),
        })
    }
}

/// The address `--metrics TEXT` listens on: `PORT` and `:PORT` mean loopback; an address
/// beyond loopback is refused unless `public`.
fn listen_addr(text: &str, public: bool) -> Result<SocketAddr> {
    let text = text.trim();
    let port_only = text.strip_prefix(':').unwrap_or(text);
    let addr = if !port_only.is_empty() && port_only.bytes().all(|b| b.is_ascii_digit()) {
        let port: u16 = port_only
            .parse()
            .with_context(|| format!("--metrics {text}: {port_only} is not a port"))?;
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    } else if let Some(port) = text.strip_prefix("localhost:") {
        let port: u16 = port
            .parse()
            .with_context(|| format!("--metrics {text}: {port} is not a port"))?;
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    } else {
        text.parse()
            .with_context(|| format!("--metrics {text}: give PORT, :PORT or IP:PORT (e.g. 127.0.0.1:9100)"))?
    };
    if !addr.ip().is_loopback() && !public {
        bail!("--metrics {addr} is beyond loopback and metrics have no authentication: listen on 127.0.0.1:PORT, or add --metrics-public to serve them there anyway");
    }
    Ok(addr)
}

/// What a command reports to; does nothing when `--metrics` was not given.
#[derive(Default)]
pub struct Exporter {
    enabled: Option<Enabled>,
}

struct Enabled {
    metrics: Arc<Metrics>,
    /// Shared by every remote's reconnect stage.
    reconnects: Arc<AtomicU64>,
    registered: parking_lot::Mutex<std::collections::HashSet<&'static str>>,
    _server: MetricsServer,
}

impl Exporter {
    fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.enabled.as_ref().map(|e| &e.metrics)
    }

    /// True the first time it is asked about `name` (a metric one process may offer from two
    /// parts is registered by the first).
    fn first_time(&self, name: &'static str) -> bool {
        self.enabled
            .as_ref()
            .is_some_and(|e| e.registered.lock().insert(name))
    }

    /// `backend`, its traffic counted under `role`.
    pub fn meter(&self, backend: SharedBackend, role: Role) -> SharedBackend {
        match self.metrics() {
            Some(metrics) => Arc::new(Metered::new(backend, role, metrics.clone())),
            None => backend,
        }
    }

    /// Remote options whose reconnects are counted.
    pub fn remote_options(&self, mut options: RemoteOptions) -> RemoteOptions {
        if let Some(enabled) = &self.enabled {
            options.reconnect.reconnects = enabled.reconnects.clone();
        }
        options
    }

    /// The NBD clients `server` is serving.
    pub fn nbd_server(&self, server: &r3map_nbd::Server) {
        let Some(metrics) = self.metrics() else { return };
        let open = server.open_connections();
        metrics.gauge_from("r3map_nbd_connections", move || {
            i64::try_from(open.get()).unwrap_or(i64::MAX)
        });
    }

    /// Times every served fault of slice regions.
    pub fn fault_observer(&self) -> Option<FaultObserver> {
        let histogram = self.metrics()?.fault_latency.clone();
        Some(FaultObserver(Arc::new(move |took| {
            histogram.observe(took.as_secs_f64())
        })))
    }

    /// A managed mount's pull progress, fetches, pushes and dirty bytes.
    pub fn managed_mount(&self, mount: &ManagedMount) {
        let Some(metrics) = self.metrics() else { return };
        let reader = mount.stats_reader();
        let stat = |read: fn(r3map_mount::MountStats) -> u64| {
            let reader = reader.clone();
            move || reader.stats().map_or(0, read)
        };
        metrics.counter_from("r3map_chunks_fetched_total", {
            let reader = reader.clone();
            move || reader.fetched_chunks().unwrap_or(0)
        });
        let pushed = stat(|s| s.pushed_bytes);
        metrics.counter_from("r3map_pushed_bytes_total", pushed);
        let (local, total, dirty) = (
            stat(|s| s.local_bytes),
            stat(|s| s.total_bytes),
            stat(|s| s.dirty_bytes),
        );
        metrics.gauge_from("r3map_pull_local_bytes", move || gauge(local()));
        metrics.gauge_from("r3map_pull_total_bytes", move || gauge(total()));
        metrics.gauge_from("r3map_dirty_bytes", move || gauge(dirty()));
    }

    /// A migration destination: phase, rounds, pull progress, re-pulls.
    pub fn leecher(&self, leecher: &Leecher) {
        let Some(metrics) = self.metrics() else { return };
        let (info, reader) = (leecher.info(), leecher.status_reader());
        let bytes = move |chunks: u64| gauge(chunks.saturating_mul(info.chunk_size).min(info.size));
        metrics.counter_from("r3map_chunks_fetched_total", {
            let reader = reader.clone();
            move || reader.fetched_chunks()
        });
        metrics.counter_from("r3map_migration_repulled_chunks_total", {
            let reader = reader.clone();
            move || reader.status().repulled
        });
        metrics.gauge_from("r3map_pull_local_bytes", {
            let reader = reader.clone();
            move || bytes(reader.status().local_chunks)
        });
        metrics.gauge_from("r3map_pull_total_bytes", move || gauge(info.size));
        if self.first_time("r3map_migration_round") {
            metrics.gauge_from("r3map_migration_round", {
                let reader = reader.clone();
                move || gauge(reader.status().rounds.len() as u64)
            });
        }
        metrics.gauge_from("r3map_migration_round_dirty_chunks", {
            let reader = reader.clone();
            move || gauge(reader.status().rounds.last().copied().unwrap_or(0))
        });
        // Once this host seeds onward, the seeder's phase (set later at each scrape) wins.
        metrics.on_scrape(move |metrics| metrics.set_migration_phase(leecher_phase(reader.status().phase)));
    }

    /// Finalize's downtime, measured by both hosts' clocks and bounded by this host's alone.
    pub fn finalized(&self, report: &FinalizeReport) {
        let Some(metrics) = self.metrics() else { return };
        let (downtime, bound) = (report.downtime.as_secs_f64(), report.downtime_bound.as_secs_f64());
        metrics.float_gauge_from("r3map_migration_downtime_seconds", move || downtime);
        metrics.float_gauge_from("r3map_migration_downtime_bound_seconds", move || bound);
    }

    /// A migration source: its phase and the pre-copy rounds its destination ran.
    pub fn seeder(&self, seeder: &Arc<Seeder>) {
        let Some(metrics) = self.metrics() else { return };
        let seeder: Weak<Seeder> = Arc::downgrade(seeder);
        let rounds = Arc::new(AtomicU64::new(0));
        // A leecher seeding onward keeps reporting the rounds it ran as a destination.
        if self.first_time("r3map_migration_round") {
            metrics.gauge_from("r3map_migration_round", {
                let rounds = rounds.clone();
                move || gauge(rounds.load(Ordering::Relaxed))
            });
        }
        metrics.on_scrape(move |metrics| {
            let Some(seeder) = seeder.upgrade() else { return };
            let phase = seeder.phase();
            if let SeederPhase::Tracking { rounds: now, .. } = phase {
                rounds.store(now, Ordering::Relaxed);
            }
            metrics.set_migration_phase(seeder_phase(phase));
        });
    }

    /// A seeder link whose reads (the chunks a destination pulls) are counted as the remote's.
    pub fn seeder_link(&self, link: Arc<dyn SeederLink>) -> Arc<dyn SeederLink> {
        match self.metrics() {
            Some(metrics) => Arc::new(MeteredLink {
                inner: link,
                metrics: metrics.clone(),
            }),
            None => link,
        }
    }

    /// Delta file sync: bytes on the wire, versions and blocks.
    pub fn sync_counters(&self, counters: &Arc<r3map_sync::conn::Counters>) {
        let Some(metrics) = self.metrics() else { return };
        let read = |value: fn(&r3map_sync::conn::Counters) -> u64| {
            let counters = counters.clone();
            move || value(&counters)
        };
        metrics.sync_bytes_from("sent", read(|c| c.sent()));
        metrics.sync_bytes_from("received", read(|c| c.received()));
        metrics.counter_from("r3map_sync_versions_total", read(|c| c.versions()));
        metrics.counter_from("r3map_sync_blocks_total", read(|c| c.blocks()));
    }
}

fn gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn leecher_phase(phase: LeecherPhase) -> &'static str {
    match phase {
        LeecherPhase::Pulling => "pulling",
        LeecherPhase::PreCopy { .. } => "precopy",
        LeecherPhase::Finalizing => "finalizing",
        LeecherPhase::Finalized => "finalized",
        LeecherPhase::Complete => "complete",
    }
}

fn seeder_phase(phase: SeederPhase) -> &'static str {
    match phase {
        SeederPhase::Serving => "serving",
        SeederPhase::Tracking { .. } => "tracking",
        SeederPhase::Synced { .. } => "synced",
        SeederPhase::HandedOff { .. } => "handed_off",
        SeederPhase::Closed => "closed",
    }
}

/// Counts a leecher's reads from its seeder (gRPC round trips) like a metered backend's.
struct MeteredLink {
    inner: Arc<dyn SeederLink>,
    metrics: Arc<Metrics>,
}

#[async_trait]
impl SeederLink for MeteredLink {
    async fn info(&self) -> r3map_migration::Result<ResourceInfo> {
        self.inner.info().await
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> r3map_migration::Result<()> {
        let (started, len) = (Instant::now(), buf.len() as u64);
        let result = self.inner.read_at(offset, buf).await;
        let outcome = match &result {
            Ok(()) => Outcome::Done,
            Err(MigrationError::Timeout { .. }) => Outcome::TimedOut,
            Err(_) => Outcome::Failed,
        };
        self.metrics.record(Role::remote, Op::read, len, started, outcome);
        result
    }
    async fn track(&self, session: SessionId) -> r3map_migration::Result<()> {
        self.inner.track(session).await
    }
    async fn dirty_round(&self, session: SessionId) -> r3map_migration::Result<Vec<u64>> {
        self.inner.dirty_round(session).await
    }
    async fn sync(&self, session: SessionId) -> r3map_migration::Result<SyncReport> {
        self.inner.sync(session).await
    }
    async fn commit(&self, session: SessionId) -> r3map_migration::Result<()> {
        self.inner.commit(session).await
    }
    async fn hashes(
        &self,
        session: SessionId,
        first: u64,
        count: u64,
    ) -> r3map_migration::Result<Vec<[u8; 32]>> {
        self.inner.hashes(session, first, count).await
    }
    async fn close(&self, session: SessionId) -> r3map_migration::Result<()> {
        self.inner.close(session).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_means_loopback_and_other_hosts_need_public() {
        let loopback = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        assert_eq!(listen_addr("9100", false).unwrap(), loopback(9100));
        assert_eq!(listen_addr(":9100", false).unwrap(), loopback(9100));
        assert_eq!(listen_addr("localhost:0", false).unwrap(), loopback(0));
        assert_eq!(
            listen_addr("[::1]:9100", false).unwrap(),
            "[::1]:9100".parse().unwrap()
        );
        let refused = listen_addr("0.0.0.0:9100", false).unwrap_err().to_string();
        assert!(refused.contains("--metrics-public"), "{refused}");
        assert_eq!(
            listen_addr("0.0.0.0:9100", true).unwrap(),
            "0.0.0.0:9100".parse().unwrap()
        );
        assert!(listen_addr("99999", false).is_err());
        assert!(listen_addr("nonsense", false).is_err());
    }
}
