//! Slice frontend: written pages the kernel swapped out still count as dirty.
//!
//! The test enables a swap file (under the temp dir), puts a child process into a memory cgroup
//! with a limit far below the region it fills, and checks in the child that the dirty scan
//! reports exactly the written chunks while some of those pages sit in swap.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::{pattern_byte, PatternBackend, PAGE};
use r3map_frontends::slice::{Region, RegionOptions, TrackingMode};

const CHILD_ENV: &str = "R3MAP_SLICE_SWAP_CHILD";
const TEST: &str = "written_pages_in_swap_are_dirty";

const CHUNK: u64 = 16 * PAGE;
const REGION: u64 = 160 << 20;
const LIMIT: u64 = 48 << 20;
const SWAP: u64 = 256 << 20;

/// A swap file and a memory cgroup, removed again on drop.
struct SwapLimit {
    swap_file: PathBuf,
    swap_on: bool,
    cgroup: Option<PathBuf>,
}

impl Drop for SwapLimit {
    fn drop(&mut self) {
        if let Some(cgroup) = &self.cgroup {
            let _ = std::fs::remove_dir(cgroup);
        }
        if self.swap_on {
            let _ = Command::new("swapoff").arg(&self.swap_file).status();
        }
        let _ = std::fs::remove_file(&self.swap_file);
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|_| format!("{program} cannot be run here"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{program} failed"))
    }
}

/// The memory cgroup root: (directory, cgroup v2?).
fn memory_cgroup_root() -> Option<(PathBuf, bool)> {
    for v2 in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let controllers = std::fs::read_to_string(Path::new(v2).join("cgroup.controllers"));
        if controllers.is_ok_and(|c| c.split_whitespace().any(|c| c == "memory")) {
            return Some((PathBuf::from(v2), true));
        }
    }
    let v1 = Path::new("/sys/fs/cgroup/memory");
    v1.join("memory.limit_in_bytes")
        .exists()
        .then(|| (v1.to_path_buf(), false))
}

/// Sets everything up, or says (in words that do not depend on the run) why it cannot be.
fn swap_limit() -> Result<SwapLimit, String> {
    let mut setup = SwapLimit {
        swap_file: std::env::temp_dir().join(format!("r3map-swap-test-{}", std::process::id())),
        swap_on: false,
        cgroup: None,
    };
    let file = setup.swap_file.to_str().expect("utf-8 temp dir").to_string();
    run("fallocate", &["-l", &SWAP.to_string(), &file])
        .map_err(|e| format!("cannot allocate a swap file in the temp dir ({e})"))?;
    run("chmod", &["600", &file])?;
    run("mkswap", &[&file]).map_err(|e| format!("cannot format a swap file ({e})"))?;
    run("swapon", &[&file]).map_err(|e| {
        format!("this machine refuses a swap file in the temp dir ({e}; tmpfs or no privilege)")
    })?;
    setup.swap_on = true;
    let (root, v2) =
        memory_cgroup_root().ok_or("no cgroup memory controller (v1 or v2) is mounted".to_string())?;
    let cgroup = root.join(format!("r3map-swap-test-{}", std::process::id()));
    std::fs::create_dir(&cgroup).map_err(|_| "cannot create a memory cgroup".to_string())?;
    setup.cgroup = Some(cgroup.clone());
    let limits: &[(&str, String)] = if v2 {
        &[
            ("memory.max", LIMIT.to_string()),
            ("memory.swap.max", "max".into()),
        ]
    } else {
        &[("memory.limit_in_bytes", LIMIT.to_string())]
    };
    for (file, value) in limits {
        std::fs::write(cgroup.join(file), value)
            .map_err(|_| format!("cannot set {file} of a memory cgroup"))?;
    }
    Ok(setup)
}

/// Whether page `addr` of this process is in swap (bit 62 of its pagemap entry).
fn swapped(pagemap: &std::fs::File, addr: u64) -> bool {
    let mut entry = [0u8; 8];
    pagemap.read_exact_at(&mut entry, addr / PAGE * 8).unwrap();
    (u64::from_le_bytes(entry) >> 62) & 1 == 1
}

/// In the limited child: fill the region (twice the limit and more), writing one byte in every
/// even chunk; some written pages must be in swap, and the scan must report exactly the even
/// chunks.
fn child() {
    let mut go = [0u8; 1];
    std::io::stdin().read_exact(&mut go).unwrap();
    let mut region = Region::new(
        Arc::new(PatternBackend::new(REGION)),
        RegionOptions {
            chunk_size: CHUNK,
            ..RegionOptions::default()
        },
    )
    .unwrap();
    assert_eq!(region.tracking_mode(), TrackingMode::AsyncWriteProtect);
    let chunks = REGION / CHUNK;
    let mem = region.as_mut_slice();
    for c in 0..chunks {
        let at = (c * CHUNK) as usize;
        if c % 2 == 0 {
            mem[at] = !pattern_byte(at as u64);
        } else {
            std::hint::black_box(mem[at + PAGE as usize]);
        }
    }
    let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
    let in_swap = (0..chunks)
        .step_by(2)
        .filter(|c| swapped(&pagemap, region.addr() + c * CHUNK))
        .count();
    assert!(
        in_swap > 0,
        "no written page went to swap: the memory limit did not force it"
    );
    eprintln!("{in_swap} of {} written pages are in swap", chunks / 2);
    let dirty = region.take_dirty().unwrap();
    let expected: Vec<u64> = (0..chunks).step_by(2).collect();
    assert!(
        dirty == expected,
        "{} chunks reported dirty, {} written ({in_swap} of those in swap)",
        dirty.len(),
        expected.len()
    );
    // Swapped back in, written bytes are intact and the pages protected again.
    let mem = region.as_slice();
    for c in (0..chunks).step_by(2) {
        let at = c * CHUNK;
        assert_eq!(mem[at as usize], !pattern_byte(at));
    }
    assert!(region.take_dirty().unwrap().is_empty());
}

#[test]
fn written_pages_in_swap_are_dirty() {
    if std::env::var(CHILD_ENV).is_ok() {
        return child();
    }
    if !common::have_async_tracking() {
        return;
    }
    let setup = match swap_limit() {
        Ok(setup) => setup,
        Err(reason) => return r3map_core::testing::skip(&reason),
    };
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--test-threads=1", "--nocapture"])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cgroup = setup.cgroup.as_ref().expect("set up");
    std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string()).unwrap();
    child.stdin.take().unwrap().write_all(&[1]).unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "child {status}: {stderr}");
    assert!(stderr.contains("pages are in swap"), "{stderr}");
    drop(setup);
}
