//! The file frontend through a real FUSE mount: reads, writes, fallocate, mmap and unmount,
//! checked against a model and against the backend read directly.

mod common;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use common::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use r3map_core::testing::{ops_strategy, pattern, Op};
use r3map_core::{MemoryBackend, SharedBackend};
use r3map_fuse::{FileMount, FileOptions, FuseError};

/// Not a multiple of the page size, so the short tail page is exercised too.
const SIZE: u64 = (6 << 20) + 1234;

fn open_rw(path: &std::path::Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open the mounted file")
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate only reads its integer arguments; the fd is open for the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reads until `buf` is full or end of file; returns the bytes read.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// Writes until all of `data` is written or an error; returns the bytes written and the error.
fn write_full(file: &File, data: &[u8], offset: u64) -> (usize, Option<std::io::Error>) {
    let mut done = 0;
    while done < data.len() {
        match file.write_at(&data[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(err) => return (done, Some(err)),
        }
    }
    (done, None)
}

fn case_error(op: &Op, what: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("{op:?}: {what}"))
}

/// Reads `len` bytes at `offset` (possibly past the end: the read comes back short).
fn check_read(file: &File, model: &[u8], op: &Op, offset: u64, len: u64) -> Result<(), TestCaseError> {
    let size = model.len() as u64;
    let mut buf = vec![0xA5; len as usize];
    let n = read_full(file, &mut buf, offset).map_err(|e| case_error(op, e))?;
    let expected = len.min(size - offset) as usize;
    if n != expected {
        return Err(case_error(
            op,
            format!("read {n} bytes at {offset}, expected {expected}"),
        ));
    }
    if buf[..n] != model[offset as usize..offset as usize + n] {
        return Err(case_error(op, format!("read at {offset} differs from the model")));
    }
    Ok(())
}

/// Writes `len` bytes at `offset`; past the end, what fits is written and then ENOSPC.
fn check_write(
    file: &File,
    model: &mut [u8],
    op: &Op,
    offset: u64,
    len: u64,
    seed: u64,
) -> Result<(), TestCaseError> {
    let size = model.len() as u64;
    let data = pattern(seed, len as usize);
    let (n, err) = write_full(file, &data, offset);
    let room = len.min(size - offset) as usize;
    if n != room {
        return Err(case_error(
            op,
            format!("wrote {n} bytes at {offset}, expected {room} ({err:?})"),
        ));
    }
    let enospc = err.as_ref().and_then(|e| e.raw_os_error()) == Some(libc::ENOSPC);
    if (room < len as usize) != enospc {
        return Err(case_error(
            op,
            format!("write of {len} bytes at {offset} gave {err:?}"),
        ));
    }
    model[offset as usize..offset as usize + n].copy_from_slice(&data[..n]);
    Ok(())
}

/// Applies one generated operation through the file and to the model. Lengths may reach past
/// the end of the file.
fn apply(file: &File, model: &mut [u8], op: &Op) -> Result<(), TestCaseError> {
    let size = model.len() as u64;
    match *op {
        Op::Read { at, len } => check_read(file, model, op, at % size, len),
        Op::PastEnd { len, write: false } => check_read(file, model, op, size - (len / 2).min(size), len),
        Op::Write { at, len, seed } => check_write(file, model, op, at % size, len, seed),
        Op::PastEnd { len, write: true } => {
            check_write(file, model, op, size - (len / 2).min(size), len, len)
        }
        Op::WriteZeroes { at, len } | Op::Trim { at, len } => {
            let offset = at % size;
            let len = len.min(size - offset);
            let mode = if matches!(op, Op::Trim { .. }) {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            fallocate(file, mode, offset, len).map_err(|e| case_error(op, e))?;
            model[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        Op::Sync => file.sync_all().map_err(|e| case_error(op, e)),
    }
}

#[test]
fn file_matches_model_under_random_operations() {
    if !fuse_available() {
        return;
    }
    for options in transports() {
        file_matches_model_under_random_operations_over(&options);
    }
}

fn file_matches_model_under_random_operations_over(options: &FileOptions) {
    eprintln!("io_uring: {}", options.io_uring);
    let dir = scratch();
    let rt = runtime();
    let backend: SharedBackend = Arc::new(MemoryBackend::new(SIZE));
    let mut mount = FileMount::mount_with(backend.clone(), dir.path(), "data", rt.handle().clone(), options)
        .expect("mount");
    let file = open_rw(mount.path());
    assert_eq!(file.metadata().unwrap().len(), SIZE);

    // Requests up to 2.5 MiB: larger than one FUSE request (1 MiB), so they are split.
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&ops_strategy(5 << 19, 24), |ops| {
            // Each case starts from what the backend holds now.
            let mut model = backend_content(&rt, &backend);
            for op in &ops {
                apply(&file, &mut model, op)?;
            }
            if backend_content(&rt, &backend) != model {
                return Err(TestCaseError::fail("the backend differs from the model"));
            }
            Ok(())
        })
        .expect("the file behaves like the model");

    drop(file);
    rt.block_on(mount.unmount()).expect("unmount");
    assert!(!mount.is_mounted());
    assert!(!mount.path().exists(), "the file is gone after unmount");
}

#[test]
fn direct_io_uses_large_requests() {
    if !fuse_available() {
        return;
    }
    let dir = scratch();
    let rt = runtime();
    let counting = Counting::new(Arc::new(MemoryBackend::new(16 << 20)));
    let backend: SharedBackend = counting.clone();
    let mut mount = FileMount::mount(backend.clone(), dir.path(), "data", rt.handle().clone()).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(mount.path())
        .unwrap();
    let mut buf = Aligned::new(4 << 20);
    buf.as_mut().copy_from_slice(&pattern(7, 4 << 20));
    file.write_all_at(buf.as_slice(), 8 << 20).unwrap();
    let mut back = Aligned::new(4 << 20);
    file.read_exact_at(back.as_mut(), 8 << 20).unwrap();
    assert!(
        back.as_slice() == buf.as_slice(),
        "O_DIRECT read returns the O_DIRECT write"
    );
    assert_eq!(
        counting.max_write.load(SeqCst),
        1 << 20,
        "writes arrive as 1 MiB requests"
    );
    assert_eq!(
        counting.max_read.load(SeqCst),
        1 << 20,
        "reads arrive as 1 MiB requests"
    );
    assert!(
        counting.writes.load(SeqCst) <= 4,
        "4 MiB takes at most 4 write requests"
    );
    let content = backend_content(&rt, &backend);
    assert!(content[8 << 20..12 << 20] == *buf.as_slice());
    drop(file);
    mount.unmount_blocking().unwrap();
}

#[test]
fn mmap_shared_writes_reach_the_backend_on_msync() {
    if !fuse_available() {
        return;
    }
    let dir = scratch();
    let rt = runtime();
    let size: usize = (4 << 20) + 100;
    let counting = Counting::new(Arc::new(MemoryBackend::new(size as u64)));
    let backend: SharedBackend = counting.clone();
    let mut mount = FileMount::mount(backend.clone(), dir.path(), "mem", rt.handle().clone()).unwrap();
    let file = open_rw(mount.path());
    // A write through the file is visible through the mapping.
    file.write_all_at(b"written with pwrite", 4096).unwrap();

    // SAFETY: a fresh shared mapping of the whole file; the kernel picks the address, and it
    // is unmapped below before the file is unmounted.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        addr,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the mapping is `size` bytes long, readable and writable, and nothing else in
    // this process aliases it while the slice lives.
    let mapped = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, size) };
    assert_eq!(&mapped[4096..4096 + 19], b"written with pwrite");

    let mut expected = backend_content(&rt, &backend);
    let chunk = pattern(3, 300_000);
    mapped[1_000_000..1_300_000].copy_from_slice(&chunk);
    expected[1_000_000..1_300_000].copy_from_slice(&chunk);
    // The short tail page.
    mapped[size - 50..].fill(0xEE);
    expected[size - 50..].fill(0xEE);

    let syncs_before = counting.syncs.load(SeqCst);
    // SAFETY: addr/size describe the mapping created above.
    let rc = unsafe { libc::msync(addr, size, libc::MS_SYNC) };
    assert_eq!(rc, 0, "msync: {}", std::io::Error::last_os_error());
    assert!(
        counting.syncs.load(SeqCst) > syncs_before,
        "msync flushed the backend"
    );
    assert!(
        backend_content(&rt, &backend) == expected,
        "msync wrote the mapped pages to the backend"
    );

    // A mapping keeps the file busy even after its fd is closed.
    drop(file);
    let busy = mount.unmount_blocking();
    assert!(
        matches!(busy, Err(FuseError::Busy { .. })),
        "unmount with a live mapping: {busy:?}"
    );
    // SAFETY: unmaps the mapping created above; `mapped` is not used any more.
    assert_eq!(unsafe { libc::munmap(addr, size) }, 0);
    mount.unmount_blocking().expect("unmount after munmap");
    assert!(backend_content(&rt, &backend) == expected);
}

#[test]
fn fallocate_punches_holes_and_zeroes_ranges_in_the_backend() {
    if !fuse_available() {
        return;
    }
    let dir = scratch();
    let rt = runtime();
    let counting = Counting::new(Arc::new(MemoryBackend::new(1 << 20)));
    let backend: SharedBackend = counting.clone();
    let mut mount = FileMount::mount(backend.clone(), dir.path(), "data", rt.handle().clone()).unwrap();
    let file = open_rw(mount.path());
    let data = pattern(11, 1 << 20);
    file.write_all_at(&data, 0).unwrap();
    let mut expected = data.clone();

    fallocate(
        &file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        4096,
        10_000,
    )
    .unwrap();
    expected[4096..14_096].fill(0);
    assert_eq!(
        counting.trims.load(SeqCst),
        1,
        "punching a hole trims the backend"
    );

    fallocate(
        &file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        500_000,
        70_000,
    )
    .unwrap();
    expected[500_000..570_000].fill(0);
    assert_eq!(
        counting.zeroes.load(SeqCst),
        1,
        "zeroing a range zeroes the backend"
    );

    // Past the end with KEEP_SIZE: only the part inside the file is zeroed.
    fallocate(
        &file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        (1 << 20) - 100,
        5000,
    )
    .unwrap();
    expected[(1 << 20) - 100..].fill(0);

    // Growing the file is refused; so are modes we do not support.
    let grow = fallocate(&file, 0, (1 << 20) - 10, 100);
    assert_eq!(grow.unwrap_err().raw_os_error(), Some(libc::EFBIG));
    let collapse = fallocate(&file, libc::FALLOC_FL_COLLAPSE_RANGE, 0, 4096);
    assert!(collapse.is_err(), "collapse range must fail");

    let mut back = vec![0u8; 1 << 20];
    file.read_exact_at(&mut back, 0).unwrap();
    assert!(
        back == expected,
        "reads after fallocate see zeros (the page cache was dropped)"
    );
    assert!(backend_content(&rt, &backend) == expected);
    assert_eq!(file.metadata().unwrap().len(), 1 << 20, "the size did not change");
    drop(file);
    mount.unmount_blocking().unwrap();
}

#[test]
fn file_has_a_fixed_size_and_is_the_only_entry() {
    if !fuse_available() {
        return;
    }
    let dir = scratch();
    let rt = runtime();
    let backend: SharedBackend = Arc::new(MemoryBackend::new(64 << 10));
    let mut mount = FileMount::mount(backend.clone(), dir.path(), "only", rt.handle().clone()).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("only")]);
    let file = open_rw(mount.path());
    assert_eq!(
        file.set_len(100).unwrap_err().raw_os_error(),
        Some(libc::EPERM),
        "shrinking is refused"
    );
    file.set_len(64 << 10)
        .expect("truncating to the same size is allowed");
    assert_eq!(
        file.write_at(b"x", 64 << 10).unwrap_err().raw_os_error(),
        Some(libc::ENOSPC),
        "writing at the end has no room"
    );
    assert!(
        File::create(dir.path().join("other")).is_err(),
        "no other files can be created"
    );
    assert_eq!(file.metadata().unwrap().len(), 64 << 10);
    drop(file);

    // A second mount on the same directory is refused with a clear message.
    let again = FileMount::mount(backend.clone(), dir.path(), "only", rt.handle().clone());
    let message = again.unwrap_err().to_string();
    assert!(message.contains("already mounted"), "{message}");
    mount.unmount_blocking().unwrap();
}

