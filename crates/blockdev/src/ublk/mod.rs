//! ublk as a frontend: a userspace block device `/dev/ublkbN` whose requests this process
//! serves from any backend or stage pipeline.
//!
//! `/dev/ublk-control` takes the control commands (`ADD_DEV`, `SET_PARAMS`, `START_DEV`,
//! `STOP_DEV`, `DEL_DEV`). Each hardware queue gets a thread with its own io_uring on
//! `/dev/ublkcN`: it queues `FETCH_REQ` for every tag, and for each fetched request spawns a task
//! on the Tokio runtime that runs it against the backend; the task hands the result back to the
//! thread (channel + eventfd polled by the same ring), which answers with
//! `COMMIT_AND_FETCH_REQ` (the kernel requires a queue's commands from one thread). So up to
//! `depth` requests per queue are in flight at once.

mod queue;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use r3map_core::SharedBackend;

use crate::support::{check_ublk_support, io_uring_unsupported, Unsupported};
use crate::sys::ublk::{ControlRing, DevInfo, Geometry, F_CMD_IOCTL_ENCODE, MAX_QUEUE_DEPTH};

/// Options of [`UblkDevice::start`].
#[derive(Debug, Clone)]
pub struct UblkOptions {
    /// Hardware queues (one thread each), at most the number of CPUs.
    pub queues: u16,
    /// Requests in flight per queue (1 to 4096).
    pub depth: u16,
    /// Largest request in bytes (a buffer of this size is kept per tag); a multiple of 4096.
    pub max_io_bytes: u32,
    /// Logical block size: a power of two from 512 to 4096.
    pub block_size: u32,
}

impl Default for UblkOptions {
    fn default() -> Self {
        Self {
            queues: std::thread::available_parallelism().map_or(1, |n| n.get().min(4) as u16),
            depth: 64,
            max_io_bytes: 512 << 10,
            block_size: 4096,
        }
    }
}

/// Why a ublk device could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    #[error("invalid ublk options: {0}")]
    Options(String),
    #[error("ublk control command {step} failed: {source}")]
    Control {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("ublk queue {queue} failed: {source}")]
    Queue {
        queue: u16,
        #[source]
        source: io::Error,
    },
    #[error("flushing {path} before stopping failed: {source}")]
    Flush {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("a ublk thread panicked or was cancelled: {0}")]
    Join(String),
}

fn control(step: &'static str) -> impl FnOnce(io::Error) -> UblkError {
    move |source| UblkError::Control { step, source }
}

/// A ublk block device (`/dev/ublkbN`) served by this process. Stop it with
/// [`UblkDevice::stop`]; dropping it stops and deletes it in the background without reporting
/// errors.
pub struct UblkDevice {
    dev_id: u32,
    path: PathBuf,
    size: u64,
    control: Option<ControlRing>,
    queues: Vec<JoinHandle<Result<(), UblkError>>>,
}

impl std::fmt::Debug for UblkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkDevice")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("queues", &self.queues.len())
            .finish()
    }
}

impl UblkDevice {
    /// Creates and starts a ublk device over `backend`. Needs a Tokio runtime: requests run
    /// as tasks on it.
    pub async fn start(backend: SharedBackend, options: UblkOptions) -> Result<Self, UblkError> {
        check_ublk_support()?;
        validate(&options)?;
        let shift = options.block_size.trailing_zeros() as u8;
        let size = backend.size() & !(u64::from(options.block_size) - 1);
        if size == 0 {
            return Err(UblkError::Options(format!(
                "the backend ({} bytes) is smaller than one {}-byte block",
                backend.size(),
                options.block_size
            )));
        }
        if size != backend.size() {
            tracing::warn!(
                "backend size {} is not a multiple of the block size {}; the tail is not visible",
                backend.size(),
                options.block_size
            );
        }
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || start_blocking(backend, options, runtime, size, shift))
            .await
            .map_err(|err| UblkError::Join(err.to_string()))?
    }

    /// The block device, `/dev/ublkbN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device id N.
    pub fn id(&self) -> u32 {
        self.dev_id
    }

    /// Size of the device in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Flushes the device, stops it (waiting for the requests in flight), stops the queue
    /// threads and deletes the device. The first error is returned after every step was tried.
    pub async fn stop(mut self) -> Result<(), UblkError> {
        let control = self.control.take();
        let queues = std::mem::take(&mut self.queues);
        let (dev_id, path) = (self.dev_id, self.path.clone());
        tokio::task::spawn_blocking(move || {
            let mut first = File::open(&path)
                .and_then(|device| device.sync_all())
                .map_err(|source| UblkError::Flush { path, source })
                .err();
            if let Some(control) = control {
                if let Err(err) = shutdown(control, dev_id, queues) {
                    first.get_or_insert(err);
                }
            }
            first.map_or(Ok(()), Err)
        })
        .await
        .map_err(|err| UblkError::Join(err.to_string()))?
    }
}

impl Drop for UblkDevice {
    fn drop(&mut self) {
        if let Some(control) = self.control.take() {
            let queues = std::mem::take(&mut self.queues);
            let dev_id = self.dev_id;
            // STOP_DEV waits for requests in flight, which may need this very runtime thread:
            // stop and delete on a thread of its own.
            let spawned = std::thread::Builder::new()
                .name("ublk-drop".into())
                .spawn(move || {
                    if let Err(err) = shutdown(control, dev_id, queues) {
                        tracing::warn!("stopping ublk device {dev_id} on drop failed: {err}");
                    }
                });
            if let Err(err) = spawned {
                tracing::warn!("cannot stop ublk device {dev_id} on drop: {err}");
            }
        }
    }
}

