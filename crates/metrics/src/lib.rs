//! r3map metrics: what every long-running command does, in the Prometheus text format.
//!
//! # Layout
//!
//! - [`Metrics`]: the registry of one process, with every metric r3map exports declared once in
//!   [`catalog`] (name, type, help; `docs/metrics.md` documents each, checked by a test).
//! - [`metered`]: [`Metered`], a stage that counts bytes, requests, errors and latency of the
//!   backend it wraps (a mount's remote, a server's export).
//! - [`http`]: [`serve`], the `/metrics` endpoint (`--metrics ADDR`).
//!
//! Values that a component already counts (chunks fetched, dirty bytes, pull progress) are not
//! counted twice: [`Metrics::counter_from`] and [`Metrics::gauge_from`] read them when scraped.

pub mod catalog;
pub mod http;
pub mod metered;

pub use http::{serve, MetricsServer};
pub use metered::{Metered, Role};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use catalog::Kind;

/// Labels of the backend metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// `remote` (what this process fetches and pushes), `export` (what it serves) or
    /// `frontend` (what applications ask for).
    pub role: Role,
    /// `read`, `write`, `sync`, `trim` or `write_zeroes`.
    pub op: Op,
}

/// A backend operation.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Op {
    read,
    write,
    sync,
    trim,
    write_zeroes,
}

/// Labels of the migration phase gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// The phase's name (`pulling`, `precopy`, `finalizing`, …).
    pub phase: String,
}

/// Labels of byte counters with a direction.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `sent` or `received`.
    pub direction: String,
}

/// Latency buckets from 20 µs to about 40 s (doubling).
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(20e-6, 2.0, 22)
}

/// How a counted request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Failed,
    /// Failed because the other side did not answer in time.
    TimedOut,
}

impl Outcome {
    /// The outcome of a backend request.
    pub fn of<T>(result: &r3map_core::Result<T>) -> Self {
        match result {
            Ok(_) => Outcome::Done,
            Err(r3map_core::Error::Timeout(_)) => Outcome::TimedOut,
            Err(_) => Outcome::Failed,
        }
    }
}

/// The metrics of one process.
pub struct Metrics {
    /// Itself, for refreshers that need the registry (see [`Metrics::on_scrape`]).
    weak: std::sync::Weak<Metrics>,
    registry: Mutex<Registry>,
    refreshers: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
    backend_bytes: Family<BackendLabels, Counter>,
    backend_requests: Family<BackendLabels, Counter>,
    backend_errors: Family<BackendLabels, Counter>,
    backend_timeouts: Family<BackendLabels, Counter>,
    backend_latency: Family<BackendLabels, Histogram>,
    /// Time from a page fault to its pages being installed (slice frontend).
    pub fault_latency: Histogram,
    /// Current migration phase: 1 for the phase the process is in, 0 for the others.
    pub migration_phase: Family<PhaseLabels, Gauge>,
    /// Bytes moved by delta file sync.
    pub sync_bytes: Family<DirectionLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry with every fixed metric of the catalog registered.
    pub fn new() -> Arc<Self> {
        Arc::new_cyclic(|weak| Self::with_fixed(weak.clone()))
    }

    fn with_fixed(weak: std::sync::Weak<Metrics>) -> Self {
        let latency = || Histogram::new(latency_buckets());
        let metrics = Self {
            weak,
            registry: Mutex::new(Registry::default()),
            refreshers: Mutex::new(Vec::new()),
            backend_bytes: Family::default(),
            backend_requests: Family::default(),
            backend_errors: Family::default(),
            backend_timeouts: Family::default(),
            backend_latency: Family::new_with_constructor(latency),
            fault_latency: latency(),
            migration_phase: Family::default(),
            sync_bytes: Family::default(),
        };
        {
            let mut registry = metrics.registry.lock();
            register(
                &mut registry,
                "r3map_backend_bytes_total",
                metrics.backend_bytes.clone(),
            );
            register(
                &mut registry,
                "r3map_backend_requests_total",
                metrics.backend_requests.clone(),
            );
            register(
                &mut registry,
                "r3map_backend_errors_total",
                metrics.backend_errors.clone(),
            );
            register(
                &mut registry,
                "r3map_backend_timeouts_total",
                metrics.backend_timeouts.clone(),
            );
            register(
                &mut registry,
                "r3map_backend_request_duration_seconds",
                metrics.backend_latency.clone(),
            );
            register(
                &mut registry,
                "r3map_fault_duration_seconds",
                metrics.fault_latency.clone(),
            );
            register(
                &mut registry,
                "r3map_migration_phase",
                metrics.migration_phase.clone(),
            );
            register(
                &mut registry,
                "r3map_sync_bytes_total",
                metrics.sync_bytes.clone(),
            );
        }
        metrics
    }

