//! Hole skipping for the background pull: before the first chunk of a region is pulled, the
//! remote is asked once where the region's holes are ([`Backend::extents`]), and every chunk
//! that lies wholly in a hole is made local as zeros without a transfer
//! ([`Synced::install_zeros`]). The other chunks are fetched as usual. A chunk only partly in a
//! hole is fetched whole.
//!
//! The answer is as good as a read of zeros at the time it was asked: a chunk written locally
//! meanwhile stays as written (installing never replaces a local chunk), and an answer asked
//! before chunks were marked remote again is not used at all (the remote epoch). A remote that
//! cannot answer (an error, an empty answer) is taken to hold data everywhere: the fetches then
//! meet the real error, if there is one.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::stages::puller::PullTarget;
use crate::stages::Synced;
use crate::{Allocation, AtomicBitmap, Backend, ChunkLayout, Result};

/// Bytes whose holes one look-up asks for (rounded to whole chunks, at least one).
pub const DEFAULT_REGION: u64 = 64 << 20;
/// Extents queries one region may take before the rest of it counts as data (each answer must
/// cover a prefix; a remote answering a few bytes at a time is not followed further).
const MAX_QUERIES_PER_REGION: usize = 1024;

/// A [`PullTarget`] that skips the remote's holes; see the module note.
pub struct SkipHoles {
    synced: Arc<Synced>,
    layout: ChunkLayout,
    region_chunks: u64,
    /// Per region: its holes were looked up (and installed).
    known: AtomicBitmap,
    /// Per region: a look-up is in flight; other pulls of the region wait for it.
    looking: AtomicBitmap,
    looked_up: Notify,
}

impl std::fmt::Debug for SkipHoles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SkipHoles")
            .field("region_chunks", &self.region_chunks)
            .field("known_regions", &self.known.count_ones())
            .finish()
    }
}

impl SkipHoles {
    /// Pulls `synced`'s chunks, looking up the remote's holes `region` bytes at a time.
    pub fn new(synced: Arc<Synced>, region: u64) -> Self {
        let layout = synced.layout();
        let region_chunks = (region / layout.chunk_size()).max(1);
        let regions = layout.chunk_count().div_ceil(region_chunks);
        Self {
            synced,
            layout,
            region_chunks,
            known: AtomicBitmap::new(regions),
            looking: AtomicBitmap::new(regions),
            looked_up: Notify::new(),
        }
    }

    /// Ensures the holes of `region` were looked up and installed (once, however many pulls
    /// ask at the same time).
    async fn ensure_known(&self, region: u64) -> Result<()> {
        loop {
            if self.known.get(region) {
                return Ok(());
            }
            // Registered before looking at `looking`, so a look-up ending in between still
            // wakes us.
            let finished = self.looked_up.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            if self.looking.set(region) {
                finished.await;
                continue;
            }
            let _in_flight = LookupInFlight { skip: self, region };
            if self.known.get(region) {
                return Ok(());
            }
            let epoch = self.synced.remote_epoch();
            for chunk in self.whole_holes(region).await {
                self.synced.install_zeros(chunk, epoch).await?;
            }
            self.known.set(region);
            return Ok(());
        }
    }

    /// The chunks of `region` not local yet that lie wholly in holes of the remote.
    async fn whole_holes(&self, region: u64) -> Vec<u64> {
        let first = region * self.region_chunks;
        let last = (first + self.region_chunks).min(self.layout.chunk_count());
        let (start, end) = (
            self.layout.chunk_range(first).start,
            self.layout.chunk_range(last - 1).end,
        );
        let remote = self.synced.remote();
        let mut holes: Vec<std::ops::Range<u64>> = Vec::new();
        let mut at = start;
        for _ in 0..MAX_QUERIES_PER_REGION {
            if at >= end {
                break;
            }
            let extents = match remote.extents(at, end - at).await {
                Ok(extents) => extents,
                Err(err) => {
                    tracing::debug!(%err, at, "asking the remote for holes failed; fetching the region");
                    break;
                }
            };
            let before = at;
            for extent in extents {
                let len = extent.len.min(end - at);
                if len == 0 {
                    break;
                }
                if extent.allocation == Allocation::Hole {
                    match holes.last_mut() {
                        Some(last) if last.end == at => last.end += len,
                        _ => holes.push(at..at + len),
                    }
                }
                at += len;
            }
            if at == before {
                break; // an empty answer: the rest counts as data
            }
        }
        let layout = self.layout;
        holes
            .into_iter()
            .flat_map(|hole| {
                let from = hole.start.div_ceil(layout.chunk_size());
                (from..last).take_while(move |&c| layout.chunk_range(c).end <= hole.end)
            })
            .filter(|&c| !self.synced.is_local(c))
            .collect()
    }
}

/// Ends a region's look-up slot however the look-up ends, so pulls waiting for it never hang.
struct LookupInFlight<'a> {
    skip: &'a SkipHoles,
    region: u64,
}

impl Drop for LookupInFlight<'_> {
    fn drop(&mut self) {
        self.skip.looking.clear(self.region);
        self.skip.looked_up.notify_waiters();
    }
}

#[async_trait]
impl PullTarget for SkipHoles {
    fn chunk_count(&self) -> u64 {
        self.layout.chunk_count()
    }

    async fn pull(&self, chunk: u64) -> Result<()> {
        if self.synced.is_local(chunk) {
            return Ok(());
        }
        self.ensure_known(chunk / self.region_chunks).await?;
        self.synced.fetch(chunk).await
    }
}