#[test]
fn requests_are_served_concurrently() {
    if !fuse_available() {
        return;
    }
    for options in transports() {
        requests_are_served_concurrently_over(&options);
    }
}

fn requests_are_served_concurrently_over(options: &FileOptions) {
    eprintln!("io_uring: {}", options.io_uring);
    let dir = scratch();
    let rt = runtime();
    const READERS: usize = 4;
    let rendezvous = Rendezvous::new(Arc::new(MemoryBackend::new(8 << 20)), READERS as u64);
    let backend: SharedBackend = rendezvous.clone();
    let mut mount =
        FileMount::mount_with(backend.clone(), dir.path(), "data", rt.handle().clone(), options).unwrap();
    let path = mount.path().to_path_buf();
    std::thread::scope(|scope| {
        for reader in 0..READERS {
            let path = &path;
            scope.spawn(move || {
                let file = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .unwrap();
                let mut buf = Aligned::new(64 << 10);
                file.read_exact_at(buf.as_mut(), (reader as u64) << 20).unwrap();
            });
        }
    });
    assert!(
        rendezvous.met.load(SeqCst),
        "{READERS} reads were never in the backend at the same time: requests are serialised"
    );
    mount.unmount_blocking().unwrap();
}

#[test]
fn concurrent_readers_and_writers_keep_their_data() {
    if !fuse_available() {
        return;
    }
    for options in transports() {
        concurrent_readers_and_writers_keep_their_data_over(&options);
    }
}