    /// A counter of the catalog whose value is read from `value` at every scrape (it must never
    /// decrease; the exported counter follows its increases).
    pub fn counter_from(&self, name: &'static str, value: impl Fn() -> u64 + Send + Sync + 'static) {
        let entry = catalog::entry(name);
        assert_eq!(
            entry.kind,
            Kind::Counter,
            "{name} is not a counter in the catalog"
        );
        let counter = Counter::<u64>::default();
        register(&mut self.registry.lock(), name, counter.clone());
        self.follow_counter(counter, value);
    }

    /// A gauge of the catalog whose value is read from `value` at every scrape.
    pub fn gauge_from(&self, name: &'static str, value: impl Fn() -> i64 + Send + Sync + 'static) {
        let entry = catalog::entry(name);
        assert_eq!(entry.kind, Kind::Gauge, "{name} is not a gauge in the catalog");
        let gauge = Gauge::<i64>::default();
        register(&mut self.registry.lock(), name, gauge.clone());
        self.refreshers.lock().push(Box::new(move || {
            gauge.set(value());
        }));
    }

    /// A gauge of the catalog in seconds (or another fractional unit), read at every scrape.
    pub fn float_gauge_from(&self, name: &'static str, value: impl Fn() -> f64 + Send + Sync + 'static) {
        let entry = catalog::entry(name);
        assert_eq!(entry.kind, Kind::Gauge, "{name} is not a gauge in the catalog");
        let gauge = Gauge::<f64, AtomicU64>::default();
        register(&mut self.registry.lock(), name, gauge.clone());
        self.refreshers.lock().push(Box::new(move || {
            gauge.set(value());
        }));
    }

    /// Counts one request under `role` and `op` that started at `started`: `bytes` are
    /// counted only when it succeeded, a timeout also as a timeout.
    pub fn record(&self, role: Role, op: Op, bytes: u64, started: Instant, outcome: Outcome) {
        let labels = BackendLabels { role, op };
        self.backend_requests.get_or_create(&labels).inc();
        self.backend_latency
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Outcome::Done => {
                self.backend_bytes.get_or_create(&labels).inc_by(bytes);
            }
            Outcome::Failed => {
                self.backend_errors.get_or_create(&labels).inc();
            }
            Outcome::TimedOut => {
                self.backend_errors.get_or_create(&labels).inc();
                self.backend_timeouts.get_or_create(&labels).inc();
            }
        }
    }

    /// Bytes of delta file sync in `direction` (`sent`, `received`), read from `value` at
    /// every scrape (it must never decrease).
    pub fn sync_bytes_from(&self, direction: &str, value: impl Fn() -> u64 + Send + Sync + 'static) {
        let counter = self
            .sync_bytes
            .get_or_create(&DirectionLabels {
                direction: direction.to_string(),
            })
            .clone();
        self.follow_counter(counter, value);
    }

    /// Runs `refresh` before every scrape (for values that are set, not read, such as the
    /// migration phase).
    pub fn on_scrape(&self, refresh: impl Fn(&Metrics) + Send + Sync + 'static) {
        let metrics = self.weak.clone();
        self.refreshers.lock().push(Box::new(move || {
            if let Some(metrics) = metrics.upgrade() {
                refresh(&metrics);
            }
        }));
    }

    /// Makes `counter` follow the increases of `value` at every scrape.
    fn follow_counter(&self, counter: Counter, value: impl Fn() -> u64 + Send + Sync + 'static) {
        let seen = AtomicU64::new(0);
        self.refreshers.lock().push(Box::new(move || {
            let now = value();
            let before = seen.swap(now, Ordering::Relaxed);
            counter.inc_by(now.saturating_sub(before));
        }));
    }

    /// Sets the migration phase gauge: `phase` is 1, every other phase seen so far 0.
    pub fn set_migration_phase(&self, phase: &str) {
        for name in catalog::MIGRATION_PHASES {
            let value = i64::from(*name == phase);
            self.migration_phase
                .get_or_create(&PhaseLabels {
                    phase: (*name).to_string(),
                })
                .set(value);
        }
    }

    /// The metrics in the Prometheus text format (OpenMetrics flavour, ending in `# EOF`).
    pub fn encode(&self) -> String {
        for refresh in self.refreshers.lock().iter() {
            refresh();
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry.lock())
            .expect("writing to a String cannot fail");
        text
    }
}

/// Registers `metric` under its catalog entry.
fn register(registry: &mut Registry, name: &str, metric: impl prometheus_client::registry::Metric) {
    let entry = catalog::entry(name);
    registry.register(strip_total(entry.name), entry.help, metric);
}

/// prometheus-client appends `_total` to counters itself.
fn strip_total(name: &str) -> &str {
    name.strip_suffix("_total").unwrap_or(name)
}
