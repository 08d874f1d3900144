//! An advertiser that maps its file and writes through the mapping, against a model: every
//! sync rehashes exactly the blocks that were written (also when the kernel reclaimed written
//! pages before the sync), and a receiver over loopback TCP ends with the model's bytes,
//! having been sent exactly the blocks whose contents changed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use r3map_sync::conn::Counters;
use r3map_sync::receiver::{receive, ReceiverConfig};
use r3map_sync::replica::Replica;
use r3map_sync::source::SourceConfig;
use r3map_sync::{Log, MappedError, MappedSource};
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;

const BLOCK: usize = 16 * 1024;

fn log() -> Log {
    Arc::new(|line| eprintln!("{line}"))
}

async fn open(path: &std::path::Path) -> Option<MappedSource> {
    let config = SourceConfig {
        path: path.to_path_buf(),
        name: "mapped.bin".into(),
        block_size: BLOCK as u32,
        threads: 1,
        timeout: Duration::from_secs(5),
    };
    match MappedSource::open(config, log()).await {
        Ok(mapped) => Some(mapped),
        Err(MappedError::Tracking(err)) => {
            r3map_core::testing::skip(&format!("no userfaultfd write tracking for files here: {err}"));
            None
        }
        Err(err) => panic!("{err}"),
    }
}

async fn receive_once(addr: &str, replica: &std::path::Path, counters: &Arc<Counters>) {
    let config = ReceiverConfig {
        addr: addr.into(),
        name: "mapped.bin".into(),
        tls: None,
        timeout: Duration::from_secs(5),
        max_size: 1 << 30,
        once: true,
        attempts: 3,
    };
    let mut replica = Replica::open(replica, BLOCK as u32, 1).unwrap();
    receive(&config, &mut replica, counters.clone(), &log())
        .await
        .unwrap();
}

fn changed_blocks(old: &[u8], new: &[u8]) -> u64 {
    old.chunks(BLOCK)
        .zip(new.chunks(BLOCK))
        .filter(|(a, b)| a != b)
        .count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_rehashes_exactly_the_written_blocks_and_receivers_converge() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mapped.bin");
    let replica = dir.path().join("replica.bin");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    // Not a whole number of pages or blocks: the last block is short.
    let mut model: Vec<u8> = (0..40 * BLOCK + 1000).map(|_| rng.gen()).collect();
    std::fs::write(&path, &model).unwrap();
    let Some(mut mapped) = open(&path).await else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(mapped.source().clone().listen(listener, None, Vec::new()));
    let counters = Arc::new(Counters::default());
    receive_once(&addr, &replica, &counters).await;
    assert_eq!(std::fs::read(&replica).unwrap(), model);

    // Nothing written yet: nothing to hash.
    let report = mapped.sync().unwrap();
    assert!(report.blocks.is_empty() && !report.new_version, "{report:?}");

    let mut reclaimed = 0;
    for round in 0..24 {
        let before = model.clone();
        let mut touched = BTreeSet::new();
        for _ in 0..rng.gen_range(0..6) {
            let at = rng.gen_range(0..model.len());
            let len = rng.gen_range(1..=(model.len() - at).min(3 * BLOCK));
            let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            mapped.data()[at..at + len].copy_from_slice(&bytes);
            model[at..at + len].copy_from_slice(&bytes);
            touched.extend((at / BLOCK) as u64..=((at + len - 1) / BLOCK) as u64);
        }
        // A read touches pages without writing them.
        let _ = mapped.data()[rng.gen_range(0..model.len())];
        if round % 3 == 2 {
            // Written pages reclaimed before the sync keep no page-table entry.
            mapped.page_out().unwrap();
        }
        let report = mapped.sync().unwrap();
        reclaimed += report.reclaimed_pages;
        assert_eq!(
            report.blocks,
            touched.iter().copied().collect::<Vec<_>>(),
            "round {round}: {report:?}"
        );
        assert_eq!(report.new_version, before != model, "round {round}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            model,
            "round {round}: the file is not the mapping"
        );
        let sent_before = counters.blocks();
        receive_once(&addr, &replica, &counters).await;
        assert_eq!(std::fs::read(&replica).unwrap(), model, "round {round}");
        assert_eq!(
            counters.blocks() - sent_before,
            changed_blocks(&before, &model),
            "round {round}"
        );
    }
    assert!(
        reclaimed > 0,
        "MADV_PAGEOUT reclaimed no written page: the reclaim path went untested"
    );
}
