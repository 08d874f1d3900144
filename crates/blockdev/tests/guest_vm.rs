//! Runs `scripts/vm-test`: the kernel NBD client (ioctl and netlink, ext4, a dying server) and
//! ublk (ext4 included) inside a Debian 6.12 guest under QEMU TCG, since the host kernel may
//! have neither; and there, as separate processes, `r3map serve` with `r3map mount --frontend
//! nbd` and `--frontend ublk`, direct and managed, closed by SIGTERM, data checked on the
//! server's file; and remote swap: mkswap/swapon on such a device whose remote the host serves,
//! used by a program that touches more memory than the guest has and checks every word. The
//! script installs what it needs and reports a skip only when it cannot.

use std::path::Path;
use std::process::Command;

use r3map_core::testing::skip;

#[test]
fn kernel_nbd_and_ublk_in_a_vm() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/vm-test");
    let output = Command::new(&script)
        // This test reports its own skip (one line per test in the skip log).
        .env_remove("R3MAP_SKIP_LOG")
        .output()
        .expect("running scripts/vm-test");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "scripts/vm-test failed ({})",
        output.status
    );
    if let Some(line) = stdout.lines().find(|line| line.starts_with("SKIPPED:")) {
        skip(line.trim_start_matches("SKIPPED: "));
        return;
    }
    assert!(
        stdout.contains("vm-test: all guest checks passed"),
        "scripts/vm-test succeeded without its final line"
    );
}
