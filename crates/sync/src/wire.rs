//! The sync protocol's frames and a sans-IO codec for them.
//!
//! A frame is a 4-byte big-endian length `N`, then `N` bytes: a 1-byte type and the message's
//! fields (integers big-endian, strings and byte strings with a length prefix). The decoder
//! first checks that a whole frame is buffered, refusing a length above its limit before
//! buffering anything, so a peer cannot make it allocate more than one frame.
//!
//! Conversation (receiver R, source S; through a hub the same bytes are relayed):
//! 1. R → `Hello { role: Receiver, name }`; S → `Welcome { block_size }` or `Refused`.
//! 2. R → `Hashes` pieces: R's current size and one xxh3 per block, in order.
//! 3. S waits until it has something R lacks (sending `Idle` meanwhile), then →
//!    `Plan { size, blocks, digest }` and `blocks` × `Block { index, data }`, in ascending
//!    order: the blocks whose hashes differ or that R lacks; `size` is the cut-off.
//! 4. R publishes when its copy has the blake3 `digest` of S's version, → `Published`, and
//!    goes on at 2.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Frames start with this in `Hello`, so a wrong peer is recognised at once.
pub const MAGIC: [u8; 8] = *b"R3MAPSYN";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Largest block size either side accepts.
pub const MAX_BLOCK_SIZE: u32 = 16 << 20;
/// Smallest block size either side accepts.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Hashes per `Hashes` frame at most (512 KiB of hashes).
pub const MAX_HASHES_PER_FRAME: usize = 65536;
/// Longest file name (sync name) in `Hello`.
pub const MAX_NAME: usize = 255;
/// Longest reason in `Refused`.
pub const MAX_REASON: usize = 1024;
/// Largest frame any side accepts: a block of the largest size plus its header.
pub const MAX_FRAME: usize = MAX_BLOCK_SIZE as usize + 64;

/// What a connecting peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Wants a replica of the named file.
    Receiver,
    /// An advertiser's control connection to a hub: offers the named file.
    Advertiser,
    /// An advertiser's data connection to a hub, answering `Open { ticket }`.
    Data,
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello {
        version: u16,
        role: Role,
        name: String,
        /// The hub's ticket for a `Data` connection; 0 otherwise.
        ticket: u64,
    },
    Welcome {
        version: u16,
        block_size: u32,
    },
    Refused {
        reason: String,
    },
    /// A piece of the receiver's hash list: hashes of blocks `first..first + hashes.len()` of
    /// a file of `size` bytes; `last` ends the list.
    Hashes {
        size: u64,
        first: u64,
        last: bool,
        hashes: Vec<u64>,
    },
    /// The source's version: its size (the cut-off), how many `Block` frames follow, and the
    /// blake3 digest of the whole version (see [`crate::BlockHashes::digest`]).
    Plan {
        size: u64,
        blocks: u64,
        digest: [u8; 32],
    },
    Block {
        index: u64,
        data: Bytes,
    },
    /// The receiver published the version with this digest.
    Published {
        digest: [u8; 32],
    },
    /// Hub → advertiser: open a data connection with this ticket for a new receiver.
    Open {
        ticket: u64,
    },
    /// Keep-alive while waiting, so every read can have a deadline.
    Idle,
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame type {kind} is truncated")]
    Truncated { kind: u8 },
    #[error("frame type {kind} has {extra} bytes after its fields")]
    Trailing { kind: u8, extra: usize },
    #[error("not an r3map sync peer (bad magic)")]
    BadMagic,
    #[error("unknown role {0}")]
    UnknownRole(u8),
    #[error("{what} is {len} bytes long, the limit is {max}")]
    FieldTooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} is not UTF-8")]
    NotUtf8 { what: &'static str },
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const REFUSED: u8 = 3;
    pub const HASHES: u8 = 4;
    pub const PLAN: u8 = 5;
    pub const BLOCK: u8 = 6;
    pub const PUBLISHED: u8 = 7;
    pub const OPEN: u8 = 8;
    pub const IDLE: u8 = 9;
}

impl Role {
    fn code(self) -> u8 {
        match self {
            Role::Receiver => 1,
            Role::Advertiser => 2,
            Role::Data => 3,
        }
    }

    fn from_code(code: u8) -> Result<Self, WireError> {
        match code {
            1 => Ok(Role::Receiver),
            2 => Ok(Role::Advertiser),
            3 => Ok(Role::Data),
            other => Err(WireError::UnknownRole(other)),
        }
    }
}

