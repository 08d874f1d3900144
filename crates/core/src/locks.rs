//! Per-chunk async locks without per-chunk state: only chunks currently locked (or waited for)
//! have an entry, so memory is bounded by the number of requests in flight, not the size.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// A table of async mutexes keyed by chunk index.
#[derive(Debug, Default)]
pub struct ChunkLocks {
    held: Mutex<HashMap<u64, Arc<AsyncMutex<()>>>>,
}

/// Holds the lock on one chunk until dropped.
#[derive(Debug)]
pub struct ChunkGuard<'a> {
    locks: &'a ChunkLocks,
    chunk: u64,
    guard: Option<OwnedMutexGuard<()>>,
}

impl ChunkLocks {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Locks `chunk`, waiting (FIFO) while another task holds it.
    pub async fn lock(&self, chunk: u64) -> ChunkGuard<'_> {
        // The entry is cloned under the table lock, so the releasing side can tell (by the
        // reference count, also under the table lock) whether anybody still waits for it.
        let mutex = self.held.lock().entry(chunk).or_default().clone();
        let guard = mutex.lock_owned().await;
        ChunkGuard {
            locks: self,
            chunk,
            guard: Some(guard),
        }
    }

    /// Number of chunks locked or waited for (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.held.lock().len()
    }

    /// Whether no chunk is locked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for ChunkGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock();
        drop(self.guard.take());
        if let Some(entry) = held.get(&self.chunk) {
            // Only the table itself still refers to the mutex: nobody waits, remove it.
            if Arc::strong_count(entry) == 1 {
                held.remove(&self.chunk);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn excludes_per_chunk_and_cleans_up() {
        let locks = Arc::new(ChunkLocks::new());
        let inside = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (locks, inside) = (locks.clone(), inside.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..50 {
                    let _guard = locks.lock(7).await;
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(locks.is_empty());
        // Different chunks do not exclude each other.
        let _a = locks.lock(1).await;
        let _b = locks.lock(2).await;
        assert_eq!(locks.len(), 2);
    }
}
