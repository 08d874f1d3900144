//! The Metered stage in the same-chunk race mode of the conformance suite
//! (`r3map_core::testing::check_races`): tasks read and write overlapping unaligned ranges
//! while scrapes of the registry race them. The data must be linearisable per byte, and no
//! request may go uncounted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use r3map_core::testing::{self, check_races, racer, RaceOptions, Yielding};
use r3map_core::MemoryBackend;
use r3map_metrics::metered::{Metered, Role};
use r3map_metrics::Metrics;

const SIZE: u64 = 4 * 64 + 19;

/// The sum of every `r3map_backend_requests_total` series in a scrape.
fn requests_counted(text: &str) -> u64 {
    text.lines()
        .filter(|line| line.starts_with("r3map_backend_requests_total{"))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn metered_races_scrapes_and_counts_every_request() {
    for seed in 1..=4 {
        testing::block_on(async move {
            let metrics = Metrics::new();
            let backend = Arc::new(Metered::new(
                Yielding::new(MemoryBackend::new(SIZE)),
                Role::remote,
                metrics.clone(),
            ));
            // Each scrape is a whole exposition, and the count never goes backwards.
            let last_count = Arc::new(AtomicU64::new(0));
            let scrape = {
                let (metrics, last_count) = (metrics.clone(), last_count.clone());
                racer(move |_| {
                    let text = metrics.encode();
                    let count = requests_counted(&text);
                    let before = last_count.fetch_max(count, Ordering::SeqCst);
                    async move {
                        assert!(text.ends_with("# EOF\n"), "{text}");
                        assert!(count >= before, "requests counted went from {before} to {count}");
                        Ok(())
                    }
                })
            };
            let options = RaceOptions {
                seed,
                ..RaceOptions::default()
            };
            let requests = options.tasks * options.ops_per_task as u64;
            check_races(backend, &vec![0; SIZE as usize], options, vec![scrape])
                .await
                .unwrap();
            // Every operation of every task is one request, and the race's final read one more.
            assert_eq!(requests_counted(&metrics.encode()), requests + 1);
        });
    }
}