fn concurrent_readers_and_writers_keep_their_data_over(options: &FileOptions) {
    eprintln!("io_uring: {}", options.io_uring);
    let dir = scratch();
    let rt = runtime();
    const REGION: u64 = 1 << 20;
    const WRITERS: u64 = 4;
    let backend: SharedBackend = Arc::new(MemoryBackend::new((WRITERS + 1) * REGION));
    let mut mount =
        FileMount::mount_with(backend.clone(), dir.path(), "data", rt.handle().clone(), options).unwrap();
    let path = mount.path().to_path_buf();
    // The last region is written once and then only read.
    let fixed = pattern(99, REGION as usize);
    open_rw(&path).write_all_at(&fixed, WRITERS * REGION).unwrap();

    let finals: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let path = &path;
                scope.spawn(move || {
                    let file = open_rw(path);
                    let mut mine = vec![0u8; REGION as usize];
                    for round in 0..24u64 {
                        let piece = 4096 * (1 + (round * 7 + w) % 40) as usize;
                        let at = ((round * 65_537 + w * 12_345) % (REGION - piece as u64)) as usize;
                        let data = pattern(w * 1000 + round, piece);
                        file.write_all_at(&data, w * REGION + at as u64).unwrap();
                        mine[at..at + piece].copy_from_slice(&data);
                        let mut back = vec![0u8; piece];
                        file.read_exact_at(&mut back, w * REGION + at as u64).unwrap();
                        assert!(back == data, "writer {w} reads back its write");
                        if round % 8 == 0 {
                            file.sync_data().unwrap();
                        }
                    }
                    mine
                })
            })
            .collect();
        for _ in 0..2 {
            let (path, fixed) = (&path, &fixed);
            scope.spawn(move || {
                let file = File::open(path).unwrap();
                for round in 0..16u64 {
                    let mut back = vec![0u8; REGION as usize];
                    file.read_exact_at(&mut back, WRITERS * REGION).unwrap();
                    assert!(
                        back == *fixed,
                        "reader round {round} sees the fixed region intact"
                    );
                }
            });
        }
        writers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut expected: Vec<u8> = finals.concat();
    expected.extend_from_slice(&fixed);
    assert!(backend_content(&rt, &backend) == expected);
    mount.unmount_blocking().unwrap();
}

