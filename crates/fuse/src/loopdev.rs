//! Loop devices: a block device (`/dev/loopN`) whose sectors are a file's bytes.
//!
//! [`LoopDevice::attach`] asks `/dev/loop-control` for a free device and binds the file with one
//! `LOOP_CONFIGURE` call, with `LO_FLAGS_AUTOCLEAR` (the kernel detaches the device when its
//! last opener closes it, so a crashed process leaves nothing behind unless someone still uses
//! the device) and, by default, `LO_FLAGS_DIRECT_IO`.
//!
//! Direct I/O helps here: without it the loop driver does buffered I/O on the backing file, so
//! every block sits twice in the page cache (once for `/dev/loopN`, once for the FUSE file) and
//! writes are copied twice. With it, the loop driver sends its requests straight to the FUSE
//! file (`O_DIRECT`), asynchronously and in parallel (`FUSE_ASYNC_DIO`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{FuseError, Result};
use crate::sys;

/// `LO_FLAGS_AUTOCLEAR` in [`LoopDevice::status_flags`]: detach at the last close.
pub const FLAG_AUTOCLEAR: u32 = sys::LO_FLAGS_AUTOCLEAR;
/// `LO_FLAGS_DIRECT_IO` in [`LoopDevice::status_flags`]: direct I/O on the backing file.
pub const FLAG_DIRECT_IO: u32 = sys::LO_FLAGS_DIRECT_IO;

/// How long [`LoopDevice::detach`] waits for the kernel to release the backing file.
const DETACH_WAIT: Duration = Duration::from_secs(5);

/// How a loop device is configured.
#[derive(Debug, Clone)]
pub struct LoopOptions {
    /// Ask for direct I/O on the backing file; if the kernel refuses, the device is set up with
    /// buffered I/O instead (see [`LoopDevice::direct_io`]).
    pub direct_io: bool,
    /// Logical block size in bytes (512, 1024, 2048 or 4096); 0 lets the kernel choose.
    pub block_size: u32,
    /// A read-only device.
    pub read_only: bool,
}

impl Default for LoopOptions {
    fn default() -> Self {
        Self {
            direct_io: true,
            block_size: 0,
            read_only: false,
        }
    }
}

/// A loop device bound to a file by this process; detached by [`LoopDevice::detach`] or, at
/// the latest, when it is dropped (then by the kernel at its last close).
#[derive(Debug)]
pub struct LoopDevice {
    number: u32,
    path: PathBuf,
    device: Option<File>,
}

fn loop_error<'a>(device: &'a str, op: &'static str) -> impl FnOnce(io::Error) -> FuseError + 'a {
    move |source| FuseError::Loop {
        device: device.to_string(),
        op,
        source,
    }
}

