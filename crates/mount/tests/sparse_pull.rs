//! A managed mount over NBD (our server, the `nbd://` remote stack the CLI uses) of a sparse
//! export pulls only the chunks that hold data: holes become local zeros without a transfer,
//! counted on the server. With a persistent cache the zeros are real in the cache's data file
//! (punched holes, whatever stale bytes it held), and they survive a process crash and a
//! machine crash by the cache's rules.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use r3map_core::testing::{self, pattern, ReadCounting};
use r3map_core::{Allocation, Backend, MemoryBackend, SharedBackend};
use r3map_mount::{BackendSpec, ManagedMount, ManagedOptions, PersistentCache};
use r3map_nbd::{Export, Server, ServerConfig};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// Data in chunks 2 and 7 (whole) and 64 KiB inside chunk 11; the rest never written.
const DATA: [(u64, u64); 3] = [(2 * MIB, MIB), (7 * MIB, MIB), (11 * MIB + (300 << 10), 64 << 10)];
const DATA_CHUNKS: [u64; 3] = [2, 7, 11];

struct Remote {
    export: Arc<ReadCounting>,
    uri: String,
    model: Vec<u8>,
}

async fn serve() -> Remote {
    let export = Arc::new(ReadCounting::new(SIZE));
    let mut model = vec![0u8; SIZE as usize];
    for (i, &(at, len)) in DATA.iter().enumerate() {
        let data = pattern(i as u64 + 1, len as usize);
        export.write_at(at, &data).await.unwrap();
        model[at as usize..(at + len) as usize].copy_from_slice(&data);
    }
    let server = Server::bind_tcp(
        ServerConfig::new(vec![Export::new("sparse", export.clone())]),
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let uri = format!("nbd://{}/sparse", server.local_addr());
    tokio::spawn(server.serve(std::future::pending()));
    Remote { export, uri, model }
}

async fn open_remote(uri: &str) -> SharedBackend {
    uri.parse::<BackendSpec>().unwrap().open(None).await.unwrap()
}

fn options(skip_holes: bool) -> ManagedOptions {
    ManagedOptions {
        skip_holes,
        ..ManagedOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_data_chunks_are_pulled_and_holes_read_as_zeros() {
    let remote = serve().await;
    let mount = ManagedMount::open(
        open_remote(&remote.uri).await,
        Arc::new(MemoryBackend::new(SIZE)),
        options(true),
    )
    .await
    .unwrap();
    mount.wait_pulled().await.unwrap();
    assert_eq!(mount.fetched_chunks(), DATA_CHUNKS.len() as u64);
    assert_eq!(mount.skipped_chunks(), 16 - DATA_CHUNKS.len() as u64);
    assert_eq!(mount.stats().local_bytes, SIZE);
    // The server sent exactly the data chunks (the partial one whole).
    assert_eq!(
        remote.export.read.load(Ordering::Relaxed),
        DATA_CHUNKS.len() as u64 * MIB
    );
    testing::check_content(&*mount.backend(), &remote.model)
        .await
        .unwrap();
    mount.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_skipping_every_chunk_is_transferred() {
    let remote = serve().await;
    let mount = ManagedMount::open(
        open_remote(&remote.uri).await,
        Arc::new(MemoryBackend::new(SIZE)),
        options(false),
    )
    .await
    .unwrap();
    mount.wait_pulled().await.unwrap();
    assert_eq!((mount.fetched_chunks(), mount.skipped_chunks()), (16, 0));
    assert_eq!(remote.export.read.load(Ordering::Relaxed), SIZE);
    testing::check_content(&*mount.backend(), &remote.model)
        .await
        .unwrap();
    mount.close().await.unwrap();
}

/// A write into a hole before the pull reaches it stays (it is data, locally and on the remote
/// after the push), and the mount's extents call it data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_write_into_a_hole_is_data_and_is_pushed() {
    let remote = serve().await;
    let mut model = remote.model.clone();
    let mount = ManagedMount::open(
        open_remote(&remote.uri).await,
        Arc::new(MemoryBackend::new(SIZE)),
        options(true),
    )
    .await
    .unwrap();
    let backend = mount.backend();
    let data = pattern(77, 5000);
    backend.write_at(14 * MIB + 10, &data).await.unwrap();
    model[(14 * MIB + 10) as usize..(14 * MIB + 5010) as usize].copy_from_slice(&data);
    mount.wait_pulled().await.unwrap();
    let extents = backend.extents(14 * MIB, MIB).await.unwrap();
    assert_eq!(extents[0].allocation, Allocation::Data, "{extents:?}");
    testing::check_content(&*backend, &model).await.unwrap();
    mount.close().await.unwrap();
    testing::check_content(&remote.export.inner, &model)
        .await
        .unwrap();
}

fn hole_chunks() -> impl Iterator<Item = u64> {
    (0..16).filter(|c| !DATA_CHUNKS.contains(c))
}

/// The cache's data file: stale bytes everywhere (as a cache left by an earlier run whose
/// chunks must be fetched again holds), none of it local.
fn stale_cache(dir: &std::path::Path, boot: &str) -> PersistentCache {
    let cache = PersistentCache::open_on_boot(dir, SIZE, MIB, "sparse", boot).unwrap();
    testing::block_on(cache.data.write_at(0, &vec![0xEE; SIZE as usize])).unwrap();
    cache
}

fn data_file_holes(dir: &std::path::Path) -> Vec<u64> {
    let file =
        r3map_backends::FileBackend::open(dir.join("data"), r3map_backends::FileOptions::new()).unwrap();
    let mut holes = Vec::new();
    let mut at = 0;
    while at < SIZE {
        for extent in testing::block_on(file.extents(at, SIZE - at)).unwrap() {
            if extent.allocation == Allocation::Hole {
                holes.extend((at.div_ceil(MIB)..(at + extent.len) / MIB).collect::<Vec<_>>());
            }
            at += extent.len;
        }
    }
    holes
}

#[test]
fn a_persistent_cache_holds_real_zeros_for_skipped_holes_across_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let remote = runtime.block_on(serve());
    let cache = stale_cache(dir.path(), "boot-a");
    // Run 1: pull, then die without closing (a process crash).
    runtime.block_on(async {
        let mount = ManagedMount::open_cached(open_remote(&remote.uri).await, cache, options(true))
            .await
            .unwrap();
        mount.wait_pulled().await.unwrap();
        assert_eq!((mount.fetched_chunks(), mount.skipped_chunks()), (3, 13));
        testing::check_content(&*mount.backend(), &remote.model)
            .await
            .unwrap();
        drop(mount);
    });
    // The zeros are in the file: every skipped chunk is a punched hole, reading zeros.
    let holes = data_file_holes(dir.path());
    assert_eq!(
        holes,
        hole_chunks().collect::<Vec<_>>(),
        "holes in the cache's data file"
    );
    let on_disk = std::fs::read(dir.path().join("data")).unwrap();
    assert!(on_disk == remote.model, "the data file differs from the remote");
    // Run 2, same boot: the page cache survived, so every chunk is still local.
    let cache = PersistentCache::open_on_boot(dir.path(), SIZE, MIB, "sparse", "boot-a").unwrap();
    runtime.block_on(async {
        let mount = ManagedMount::open_cached(open_remote(&remote.uri).await, cache, options(true))
            .await
            .unwrap();
        mount.wait_pulled().await.unwrap();
        assert_eq!((mount.fetched_chunks(), mount.skipped_chunks()), (0, 0));
        testing::check_content(&*mount.backend(), &remote.model)
            .await
            .unwrap();
        drop(mount); // again no close: nothing was ever checkpointed
    });
    // Run 3, another boot (a machine crash): nothing was fsynced, so nothing is trusted; stale
    // bytes written over the file stand for what the disk may hold. Holes are skipped again
    // and zeroed again; then a clean close makes them durable.
    let cache = stale_cache(dir.path(), "boot-b");
    runtime.block_on(async {
        let mount = ManagedMount::open_cached(open_remote(&remote.uri).await, cache, options(true))
            .await
            .unwrap();
        mount.wait_pulled().await.unwrap();
        assert_eq!((mount.fetched_chunks(), mount.skipped_chunks()), (3, 13));
        testing::check_content(&*mount.backend(), &remote.model)
            .await
            .unwrap();
        mount.close().await.unwrap();
    });
    // Run 4, after a clean close and a reboot: trusted as it is.
    let cache = PersistentCache::open_on_boot(dir.path(), SIZE, MIB, "sparse", "boot-c").unwrap();
    runtime.block_on(async {
        let mount = ManagedMount::open_cached(open_remote(&remote.uri).await, cache, options(true))
            .await
            .unwrap();
        mount.wait_pulled().await.unwrap();
        assert_eq!((mount.fetched_chunks(), mount.skipped_chunks()), (0, 0));
        testing::check_content(&*mount.backend(), &remote.model)
            .await
            .unwrap();
        mount.close().await.unwrap();
    });
}
