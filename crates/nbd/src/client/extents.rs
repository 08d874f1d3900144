//! [`Backend::extents`](r3map_core::Backend::extents) over `NBD_CMD_BLOCK_STATUS`: the
//! `base:allocation` descriptors of one query, cut to the range asked for.

use r3map_core::{Allocation, Extent};

use crate::codec::StatusDescriptor;
use crate::wire;

/// What a `base:allocation` status says for r3map: only a range that reads as zeros
/// (`NBD_STATE_ZERO`) is a hole. `NBD_STATE_HOLE` alone (unallocated, contents unknown) is data,
/// as is every status bit this client does not know.
pub(super) fn allocation(status: u64) -> Allocation {
    if status & u64::from(wire::state::ZERO) != 0 {
        Allocation::Hole
    } else {
        Allocation::Data
    }
}

/// The extents of `range` that `descriptors` describe, starting at `from` (at or before
/// `range.start`: queries go in whole minimum blocks). Neighbours of one kind are merged. The
/// descriptors were checked to be consecutive and within the export; when they end before
/// `range.start`, the whole range is reported as data (always correct).
pub(super) fn within(
    descriptors: &[StatusDescriptor],
    from: u64,
    range: std::ops::Range<u64>,
) -> Vec<Extent> {
    let mut extents: Vec<Extent> = Vec::new();
    let mut at = from;
    for descriptor in descriptors {
        let (start, end) = (at.max(range.start), (at + descriptor.length).min(range.end));
        at += descriptor.length;
        if start >= end {
            if at >= range.end {
                break;
            }
            continue;
        }
        let allocation = allocation(descriptor.status);
        match extents.last_mut() {
            Some(last) if last.allocation == allocation => last.len += end - start,
            _ => extents.push(Extent {
                len: end - start,
                allocation,
            }),
        }
    }
    if extents.is_empty() {
        extents.push(Extent::data(range.end - range.start));
    }
    extents
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(length: u64, status: u32) -> StatusDescriptor {
        StatusDescriptor {
            length,
            status: u64::from(status),
        }
    }

    #[test]
    fn descriptors_are_cut_to_the_range_and_merged() {
        use wire::state::{HOLE, ZERO};
        let descriptors = [
            d(512, 0),
            d(512, HOLE | ZERO),
            d(1024, ZERO),
            d(512, HOLE),
            d(4096, 0),
        ];
        // Asked for 600..3000 after a query from 0.
        assert_eq!(
            within(&descriptors, 0, 600..3000),
            vec![Extent::hole(1448), Extent::data(952)]
        );
        // Only a prefix described: the answer is that prefix.
        assert_eq!(
            within(&descriptors[..2], 0, 0..8192),
            vec![Extent::data(512), Extent::hole(512)]
        );
        // Nothing of the range described: all data.
        assert_eq!(within(&descriptors[..1], 0, 600..700), vec![Extent::data(100)]);
        // HOLE without ZERO may read as anything.
        assert_eq!(allocation(u64::from(HOLE)), Allocation::Data);
        assert_eq!(allocation(u64::from(ZERO) | 1 << 40), Allocation::Hole);
    }
}
