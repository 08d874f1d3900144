//! Our client's `Backend::extents` (NBD_CMD_BLOCK_STATUS, base:allocation) against real
//! servers — our own, `nbdkit sparse-random` and `qemu-nbd` on a sparse raw file and a qcow2
//! image — compared with what libnbd's `nbdinfo --map` reports for the same export, and every
//! hole read back as zeros. A missing tool skips its test.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use r3map_core::{Allocation, Backend, MemoryBackend};
use r3map_nbd::{Client, ClientOptions, Export, ServerConfig};

const MIB: u64 = 1 << 20;

/// `(start, end, hole)` runs, neighbours of one kind merged.
type Map = Vec<(u64, u64, bool)>;

fn push(map: &mut Map, start: u64, len: u64, hole: bool) {
    match map.last_mut() {
        Some(last) if last.2 == hole && last.1 == start => last.1 += len,
        _ => map.push((start, start + len, hole)),
    }
}

/// The whole export's map through our client, asking again after every short answer.
async fn our_map(client: &Client) -> Map {
    let size = client.size();
    let mut map = Map::new();
    let mut at = 0;
    while at < size {
        let extents = client.extents(at, size - at).await.unwrap();
        assert!(!extents.is_empty(), "no extents at {at}");
        for extent in extents {
            assert!(extent.len > 0 && at + extent.len <= size);
            push(&mut map, at, extent.len, extent.allocation == Allocation::Hole);
            at += extent.len;
        }
    }
    map
}

/// `nbdinfo --map` of `uri`: a range is a hole when its type has the zero bit (2).
async fn nbdinfo_map(uri: &str) -> Map {
    let mut command = Command::new("nbdinfo");
    command.arg("--map").arg(uri);
    let out = tokio::task::spawn_blocking(move || common::run(&mut command))
        .await
        .unwrap();
    let mut map = Map::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let number = |i: usize| fields[i].parse::<u64>().unwrap_or_else(|_| panic!("{line:?}"));
        push(&mut map, number(0), number(1), number(2) & 2 != 0);
    }
    map
}

/// Our map equals nbdinfo's, covers the export, has at least one hole and one data run, and
/// every hole reads as zeros.
async fn check_against_nbdinfo(uri: &str) -> Map {
    let client = Client::connect(uri, ClientOptions::default()).await.unwrap();
    assert!(client.info().base_allocation.is_some(), "{:?}", client.info());
    let ours = our_map(&client).await;
    assert_eq!(
        ours,
        nbdinfo_map(uri).await,
        "our client and nbdinfo disagree on {uri}"
    );
    assert_eq!(ours.last().unwrap().1, client.size());
    assert!(ours.iter().any(|r| r.2) && ours.iter().any(|r| !r.2), "{ours:?}");
    for &(start, end, hole) in &ours {
        if hole {
            let mut buf = vec![1u8; (end - start) as usize];
            client.read_at(start, &mut buf).await.unwrap();
            assert!(buf.iter().all(|&b| b == 0), "hole {start}..{end} holds data");
        }
    }
    ours
}

