//! Chunks on the wire: each chunk is sent as zeros (no data), lz4-compressed (only when that
//! makes it smaller) or raw, chosen per chunk from the encodings the receiver accepts.

use bytes::Bytes;
use tonic::Status;

use crate::pb::ext::{Chunk, Encoding};

/// The encodings this implementation can produce and decode besides raw.
pub const SUPPORTED: &[Encoding] = &[Encoding::Zero, Encoding::Lz4];

/// What a sender may use: the encodings the receiver accepts, narrowed to what the sender
/// allows (`compress: false` still elides zero chunks, which costs nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accept {
    pub zero: bool,
    pub lz4: bool,
}

impl Accept {
    /// Everything this implementation supports, with or without compression.
    pub fn all(compress: bool) -> Self {
        Self {
            zero: true,
            lz4: compress,
        }
    }

    /// Parses the wire list (unknown values are ignored: a newer peer may offer more).
    pub fn from_wire(list: &[i32]) -> Self {
        let has = |e: Encoding| list.contains(&(e as i32));
        Self {
            zero: has(Encoding::Zero),
            lz4: has(Encoding::Lz4),
        }
    }

    /// The wire list.
    pub fn to_wire(self) -> Vec<i32> {
        let mut list = Vec::new();
        if self.zero {
            list.push(Encoding::Zero as i32);
        }
        if self.lz4 {
            list.push(Encoding::Lz4 as i32);
        }
        list
    }

    /// What both sides allow.
    pub fn and(self, other: Accept) -> Self {
        Self {
            zero: self.zero && other.zero,
            lz4: self.lz4 && other.lz4,
        }
    }
}

fn is_zero(data: &[u8]) -> bool {
    // 16-byte pieces compare as one integer, which the compiler vectorises.
    let mut pieces = data.chunks_exact(16);
    pieces
        .by_ref()
        .all(|piece| u128::from_ne_bytes(piece.try_into().expect("16 bytes")) == 0)
        && pieces.remainder().iter().all(|byte| *byte == 0)
}

/// Encodes `data` (which starts at `offset`) for a receiver that accepts `accept`.
pub fn encode(offset: u64, data: &[u8], accept: Accept) -> Chunk {
    let length = data.len() as u64;
    let chunk = |encoding: Encoding, data: Bytes| Chunk {
        offset,
        length,
        encoding: encoding as i32,
        data,
    };
    if accept.zero && is_zero(data) {
        return chunk(Encoding::Zero, Bytes::new());
    }
    if accept.lz4 {
        let compressed = lz4_flex::block::compress(data);
        if compressed.len() < data.len() {
            return chunk(Encoding::Lz4, compressed.into());
        }
    }
    chunk(Encoding::Raw, Bytes::copy_from_slice(data))
}

/// Decodes `chunk` into `out`, whose length must be the chunk's length. A chunk that does not
/// decode to exactly that length is refused (a hostile or broken peer).
pub fn decode_into(chunk: &Chunk, out: &mut [u8]) -> Result<(), Status> {
    if chunk.length != out.len() as u64 {
        return Err(Status::invalid_argument(format!(
            "chunk at offset {} has length {}, expected {}",
            chunk.offset,
            chunk.length,
            out.len()
        )));
    }
    match Encoding::try_from(chunk.encoding) {
        Ok(Encoding::Raw) => {
            if chunk.data.len() != out.len() {
                return Err(wrong_size(chunk, chunk.data.len()));
            }
            out.copy_from_slice(&chunk.data);
        }
        Ok(Encoding::Zero) => {
            if !chunk.data.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "zero chunk at offset {} carries {} bytes of data",
                    chunk.offset,
                    chunk.data.len()
                )));
            }
            out.fill(0);
        }
        Ok(Encoding::Lz4) => {
            let n = lz4_flex::block::decompress_into(&chunk.data, out).map_err(|err| {
                Status::invalid_argument(format!(
                    "lz4 chunk at offset {} does not decompress: {err}",
                    chunk.offset
                ))
            })?;
            if n != out.len() {
                return Err(wrong_size(chunk, n));
            }
        }
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "chunk at offset {} has unknown encoding {}",
                chunk.offset, chunk.encoding
            )))
        }
    }
    Ok(())
}

fn wrong_size(chunk: &Chunk, got: usize) -> Status {
    Status::invalid_argument(format!(
        "wrong-size chunk at offset {}: {} bytes of data for a length of {}",
        chunk.offset, got, chunk.length
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(data: &[u8], accept: Accept) -> (Encoding, Vec<u8>) {
        let chunk = encode(7, data, accept);
        let mut out = vec![0xAA; data.len()];
        decode_into(&chunk, &mut out).unwrap();
        (Encoding::try_from(chunk.encoding).unwrap(), out)
    }

    #[test]
    fn zeros_travel_without_data_and_text_compressed_and_random_raw() {
        assert_eq!(roundtrip(&[0; 4096], Accept::all(true)).0, Encoding::Zero);
        let text = b"the quick brown fox ".repeat(200);
        let chunk = encode(0, &text, Accept::all(true));
        assert_eq!(chunk.encoding, Encoding::Lz4 as i32);
        assert!(chunk.data.len() < text.len() / 4);
        let random: Vec<u8> = (0..4096).map(|_| rand::random()).collect();
        assert_eq!(roundtrip(&random, Accept::all(true)).0, Encoding::Raw);
        assert_eq!(roundtrip(&text, Accept::all(false)).0, Encoding::Raw);
        assert_eq!(roundtrip(&[0; 64], Accept::default()).0, Encoding::Raw);
    }

    #[test]
    fn chunks_that_do_not_decode_to_their_length_are_refused() {
        let text = b"abcdefgh".repeat(100);
        let mut chunk = encode(0, &text, Accept::all(true));
        let mut short = vec![0; text.len() - 1];
        assert!(decode_into(&chunk, &mut short).is_err());
        chunk.length -= 1;
        assert!(
            decode_into(&chunk, &mut short).is_err(),
            "lz4 data longer than the length"
        );
        let raw = Chunk {
            offset: 0,
            length: 10,
            encoding: Encoding::Raw as i32,
            data: Bytes::from_static(b"123"),
        };
        assert!(decode_into(&raw, &mut [0; 10]).is_err());
        let bad = Chunk { encoding: 99, ..raw };
        assert!(decode_into(&bad, &mut [0; 10]).is_err());
    }

    proptest! {
        #[test]
        fn every_encoding_round_trips(data in proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..3000), lz4: bool) {
            let (_, out) = roundtrip(&data, Accept::all(lz4));
            prop_assert_eq!(out, data);
        }

        #[test]
        fn garbage_lz4_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200), len in 0usize..500) {
            let chunk = Chunk { offset: 0, length: len as u64, encoding: Encoding::Lz4 as i32, data: data.into() };
            let _ = decode_into(&chunk, &mut vec![0; len]);
        }
    }
}
