//! What every service of one server shares: the exports, the limits and the semaphores that
//! enforce them, and the request checks.

use std::sync::Arc;

use r3map_core::{Error, SharedBackend};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::chunk::Accept;
use crate::limits::{ServerLimits, MAX_RANGES};
use crate::pb::ext::Range;
use crate::status::from_core;

/// The metadata key naming the export a call is for (absent: the first export, which is what
/// a Go peer, knowing no exports, gets).
pub const EXPORT_KEY: &str = "r3map-export";

/// One named backend the server offers.
#[derive(Clone)]
pub struct Export {
    /// The name clients give (`grpc://HOST:PORT/NAME`).
    pub name: String,
    /// The storage behind it.
    pub backend: SharedBackend,
    /// Refuse writes, trims and zeroing.
    pub read_only: bool,
}

impl Export {
    /// A writable export.
    pub fn new(name: impl Into<String>, backend: SharedBackend) -> Self {
        Self {
            name: name.into(),
            backend,
            read_only: false,
        }
    }
}

pub(crate) struct Shared {
    pub exports: Vec<Export>,
    pub limits: ServerLimits,
    /// What this server sends (zero elision always; lz4 unless compression is off).
    pub send: Accept,
    calls: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

/// Byte budgets are counted in KiB so that large budgets fit the semaphore.
const BYTE_UNIT: u64 = 1 << 10;

/// Held while a call runs (server-wide bound).
pub(crate) struct CallPermit(#[allow(dead_code)] OwnedSemaphorePermit);

impl Shared {
    pub fn new(exports: Vec<Export>, limits: ServerLimits, compress: bool) -> Self {
        Self {
            exports,
            limits,
            send: Accept::all(compress),
            calls: Arc::new(Semaphore::new(limits.server_wide.max(1))),
            bytes: Arc::new(Semaphore::new(
                (limits.bytes_in_flight / BYTE_UNIT).max(limits.max_chunk / BYTE_UNIT + 1) as usize,
            )),
        }
    }

    /// The export `metadata` names.
    pub fn export(&self, metadata: &MetadataMap) -> Result<&Export, Status> {
        let name = match metadata.get(EXPORT_KEY) {
            Some(value) => value
                .to_str()
                .map_err(|_| Status::invalid_argument("the export name is not valid text"))?,
            None => "",
        };
        let found = if name.is_empty() {
            self.exports.first()
        } else {
            self.exports.iter().find(|export| export.name == name)
        };
        found.ok_or_else(|| {
            let names: Vec<&str> = self.exports.iter().map(|e| e.name.as_str()).collect();
            Status::not_found(format!(
                "no export named {name:?} on this server (it has: {names:?})"
            ))
        })
    }

    /// Waits for a place among the server's calls in flight.
    pub async fn call(&self) -> Result<CallPermit, Status> {
        let permit = self
            .calls
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("the server is shutting down"))?;
        Ok(CallPermit(permit))
    }

    /// Waits until `len` more bytes of chunk data may be held in memory.
    pub async fn bytes(&self, len: u64) -> OwnedSemaphorePermit {
        let units = len.div_ceil(BYTE_UNIT).max(1) as u32;
        self.bytes
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("the byte semaphore is never closed")
    }

    /// Checks one chunk's range: at most `max_chunk` bytes, inside the resource.
    pub fn check_chunk(&self, offset: u64, len: u64, size: u64) -> Result<(), Status> {
        if len > self.limits.max_chunk {
            return Err(from_core(&Error::TooLarge {
                len,
                max: self.limits.max_chunk,
            }));
        }
        check_range(offset, len, size)
    }

    /// Checks a streamed read's ranges before any is read.
    pub fn check_ranges(&self, ranges: &[Range], size: u64) -> Result<(), Status> {
        if ranges.len() > MAX_RANGES {
            return Err(Status::invalid_argument(format!(
                "{} ranges in one call; at most {MAX_RANGES} are allowed",
                ranges.len()
            )));
        }
        ranges
            .iter()
            .try_for_each(|range| self.check_chunk(range.offset, range.length, size))
    }
}

/// Checks that a range lies inside a resource of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), Status> {
    r3map_core::layout::check_range(offset, len, size).map_err(|err| from_core(&err))
}

/// Go's signed offsets and lengths, refused when negative.
pub fn go_range(off: i64, length: i32) -> Result<(u64, u64), Status> {
    if off < 0 || length < 0 {
        return Err(Status::invalid_argument(format!(
            "negative offset or length (offset {off}, length {length})"
        )));
    }
    Ok((off as u64, length as u64))
}
