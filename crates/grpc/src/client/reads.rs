//! Splitting a buffer into pieces, and filling it from a streamed read: a hostile or broken
//! server can only make the read fail, never write outside the buffer or leave part unfilled.

use futures::StreamExt;
use r3map_core::Error;
use tonic::Streaming;

use crate::chunk::{self, Accept};
use crate::pb::ext::{Chunk, Range};

/// The ranges of `len` bytes at `offset` in pieces of at most `piece` bytes.
pub(crate) fn pieces(offset: u64, len: u64, piece: u64) -> Vec<Range> {
    (0..len.div_ceil(piece))
        .map(|i| Range {
            offset: offset + i * piece,
            length: piece.min(len - i * piece),
        })
        .collect()
}

/// Fills `buf` (which holds `ranges`, in order and adjacent) from the chunks of `stream`.
pub(crate) async fn fill(
    mut stream: Streaming<Chunk>,
    ranges: &[Range],
    buf: &mut [u8],
    mut error: impl FnMut(&tonic::Status) -> Error,
) -> Result<(), Error> {
    let start = ranges.first().map_or(0, |r| r.offset);
    for range in ranges {
        let chunk = match stream.next().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(status)) => return Err(error(&status)),
            None => {
                return Err(Error::Remote(format!(
                    "the server ended a streamed read before the chunk at offset {}",
                    range.offset
                )))
            }
        };
        if chunk.offset != range.offset {
            return Err(Error::Remote(format!(
                "the server sent the chunk at offset {} where {} was due",
                chunk.offset, range.offset
            )));
        }
        let at = (range.offset - start) as usize;
        chunk::decode_into(&chunk, &mut buf[at..at + range.length as usize])
            .map_err(|status| Error::Remote(status.message().to_owned()))?;
    }
    Ok(())
}

/// Encodes `data` (at `offset`) as chunks of at most `piece` bytes.
pub(crate) fn encode_pieces(offset: u64, data: &[u8], piece: u64, accept: Accept) -> Vec<Chunk> {
    pieces(offset, data.len() as u64, piece)
        .into_iter()
        .map(|range| {
            let at = (range.offset - offset) as usize;
            chunk::encode(range.offset, &data[at..at + range.length as usize], accept)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range_exactly() {
        let got = pieces(10, 25, 10);
        let lens: Vec<u64> = got.iter().map(|r| r.length).collect();
        assert_eq!(lens, [10, 10, 5]);
        assert_eq!(got[2].offset, 30);
        assert!(pieces(0, 0, 10).is_empty());
    }
}
