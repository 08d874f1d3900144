//! A fetch whose remote read was answered before its chunk was marked remote (the remote got
//! newer bytes meanwhile, as a migration source's writes) must not install the older bytes:
//! the read is repeated. Without that, a leecher finalizing without pre-copy rounds could keep
//! a stale chunk, since marking a chunk that is not local yet changes nothing else.

use std::sync::Arc;

use async_trait::async_trait;
use r3map_core::stages::Synced;
use r3map_core::testing::pattern;
use r3map_core::{Backend, MemoryBackend, Result};
use tokio::sync::{watch, Semaphore};

const CHUNK: u64 = 64 << 10;
const SIZE: u64 = 4 * CHUNK;

/// Reads its bytes, then holds the answer until released.
struct AnswersLate {
    inner: MemoryBackend,
    answered: watch::Sender<u64>,
    release: Semaphore,
}

#[async_trait]
impl Backend for AnswersLate {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf).await?;
        self.answered.send_modify(|n| *n += 1);
        self.release.acquire().await.unwrap().forget();
        Ok(())
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.inner.write_at(offset, data).await
    }
    async fn sync(&self) -> Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_answered_before_its_chunk_was_marked_remote_is_repeated() {
    let inner = MemoryBackend::new(SIZE);
    inner.write_at(0, &pattern(3, SIZE as usize)).await.unwrap();
    let remote = Arc::new(AnswersLate {
        inner,
        answered: watch::channel(0).0,
        release: Semaphore::new(0),
    });
    let local = Arc::new(MemoryBackend::new(SIZE));
    let synced = Arc::new(Synced::new(local, remote.clone(), CHUNK).unwrap());
    let fetch = tokio::spawn({
        let synced = synced.clone();
        async move { synced.fetch(1).await }
    });
    let mut answered = remote.answered.subscribe();
    answered.wait_for(|&n| n >= 1).await.unwrap();
    // The source writes chunk 1 after the fetch read it, and the destination is told.
    let newer = vec![0x5A; CHUNK as usize];
    remote.inner.write_at(CHUNK, &newer).await.unwrap();
    synced.mark_remote(&[1]).await;
    // The held answer, and the repeated read.
    remote.release.add_permits(2);
    fetch.await.unwrap().unwrap();
    let mut got = vec![0u8; CHUNK as usize];
    synced.read_at(CHUNK, &mut got).await.unwrap();
    assert!(got == newer, "the fetch installed bytes older than the mark");
    assert_eq!(synced.fetch_count(), 2, "the read was repeated once");
}