/// A child process killed when the test ends.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(command: &mut Command) -> Child {
    Child(command.stdout(Stdio::null()).spawn().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_our_server_in_both_framings() {
    // Memory backend: data in the segments written, holes in the others (256 KiB segments).
    let backend = Arc::new(MemoryBackend::new(8 * MIB));
    backend.write_at(MIB, &[7u8; 4096]).await.unwrap();
    backend
        .write_at(5 * MIB + 300_000, &[9u8; 600_000])
        .await
        .unwrap();
    let running = common::serve(ServerConfig::new(vec![Export::new("m", backend)]), None).await;
    let uri = running.uri_for("m");
    let expected: Map = vec![
        (0, MIB, true),
        (MIB, MIB + (256 << 10), false),
        (MIB + (256 << 10), 5 * MIB + (256 << 10), true),
        (5 * MIB + (256 << 10), 6 * MIB, false),
        (6 * MIB, 8 * MIB, true),
    ];
    for extended in [true, false] {
        let options = ClientOptions {
            extended_headers: extended,
            ..ClientOptions::default()
        };
        let client = Client::connect(&uri, options).await.unwrap();
        assert_eq!(client.info().extended_headers, extended);
        assert_eq!(our_map(&client).await, expected, "extended headers: {extended}");
    }
    if common::have("nbdinfo") {
        assert_eq!(check_against_nbdinfo(&uri).await, expected);
    }
    running.stop().await;
}

/// Our server over the local backends: a sparse file (holes from SEEK_HOLE/SEEK_DATA) and a
/// chunk directory (missing chunk files are holes, and so are the holes inside a chunk file).
/// Our client and `nbdinfo --map` must both see the holes, and they must read as zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_and_directory_backends_show_their_holes() {
    let dir = tempfile::tempdir().unwrap();
    // File: data at 1 MiB (64 KiB) and 5 MiB + 300000 (600000 bytes), the rest never written.
    let file = r3map_backends::FileBackend::create(
        dir.path().join("disk.img"),
        8 * MIB,
        r3map_backends::FileOptions::new(),
    )
    .unwrap();
    file.write_at(MIB, &[7u8; 64 << 10]).await.unwrap();
    file.write_at(5 * MIB + 300_000, &[9u8; 600_000]).await.unwrap();
    // Directory of 1 MiB chunks: files only for chunks 2 and 5, and chunk 5 written only in
    // its second half (its first half is a hole inside the file).
    let chunks = r3map_backends::DirectoryBackend::open(
        dir.path().join("chunks"),
        8 * MIB,
        MIB,
        r3map_backends::DirectoryOptions::new(),
    )
    .unwrap();
    chunks.write_at(2 * MIB, &[3u8; MIB as usize]).await.unwrap();
    chunks
        .write_at(5 * MIB + MIB / 2, &[4u8; (MIB / 2) as usize])
        .await
        .unwrap();
    let config = ServerConfig::new(vec![
        Export::new("file", Arc::new(file)),
        Export::new("dir", Arc::new(chunks)),
    ]);
    let running = common::serve(config, None).await;
    // File systems allocate in blocks (4 KiB here; tmpfs and ext4 alike), so the data runs are
    // the written ranges rounded out to 4 KiB.
    let down = |x: u64| x / 4096 * 4096;
    let up = |x: u64| x.div_ceil(4096) * 4096;
    let expected: [(&str, Map); 2] = [
        (
            "file",
            vec![
                (0, MIB, true),
                (MIB, MIB + (64 << 10), false),
                (MIB + (64 << 10), down(5 * MIB + 300_000), true),
                (down(5 * MIB + 300_000), up(5 * MIB + 900_000), false),
                (up(5 * MIB + 900_000), 8 * MIB, true),
            ],
        ),
        (
            "dir",
            vec![
                (0, 2 * MIB, true),
                (2 * MIB, 3 * MIB, false),
                (3 * MIB, 5 * MIB + MIB / 2, true),
                (5 * MIB + MIB / 2, 6 * MIB, false),
                (6 * MIB, 8 * MIB, true),
            ],
        ),
    ];
    for (name, expected) in expected {
        let uri = running.uri_for(name);
        let client = Client::connect(&uri, ClientOptions::default()).await.unwrap();
        assert_eq!(our_map(&client).await, expected, "our client on {name}");
        if common::have("nbdinfo") {
            assert_eq!(check_against_nbdinfo(&uri).await, expected, "nbdinfo on {name}");
        }
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_nbdkit_sparse_random() {
    if !common::have("nbdkit") || !common::have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("k.sock");
    let _kit = spawn(Command::new("nbdkit").args(["-f", "-U"]).arg(&socket).args([
        "sparse-random",
        "32M",
        "seed=7",
        "percent=30",
        "runlength=65536",
    ]));
    common::wait_for_socket(&socket).await;
    let map = check_against_nbdkit_uri(&socket).await;
    assert!(map.len() > 20, "sparse-random gave few runs: {map:?}");
}

async fn check_against_nbdkit_uri(socket: &Path) -> Map {
    check_against_nbdinfo(&format!("nbd+unix:///?socket={}", socket.display())).await
}

/// qemu-nbd on a sparse image: `format` raw (holes from SEEK_HOLE) or qcow2 (unallocated
/// clusters), written with data at 1 MiB (64 KiB) and 5 MiB (1 MiB).
async fn against_qemu_nbd(format: &str) {
    if !common::have("qemu-nbd")
        || !common::have("qemu-img")
        || !common::have("qemu-io")
        || !common::have("nbdinfo")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join(format!("disk.{format}"));
    common::run(
        Command::new("qemu-img")
            .args(["create", "-f", format])
            .arg(&image)
            .arg("8M"),
    );
    common::run(
        Command::new("qemu-io")
            .args([
                "-f",
                format,
                "-c",
                "write -P 0xab 1M 64k",
                "-c",
                "write -P 0xcd 5M 1M",
            ])
            .arg(&image),
    );
    let socket = dir.path().join("q.sock");
    let _qemu = spawn(
        Command::new("qemu-nbd")
            // --persistent: the readiness probe's connection must not end the server.
            .args(["-f", format, "-x", "disk", "-e", "4", "-t", "-k"])
            .arg(&socket)
            .arg(&image),
    );
    common::wait_for_socket(&socket).await;
    let map = check_against_nbdinfo(&format!("nbd+unix:///disk?socket={}", socket.display())).await;
    // The written ranges are data (the file system or the format may round them up).
    for (start, end) in [(MIB, MIB + (64 << 10)), (5 * MIB, 6 * MIB)] {
        assert!(
            map.iter().any(|&(s, e, hole)| !hole && s <= start && e >= end),
            "{start}..{end} is not data in {map:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_qemu_nbd_raw() {
    against_qemu_nbd("raw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_qemu_nbd_qcow2() {
    against_qemu_nbd("qcow2").await;
}
