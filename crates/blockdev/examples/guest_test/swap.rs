//! Remote swap, as a user sets it up: `r3map mount --frontend nbd|ublk --mlock` of a remote
//! that the host serves (scripts/vm-test runs `r3map serve` there and passes its address on the
//! kernel command line as `r3map.swap=nbd://10.0.2.2:PORT/EXPORT`), `mkswap` and `swapon` on the
//! device, then a program that touches more memory than the guest has (MemTotal + [`OVER_MIB`])
//! writes a pattern over all of it and reads it back. The program runs in a memory cgroup that
//! holds [`HEADROOM_MIB`] less than the guest has: what does not fit must go out to the remote
//! and come back (the swap counters must show at least that much each way), while the rest of
//! the guest keeps free memory. A guest-wide shortage instead starves the mount process, which
//! needs buffers for the very pages it writes out (and so stalled: nothing reached the remote).
//! `--mlock` keeps the mount process itself in RAM, so it is never swapped out to the device it
//! serves.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

use super::cli::Proc;
use super::{open_direct, run, Aligned};

/// How far the program goes beyond the guest's memory.
const OVER_MIB: u64 = 128;
/// What the program's cgroup leaves to the rest of the guest (the initramfs, the kernel, the
/// mount process and its buffers).
const HEADROOM_MIB: u64 = 384;
const CGROUP: &str = "/sys/fs/cgroup/r3map-swap";
const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

/// The word at index `i` of the program's memory: splitmix64, so every page differs.
fn word(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The program that swaps (`guest_test swap-worker MIB`): waits for a line on stdin (its parent
/// moves it into the cgroup first), fills MIB MiB with [`word`]s, then checks every word.
pub fn worker(mib: u64) -> Result<()> {
    let mut go = String::new();
    std::io::stdin().read_line(&mut go)?;
    // Zeroed allocation: fresh pages, first touched by the loop below.
    let mut memory = vec![0u64; (mib * MIB / 8) as usize];
    let started = Instant::now();
    for (i, w) in memory.iter_mut().enumerate() {
        *w = word(i as u64);
    }
    let write_s = started.elapsed().as_secs_f64();
    // Backwards: what is still in RAM (the end, written last) first, then what went out. A
    // forward pass would evict each page just before it is needed (every page a fault).
    let started = Instant::now();
    let bad = memory
        .iter()
        .enumerate()
        .rev()
        .filter(|(i, w)| **w != word(*i as u64))
        .count();
    let read_s = started.elapsed().as_secs_f64();
    ensure!(bad == 0, "{bad} of {} words differ after swapping", memory.len());
    println!("write_s={write_s:.2} read_s={read_s:.2}");
    Ok(())
}

/// The remote the host serves for swap, from the kernel command line.
fn swap_remote() -> Result<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline")?;
    cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("r3map.swap="))
        .map(str::to_string)
        .context("no r3map.swap=URI on the kernel command line (scripts/vm-test sets it)")
}

/// The value of `key` (the first field after it) in a `key value` or `key: value kB` file.
fn field(file: &str, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(file)?;
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(key)?;
            rest.strip_prefix(':').or(Some(rest))
        })
        .with_context(|| format!("no {key} in {file}"))?
        .split_whitespace()
        .next()
        .with_context(|| format!("{key} in {file} has no value"))?
        .parse()
        .with_context(|| format!("{key} in {file}"))
}

/// Pages swapped in and out so far (guest-wide).
fn swap_counters() -> Result<(u64, u64)> {
    Ok((
        field("/proc/vmstat", "pswpin ")?,
        field("/proc/vmstat", "pswpout ")?,
    ))
}

/// A cgroup whose processes may keep `limit_mib` MiB in memory (and swap the rest).
fn memory_cgroup(limit_mib: u64) -> Result<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if !root.join("cgroup.controllers").exists() {
        run(Command::new("mount").args(["-t", "cgroup2", "none"]).arg(root))?;
    }
    std::fs::write(root.join("cgroup.subtree_control"), "+memory")
        .context("enabling the memory controller")?;
    let group = PathBuf::from(CGROUP);
    if !group.exists() {
        std::fs::create_dir(&group)?;
    }
    std::fs::write(group.join("memory.max"), (limit_mib * MIB).to_string())?;
    Ok(group)
}

/// Writes and reads back `mib` MiB at the start of the device (O_DIRECT), timed: the path to
/// the remote works and how fast it is, before swap depends on it.
fn probe(device: &Path, mib: u64) -> Result<(f64, f64)> {
    let data = r3map_core::testing::pattern(17, (mib * MIB) as usize);
    let file = open_direct(device)?;
    let started = Instant::now();
    file.write_all_at(Aligned::from(&data).as_ref(), 0)?;
    file.sync_all()?;
    let write = mib as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut back = Aligned::new(data.len());
    file.read_exact_at(back.as_mut(), 0)?;
    let read = mib as f64 / started.elapsed().as_secs_f64();
    ensure!(
        back.as_ref() == data,
        "the device read back other bytes than written"
    );
    Ok((write, read))
}

