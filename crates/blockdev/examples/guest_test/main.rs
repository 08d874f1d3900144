//! The in-guest checks of `scripts/vm-test`: run as root inside a VM whose kernel has the `nbd`
//! and `ublk_drv` modules loaded. Each check prints `R3MAP-GUEST-OK <name>` or
//! `R3MAP-GUEST-FAIL <name>: <error>` on stdout (the serial console), and the run ends with
//! `R3MAP-GUEST-DONE failures=<n>`. Needs `mke2fs` and `mount` on `PATH` for the ext4 checks,
//! and the static `r3map` binary at /bin/r3map for the command-line checks (`cli`), and
//! `mkswap`/`swapon`/`swapoff` plus a remote served by the host for remote swap (`swap`).

mod cli;
mod swap;

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use r3map_blockdev::{NbdDevice, NbdMethod, NbdOptions, UblkDevice, UblkOptions};
use r3map_core::testing::pattern;
use r3map_core::{Backend, MemoryBackend, SharedBackend};

const SIZE: u64 = 64 << 20;
const BLOCK: usize = 4096;

/// One check: a name and the future that runs it.
type Check = fn() -> std::pin::Pin<Box<dyn Future<Output = Result<()>>>>;

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let only: Vec<String> = std::env::args().skip(1).collect();
    if let [worker, mib] = &only[..] {
        if worker == "swap-worker" {
            // The program the swap checks run, not a check.
            return match mib.parse().map_err(anyhow::Error::from).and_then(swap::worker) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    println!("{err:#}");
                    ExitCode::FAILURE
                }
            };
        }
    }
    let mut failures = 0;
    let checks: Vec<(&str, Check)> = vec![
        ("nbd-ioctl-rw", || Box::pin(nbd_rw(NbdMethod::Ioctl))),
        ("nbd-netlink-rw-ext4", || Box::pin(nbd_netlink_ext4())),
        ("nbd-dead-server-eio", || Box::pin(nbd_dead_server())),
        ("ublk-rw-ext4", || Box::pin(ublk_rw_ext4())),
        ("cli-mount-nbd-direct", || {
            Box::pin(blocking(|| cli::mount_and_close("nbd", false)))
        }),
        ("cli-mount-nbd-managed", || {
            Box::pin(blocking(|| cli::mount_and_close("nbd", true)))
        }),
        ("cli-mount-ublk-direct", || {
            Box::pin(blocking(|| cli::mount_and_close("ublk", false)))
        }),
        ("cli-mount-ublk-managed", || {
            Box::pin(blocking(|| cli::mount_and_close("ublk", true)))
        }),
        ("swap-remote-nbd", || {
            Box::pin(blocking(|| swap::remote_swap("nbd")))
        }),
        ("swap-remote-ublk", || {
            Box::pin(blocking(|| swap::remote_swap("ublk")))
        }),
    ];
    for (name, check) in checks {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let start = Instant::now();
        // Swapping hundreds of MiB through an emulated network takes minutes.
        let limit = Duration::from_secs(if name.starts_with("swap-") { 900 } else { 120 });
        let outcome = runtime.block_on(async {
            tokio::time::timeout(limit, check())
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out after {limit:?}")))
        });
        match outcome {
            Ok(()) => println!("R3MAP-GUEST-OK {name} ({:.1} s)", start.elapsed().as_secs_f64()),
            Err(err) => {
                failures += 1;
                println!("R3MAP-GUEST-FAIL {name}: {err:#}");
            }
        }
    }
    println!("R3MAP-GUEST-DONE failures={failures}");
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs blocking `check` (processes, file I/O) off the runtime's threads.
async fn blocking(check: fn() -> Result<()>) -> Result<()> {
    tokio::task::spawn_blocking(check).await?
}

fn memory() -> (Arc<MemoryBackend>, SharedBackend) {
    let backend = Arc::new(MemoryBackend::new(SIZE));
    (backend.clone(), backend)
}

/// A buffer aligned for O_DIRECT.
struct Aligned {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + BLOCK];
        let offset = storage.as_ptr().align_offset(BLOCK);
        Self { storage, offset, len }
    }
    fn from(data: &[u8]) -> Self {
        let mut buf = Self::new(data.len());
        buf.as_mut().copy_from_slice(data);
        buf
    }
    fn as_ref(&self) -> &[u8] {
        &self.storage[self.offset..self.offset + self.len]
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

fn open_direct(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("opening {} with O_DIRECT", path.display()))
}

