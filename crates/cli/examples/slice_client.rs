//! An ordinary program whose memory `r3map mount … --frontend slice` serves: it maps memory,
//! hands its userfaultfd to r3map, and from then on just reads and writes its memory.
//!
//! Usage: `slice_client SOCKET BYTES [OFFSET=TEXT]...` — prints the CRC-32 of its memory as
//! first served, writes each TEXT at OFFSET, asks r3map to write the changes back (`S`), and
//! prints `synced`.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use r3map_frontends::slice::RemoteRequest;
use r3map_frontends::uffd::{Mapping, Uffd};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: slice_client SOCKET BYTES [OFFSET=TEXT]...".into());
    }
    let len: usize = args[2].parse()?;
    let mut sock = UnixStream::connect(&args[1])?;
    let mut memory = Mapping::anonymous(len)?;
    let uffd = Uffd::create()?;
    RemoteRequest {
        addr: memory.addr(),
        len: len as u64,
        pid: std::process::id() as i32,
    }
    .send(&sock, uffd.as_fd())?;
    drop(uffd); // r3map holds it now
    let mut answer = [0u8; 1];
    sock.read_exact(&mut answer)?;
    if answer[0] != 0 {
        return Err("r3map refused to serve this memory".into());
    }
    println!("crc32 {:08x}", crc32fast::hash(memory.as_slice()));
    for edit in &args[3..] {
        let (offset, text) = edit.split_once('=').ok_or("edits are OFFSET=TEXT")?;
        let offset: usize = offset.parse()?;
        memory.as_mut_slice()[offset..offset + text.len()].copy_from_slice(text.as_bytes());
    }
    sock.write_all(b"S")?;
    sock.read_exact(&mut answer)?;
    if answer[0] != 0 {
        return Err("r3map could not write the changes back".into());
    }
    println!("synced");
    Ok(())
}
