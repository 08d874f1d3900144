//! Reusable buffers for the data of read replies and write requests, so neither allocates nor
//! zeroes memory (and takes no page faults) once the connection is warm.
//!
//! Buffers come in size classes: powers of two from [`MIN_CLASS`], capped at the largest
//! request. A read or write of `n` bytes takes a buffer of class `class_of(n)` and accounts for the
//! whole class in the connection's in-flight byte budget, so buffers in use never exceed the
//! budget. Idle buffers stay in the pool; before a new buffer is allocated, idle buffers are
//! freed until in-use plus idle plus the new one fit in the same budget. The memory the pool
//! holds is therefore never more than the budget.

use std::sync::Arc;

use parking_lot::Mutex;

/// Smallest buffer class (one page).
pub(crate) const MIN_CLASS: usize = 4096;

/// Data buffers of one connection's reads and writes.
#[derive(Debug)]
pub(crate) struct BufferPool {
    /// Largest payload of one request (the largest class).
    max_request: usize,
    /// Bytes of buffers in use plus idle may not exceed this.
    limit: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Idle buffers by class index; every buffer's length is its class.
    idle: Vec<Vec<Vec<u8>>>,
    /// Bytes of all buffers handed out and not yet freed (in use plus idle).
    allocated: usize,
    /// Bytes of the idle buffers.
    idle_bytes: usize,
}

impl BufferPool {
    /// A pool for requests of at most `max_request` bytes holding at most `limit` bytes
    /// (`limit >= max_request`).
    pub(crate) fn new(max_request: usize, limit: usize) -> Arc<Self> {
        assert!(max_request >= MIN_CLASS && limit >= max_request);
        let classes = index_of(class_for(max_request, max_request)) + 1;
        Arc::new(Self {
            max_request,
            limit,
            inner: Mutex::new(Inner {
                idle: (0..classes).map(|_| Vec::new()).collect(),
                ..Inner::default()
            }),
        })
    }

    /// Bytes a buffer for `len` bytes occupies; this is what its user must account for.
    pub(crate) fn class_of(&self, len: usize) -> usize {
        class_for(len, self.max_request)
    }

    /// A buffer of `len` bytes (`0 < len <= max_request`) with unspecified contents. The
    /// caller must hold `class_of(len)` bytes of the budget until the buffer is dropped.
    pub(crate) fn take(self: &Arc<Self>, len: usize) -> PooledBuf {
        assert!(len > 0 && len <= self.max_request);
        let class = self.class_of(len);
        let index = index_of(class);
        let mut inner = self.inner.lock();
        if let Some(buf) = inner.idle[index].pop() {
            inner.idle_bytes -= class;
            drop(inner);
            return PooledBuf {
                buf,
                len,
                pool: self.clone(),
            };
        }
        // Free idle buffers of other classes until the new one fits (largest first).
        let mut victim = inner.idle.len();
        while inner.allocated + class > self.limit && inner.idle_bytes > 0 {
            victim -= 1;
            while let Some(buf) = inner.idle[victim].pop() {
                inner.idle_bytes -= buf.len();
                inner.allocated -= buf.len();
                if inner.allocated + class <= self.limit {
                    break;
                }
            }
        }
        inner.allocated += class;
        drop(inner);
        PooledBuf {
            // Zeroed once, by the allocator; reused without zeroing afterwards.
            buf: vec![0u8; class],
            len,
            pool: self.clone(),
        }
    }

    fn give_back(&self, buf: Vec<u8>) {
        let mut inner = self.inner.lock();
        inner.idle_bytes += buf.len();
        let index = index_of(buf.len());
        inner.idle[index].push(buf);
    }

    /// Bytes held by the pool: buffers in use plus idle ones.
    #[cfg(test)]
    fn allocated(&self) -> usize {
        self.inner.lock().allocated
    }
}

fn class_for(len: usize, max_request: usize) -> usize {
    len.next_power_of_two()
        .max(MIN_CLASS)
        .min(max_request.max(MIN_CLASS))
}

/// Index of a class in the idle lists (a capped, non-power-of-two class counts as the power of
/// two above it; only one such class exists per pool).
fn index_of(class: usize) -> usize {
    (class.next_power_of_two().trailing_zeros() - MIN_CLASS.trailing_zeros()) as usize
}

/// A buffer from a [`BufferPool`]; it goes back to the pool when dropped.
pub(crate) struct PooledBuf {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<BufferPool>,
}

impl PooledBuf {
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_powers_of_two_capped_at_the_largest_request() {
        let pool = BufferPool::new(5000, 1 << 20);
        assert_eq!(pool.class_of(1), 4096);
        assert_eq!(pool.class_of(4096), 4096);
        assert_eq!(pool.class_of(4097), 5000);
        let pool = BufferPool::new(1 << 20, 1 << 20);
        assert_eq!(pool.class_of(256 << 10), 256 << 10);
        assert_eq!(pool.class_of((256 << 10) + 1), 512 << 10);
    }

    #[test]
    fn buffers_are_reused() {
        let pool = BufferPool::new(1 << 20, 4 << 20);
        let mut a = pool.take(300 << 10);
        a.as_mut_slice().fill(7);
        let ptr = a.as_ref().as_ptr();
        drop(a);
        let b = pool.take(260 << 10);
        assert_eq!(b.as_ref().as_ptr(), ptr);
        assert_eq!(b.as_ref().len(), 260 << 10);
        assert_eq!(pool.allocated(), 512 << 10);
    }

    #[test]
    fn held_memory_stays_within_the_limit() {
        let limit = 1 << 20;
        let pool = BufferPool::new(limit, limit);
        // Fill the pool with idle small buffers, then ask for the largest class.
        let small: Vec<_> = (0..256).map(|_| pool.take(4096)).collect();
        assert_eq!(pool.allocated(), limit);
        drop(small);
        let big = pool.take(limit);
        assert_eq!(pool.allocated(), limit);
        drop(big);
        let mixed: Vec<_> = [1, 5000, 70_000, 300_000].iter().map(|&n| pool.take(n)).collect();
        let in_use: usize = [1, 5000, 70_000, 300_000].iter().map(|&n| pool.class_of(n)).sum();
        assert!(pool.allocated() <= limit);
        assert!(pool.allocated() >= in_use);
        drop(mixed);
        assert!(pool.allocated() <= limit);
    }
}