/// The writes of writer `w` in order: one large write per region, then small scattered ones
/// inside it. Regions do not overlap, so the writers may run at once.
fn writes_of(w: u64, size: u64) -> Vec<(u64, Vec<u8>)> {
    let region = size / 4;
    let mut writes = vec![(w * region, pattern(w + 1, 4 << 20))];
    for i in 0..32u64 {
        let at = w * region + (i * 7919 % (region / BLOCK as u64)) * BLOCK as u64;
        writes.push((at, pattern(1000 + w * 100 + i, BLOCK)));
    }
    writes
}

/// Writes through the device from several threads at once (so several kernel queues or
/// connections are busy), then checks that the backend holds exactly the expected bytes and
/// that reading the whole device back through the kernel returns them too.
async fn rw_verify(path: PathBuf, backend: Arc<MemoryBackend>) -> Result<()> {
    let size = backend.size();
    let mut expected = vec![0u8; size as usize];
    backend.read_at(0, &mut expected).await?;
    let path2 = path.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let path = path2.clone();
                std::thread::spawn(move || -> Result<()> {
                    let device = open_direct(&path)?;
                    for (at, data) in writes_of(w, size) {
                        device
                            .write_all_at(Aligned::from(&data).as_ref(), at)
                            .with_context(|| format!("write of {} bytes at {at}", data.len()))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for writer in writers {
            writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        // The last block of the device too.
        let device = open_direct(&path2)?;
        let tail = Aligned::from(&pattern(77, BLOCK));
        device
            .write_all_at(tail.as_ref(), size - BLOCK as u64)
            .context("write of the last block")?;
        device.sync_all().context("fsync of the device")?;
        Ok(())
    })
    .await??;
    for w in 0..4 {
        for (at, data) in writes_of(w, size) {
            expected[at as usize..at as usize + data.len()].copy_from_slice(&data);
        }
    }
    expected[size as usize - BLOCK..].copy_from_slice(&pattern(77, BLOCK));
    let mut backend_bytes = vec![0u8; size as usize];
    backend.read_at(0, &mut backend_bytes).await?;
    ensure!(
        backend_bytes == expected,
        "the backend does not hold what was written"
    );
    let device_bytes = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
        let device = open_direct(&path)?;
        let mut buf = Aligned::new(size as usize);
        device
            .read_exact_at(buf.as_mut(), 0)
            .context("read of the whole device")?;
        Ok(buf.as_ref().to_vec())
    })
    .await??;
    ensure!(
        device_bytes == expected,
        "reading the device back differs from what was written"
    );
    Ok(())
}

/// mkfs.ext4, mount, write files, unmount, mount again, verify, unmount.
async fn ext4_check(path: PathBuf) -> Result<()> {
    tokio::task::spawn_blocking(move || -> Result<()> {
        run(Command::new("mke2fs").args(["-q", "-F", "-t", "ext4"]).arg(&path))?;
        let mnt = Path::new("/mnt/r3map");
        std::fs::create_dir_all(mnt)?;
        run(Command::new("mount").args(["-t", "ext4"]).arg(&path).arg(mnt))?;
        let files: Vec<(String, Vec<u8>)> = (0..16u64)
            .map(|i| (format!("file{i}"), pattern(500 + i, (i as usize + 1) * 37_000)))
            .collect();
        for (name, data) in &files {
            std::fs::write(mnt.join(name), data)?;
        }
        std::fs::remove_file(mnt.join("file3"))?; // a discard for the backend
        run(&mut Command::new("sync"))?;
        run(Command::new("umount").arg(mnt))?;
        run(Command::new("mount").args(["-t", "ext4"]).arg(&path).arg(mnt))?;
        for (name, data) in &files {
            let found = std::fs::read(mnt.join(name));
            if name == "file3" {
                ensure!(found.is_err(), "{name} was deleted but is back");
            } else {
                ensure!(found? == *data, "{name} differs after remount");
            }
        }
        run(Command::new("umount").arg(mnt))?;
        Ok(())
    })
    .await?
}