impl Message {
    /// Appends this message as one frame.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0);
        match self {
            Message::Hello {
                version,
                role,
                name,
                ticket,
            } => {
                out.put_u8(kind::HELLO);
                out.put_slice(&MAGIC);
                out.put_u16(*version);
                out.put_u8(role.code());
                out.put_u64(*ticket);
                put_str(out, name);
            }
            Message::Welcome { version, block_size } => {
                out.put_u8(kind::WELCOME);
                out.put_u16(*version);
                out.put_u32(*block_size);
            }
            Message::Refused { reason } => {
                out.put_u8(kind::REFUSED);
                put_str(out, reason);
            }
            Message::Hashes {
                size,
                first,
                last,
                hashes,
            } => {
                out.put_u8(kind::HASHES);
                out.put_u64(*size);
                out.put_u64(*first);
                out.put_u8(u8::from(*last));
                out.put_u32(hashes.len() as u32);
                for hash in hashes {
                    out.put_u64(*hash);
                }
            }
            Message::Plan { size, blocks, digest } => {
                out.put_u8(kind::PLAN);
                out.put_u64(*size);
                out.put_u64(*blocks);
                out.put_slice(digest);
            }
            Message::Block { index, data } => {
                out.put_u8(kind::BLOCK);
                out.put_u64(*index);
                out.put_u32(data.len() as u32);
                out.put_slice(data);
            }
            Message::Published { digest } => {
                out.put_u8(kind::PUBLISHED);
                out.put_slice(digest);
            }
            Message::Open { ticket } => {
                out.put_u8(kind::OPEN);
                out.put_u64(*ticket);
            }
            Message::Idle => out.put_u8(kind::IDLE),
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Takes one whole frame off the front of `buf`: `Ok(None)` if it is not all there yet
    /// (nothing is consumed), an error for a frame longer than `max_frame` or malformed.
    pub fn decode(buf: &mut BytesMut, max_frame: usize) -> Result<Option<Message>, WireError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > max_frame {
            return Err(WireError::TooLarge { len, max: max_frame });
        }
        if len == 0 {
            return Err(WireError::Empty);
        }
        if buf.len() < 4 + len {
            buf.reserve(4 + len - buf.len());
            return Ok(None);
        }
        buf.advance(4);
        let mut body = buf.split_to(len).freeze();
        let kind = body.get_u8();
        let message = parse(kind, &mut body)?;
        if !body.is_empty() {
            return Err(WireError::Trailing {
                kind,
                extra: body.len(),
            });
        }
        Ok(Some(message))
    }
}

fn put_str(out: &mut BytesMut, text: &str) {
    out.put_u16(text.len() as u16);
    out.put_slice(text.as_bytes());
}

/// A cursor over one frame's body that fails instead of panicking when it runs out.
struct Fields<'a> {
    body: &'a mut Bytes,
    kind: u8,
}

