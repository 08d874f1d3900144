//! Slice frontend: faults that cannot be served (SIGBUS, errors reported) and teardown.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{pattern_byte, shared, GateBackend, PatternBackend, PAGE};
use r3map_core::testing::{block_on, FaultyBackend};
use r3map_core::Error;
use r3map_frontends::slice::{FailedFetch, Region, RegionOptions};
use r3map_frontends::uffd::{raw, read_process_memory};

const CHILD_ENV: &str = "R3MAP_SLICE_CHILD";

/// Re-runs this test binary's test `name` in a child with `CHILD_ENV=name` and returns the
/// signal that ended it, if any.
fn run_child(name: &str) -> Option<i32> {
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--test-threads=1", "--nocapture"])
        .env(CHILD_ENV, name)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    status.signal()
}

fn in_child(name: &str) -> bool {
    std::env::var(CHILD_ENV).is_ok_and(|v| v == name)
}

fn options(chunk: u64, timeout: Option<Duration>) -> RegionOptions {
    RegionOptions {
        chunk_size: chunk,
        fetch_timeout: timeout,
        ..RegionOptions::default()
    }
}

#[test]
fn backend_error_delivers_sigbus_to_the_faulting_thread() {
    if !common::have_userfaultfd() {
        return;
    }
    let name = "backend_error_delivers_sigbus_to_the_faulting_thread";
    if in_child(name) {
        let faulty = FaultyBackend::new(Arc::new(PatternBackend::new(16 * PAGE)));
        faulty.fail_reads.store(true, Ordering::SeqCst);
        let region = Region::new(Arc::new(faulty), options(4 * PAGE, None)).unwrap();
        std::hint::black_box(region.as_slice()[PAGE as usize]);
        panic!("the faulting read returned instead of raising SIGBUS");
    }
    assert_eq!(run_child(name), Some(libc::SIGBUS));
}

#[test]
fn backend_timeout_delivers_sigbus() {
    if !common::have_userfaultfd() {
        return;
    }
    let name = "backend_timeout_delivers_sigbus";
    if in_child(name) {
        // Reads never complete: the remote is gone.
        let gate = GateBackend::new(16 * PAGE);
        let region = Region::new(
            Arc::new(gate),
            options(4 * PAGE, Some(Duration::from_millis(100))),
        )
        .unwrap();
        std::hint::black_box(region.as_slice()[0]);
        panic!("the faulting read returned instead of raising SIGBUS");
    }
    assert_eq!(run_child(name), Some(libc::SIGBUS));
}

#[test]
fn unserved_faults_are_reported_and_poison_only_their_chunk() {
    if !common::have_userfaultfd() {
        return;
    }
    let chunk = 4 * PAGE;
    let (faulty, backend) = shared(FaultyBackend::new(Arc::new(PatternBackend::new(8 * chunk))));
    let region = Region::new(backend, options(chunk, None)).unwrap();
    assert!(region.poison_supported());
    let mut errors = region.error_count();
    faulty.fail_reads.store(true, Ordering::SeqCst);
    // A kernel-side access (process_vm_readv) gets EFAULT where a thread would get SIGBUS.
    let mut buf = vec![0u8; 16];
    let err = read_process_memory(None, region.addr() + chunk + 8, &mut buf).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
    block_on(errors.wait_for(|n| *n == 1)).unwrap();
    let reported = region.errors();
    assert_eq!(reported.len(), 1);
    assert_eq!(reported[0].chunk, 1);
    assert!(matches!(reported[0].error, Error::Io(_)));
    assert_eq!(region.stats().poisoned, 1);
    // A failed background install is an error for the puller, not a poisoned chunk.
    assert!(block_on(region.install(2)).is_err());
    assert!(!region.is_installed(2));
    faulty.fail_reads.store(false, Ordering::SeqCst);
    block_on(region.install(2)).unwrap();
    assert_eq!(region.stats().poisoned, 1);
    // The poisoned chunk stays failed; others serve normally.
    assert!(block_on(region.install(1)).is_err());
    assert_eq!(region.as_slice()[3 * chunk as usize], pattern_byte(3 * chunk));
    assert_eq!(region.as_slice()[2 * chunk as usize], pattern_byte(2 * chunk));
}

/// Teardown while fetches hang in the backend, threads wait on faults and the puller runs:
/// dropping the region returns, blocked accesses end, and the puller reports the closure.
#[test]
fn teardown_under_load_never_hangs() {
    if !common::have_userfaultfd() {
        return;
    }
    let chunk = 4 * PAGE;
    let count = 256u64;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (gate, backend) = shared(GateBackend::new(count * chunk));
    let region = Region::new(backend, options(chunk, None)).unwrap();
    let puller = region
        .start_puller(r3map_core::stages::PullerOptions {
            workers: 8,
            priority: r3map_core::stages::Priority::sequential(),
        })
        .unwrap();
    let addr = region.addr();
    let readers: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 8];
                // Chunks the puller has not reached: each blocks on a hanging fetch.
                read_process_memory(None, addr + (200 + t) * chunk, &mut buf).map(|()| buf)
            })
        })
        .collect();
    // Wait until the puller's 8 and the 4 readers' fetches are all hanging in the backend.
    let mut started = gate.started.subscribe();
    runtime.block_on(started.wait_for(|n| *n >= 12)).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let dropper = std::thread::spawn(move || {
        drop(region);
        done_tx.send(()).unwrap();
    });
    done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("dropping the region hung");
    dropper.join().unwrap();
    for reader in readers {
        // Woken by the teardown: either zeros from the unregistered range or EFAULT after the
        // unmap (the gate is still closed, so no fetch delivered data), but never a hang.
        match reader.join().unwrap() {
            Ok(bytes) => assert_eq!(bytes, vec![0u8; 8], "a blocked reader got data after teardown"),
            Err(err) => assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{err}"),
        }
    }
    gate.open();
    let result =
        runtime.block_on(async { tokio::time::timeout(Duration::from_secs(10), puller.wait()).await });
    assert!(
        matches!(result, Ok(Err(_))),
        "puller reports the closed region: {result:?}"
    );
}

