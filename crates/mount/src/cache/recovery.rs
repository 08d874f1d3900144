//! What an opened cache may trust of the state an earlier run left, by how that run ended.
//!
//! The state file records, per chunk: `local` (the data file holds the chunk, as this process
//! sees it), `dirty` (written and not yet pushed), `pushing` (a push started and the remote has
//! not yet acknowledged a flush of it) and `durable` (the chunk's data was fsynced before the
//! bit was set: it survives a machine crash). See ARCHITECTURE.md, "Persistent cache crash
//! consistency", for the rules that make these trustworthy.

use r3map_core::AtomicBitmap;

/// How the run that last had the cache open ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// The cache was just created.
    New,
    /// It was closed cleanly: its state matched its data on disk.
    Clean,
    /// The process died with the cache open, but the machine kept running: the kernel's page
    /// cache still holds everything the process wrote, in the order it wrote it.
    ProcessCrash,
    /// The machine restarted with the cache open (the boot ID changed): only what was fsynced
    /// is certain, and the state file's pages reached the disk in no known order.
    MachineCrash,
}

/// What opening a cache recovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// How the previous run ended.
    pub shutdown: Shutdown,
    /// Chunks the state called local that are fetched again, because their data may be stale.
    pub refetch: u64,
    /// Dirty chunks whose writes were given up: they had never been acknowledged (process
    /// crash) or were never fsynced and their base data may be lost (machine crash).
    pub dropped: u64,
    /// Chunks to push, from the earlier run.
    pub dirty: u64,
}

/// The state bitmaps of one cache.
pub struct Bits<'a> {
    pub local: &'a AtomicBitmap,
    pub dirty: &'a AtomicBitmap,
    pub pushing: &'a AtomicBitmap,
    pub durable: &'a AtomicBitmap,
}

/// Brings the bitmaps to a state that is safe to run on after `shutdown`.
pub fn recover(shutdown: Shutdown, bits: Bits<'_>) -> Recovery {
    let chunks = bits.local.len();
    // A push that had started may not have reached the remote's disk: push it again.
    for chunk in bits.pushing.take() {
        bits.dirty.set(chunk);
    }
    let (mut refetch, mut dropped) = (0, 0);
    for chunk in 0..chunks {
        let (local, dirty, durable) = (
            bits.local.get(chunk),
            bits.dirty.get(chunk),
            bits.durable.get(chunk),
        );
        let (keep_local, keep_dirty) = match shutdown {
            Shutdown::New => (false, false),
            // Every chunk was checkpointed at close, so `durable` and `local` agree, except a
            // fetch that ended after the checkpoint (its data may not be on disk if the machine
            // restarted since): only `durable` is certain.
            Shutdown::Clean => (local && durable, dirty && local && durable),
            // The page cache survived: `local` is exact. A chunk dirty but not local was being
            // written for the first time (a whole-chunk write into a chunk never fetched) when
            // the process died, so that write was never acknowledged and the chunk may hold
            // zeros where the remote has data: fetch it again instead of pushing it.
            Shutdown::ProcessCrash => (local, dirty && local),
            // Only fsynced data is certain. A dirty chunk whose base was fsynced holds that base
            // plus some of the later (never fsynced) writes: a valid outcome of a crash, so it
            // is pushed. Any other chunk may hold zeros, or bytes written after its dirty bit
            // last reached the disk (so `dirty` could be lost): fetch it again.
            Shutdown::MachineCrash => (dirty && durable, dirty && durable),
        };
        if local && !keep_local {
            refetch += 1;
        }
        if dirty && !keep_dirty {
            dropped += 1;
        }
        set(bits.local, chunk, keep_local);
        set(bits.dirty, chunk, keep_dirty);
        if !keep_local {
            bits.durable.clear(chunk);
        }
    }
    Recovery {
        shutdown,
        refetch,
        dropped,
        dirty: bits.dirty.count_ones(),
    }
}

fn set(bitmap: &AtomicBitmap, chunk: u64, value: bool) {
    if value {
        bitmap.set(chunk);
    } else {
        bitmap.clear(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks 0..8 cover every combination of (local, dirty, durable); chunk 8 was being pushed.
    fn bitmaps() -> [AtomicBitmap; 4] {
        let [local, dirty, pushing, durable] = [(); 4].map(|_| AtomicBitmap::new(9));
        for chunk in 0..8u64 {
            if chunk & 1 != 0 {
                local.set(chunk);
            }
            if chunk & 2 != 0 {
                dirty.set(chunk);
            }
            if chunk & 4 != 0 && chunk & 1 != 0 {
                durable.set(chunk); // durable implies local while running
            }
        }
        local.set(8);
        durable.set(8);
        pushing.set(8);
        [local, dirty, pushing, durable]
    }

    fn run(shutdown: Shutdown) -> (Recovery, Vec<u64>, Vec<u64>) {
        let [local, dirty, pushing, durable] = bitmaps();
        let recovery = recover(
            shutdown,
            Bits {
                local: &local,
                dirty: &dirty,
                pushing: &pushing,
                durable: &durable,
            },
        );
        assert!(pushing.ones().is_empty());
        for chunk in durable.ones() {
            assert!(
                local.get(chunk),
                "{shutdown:?}: chunk {chunk} durable but not local"
            );
        }
        (recovery, local.ones(), dirty.ones())
    }

    #[test]
    fn each_shutdown_keeps_what_it_can_trust() {
        // local = 1,3,5,7,8; dirty = 2,3,6,7 (+8 from pushing); durable = 5,7,8.
        let (r, local, dirty) = run(Shutdown::ProcessCrash);
        assert_eq!(local, vec![1, 3, 5, 7, 8]);
        assert_eq!(
            dirty,
            vec![3, 7, 8],
            "dirty without local is an unacknowledged first write"
        );
        assert_eq!((r.refetch, r.dropped, r.dirty), (0, 2, 3));
        let (r, local, dirty) = run(Shutdown::MachineCrash);
        assert_eq!(
            local,
            vec![7, 8],
            "only dirty chunks with an fsynced base stay local"
        );
        assert_eq!(dirty, vec![7, 8]);
        assert_eq!((r.refetch, r.dropped, r.dirty), (3, 3, 2));
        let (_, local, dirty) = run(Shutdown::Clean);
        assert_eq!((local, dirty), (vec![5, 7, 8], vec![7, 8]));
    }
}
