//! Test helper for `tests/stale_cleanup.rs`: opens a disk (FUSE file + loop device) at the
//! mountpoint given as the first argument, prints `READY <device>`, and waits on standard
//! input — the test kills it with SIGKILL to leave a stale mount behind.

use std::sync::Arc;

use r3map_core::MemoryBackend;
use r3map_fuse::DiskMount;

fn main() {
    let mountpoint = std::env::args()
        .nth(1)
        .expect("usage: open_disk_and_wait MOUNTPOINT");
    let runtime = tokio::runtime::Runtime::new().expect("a Tokio runtime");
    let disk = DiskMount::open(
        Arc::new(MemoryBackend::new(8 << 20)),
        &mountpoint,
        "disk",
        runtime.handle().clone(),
    )
    .expect("open the disk");
    println!("READY {}", disk.path().display());
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    panic!("the helper should have been killed");
}