/// Pretends the kernel has no UFFDIO_POISON.
const NO_POISON: u64 = raw::UFFD_FEATURE_POISON as u64;

/// Without poison a fault whose fetch failed could only be answered with zeros: the default
/// (SIGBUS) mode is refused, naming the feature and the alternative.
#[test]
fn without_poison_sigbus_mode_is_refused_naming_the_feature() {
    if !common::have_userfaultfd() {
        return;
    }
    let err = Region::new(
        Arc::new(PatternBackend::new(16 * PAGE)),
        RegionOptions {
            ignore_features: NO_POISON,
            ..options(4 * PAGE, None)
        },
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("UFFDIO_POISON") && message.contains("FailedFetch::Retry"),
        "{message}"
    );
}

/// Without poison, in retry mode: the faulting thread stays blocked while fetches fail (each
/// failure reported), never sees zeros, and gets the real bytes once the backend recovers.
#[test]
fn without_poison_a_failed_fetch_blocks_and_retries_never_zeros() {
    if !common::have_userfaultfd() {
        return;
    }
    let chunk = 4 * PAGE;
    let (faulty, backend) = shared(FaultyBackend::new(Arc::new(PatternBackend::new(8 * chunk))));
    faulty.fail_reads.store(true, Ordering::SeqCst);
    let region = Region::new(
        backend,
        RegionOptions {
            ignore_features: NO_POISON,
            failed_fetch: FailedFetch::Retry,
            ..options(chunk, None)
        },
    )
    .unwrap();
    assert!(!region.poison_supported());
    let mut errors = region.error_count();
    let addr = region.addr();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; chunk as usize];
        let result = read_process_memory(None, addr + chunk, &mut buf);
        tx.send(()).unwrap();
        result.map(|()| buf)
    });
    // Three failed attempts, and the reader is still waiting.
    block_on(errors.wait_for(|n| *n >= 3)).unwrap();
    assert!(
        rx.try_recv().is_err(),
        "the fault returned while every fetch failed"
    );
    assert!(
        !region.is_installed(1),
        "a failed fetch marked the chunk installed"
    );
    assert_eq!(region.stats().poisoned, 0);
    faulty.fail_reads.store(false, Ordering::SeqCst);
    let buf = reader
        .join()
        .unwrap()
        .expect("the retried fetch served the fault");
    for (i, byte) in buf.iter().enumerate() {
        assert_eq!(*byte, pattern_byte(chunk + i as u64), "offset {i} of chunk 1");
    }
    assert!(region.is_installed(1));
    assert!(region.errors().iter().all(|e| e.chunk == 1));
}

/// A page dropped from a poisoned chunk faults again: it must be poisoned again (SIGBUS), not
/// refilled with zeros as a dropped page of a served chunk is.
#[test]
fn a_dropped_page_of_a_poisoned_chunk_still_raises_sigbus() {
    if !common::have_userfaultfd() {
        return;
    }
    let name = "a_dropped_page_of_a_poisoned_chunk_still_raises_sigbus";
    if in_child(name) {
        let chunk = 4 * PAGE;
        let faulty = Arc::new(FaultyBackend::new(Arc::new(PatternBackend::new(4 * chunk))));
        faulty.fail_reads.store(true, Ordering::SeqCst);
        let mut region = Region::new(faulty.clone(), options(chunk, None)).unwrap();
        let mut errors = region.error_count();
        let mut byte = [0u8; 1];
        let err = read_process_memory(None, region.addr() + chunk, &mut byte).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
        block_on(errors.wait_for(|n| *n == 1)).unwrap();
        faulty.fail_reads.store(false, Ordering::SeqCst);
        region.discard((chunk + PAGE) as usize, PAGE as usize).unwrap();
        std::hint::black_box(region.as_slice()[(chunk + PAGE) as usize]);
        panic!("a dropped page of a poisoned chunk was readable");
    }
    assert_eq!(run_child(name), Some(libc::SIGBUS));
}

/// A local region is left out of forked children (MADV_DONTFORK): nobody would serve the
/// child's copy, so the child has no mapping there at all (SIGSEGV) rather than a copy whose
/// never-fetched pages read as zeros. Fetched pages are not copied either.
#[test]
fn a_forked_child_gets_no_copy_of_a_local_region() {
    let chunk = 4 * PAGE;
    let region = Region::new(Arc::new(PatternBackend::new(8 * chunk)), options(chunk, None)).unwrap();
    assert_eq!(region.as_slice()[3], pattern_byte(3), "fetched in the parent");
    for offset in [3, 5 * chunk + 7] {
        let addr = region.addr() + offset;
        // SAFETY: the child only reads memory and calls _exit (no allocation, no locks), which
        // is all a child of a multithreaded process may do.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: `addr` lies in the region's mapping in the parent; in the child it is
            // expected to be unmapped, which ends the child with SIGSEGV.
            let byte = unsafe { std::ptr::read_volatile(addr as *const u8) };
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(i32::from(byte == 0) + 10) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked into a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV,
            "offset {offset}: the child read the region (exit code {}: 11 = zeros, 10 = data)",
            libc::WEXITSTATUS(status)
        );
    }
    assert_eq!(
        region.as_slice()[5 * chunk as usize + 7],
        pattern_byte(5 * chunk + 7)
    );
}