#[test]
fn unmount_while_busy_fails_clearly_and_loses_nothing() {
    if !fuse_available() {
        return;
    }
    let dir = scratch();
    let rt = runtime();
    let counting = Counting::new(Arc::new(MemoryBackend::new(1 << 20)));
    let backend: SharedBackend = counting.clone();
    let mut mount = FileMount::mount(backend.clone(), dir.path(), "data", rt.handle().clone()).unwrap();
    let file = open_rw(mount.path());
    file.write_all_at(b"first", 0).unwrap();

    let syncs_before = counting.syncs.load(SeqCst);
    let err = rt.block_on(mount.unmount()).expect_err("the file is open");
    let message = err.to_string();
    assert!(matches!(err, FuseError::Busy { .. }), "{err:?}");
    assert!(message.contains(&mount.path().display().to_string()), "{message}");
    assert!(message.contains("busy"), "{message}");
    assert!(
        counting.syncs.load(SeqCst) > syncs_before,
        "the backend was flushed first"
    );
    assert!(mount.is_mounted());
    let ours = r3map_fuse::stale::r3map_mounts().unwrap();
    let listed = ours.iter().find(|m| m.mountpoint == mount.mountpoint());
    assert!(
        listed.is_some_and(|m| m.alive && m.pid == Some(std::process::id())),
        "the live mount is listed as ours and alive: {ours:?}"
    );

    // Still fully usable.
    file.write_all_at(b"second", 100).unwrap();
    let mut back = [0u8; 5];
    file.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(&back, b"first");
    drop(file);

    mount.unmount_blocking().expect("unmount once closed");
    assert!(!mount.is_mounted());
    let content = backend_content(&rt, &backend);
    assert_eq!(&content[..5], b"first");
    assert_eq!(&content[100..106], b"second");
    let mounted = r3map_fuse::stale::r3map_mounts().unwrap();
    assert!(
        !mounted.iter().any(|m| m.mountpoint == mount.mountpoint()),
        "the mount is gone from mountinfo"
    );
    mount.unmount_blocking().expect("a second unmount does nothing");
}
