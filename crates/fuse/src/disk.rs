//! The *path* frontend: a loop device over the file frontend, so the application gets a block
//! device path (`/dev/loopN`) it can partition, format and mount.

use std::path::Path;

use r3map_core::SharedBackend;
use tokio::runtime::Handle;

use crate::error::{FuseError, Result};
use crate::file::{FileMount, FileOptions};
use crate::loopdev::{LoopDevice, LoopOptions};

/// A backend as a block device: a [`FileMount`] plus a loop device bound to its file.
///
/// Close it with [`DiskMount::close`]: it flushes and detaches the loop device, then unmounts
/// the file. Dropping it detaches and unmounts too (lazily when busy), without reporting errors
/// and without syncing the backend — close it for durability.
#[derive(Debug)]
pub struct DiskMount {
    // Field order matters for Drop: the loop device goes before the file it uses.
    device: LoopDevice,
    file: FileMount,
}

impl DiskMount {
    /// Mounts the file frontend at `mountpoint` (file `name`) and binds a loop device to it.
    pub fn open(
        backend: SharedBackend,
        mountpoint: impl AsRef<Path>,
        name: &str,
        runtime: Handle,
    ) -> Result<Self> {
        Self::open_with(
            backend,
            mountpoint,
            name,
            runtime,
            &FileOptions::default(),
            &LoopOptions::default(),
        )
    }

    /// [`DiskMount::open`] with explicit options.
    pub fn open_with(
        backend: SharedBackend,
        mountpoint: impl AsRef<Path>,
        name: &str,
        runtime: Handle,
        file_options: &FileOptions,
        loop_options: &LoopOptions,
    ) -> Result<Self> {
        let mut loop_options = loop_options.clone();
        loop_options.read_only |= file_options.read_only;
        let mut file = FileMount::mount_with(backend, mountpoint, name, runtime, file_options)?;
        match LoopDevice::attach(file.path(), &loop_options) {
            Ok(device) => Ok(Self { device, file }),
            Err(err) => {
                if let Err(unmount) = file.unmount_blocking() {
                    tracing::warn!("cleaning up after a failed attach: {unmount}");
                }
                Err(err)
            }
        }
    }

    /// The block device path, `/dev/loopN`.
    pub fn path(&self) -> &Path {
        self.device.path()
    }

    /// The loop device.
    pub fn device(&self) -> &LoopDevice {
        &self.device
    }

    /// The file frontend under the loop device.
    pub fn file(&self) -> &FileMount {
        &self.file
    }

    /// Flushes the device and the backend (like `fsync` of the device).
    pub async fn sync(&self) -> Result<()> {
        let runtime = self.file_runtime();
        let device = self.device.path().to_path_buf();
        let flushed = runtime
            .spawn_blocking(move || {
                // Our own fd may be gone after a partial close; opening the device works
                // as long as it exists.
                std::fs::File::open(&device).and_then(|f| f.sync_all())
            })
            .await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(source)) => {
                return Err(FuseError::Loop {
                    device: self.device.path().display().to_string(),
                    op: "fsync",
                    source,
                })
            }
            Err(_) => {
                return Err(FuseError::RuntimeGone {
                    mountpoint: self.file.mountpoint().to_path_buf(),
                })
            }
        }
        self.file.sync().await
    }

    /// Flushes and detaches the loop device, then unmounts the file (see
    /// [`FileMount::unmount`]). If the device is mounted or the file is still in use, fails
    /// with [`FuseError::Busy`]; nothing is lost, and `close` can be called again. A filesystem
    /// mounted on the device is detected before anything changes; a file still open elsewhere
    /// is found only after the loop device was detached, which then stays detached.
    pub async fn close(&mut self) -> Result<()> {
        if self.device.is_attached() || self.file.is_mounted() {
            let runtime = self.file_runtime();
            let mut device = std::mem::replace(&mut self.device, LoopDevice::detached_placeholder());
            let (device, detached) = runtime
                .spawn_blocking(move || {
                    let result = device.detach();
                    (device, result)
                })
                .await
                .map_err(|_| FuseError::RuntimeGone {
                    mountpoint: self.file.mountpoint().to_path_buf(),
                })?;
            self.device = device;
            detached?;
        }
        self.file.unmount().await
    }

    /// [`DiskMount::close`] for code outside async contexts. It blocks the calling thread, so do
    /// not call it on a current-thread runtime.
    pub fn close_blocking(&mut self) -> Result<()> {
        self.device.detach()?;
        self.file.unmount_blocking()
    }

    fn file_runtime(&self) -> Handle {
        self.file.runtime().clone()
    }
}