fn run(command: &mut Command) -> Result<()> {
    let output = command.output().with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn sys_block_exists(path: &Path) -> bool {
    let name = path.file_name().unwrap_or_default();
    Path::new("/sys/block").join(name).join("pid").exists()
}

async fn nbd_rw(method: NbdMethod) -> Result<()> {
    let (backend, shared) = memory();
    let device = NbdDevice::attach(
        shared,
        NbdOptions {
            connections: 2,
            method,
            ..NbdOptions::default()
        },
    )
    .await?;
    ensure!(device.method() == method, "attached with {:?}", device.method());
    let path = device.path().to_owned();
    ensure!(
        sys_block_exists(&path),
        "{} has no pid after attach",
        path.display()
    );
    rw_verify(path.clone(), backend).await?;
    device.disconnect().await?;
    ensure!(!sys_block_exists(&path), "{} still connected", path.display());
    Ok(())
}

async fn nbd_netlink_ext4() -> Result<()> {
    let (backend, shared) = memory();
    let device = NbdDevice::attach(
        shared,
        NbdOptions {
            connections: 4,
            method: NbdMethod::Netlink,
            ..NbdOptions::default()
        },
    )
    .await?;
    let path = device.path().to_owned();
    rw_verify(path.clone(), backend.clone()).await?;
    ext4_check(path.clone()).await?;
    device.disconnect().await?;
    ensure!(!sys_block_exists(&path), "{} still connected", path.display());
    // A second device at the same time gets another index (the kernel picks free ones).
    let (_, one) = memory();
    let (_, two) = memory();
    let a = NbdDevice::attach(one, NbdOptions::default()).await?;
    let b = NbdDevice::attach(two, NbdOptions::default()).await?;
    ensure!(a.path() != b.path(), "two attaches got the same device");
    a.disconnect().await?;
    b.disconnect().await?;
    Ok(())
}

/// A server that goes away turns into I/O errors, not a hung process.
async fn nbd_dead_server() -> Result<()> {
    let (_, shared) = memory();
    let config = r3map_nbd::ServerConfig::new(vec![r3map_nbd::Export::new("dead", shared)]);
    let server = r3map_nbd::Server::bind_tcp(config, "127.0.0.1:0").await?;
    let addr = match server.local_addr() {
        r3map_nbd::ListenAddr::Tcp(addr) => addr.to_string(),
        other => bail!("unexpected listener {other:?}"),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async {
        let _ = stop_rx.await;
    }));
    let device = NbdDevice::attach_remote(
        &addr,
        NbdOptions {
            connections: 1,
            export_name: "dead".into(),
            timeout: Duration::from_secs(5),
            ..NbdOptions::default()
        },
    )
    .await?;
    let path = device.path().to_owned();
    let read = |path: PathBuf, at: u64| {
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let device = open_direct(&path).map_err(std::io::Error::other)?;
            let mut buf = Aligned::new(BLOCK);
            device.read_exact_at(buf.as_mut(), at)
        })
    };
    read(path.clone(), 0)
        .await?
        .context("read while the server is up")?;
    let _ = stop_tx.send(());
    serving.await??;
    let start = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(60), read(path.clone(), 8 << 20))
        .await
        .context("a read after the server died hung for 60 s")??;
    match outcome {
        Err(err) if err.raw_os_error() == Some(libc::EIO) => {}
        Err(err) => bail!("read after the server died failed with {err}, not EIO"),
        Ok(()) => bail!("read after the server died succeeded"),
    }
    println!("dead server: EIO after {:.1} s", start.elapsed().as_secs_f64());
    // Disconnecting a device whose server is gone must not hang either (the flush fails).
    let _ = tokio::time::timeout(Duration::from_secs(30), device.disconnect())
        .await
        .context("disconnect after the server died hung")?;
    Ok(())
}

async fn ublk_rw_ext4() -> Result<()> {
    let (backend, shared) = memory();
    let queues = std::thread::available_parallelism().map_or(1, |n| n.get().min(2) as u16);
    let device = UblkDevice::start(
        shared,
        UblkOptions {
            queues,
            depth: 32,
            ..UblkOptions::default()
        },
    )
    .await?;
    let path = device.path().to_owned();
    ensure!(path.exists(), "{} does not exist after start", path.display());
    rw_verify(path.clone(), backend).await?;
    ext4_check(path.clone()).await?;
    device.stop().await?;
    ensure!(!path.exists(), "{} still exists after stop", path.display());
    Ok(())
}
