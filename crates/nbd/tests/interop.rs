//! Interop with real NBD peers: qemu-img / qemu-io / nbdinfo / nbdcopy against our server, and
//! our client against `nbdkit memory` and `qemu-nbd`. A missing tool skips its test.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use r3map_core::{testing, Backend, MemoryBackend};
use r3map_nbd::{Client, ClientOptions, Export, ServerConfig};

const SIZE: u64 = 4 << 20;

/// Runs a blocking command off the async runtime (the server runs on it).
async fn run(mut cmd: Command) -> String {
    tokio::task::spawn_blocking(move || common::run(&mut cmd))
        .await
        .unwrap()
}

fn sha256(path: &Path) -> String {
    common::run(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_reads_our_server() {
    if !common::have("qemu-io") {
        return;
    }
    let running = common::serve(common::memory_config("disk", SIZE), None).await;
    let uri = running.uri_for("disk");
    let out = run({
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"])
            .args(["-c", "write -P 0xab 0 1M"])
            .args(["-c", "write -z 1M 64k"])
            .args(["-c", "write -P 0xcd -f 2M 512k"])
            .args(["-c", "flush"])
            .args(["-c", "read -P 0xab 0 1M"])
            .args(["-c", "read -P 0 1M 1M"])
            .args(["-c", "read -P 0xcd 2M 512k"])
            .arg(&uri);
        c
    })
    .await;
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // Verify on the server side too.
    let all = common::contents(&*running.backends[0]).await;
    assert!(all[..1 << 20].iter().all(|&b| b == 0xab));
    assert!(all[1 << 20..2 << 20].iter().all(|&b| b == 0));
    assert!(all[2 << 20..(2 << 20) + (512 << 10)].iter().all(|&b| b == 0xcd));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_round_trip_over_a_unix_socket() {
    if !common::have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let running = common::serve(common::memory_config("", SIZE), Some(&socket)).await;
    let input = dir.path().join("in.raw");
    let output = dir.path().join("out.raw");
    let data = common::random_bytes(7, SIZE as usize);
    std::fs::write(&input, &data).unwrap();
    let target = format!("nbd+unix:///?socket={}", socket.display());
    run({
        let mut c = Command::new("qemu-img");
        c.args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&input)
            .arg(&target);
        c
    })
    .await;
    assert!(common::contents(&*running.backends[0]).await == data);
    run({
        let mut c = Command::new("qemu-img");
        c.args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&target)
            .arg(&output);
        c
    })
    .await;
    assert_eq!(sha256(&input), sha256(&output));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_exports_contexts_and_maps() {
    if !common::have("nbdinfo") {
        return;
    }
    // The second export holds data only in its first 256 KiB: the rest was never written.
    let second = Arc::new(MemoryBackend::new(SIZE / 2));
    second.write_at(0, &[1u8; 256 << 10]).await.unwrap();
    let config = ServerConfig::new(vec![
        Export::new("first", Arc::new(MemoryBackend::new(SIZE))).with_description("the first"),
        Export::new("second", second).read_only(true),
    ]);
    let running = common::serve(config, None).await;
    let list = run({
        let mut c = Command::new("nbdinfo");
        c.arg("--list").arg(&running.uri);
        c
    })
    .await;
    for needle in [
        "export=\"first\"",
        "description: the first",
        "export=\"second\"",
        "base:allocation",
        "is_read_only: true",
        "can_multi_conn: true",
        "block_size_maximum: 33554432",
    ] {
        assert!(list.contains(needle), "missing {needle:?} in:\n{list}");
    }
    let map = run({
        let mut c = Command::new("nbdinfo");
        c.arg("--map").arg(running.uri_for("second"));
        c
    })
    .await;
    let fields: Vec<&str> = map.split_whitespace().collect();
    let rest = (SIZE / 2 - (256 << 10)).to_string();
    assert_eq!(
        fields,
        ["0", "262144", "0", "data", "262144", &rest, "3", "hole,zero"],
        "{map}"
    );
    let size = run({
        let mut c = Command::new("nbdinfo");
        c.arg("--size").arg(running.uri_for("first"));
        c
    })
    .await;
    assert_eq!(size.trim(), SIZE.to_string());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trip_keeps_the_checksum() {
    if !common::have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let running = common::serve(common::memory_config("c", 8 << 20), None).await;
    let uri = running.uri_for("c");
    let input = dir.path().join("in.raw");
    let output = dir.path().join("out.raw");
    std::fs::write(&input, common::random_bytes(11, 8 << 20)).unwrap();
    run({
        let mut c = Command::new("nbdcopy");
        c.arg(&input).arg(&uri);
        c
    })
    .await;
    run({
        let mut c = Command::new("nbdcopy");
        c.arg(&uri).arg(&output);
        c
    })
    .await;
    assert_eq!(sha256(&input), sha256(&output));
    running.stop().await;
}

/// A child process killed when the test ends.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn conformance(uri: &str) {
    let client = Arc::new(Client::connect(uri, ClientOptions::default()).await.unwrap());
    assert_eq!(client.size(), SIZE);
    // These peers predate NBD_OPT_EXTENDED_HEADERS: the client asked, was refused and fell
    // back to structured replies, with base:allocation still selected.
    let info = client.info();
    assert!(!info.extended_headers && info.structured_replies, "{info:?}");
    assert!(info.base_allocation.is_some(), "{info:?}");
    let status = client.block_status(0, SIZE, 0).await.unwrap();
    assert!(!status.is_empty() && status.iter().all(|d| d.length > 0 && d.status <= 3));
    testing::check_concurrent(client.clone(), 1, 4, 60).await.unwrap();
    let data = common::random_bytes(3, 3 << 20);
    client.write_at(12345, &data).await.unwrap();
    client.sync().await.unwrap();
    let mut back = vec![0u8; data.len()];
    client.read_at(12345, &mut back).await.unwrap();
    assert!(back == data);
    client.trim(0, 4096).await.unwrap();
    let mut zeros = [1u8; 4096];
    client.read_at(0, &mut zeros).await.unwrap();
    assert!(zeros.iter().all(|&b| b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_against_nbdkit_memory() {
    if !common::have("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("k.sock");
    let _kit = Child(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&socket)
            .args(["memory", &SIZE.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    common::wait_for_socket(&socket).await;
    conformance(&format!("nbd+unix:///?socket={}", socket.display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_against_qemu_nbd() {
    if !common::have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("q.sock");
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; SIZE as usize]).unwrap();
    let _qemu = Child(
        Command::new("qemu-nbd")
            // --persistent: the readiness probe's connection must not end the server.
            .args(["-f", "raw", "-x", "disk", "-e", "4", "-t", "-k"])
            .arg(&socket)
            .arg(&image)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    common::wait_for_socket(&socket).await;
    conformance(&format!("nbd+unix:///disk?socket={}", socket.display())).await;
}
