//! Benchmarks of the FUSE frontends (run as root, release build):
//!
//! `cargo run --release -p r3map-fuse --example bench_fuse [size-MiB] [direct|speed|all]`
//!
//! - `direct` (issue 5): O_DIRECT throughput of the FUSE file and the loop device over it
//!   against the memory backend called directly, for each FUSE transport.
//! - `speed` (issue 17): buffered sequential reads against the page cache, 4 KiB random reads
//!   and writes at QD1 and QD32, classic vs io_uring, loop over FUSE, and the slice frontend,
//!   on a fully local managed stack.
//!
//! FUSE over io_uring needs the `fuse` module parameter `enable_uring`: the program turns it on
//! if it is off (and says so), and turns it off again at the end.

mod direct_io;
mod frontend_speed;

use r3map_fuse::{enable_uring, FileOptions, UringSwitch};

fn main() {
    let size_mib: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("size in MiB"))
        .unwrap_or(256);
    let which = std::env::args().nth(2).unwrap_or_else(|| "all".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let switched = enable_uring();
    match &switched {
        Ok(UringSwitch::AlreadyOn) => println!("FUSE over io_uring: enable_uring was already Y\n"),
        Ok(UringSwitch::TurnedOn) => println!("FUSE over io_uring: turned enable_uring on for this run\n"),
        Err(reason) => println!("FUSE over io_uring unavailable ({reason}): the io_uring runs fall back\n"),
    }
    if which == "direct" || which == "all" {
        for io_uring in [false, true] {
            let options = FileOptions {
                io_uring,
                ..FileOptions::default()
            };
            direct_io::run(&rt, size_mib, &options);
        }
    }
    if which == "speed" || which == "all" {
        frontend_speed::run(&rt, size_mib);
    }
    if switched == Ok(UringSwitch::TurnedOn) {
        if let Err(err) = std::fs::write("/sys/module/fuse/parameters/enable_uring", "N\n") {
            println!("could not turn enable_uring off again: {err}");
        }
    }
}