impl LoopDevice {
    /// Binds `backing` to a free loop device.
    pub fn attach(backing: &Path, options: &LoopOptions) -> Result<Self> {
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .map_err(loop_error(
                "/dev/loop-control",
                "open (is the loop module present?)",
            ))?;
        let backing_file = OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .open(backing)
            .map_err(|source| FuseError::Loop {
                device: "(none yet)".into(),
                op: "opening the backing file",
                source: io::Error::new(source.kind(), format!("{}: {source}", backing.display())),
            })?;
        let mut flags = sys::LO_FLAGS_AUTOCLEAR;
        if options.read_only {
            flags |= sys::LO_FLAGS_READ_ONLY;
        }
        // Another process can take the free device between GET_FREE and CONFIGURE (EBUSY):
        // ask again a few times.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let number = sys::loop_ctl_get_free(&control)
                .map_err(loop_error("/dev/loop-control", "LOOP_CTL_GET_FREE"))?;
            let path = PathBuf::from(format!("/dev/loop{number}"));
            let name = path.display().to_string();
            let device = OpenOptions::new()
                .read(true)
                .write(!options.read_only)
                .open(&path)
                .map_err(loop_error(&name, "open"))?;
            let mut result = Err(io::Error::from(io::ErrorKind::InvalidInput));
            if options.direct_io {
                result = sys::loop_configure(
                    &device,
                    &backing_file,
                    flags | sys::LO_FLAGS_DIRECT_IO,
                    options.block_size,
                );
                if let Err(err) = &result {
                    tracing::debug!("{name}: LOOP_CONFIGURE with direct I/O failed ({err})");
                }
            }
            if matches!(&result, Err(err) if err.raw_os_error() != Some(libc::EBUSY)) {
                result = sys::loop_configure(&device, &backing_file, flags, options.block_size);
            }
            match result {
                Ok(()) => {
                    let attached = Self {
                        number,
                        path,
                        device: Some(device),
                    };
                    tracing::info!(
                        "attached {} to {} (direct I/O {})",
                        attached.path.display(),
                        backing.display(),
                        if attached.direct_io() { "on" } else { "off" }
                    );
                    return Ok(attached);
                }
                Err(err) if err.raw_os_error() == Some(libc::EBUSY) && attempts < 8 => continue,
                Err(err) => return Err(loop_error(&name, "LOOP_CONFIGURE")(err)),
            }
        }
    }

    /// A value standing in while the real one is moved to a blocking thread.
    pub(crate) fn detached_placeholder() -> Self {
        Self {
            number: u32::MAX,
            path: PathBuf::new(),
            device: None,
        }
    }

    /// The device path, `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device number N.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// Whether the kernel does direct I/O on the backing file.
    pub fn direct_io(&self) -> bool {
        std::fs::read_to_string(format!("/sys/block/loop{}/loop/dio", self.number))
            .is_ok_and(|s| s.trim() == "1")
    }

    /// Whether the device is still bound to its file.
    pub fn is_attached(&self) -> bool {
        self.device.is_some()
    }

    /// The kernel's `LO_FLAGS_*` for this device (`LOOP_GET_STATUS64`), e.g. [`FLAG_AUTOCLEAR`].
    pub fn status_flags(&self) -> Result<u32> {
        let name = self.path.display().to_string();
        let device = self
            .device
            .as_ref()
            .ok_or_else(|| loop_error(&name, "LOOP_GET_STATUS64")(io::ErrorKind::NotFound.into()))?;
        sys::loop_get_status(device)
            .map(|info| info.lo_flags)
            .map_err(loop_error(&name, "LOOP_GET_STATUS64"))
    }

    /// Writes the device's cached blocks to the backing file and flushes it (`fsync` of the
    /// device, which ends with a flush of the backing file).
    pub fn flush(&self) -> Result<()> {
        if let Some(device) = &self.device {
            let name = self.path.display().to_string();
            device.sync_all().map_err(loop_error(&name, "fsync"))?;
        }
        Ok(())
    }

    /// Flushes and detaches the device. Fails with [`FuseError::Busy`], changing nothing, if a
    /// filesystem is mounted on it (or another program holds it exclusively). If another
    /// program merely has it open, the kernel detaches it when that program closes it; this
    /// waits a few seconds for that and then reports the device busy. Calling it after success
    /// does nothing.
    pub fn detach(&mut self) -> Result<()> {
        let name = self.path.display().to_string();
        if self.device.is_some() {
            // An exclusive open fails while a filesystem (or device mapper, or another
            // O_EXCL opener) claims the device.
            if let Err(err) = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_EXCL)
                .open(&self.path)
            {
                if err.raw_os_error() == Some(libc::EBUSY) {
                    let holder = match mounted_at(&self.path) {
                        Some(at) => format!("it is mounted at {}", at.display()),
                        None => "another program holds it exclusively".into(),
                    };
                    return Err(FuseError::Busy {
                        path: self.path.clone(),
                        holder,
                    });
                }
                return Err(loop_error(&name, "exclusive open")(err));
            }
            self.flush()?;
            let device = self.device.take().expect("checked above");
            match sys::loop_clr_fd(&device) {
                // ENXIO: already unbound.
                Ok(()) => {}
                Err(err) if err.raw_os_error() == Some(libc::ENXIO) => {}
                Err(err) => {
                    self.device = Some(device);
                    return Err(loop_error(&name, "LOOP_CLR_FD")(err));
                }
            }
            // The kernel detaches at the last close of the device; this is ours unless
            // another program has it open.
            drop(device);
        }
        let deadline = Instant::now() + DETACH_WAIT;
        while backing_file(self.number).is_some() {
            if Instant::now() >= deadline {
                return Err(FuseError::Busy {
                    path: self.path.clone(),
                    holder: "another program still has it open; the kernel detaches it when \
                             that program closes it"
                        .into(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Some(device) = self.device.take() {
            // Autoclear detaches the device at the last close; make sure of it even if the
            // flag was lost.
            let _ = device.sync_all();
            let _ = sys::loop_clr_fd(&device);
        }
    }
}

/// The backing file of `/dev/loop<number>`, if the device is bound.
pub fn backing_file(number: u32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/sys/block/loop{number}/loop/backing_file")).ok()?;
    let text = text.trim_end_matches('\n');
    (!text.is_empty()).then(|| PathBuf::from(text))
}

/// Every bound loop device: `(number, backing file)`.
pub fn bound_devices() -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut devices: Vec<_> = entries
        .filter_map(|entry| {
            let name = entry.ok()?.file_name();
            let number = name.to_str()?.strip_prefix("loop")?.parse().ok()?;
            Some((number, backing_file(number)?))
        })
        .collect();
    devices.sort();
    devices
}

/// Where a block device is mounted, from /proc/self/mountinfo.
fn mounted_at(device: &Path) -> Option<PathBuf> {
    crate::stale::mounts()
        .ok()?
        .into_iter()
        .find(|m| Path::new(&m.source) == device)
        .map(|m| m.mountpoint)
}
