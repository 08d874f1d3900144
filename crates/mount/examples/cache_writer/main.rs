//! A managed mount over a persistent cache that writes until it is killed: the child process
//! of `tests/cache_sigkill.rs`. Not a user tool.
//!
//! `cache_writer DIR REMOTE VIEW SEED` opens the cache in DIR for the remote file REMOTE, writes
//! the content it reads through the mount to VIEW, prints `ready SHUTDOWN`, then writes op
//! after op (see `ops.rs`), printing `ack N` once write N has returned (and fsyncs every seventh),
//! until it is killed. With SEED `close` it closes the mount cleanly after `ready` instead
//! (pushing everything) and prints `closed`.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use r3map_backends::{FileBackend, FileOptions};
use r3map_core::stages::PusherOptions;
use r3map_core::{Backend, SharedBackend};
use r3map_mount::{ManagedMount, ManagedOptions, PersistentCache};

mod ops;
use ops::{op, CHUNK};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> r3map_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, remote, view, seed] = &args[..] else {
        panic!("usage: cache_writer DIR REMOTE VIEW SEED|close");
    };
    let remote: SharedBackend = Arc::new(FileBackend::open(remote, FileOptions::new())?);
    let size = remote.size();
    let cache = PersistentCache::open(dir.as_ref(), size, CHUNK, "file:remote")?;
    let shutdown = cache.recovery.shutdown;
    let options = ManagedOptions {
        chunk_size: CHUNK,
        pusher: PusherOptions {
            workers: 4,
            interval: Duration::from_millis(5),
        },
        ..Default::default()
    };
    let mount = ManagedMount::open_cached(remote, cache, options).await?;
    let backend = mount.backend();
    let mut content = vec![0; size as usize];
    backend.read_at(0, &mut content).await?;
    std::fs::write(view, &content)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {shutdown:?}")?;
    if seed == "close" {
        mount.close().await?;
        writeln!(out, "closed")?;
        return Ok(());
    }
    let seed: u64 = seed.parse().expect("a numeric seed");
    for n in 0.. {
        let (offset, data) = op(seed, n, size);
        backend.write_at(offset, &data).await?;
        if n % 7 == 6 {
            mount.sync().await?;
        }
        writeln!(out, "ack {n}")?;
    }
    Ok(())
}
