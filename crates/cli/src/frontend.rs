//! The frontends through which a command offers a backend to applications: a FUSE file, a loop
//! device over it, the kernel's NBD client, ublk, or a slice server for programs that hand over
//! their userfaultfd. `mount` and `migrate` share them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use r3map_blockdev::{check_nbd_support, check_ublk_support, NbdDevice, NbdOptions, UblkDevice, UblkOptions};
use r3map_core::SharedBackend;
use r3map_fuse::{DiskMount, FileMount, Transport, UringSwitch};

use crate::commands::slice_server::SliceServer;
use crate::metrics::{Exporter, Role};

/// How the resource appears to applications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Frontend {
    File,
    Disk,
    Nbd,
    Ublk,
    Slice,
}

impl Frontend {
    /// Refuses a frontend this kernel cannot offer, naming the missing feature, before any work.
    pub fn check_supported(self) -> Result<()> {
        match self {
            Frontend::Nbd => drop(check_nbd_support()?),
            Frontend::Ublk => check_ublk_support()?,
            Frontend::File | Frontend::Disk | Frontend::Slice => {}
        }
        Ok(())
    }
}

/// The mounted frontend. Kernel block devices are `None` once closed.
pub enum Mounted {
    File(FileMount),
    Disk(DiskMount),
    Nbd(PathBuf, Option<NbdDevice>),
    Ublk(PathBuf, Option<UblkDevice>),
    Slice(Option<SliceServer>),
}

impl Mounted {
    /// Offers `backend` through `frontend`; its requests (and a slice region's faults) are
    /// counted in `metrics`.
    pub async fn open(
        frontend: Frontend,
        backend: SharedBackend,
        target: &Path,
        name: &str,
        metrics: &Exporter,
    ) -> Result<Self> {
        let runtime = tokio::runtime::Handle::current();
        let backend = metrics.meter(backend, Role::frontend);
        Ok(match frontend {
            Frontend::File => Mounted::File(FileMount::mount(backend, target, name, runtime)?),
            Frontend::Disk => Mounted::Disk(DiskMount::open(backend, target, name, runtime)?),
            Frontend::Nbd => {
                let device = NbdDevice::attach(backend, NbdOptions::default()).await?;
                Mounted::Nbd(device.path().to_path_buf(), Some(device))
            }
            Frontend::Ublk => {
                let device = UblkDevice::start(backend, UblkOptions::default()).await?;
                Mounted::Ublk(device.path().to_path_buf(), Some(device))
            }
            Frontend::Slice => Mounted::Slice(Some(SliceServer::start(
                backend,
                target,
                runtime,
                metrics.fault_observer(),
            )?)),
        })
    }

    /// How the kernel's FUSE requests reach the file (file and disk frontends).
    pub fn fuse_transport(&self) -> Option<&Transport> {
        match self {
            Mounted::File(file) => Some(file.transport()),
            Mounted::Disk(disk) => Some(disk.file().transport()),
            _ => None,
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Mounted::File(file) => file.path(),
            Mounted::Disk(disk) => disk.path(),
            Mounted::Nbd(path, _) | Mounted::Ublk(path, _) => path,
            Mounted::Slice(server) => server.as_ref().map_or(Path::new("-"), |s| s.path()),
        }
    }

    /// Makes the kernel hand over what it still holds for the frontend (dirty pages of mapped
    /// files and block devices; a slice region's written pages) to the backend.
    pub async fn flush(&self) -> Result<()> {
        match self {
            Mounted::Slice(Some(server)) => server.write_back().await,
            Mounted::Slice(None) => Ok(()),
            _ => {
                let path = self.path().to_path_buf();
                tokio::task::spawn_blocking(move || -> Result<()> {
                    let file = std::fs::OpenOptions::new().write(true).open(&path)?;
                    file.sync_all()
                        .with_context(|| format!("cannot flush {}", path.display()))
                })
                .await?
            }
        }
    }

    pub async fn close(&mut self) -> Result<()> {
        match self {
            Mounted::File(file) => file.unmount().await?,
            Mounted::Disk(disk) => disk.close().await?,
            Mounted::Nbd(path, device) => {
                refuse_if_mounted(path)?;
                if let Some(device) = device.take() {
                    device.disconnect().await?;
                }
            }
            Mounted::Ublk(path, device) => {
                refuse_if_mounted(path)?;
                if let Some(device) = device.take() {
                    device.stop().await?;
                }
            }
            Mounted::Slice(server) => {
                if let Some(running) = server.as_ref() {
                    running.close().await?;
                }
                server.take();
            }
        }
        Ok(())
    }
}

/// `--fuse-uring`: turns on FUSE over io_uring in the kernel and says what changed, or why not
/// and which command would (the mount then uses /dev/fuse).
pub fn turn_on_fuse_uring() {
    let path = "/sys/module/fuse/parameters/enable_uring";
    match r3map_fuse::enable_uring() {
        Ok(UringSwitch::AlreadyOn) => eprintln!("FUSE over io_uring was already on ({path} is Y)"),
        Ok(UringSwitch::TurnedOn) => eprintln!(
            "turned on FUSE over io_uring for this kernel: wrote Y to {path} (every FUSE filesystem \
             mounted from now on may use it; `echo N > {path}` turns it off)"
        ),
        Err(reason) => eprintln!("cannot turn on FUSE over io_uring: {reason}; mounting over /dev/fuse"),
    }
}

/// A kernel block device with a filesystem mounted on it must not be pulled away.
fn refuse_if_mounted(device: &Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let device = device.to_string_lossy();
    if let Some(line) = mounts
        .lines()
        .find(|line| line.split_whitespace().next() == Some(&*device))
    {
        let at = line.split_whitespace().nth(1).unwrap_or("?");
        bail!("{device} is mounted at {at}; unmount it first");
    }
    Ok(())
}
