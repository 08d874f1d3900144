//! The client side of the fixed-newstyle NBD handshake, on a blocking stream. The kernel only
//! speaks the transmission phase, so every socket it gets has been negotiated here first.

use std::io::{self, Read, Write};

use r3map_nbd::wire::{client_flags, handshake_flags, opt, EXPORT_NAME_PADDING, IHAVEOPT, NBD_MAGIC};

/// What the server said about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub size: u64,
    pub transmission_flags: u16,
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Negotiates `export` with `NBD_OPT_EXPORT_NAME` (understood by every fixed-newstyle server).
pub fn negotiate<S: Read + Write>(stream: &mut S, export: &str) -> io::Result<Negotiated> {
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting)?;
    let magic = u64::from_be_bytes(greeting[0..8].try_into().expect("8 bytes"));
    let version = u64::from_be_bytes(greeting[8..16].try_into().expect("8 bytes"));
    if magic != NBD_MAGIC || version != IHAVEOPT {
        return Err(invalid(format!(
            "not a newstyle NBD server (greeting {magic:#x} {version:#x})"
        )));
    }
    let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    if server_flags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(invalid("server does not speak fixed newstyle".into()));
    }
    let no_zeroes = server_flags & handshake_flags::NO_ZEROES != 0;
    let mut flags = client_flags::FIXED_NEWSTYLE;
    if no_zeroes {
        flags |= client_flags::NO_ZEROES;
    }
    let mut request = Vec::with_capacity(20 + export.len());
    request.extend_from_slice(&flags.to_be_bytes());
    request.extend_from_slice(&IHAVEOPT.to_be_bytes());
    request.extend_from_slice(&opt::EXPORT_NAME.to_be_bytes());
    request.extend_from_slice(&(export.len() as u32).to_be_bytes());
    request.extend_from_slice(export.as_bytes());
    stream.write_all(&request)?;
    stream.flush()?;
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).map_err(|err| {
        if err.kind() == io::ErrorKind::UnexpectedEof {
            invalid(format!(
                "server closed the connection: it has no export {export:?}"
            ))
        } else {
            err
        }
    })?;
    if !no_zeroes {
        let mut padding = [0u8; EXPORT_NAME_PADDING];
        stream.read_exact(&mut padding)?;
    }
    Ok(Negotiated {
        size: u64::from_be_bytes(reply[0..8].try_into().expect("8 bytes")),
        transmission_flags: u16::from_be_bytes([reply[8], reply[9]]),
    })
}
