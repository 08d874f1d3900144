//! A program whose memory is served by r3map running in another process.
//!
//! It maps anonymous memory, creates a userfaultfd and sends it (SCM_RIGHTS) with the range
//! and its pid to the r3map server listening on a UNIX socket; from then on the server fills
//! every page this program touches. The program itself does nothing r3map-specific beyond the
//! hand-over: after it, it reads and writes its memory as usual.
//!
//! Usage: `uffd_client <socket path> <bytes> <page to write>...`, or
//! `uffd_client <socket path> <bytes> fork <fetched page> <never-fetched page>`, or
//! `uffd_client <socket path> <bytes> mremap <offset> <bytes to move>`.
//!
//! Protocol (for the tests in tests/slice_remote.rs): after handing over its memory (the server
//! answers 0 once it has registered the range), then:
//! - by default it checks that every byte equals the server's pattern, writes one byte in each
//!   listed page, sends the number of mismatching bytes (u64 LE), waits for one more byte and
//!   unmaps its memory;
//! - with `fork` it reads the fetched page, forks a child that checks that page and then reads
//!   the never-fetched page, and sends three bytes: whether the child was killed by a signal
//!   (1) or exited (0), the signal or exit code (3: the fetched page was wrong in the child, 4:
//!   the never-fetched read returned), and whether the never-fetched page then reads right in
//!   this process (1); then it waits for one byte;
//! - with `mremap` it reads its first page, moves the given range to a new place, sends one
//!   byte, waits for one byte and reads at the new place (the server has never fetched it): it
//!   expects to die of SIGBUS, and exits with 4 if the read returned.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use r3map_frontends::slice::hand_over;
use r3map_frontends::uffd::{page_size, Mapping};

/// The content the test's server backend holds (same function as tests/common).
fn pattern_byte(offset: u64) -> u8 {
    let v = (offset >> 3).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((v >> 56) as u8) ^ (offset as u8 & 7) ^ 0x5a
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: uffd_client <socket path> <bytes> <page to write>...".into());
    }
    let len: usize = args[2].parse()?;
    let mode = args.get(3).map(String::as_str);
    let numbers = |from: usize| -> Result<Vec<usize>, std::num::ParseIntError> {
        args[from..].iter().map(|p| p.parse()).collect()
    };

    let (mut memory, mut sock) = hand_over(Path::new(&args[1]), len, std::time::Duration::from_secs(60))?;
    let mut byte = [0u8; 1];
    match mode {
        Some("fork") => {
            let pages = numbers(4)?;
            let report = fork_and_touch(&memory, pages[0], pages[1]);
            sock.write_all(&report)?;
            sock.read_exact(&mut byte)?;
            return Ok(());
        }
        Some("mremap") => {
            let at = numbers(4)?;
            move_and_touch(&memory, at[0], at[1], &mut sock);
        }
        _ => {}
    }
    let pages = numbers(3)?;

    let mem = memory.as_mut_slice();
    let mismatches = mem
        .iter()
        .enumerate()
        .filter(|(off, b)| **b != pattern_byte(*off as u64))
        .count() as u64;
    let page = page_size() as usize;
    for p in pages {
        mem[p * page + 1] ^= 0xff;
    }
    sock.write_all(&mismatches.to_le_bytes())?;
    let mut byte = [0u8; 1];
    sock.read_exact(&mut byte)?;
    drop(memory);
    Ok(())
}

/// Whether the page at `page` holds the server's pattern.
fn page_is_pattern(memory: &Mapping, page: usize) -> bool {
    let size = page_size() as usize;
    memory.as_slice()[page * size..(page + 1) * size]
        .iter()
        .enumerate()
        .all(|(i, b)| *b == pattern_byte((page * size + i) as u64))
}

/// The `fork` mode (see the module note).
fn fork_and_touch(memory: &Mapping, fetched: usize, never_fetched: usize) -> [u8; 3] {
    let size = page_size() as usize;
    let fetched_ok = page_is_pattern(memory, fetched);
    // SAFETY: the child runs only reads of mapped memory and _exit (no allocation, no locks),
    // which is all a child of a multithreaded process may do.
    let child = unsafe { libc::fork() };
    if child == 0 {
        if !fetched_ok || !page_is_pattern(memory, fetched) {
            // SAFETY: ends the child at once, as fork's child must.
            unsafe { libc::_exit(3) };
        }
        // SAFETY: the address lies inside the mapping.
        let byte = unsafe { std::ptr::read_volatile(memory.as_ptr().add(never_fetched * size)) };
        std::hint::black_box(byte);
        // SAFETY: as above.
        unsafe { libc::_exit(4) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked; `status` is a valid out-pointer.
    let waited = unsafe { libc::waitpid(child, &mut status, 0) };
    assert_eq!(waited, child, "waitpid: {}", std::io::Error::last_os_error());
    let (signaled, value) = if libc::WIFSIGNALED(status) {
        (1, libc::WTERMSIG(status))
    } else {
        (0, libc::WEXITSTATUS(status))
    };
    [
        signaled,
        value as u8,
        page_is_pattern(memory, never_fetched) as u8,
    ]
}

/// The `mremap` mode (see the module note): never returns.
fn move_and_touch(memory: &Mapping, offset: usize, len: usize, sock: &mut UnixStream) -> ! {
    let _ = page_is_pattern(memory, 0);
    // SAFETY: reserves fresh address space (no MAP_FIXED), overlapping nothing.
    let target = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(
        target,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: moves part of our own mapping onto the reservation just made; nothing in this
    // program refers to the moved pages afterwards except the read below.
    let moved = unsafe {
        libc::mremap(
            memory.as_ptr().add(offset).cast(),
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            target,
        )
    };
    assert_eq!(moved, target, "mremap: {}", std::io::Error::last_os_error());
    let mut byte = [1u8];
    sock.write_all(&byte).expect("tell the server");
    sock.read_exact(&mut byte).expect("wait for the server");
    // SAFETY: `moved` is mapped (read-write) for `len` bytes.
    let byte = unsafe { std::ptr::read_volatile(moved.cast::<u8>()) };
    std::hint::black_box(byte);
    std::process::exit(4);
}
