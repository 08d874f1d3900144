//! A program whose memory is served by r3map running in another process.
//!
//! It maps anonymous memory, creates a userfaultfd and sends it (SCM_RIGHTS) with the range
//! and its pid to the r3map server listening on a UNIX socket; from then on the server fills
//! every page this program touches. The program itself does nothing r3map-specific beyond the
//! hand-over: after it, it reads and writes its memory as usual.
//!
//! Usage: `uffd_client <socket path> <bytes> <page to write>...`
//!
//! Protocol (for the test in tests/slice_remote.rs): after sending the fd it waits for one byte
//! (the server has registered the range), checks that every byte equals the server's pattern,
//! writes one byte in each listed page, sends the number of mismatching bytes (u64 LE), waits
//! for one more byte and unmaps its memory.

use std::io::{Read, Write};
use std::path::Path;

use r3map_frontends::slice::hand_over;
use r3map_frontends::uffd::page_size;

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
    let pages: Vec<usize> = args[3..].iter().map(|p| p.parse()).collect::<Result<_, _>>()?;

    let (mut memory, mut sock) = hand_over(Path::new(&args[1]), len)?;

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
