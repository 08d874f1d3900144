//! An offline-capable drive: ext4 made on a managed mount (`--frontend disk`) with a persistent
//! cache and `--sync-to cache`. Files are written through one mount and pushed; a second mount
//! (another machine, a fresh cache) pulls everything; then the remote stops. Reads of the pulled
//! files keep working, new files are written and fsynced (into the cache), and when the remote
//! comes back the background push takes them there.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use crate::procs::{mounted_path, served_uri, tool, Running, UnmountOnDrop};

const LONG: Duration = Duration::from_secs(120);
/// Each request's deadline: a sync that waited for the stopped remote would fail after this.
const REMOTE_TIMEOUT: &str = "10s";

/// Content of file `name`: its name repeated (distinct per file, checkable anywhere).
fn content(name: &str, len: usize) -> Vec<u8> {
    name.bytes().cycle().take(len).collect()
}

pub fn run(r3map: &Path, work: &Path) -> Result<()> {
    let image = work.join("drive.img");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let listen = format!("127.0.0.1:{port}");
    let export = format!("drive=file:{}?size=64MiB", image.display());
    let serve = || -> Result<(Running, String)> {
        let mut server = Running::start(r3map, &["serve", &export, "--listen", &listen])?;
        let uri = served_uri(&server.wait_for("serving nbd", LONG)?)?;
        Ok((server, uri))
    };
    let (server, uri) = serve()?;
    let fs = work.join("fs");
    std::fs::create_dir(&fs)?;
    let fs_s = fs.to_str().context("path is not UTF-8")?;
    let mount = |name: &str| -> Result<(Running, String)> {
        let (target, cache) = (
            work.join(format!("mnt-{name}")),
            work.join(format!("cache-{name}")),
        );
        let mut mount = Running::start(
            r3map,
            &[
                "mount",
                &uri,
                target.to_str().unwrap_or_default(),
                "--managed",
                "--frontend",
                "disk",
                "--chunk-size",
                "256KiB",
                "--cache",
                cache.to_str().unwrap_or_default(),
                "--sync-to",
                "cache",
                "--remote-timeout",
                REMOTE_TIMEOUT,
            ],
        )?;
        let device = mounted_path(&mount.wait_for("mounted ", LONG)?);
        Ok((mount, device))
    };
    let before: Vec<String> = (0..4).map(|i| format!("before-{i}")).collect();
    let offline: Vec<String> = (0..4).map(|i| format!("offline-{i}")).collect();
    let len = 3 << 20;

    // Machine A: mkfs on the managed mount, files written, unmounted: everything pushed.
    let (first, device) = mount("a")?;
    let unmount_a = UnmountOnDrop(&fs);
    tool("mkfs.ext4", &["-q", &device])?;
    tool("mount", &["-t", "ext4", &device, fs_s])?;
    for name in &before {
        std::fs::write(fs.join(name), content(name, len))?;
    }
    tool("umount", &[fs_s])?;
    drop(unmount_a);
    first.terminate(LONG)?;

    // Machine B, a fresh cache: everything pulled, the files read.
    let (mut second, device) = mount("b")?;
    let _unmount_b = UnmountOnDrop(&fs);
    second.wait_for("pulled:", LONG)?;
    tool("mount", &["-t", "ext4", &device, fs_s])?;
    for name in &before {
        ensure!(
            std::fs::read(fs.join(name))? == content(name, len),
            "{name} differs on machine B"
        );
    }

    // The remote goes away. Reads from the cache, after dropping the kernel's copies.
    server.terminate(LONG)?;
    tool("umount", &[fs_s])?;
    tool("blockdev", &["--flushbufs", &device])?;
    tool("mount", &["-t", "ext4", &device, fs_s])?;
    let mut read = 0;
    for name in &before {
        let got = std::fs::read(fs.join(name))?;
        ensure!(
            got == content(name, len),
            "{name} differs while the remote is away"
        );
        read += got.len();
    }
    // Writes, fsynced: durable in the cache (with --sync-to remote an fsync waits for the
    // remote and fails after the request deadline).
    let offline_started = Instant::now();
    for name in &offline {
        let mut file = std::fs::File::create(fs.join(name))?;
        std::io::Write::write_all(&mut file, &content(name, len))?;
        file.sync_all()
            .with_context(|| format!("fsync of {name} while the remote is away"))?;
    }
    tool("sync", &["-f", fs_s])?;
    let offline_seconds = offline_started.elapsed().as_secs_f64();
    tool("umount", &[fs_s])?; // the filesystem complete in the cache, for a check on the remote
    ensure!(
        !second.has_said("gave up"),
        "the mount gave up while the remote was away:\n{}",
        second.seen.join("\n")
    );

    // The remote is back (same address): the background push delivers the offline writes.
    let returned = Instant::now();
    let (server, _) = serve()?;
    let deadline = returned + LONG;
    loop {
        let on_remote = offline.iter().all(|name| {
            tool(
                "debugfs",
                &["-R", &format!("cat /{name}"), image.to_str().unwrap_or_default()],
            )
            .is_ok_and(|got| got.as_bytes() == content(name, len))
        });
        if on_remote {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the offline writes did not reach the remote within {LONG:?}"
        );
        std::thread::sleep(Duration::from_millis(200)); // polling the remote's file, bounded above
    }
    let pushed_seconds = returned.elapsed().as_secs_f64();
    second.terminate(LONG)?;
    server.terminate(LONG)?;
    println!(
        "figure case=drive read_offline_bytes={read} written_offline_bytes={} offline_write_seconds={offline_seconds:.3} pushed_after_return_seconds={pushed_seconds:.3}",
        offline.len() * len
    );
    Ok(())
}
