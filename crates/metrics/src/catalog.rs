//! Every metric r3map exports, declared once: `docs/metrics.md` documents each of these names
//! (a test checks it), and registering a name that is not here panics at start-up.

/// The Prometheus type of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exported metric.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static str,
    pub help: &'static str,
}

const fn metric(name: &'static str, kind: Kind, labels: &'static str, help: &'static str) -> Entry {
    Entry {
        name,
        kind,
        labels,
        help,
    }
}

use Kind::*;

/// The catalog.
pub const ENTRIES: &[Entry] = &[
    // Backends (a mount's remote, a server's exports, what a frontend asks for): wrapped in
    // the Metered stage.
    metric("r3map_backend_bytes_total", Counter, "role, op", "Bytes read or written through a backend (role remote: fetched and pushed by this process; export: served to clients; frontend: asked for by applications)"),
    metric("r3map_backend_requests_total", Counter, "role, op", "Requests made to a backend"),
    metric("r3map_backend_errors_total", Counter, "role, op", "Requests to a backend that failed"),
    metric("r3map_backend_timeouts_total", Counter, "role, op", "Requests to a backend that failed because the remote did not answer in time"),
    metric("r3map_backend_request_duration_seconds", Histogram, "role, op", "Time a backend took to answer a request (role remote: an NBD or gRPC round trip; frontend: a FUSE, block device or slice request served)"),
    // Managed mounts and migration destinations.
    metric("r3map_chunks_fetched_total", Counter, "", "Chunks fetched from the remote into the local copy"),
    metric("r3map_pushed_bytes_total", Counter, "", "Bytes pushed from the local cache to the remote"),
    metric("r3map_pull_local_bytes", Gauge, "", "Bytes held locally (pulled, written, or found in a persistent cache)"),
    metric("r3map_pull_total_bytes", Gauge, "", "Size of the resource being pulled"),
    metric("r3map_dirty_bytes", Gauge, "", "Bytes written locally and not yet pushed to the remote"),
    metric("r3map_reconnects_total", Counter, "", "Connections to a remote re-established after a loss or a timeout"),
    // Servers.
    metric("r3map_nbd_connections", Gauge, "", "NBD client connections the server is serving (accepted under the connection cap, not yet ended)"),
    // Frontends.
    metric("r3map_fault_duration_seconds", Histogram, "", "Time from reading a page fault of a slice region to waking its threads with the chunk installed"),
    // Migration.
    metric("r3map_migration_phase", Gauge, "phase", "1 for the migration phase this process is in, 0 for the others"),
    metric("r3map_migration_round", Gauge, "", "Pre-copy rounds completed"),
    metric("r3map_migration_round_dirty_chunks", Gauge, "", "Dirty chunks found by the last pre-copy round (or by finalize)"),
    metric("r3map_migration_repulled_chunks_total", Counter, "", "Chunks pulled again because the source wrote them after sending"),
    metric("r3map_migration_downtime_seconds", Gauge, "", "Measured downtime of the finished migration (source suspend to destination gate open, by both hosts' clocks)"),
    metric("r3map_migration_downtime_bound_seconds", Gauge, "", "Upper bound of the downtime by the destination's clock alone (sync sent to gate open)"),
    // Delta file sync.
    metric("r3map_sync_bytes_total", Counter, "direction", "Bytes of delta file sync on the wire (sent, received), counted below TLS"),
    metric("r3map_sync_versions_total", Counter, "", "Versions published: by this receiver, or (advertiser) confirmed by a receiver"),
    metric("r3map_sync_blocks_total", Counter, "", "Changed blocks transferred: received by this receiver, or sent by this advertiser"),
];

/// The phases `r3map_migration_phase` knows (seeder and leecher).
pub const MIGRATION_PHASES: &[&str] = &[
    "serving",
    "tracking",
    "synced",
    "handed_off",
    "closed",
    "pulling",
    "precopy",
    "finalizing",
    "finalized",
    "complete",
];

/// The catalog entry for `name`; panics for a name that is not declared (a programming error).
pub fn entry(name: &str) -> &'static Entry {
    ENTRIES
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("metric {name} is not in the catalog (crates/metrics/src/catalog.rs)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_documented_in_docs_metrics_md() {
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/metrics.md")).unwrap();
        for entry in ENTRIES {
            assert!(
                doc.contains(&format!("`{}`", entry.name)),
                "docs/metrics.md does not document {}",
                entry.name
            );
        }
        for phase in MIGRATION_PHASES {
            assert!(
                doc.contains(&format!("`{phase}`")),
                "docs/metrics.md does not name the phase {phase}"
            );
        }
    }

    #[test]
    fn names_are_unique_and_counters_end_in_total() {
        for (i, a) in ENTRIES.iter().enumerate() {
            assert!(
                ENTRIES[i + 1..].iter().all(|b| b.name != a.name),
                "{} twice",
                a.name
            );
            assert_eq!(a.kind == Kind::Counter, a.name.ends_with("_total"), "{}", a.name);
        }
    }
}