/// Mount, probe, mkswap, swapon, run the program, check the counters, swapoff, unmount; the
/// mount's output with any error.
pub fn remote_swap(frontend: &str) -> Result<()> {
    let uri = swap_remote()?;
    // Pages are the unit: 4 KiB chunks, so a swapped-out page is one write (no read-modify-write
    // of a larger chunk).
    let mut mount = Proc::start(&[
        "mount",
        &uri,
        "--frontend",
        frontend,
        "--chunk-size",
        "4KiB",
        "--mlock",
    ])?;
    let line = mount.wait_for("mounted ")?;
    let device = line.rsplit(" at ").next().unwrap_or_default().to_string();
    ensure!(device.starts_with("/dev/"), "mounted at {device}: {line}");
    let outcome = swap_on(frontend, &device);
    if outcome.is_err() {
        let _ = run(Command::new("swapoff").arg(&device));
    }
    let (status, said) = mount.terminate()?;
    let figures = outcome.with_context(|| format!("r3map mount said:\n{said}"))?;
    ensure!(status.success(), "r3map mount exited with {status}:\n{said}");
    ensure!(said.contains("unmounted after"), "no unmount report:\n{said}");
    println!("{figures}");
    Ok(())
}

/// The swap part of [`remote_swap`] on `device`; its figures.
fn swap_on(frontend: &str, device: &str) -> Result<String> {
    let (write_mb_s, read_mb_s) = probe(Path::new(device), 32)?;
    println!("swap-{frontend}: {device} writes {write_mb_s:.1} MB/s, reads {read_mb_s:.1} MB/s");

    // Swap must reach the device, not a compressed pool in RAM.
    let zswap = Path::new("/sys/module/zswap/parameters/enabled");
    if zswap.exists() {
        std::fs::write(zswap, "N").context("disabling zswap")?;
    }
    run(Command::new("mkswap").arg(device))?;
    run(Command::new("swapon").arg(device))?;
    let swaps = std::fs::read_to_string("/proc/swaps")?;
    ensure!(swaps.contains(device), "{device} is not in /proc/swaps:\n{swaps}");
    let swap_mib = field("/proc/meminfo", "SwapTotal")? / 1024;

    let ram_mib = field("/proc/meminfo", "MemTotal")? / 1024;
    let touched_mib = ram_mib + OVER_MIB;
    let limit_mib = ram_mib - HEADROOM_MIB;
    let over = touched_mib - limit_mib;
    ensure!(
        over < swap_mib,
        "{over} MiB beyond the cgroup's {limit_mib} MiB do not fit in {swap_mib} MiB of swap"
    );
    let group = memory_cgroup(limit_mib)?;
    let (in_before, out_before) = swap_counters()?;
    let started = Instant::now();
    let mut program = Command::new(std::env::current_exe()?)
        .args(["swap-worker", &touched_mib.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the swapping program")?;
    std::fs::write(group.join("cgroup.procs"), program.id().to_string())
        .context("moving the program into its cgroup")?;
    writeln!(program.stdin.take().context("piped stdin")?, "go")?;
    // Progress on the console every 30 s while it runs (it takes minutes under TCG), until the
    // program is done (the sender dropped).
    let (done, progress) = std::sync::mpsc::channel::<()>();
    let label = format!("swap-{frontend}");
    let reporter = std::thread::spawn(move || {
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            progress.recv_timeout(std::time::Duration::from_secs(30))
        {
            if let Ok((pages_in, pages_out)) = swap_counters() {
                println!(
                    "{label}: {:.0} s, {} MiB out, {} MiB in",
                    started.elapsed().as_secs_f64(),
                    (pages_out - out_before) * PAGE / MIB,
                    (pages_in - in_before) * PAGE / MIB
                );
            }
        }
    });
    let output = program.wait_with_output();
    drop(done);
    let _ = reporter.join();
    let output = output?;
    let seconds = started.elapsed().as_secs_f64();
    let said = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if !output.status.success() {
        bail!(
            "the program exited with {}: {said} {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let (in_after, out_after) = swap_counters()?;
    let out_mib = (out_after - out_before) * PAGE / MIB;
    let in_mib = (in_after - in_before) * PAGE / MIB;
    let events = std::fs::read_to_string(group.join("memory.events")).unwrap_or_default();
    // What did not fit in the cgroup was out at the end of the write pass, and had to come back
    // in for the read pass.
    ensure!(
        out_mib >= over,
        "only {out_mib} MiB swapped out, {touched_mib} MiB touched in {limit_mib} MiB"
    );
    ensure!(
        in_mib >= over,
        "only {in_mib} MiB swapped in, {touched_mib} MiB touched in {limit_mib} MiB"
    );
    ensure!(
        events.lines().any(|line| line == "oom_kill 0"),
        "the cgroup saw OOM kills:\n{events}"
    );
    run(Command::new("swapoff").arg(device))?;
    std::fs::remove_dir(&group)?;
    Ok(format!(
        "R3MAP-GUEST-FIGURE swap-{frontend} ram_mib={ram_mib} swap_mib={swap_mib} \
         touched_mib={touched_mib} cgroup_mib={limit_mib} swapped_out_mib={out_mib} \
         swapped_in_mib={in_mib} seconds={seconds:.2} {said} \
         probe_write_mb_s={write_mb_s:.1} probe_read_mb_s={read_mb_s:.1}"
    ))
}
