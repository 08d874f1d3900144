//! An ordinary program whose memory `r3map mount … --frontend slice` serves: it maps memory,
//! hands its userfaultfd to r3map, and from then on just reads and writes its memory.
//!
//! Usage: `slice_client SOCKET BYTES [OFFSET=TEXT]...` — prints the CRC-32 of its memory as
//! first served, writes each TEXT at OFFSET, asks r3map to write the changes back (`S`), and
//! prints `synced`.
//!
//! `slice_client SOCKET BYTES --hold=OFFSET [OFFSET=TEXT]...` — reads nothing else first and
//! never asks for a sync: writes each TEXT, prints `written`, waits until r3map closes the
//! socket (it stopped), then reads the byte at OFFSET (which it never touched before) and
//! prints it. With nobody serving, that read must raise SIGBUS, never show zeros.

use std::io::{Read, Write};
use std::path::Path;

use r3map_frontends::slice::hand_over;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: slice_client SOCKET BYTES [OFFSET=TEXT]...".into());
    }
    let len: usize = args[2].parse()?;
    let (mut memory, mut sock) = hand_over(Path::new(&args[1]), len, std::time::Duration::from_secs(60))?;
    let hold = args.get(3).and_then(|a| a.strip_prefix("--hold="));
    let edits = &args[if hold.is_some() { 4 } else { 3 }..];
    if hold.is_none() {
        println!("crc32 {:08x}", crc32fast::hash(memory.as_slice()));
    }
    for edit in edits {
        let (offset, text) = edit.split_once('=').ok_or("edits are OFFSET=TEXT")?;
        let offset: usize = offset.parse()?;
        memory.as_mut_slice()[offset..offset + text.len()].copy_from_slice(text.as_bytes());
    }
    if let Some(offset) = hold {
        let offset: usize = offset.parse()?;
        println!("written");
        std::io::stdout().flush()?;
        // r3map closes the socket when it stops.
        let mut rest = Vec::new();
        sock.read_to_end(&mut rest)?;
        println!("read {}", std::hint::black_box(memory.as_slice()[offset]));
        return Ok(());
    }
    sock.write_all(b"S")?;
    let mut answer = [0u8; 1];
    sock.read_exact(&mut answer)?;
    if answer[0] != 0 {
        return Err("r3map could not write the changes back".into());
    }
    println!("synced");
    Ok(())
}