impl Fields<'_> {
    fn need(&self, n: usize) -> Result<(), WireError> {
        if self.body.len() < n {
            Err(WireError::Truncated { kind: self.kind })
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        self.need(1)?;
        Ok(self.body.get_u8())
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        self.need(2)?;
        Ok(self.body.get_u16())
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.need(4)?;
        Ok(self.body.get_u32())
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.need(8)?;
        Ok(self.body.get_u64())
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, WireError> {
        self.need(n)?;
        Ok(self.body.split_to(n))
    }
    fn digest(&mut self) -> Result<[u8; 32], WireError> {
        let bytes = self.bytes(32)?;
        let mut digest = [0; 32];
        digest.copy_from_slice(&bytes);
        Ok(digest)
    }
    fn string(&mut self, what: &'static str, max: usize) -> Result<String, WireError> {
        let len = self.u16()? as usize;
        if len > max {
            return Err(WireError::FieldTooLong { what, len, max });
        }
        let bytes = self.bytes(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::NotUtf8 { what })
    }
}

fn parse(kind: u8, body: &mut Bytes) -> Result<Message, WireError> {
    let mut f = Fields { body, kind };
    Ok(match kind {
        kind::HELLO => {
            if f.bytes(MAGIC.len())? != MAGIC[..] {
                return Err(WireError::BadMagic);
            }
            let version = f.u16()?;
            let role = Role::from_code(f.u8()?)?;
            let ticket = f.u64()?;
            let name = f.string("name", MAX_NAME)?;
            Message::Hello {
                version,
                role,
                name,
                ticket,
            }
        }
        kind::WELCOME => Message::Welcome {
            version: f.u16()?,
            block_size: f.u32()?,
        },
        kind::REFUSED => Message::Refused {
            reason: f.string("reason", MAX_REASON)?,
        },
        kind::HASHES => {
            let size = f.u64()?;
            let first = f.u64()?;
            let last = f.u8()? != 0;
            let count = f.u32()? as usize;
            if count > MAX_HASHES_PER_FRAME {
                return Err(WireError::FieldTooLong {
                    what: "hash list piece",
                    len: count,
                    max: MAX_HASHES_PER_FRAME,
                });
            }
            // The count is checked against the bytes present before allocating for it.
            f.need(count * 8)?;
            let hashes = (0..count).map(|_| f.body.get_u64()).collect();
            Message::Hashes {
                size,
                first,
                last,
                hashes,
            }
        }
        kind::PLAN => Message::Plan {
            size: f.u64()?,
            blocks: f.u64()?,
            digest: f.digest()?,
        },
        kind::BLOCK => {
            let index = f.u64()?;
            let len = f.u32()? as usize;
            Message::Block {
                index,
                data: f.bytes(len)?,
            }
        }
        kind::PUBLISHED => Message::Published { digest: f.digest()? },
        kind::OPEN => Message::Open { ticket: f.u64()? },
        kind::IDLE => Message::Idle,
        other => return Err(WireError::UnknownType(other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(message: Message) {
        let mut buf = BytesMut::new();
        message.encode(&mut buf);
        let encoded = buf.clone();
        // Every proper prefix is incomplete, never an error.
        for cut in 0..encoded.len() {
            let mut part = BytesMut::from(&encoded[..cut]);
            assert_eq!(Message::decode(&mut part, MAX_FRAME), Ok(None), "cut at {cut}");
            assert_eq!(part.len(), cut, "an incomplete frame was consumed");
        }
        assert_eq!(Message::decode(&mut buf, MAX_FRAME), Ok(Some(message)));
        assert!(buf.is_empty());
    }

    #[test]
    fn every_message_roundtrips() {
        roundtrip(Message::Hello {
            version: VERSION,
            role: Role::Data,
            name: "disk.img".into(),
            ticket: 7,
        });
        roundtrip(Message::Welcome {
            version: VERSION,
            block_size: 65536,
        });
        roundtrip(Message::Refused { reason: "no".into() });
        roundtrip(Message::Hashes {
            size: 10,
            first: 3,
            last: true,
            hashes: vec![1, u64::MAX],
        });
        roundtrip(Message::Plan {
            size: 1,
            blocks: 2,
            digest: [9; 32],
        });
        roundtrip(Message::Block {
            index: 4,
            data: Bytes::from_static(b"abc"),
        });
        roundtrip(Message::Published { digest: [1; 32] });
        roundtrip(Message::Open { ticket: 3 });
        roundtrip(Message::Idle);
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            Message::decode(&mut buf, MAX_FRAME),
            Err(WireError::TooLarge {
                len: u32::MAX as usize,
                max: MAX_FRAME
            })
        );
        assert!(
            buf.capacity() < 1 << 20,
            "the decoder reserved space for the claimed length"
        );
    }

    #[test]
    fn malformed_frames_are_errors() {
        let frame = |bytes: &[u8]| {
            let mut buf = BytesMut::new();
            buf.put_u32(bytes.len() as u32);
            buf.put_slice(bytes);
            Message::decode(&mut buf, MAX_FRAME)
        };
        assert_eq!(frame(&[]), Err(WireError::Empty));
        assert_eq!(frame(&[99]), Err(WireError::UnknownType(99)));
        assert_eq!(
            frame(&[kind::PLAN, 1]),
            Err(WireError::Truncated { kind: kind::PLAN })
        );
        assert_eq!(
            frame(&[kind::IDLE, 0]),
            Err(WireError::Trailing {
                kind: kind::IDLE,
                extra: 1
            })
        );
        assert_eq!(
            frame(&[kind::HELLO, b'X', 0, 0, 0, 0, 0, 0, 0]),
            Err(WireError::BadMagic)
        );
        // A hash count far beyond the bytes present: refused without allocating for it.
        let mut hashes = vec![kind::HASHES];
        hashes.extend_from_slice(&[0; 17]);
        hashes.extend_from_slice(&(MAX_HASHES_PER_FRAME as u32).to_be_bytes());
        assert_eq!(frame(&hashes), Err(WireError::Truncated { kind: kind::HASHES }));
        // A block whose length field claims more than the frame holds.
        let mut block = vec![kind::BLOCK];
        block.extend_from_slice(&[0; 8]);
        block.extend_from_slice(&100u32.to_be_bytes());
        block.extend_from_slice(&[1, 2, 3]);
        assert_eq!(frame(&block), Err(WireError::Truncated { kind: kind::BLOCK }));
    }
}
