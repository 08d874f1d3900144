//! Slice frontend: fetches run on the region's own runtime, so threads of the application's
//! runtime can fault without starving the fetches that would wake them.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use async_trait::async_trait;
use common::{pattern_byte, PatternBackend, PAGE};
use r3map_core::{Backend, Result};
use r3map_frontends::slice::{Region, RegionOptions};
use r3map_frontends::uffd::read_process_memory;

/// A backend whose reads need a Tokio timer (like a real network backend's deadlines).
struct TimerBackend(PatternBackend);

#[async_trait]
impl Backend for TimerBackend {
    fn size(&self) -> u64 {
        self.0.size
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        self.0.read_at(offset, buf).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.0.write_at(offset, data).await
    }
    async fn sync(&self) -> Result<()> {
        Ok(())
    }
}

fn region(chunks: u64, chunk: u64) -> Region {
    Region::new(
        Arc::new(TimerBackend(PatternBackend::new(chunks * chunk))),
        RegionOptions {
            chunk_size: chunk,
            ..RegionOptions::default()
        },
    )
    .unwrap()
}

/// Every worker of a multi-threaded runtime faults at the same moment (a barrier holds them
/// all in place first): with fetches on that runtime nobody would be left to run them.
#[test]
fn faults_on_every_worker_of_the_callers_runtime_are_served() {
    if !common::have_userfaultfd() {
        return;
    }
    let workers = 2;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    let chunk = 4 * PAGE;
    // Created inside the runtime, where "the current runtime" is the application's.
    let region = runtime.block_on(async { region(8, chunk) });
    let addr = region.addr();
    let barrier = Arc::new(Barrier::new(workers));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for worker in 0..workers as u64 {
        let (barrier, done_tx) = (barrier.clone(), done_tx.clone());
        runtime.spawn(async move {
            // Blocks this worker thread (deliberately not async) until every worker is here.
            barrier.wait();
            let offset = (worker * 3 + 1) * chunk + 5;
            let mut byte = [0u8; 1];
            read_process_memory(None, addr + offset, &mut byte).unwrap();
            done_tx.send((offset, byte[0])).unwrap();
        });
    }
    for _ in 0..workers {
        let (offset, byte) = done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a fault on a runtime worker was never served");
        assert_eq!(byte, pattern_byte(offset));
    }
    assert_eq!(region.installed_count(), workers as u64);
}

/// The only thread of a current-thread runtime faults while it runs a task.
#[test]
fn a_fault_inside_a_current_thread_runtime_is_served() {
    if !common::have_userfaultfd() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let chunk = 4 * PAGE;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        runtime.block_on(async {
            let region = region(4, chunk);
            let offset = 2 * chunk + 77;
            done_tx
                .send((offset, region.as_slice()[offset as usize]))
                .unwrap();
        })
    });
    let (offset, byte) = done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the fault of the runtime's only thread was never served");
    assert_eq!(byte, pattern_byte(offset));
    thread.join().unwrap();
}

#[test]
fn zero_fetch_threads_are_refused() {
    if !common::have_userfaultfd() {
        return;
    }
    let err = Region::new(
        Arc::new(PatternBackend::new(16 * PAGE)),
        RegionOptions {
            fetch_threads: 0,
            ..RegionOptions::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("fetch thread"), "{err}");
}