/// STOP_DEV, join the queue threads, DEL_DEV.
fn shutdown(
    mut control: ControlRing,
    dev_id: u32,
    queues: Vec<JoinHandle<Result<(), UblkError>>>,
) -> Result<(), UblkError> {
    let mut first = control.stop_dev(dev_id).map_err(control_err("STOP_DEV")).err();
    for queue in queues {
        match queue.join() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                first.get_or_insert(err);
            }
            Err(_) => {
                first.get_or_insert(UblkError::Join("ublk queue thread panicked".into()));
            }
        }
    }
    if let Err(err) = control.del_dev(dev_id) {
        first.get_or_insert(UblkError::Control {
            step: "DEL_DEV",
            source: err,
        });
    }
    first.map_or(Ok(()), Err)
}

fn control_err(step: &'static str) -> impl Fn(io::Error) -> UblkError {
    move |source| UblkError::Control { step, source }
}

fn validate(options: &UblkOptions) -> Result<(), UblkError> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if options.queues == 0 || usize::from(options.queues) > cpus {
        return Err(UblkError::Options(format!(
            "{} queues requested; 1 to {cpus} (the number of CPUs) are possible",
            options.queues
        )));
    }
    if options.depth == 0 || usize::from(options.depth) > MAX_QUEUE_DEPTH {
        return Err(UblkError::Options(format!(
            "queue depth {} is not between 1 and {MAX_QUEUE_DEPTH}",
            options.depth
        )));
    }
    if options.max_io_bytes < 4096
        || !options.max_io_bytes.is_multiple_of(4096)
        || options.max_io_bytes > 32 << 20
    {
        return Err(UblkError::Options(format!(
            "max_io_bytes {} is not a multiple of 4096 between 4 KiB and 32 MiB",
            options.max_io_bytes
        )));
    }
    if !options.block_size.is_power_of_two() || !(512..=4096).contains(&options.block_size) {
        return Err(UblkError::Options(format!(
            "block size {} is not a power of two from 512 to 4096",
            options.block_size
        )));
    }
    Ok(())
}

fn start_blocking(
    backend: SharedBackend,
    options: UblkOptions,
    runtime: tokio::runtime::Handle,
    size: u64,
    shift: u8,
) -> Result<UblkDevice, UblkError> {
    let mut ring = match ControlRing::open() {
        Ok(ring) => ring,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(check_ublk_support().err().map_or(
                UblkError::Control {
                    step: "open /dev/ublk-control",
                    source: err,
                },
                UblkError::Unsupported,
            ))
        }
        Err(err) if matches!(err.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
            return Err(io_uring_unsupported(&err).into())
        }
        Err(err) => return Err(control("open /dev/ublk-control")(err)),
    };
    let mut info = DevInfo {
        nr_hw_queues: options.queues,
        queue_depth: options.depth,
        max_io_buf_bytes: options.max_io_bytes,
        dev_id: u32::MAX,
        flags: F_CMD_IOCTL_ENCODE,
        ..DevInfo::default()
    };
    ring.add_dev(&mut info).map_err(control("ADD_DEV"))?;
    let dev_id = info.dev_id;
    let geometry = Geometry {
        logical_block_shift: shift,
        sectors: size >> 9,
        max_request_sectors: options.max_io_bytes >> 9,
        discard_sectors: 1 << 21,
    };
    if let Err(err) = ring.set_params(dev_id, geometry) {
        let _ = ring.del_dev(dev_id);
        return Err(control("SET_PARAMS")(err));
    }
    let device = match crate::sys::ublk::open_char_device(dev_id) {
        Ok(device) => std::sync::Arc::new(device),
        Err(err) => {
            let _ = ring.del_dev(dev_id);
            return Err(control("open /dev/ublkcN")(err));
        }
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut queues = Vec::with_capacity(usize::from(options.queues));
    for q in 0..options.queues {
        let spec = queue::QueueSpec {
            device: device.clone(),
            queue: q,
            depth: options.depth,
            buffer_bytes: options.max_io_bytes as usize,
            size,
        };
        let backend = backend.clone();
        let runtime = runtime.clone();
        let ready = ready_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("ublk{dev_id}-q{q}"))
            .spawn(move || queue::run(spec, backend, runtime, ready));
        match spawned {
            Ok(handle) => queues.push(handle),
            Err(err) => {
                let _ = shutdown(ring, dev_id, queues);
                return Err(UblkError::Queue {
                    queue: q,
                    source: err,
                });
            }
        }
    }
    drop(ready_tx);
    // The queues hold the device open; it closes when the last one ends.
    drop(device);
    // Every queue reports once: its fetches are queued in the kernel, or it failed.
    let mut failed = None;
    for _ in 0..options.queues {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                failed.get_or_insert(err);
            }
            Err(_) => {
                failed.get_or_insert(UblkError::Join("a ublk queue thread ended during setup".into()));
            }
        }
    }
    if let Some(err) = failed {
        let _ = shutdown(ring, dev_id, queues);
        return Err(err);
    }
    if let Err(err) = ring.start_dev(dev_id, std::process::id() as i32) {
        let _ = shutdown(ring, dev_id, queues);
        return Err(control("START_DEV")(err));
    }
    let path = PathBuf::from(format!("/dev/ublkb{dev_id}"));
    tracing::info!(path = %path.display(), size, queues = options.queues, depth = options.depth, "ublk device started");
    Ok(UblkDevice {
        dev_id,
        path,
        size,
        control: Some(ring),
        queues,
    })
}
