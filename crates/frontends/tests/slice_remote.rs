//! Slice frontend across processes: r3map serves the page faults of another program, which
//! passed its userfaultfd over a UNIX socket (examples/uffd_client.rs).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use common::{PatternBackend, PAGE};
use r3map_frontends::slice::{RegionOptions, RemoteRegion, RemoteRequest, TrackingMode};

fn client_binary() -> std::path::PathBuf {
    r3map_core::testing::example_binary(env!("CARGO"), env!("CARGO_MANIFEST_DIR"), "uffd_client")
}

#[test]
fn serves_faults_and_tracks_writes_of_another_process() {
    if !common::have_userfaultfd() {
        return;
    }
    let chunk = 16 * PAGE;
    let len = 64 * chunk;
    let path = std::env::temp_dir().join(format!("r3map-remote-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let written_pages = [3u64, 17, 600, 1023];
    let mut child = std::process::Command::new(client_binary())
        .arg(&path)
        .arg(len.to_string())
        .args(written_pages.iter().map(|p| p.to_string()))
        .spawn()
        .expect("run examples/uffd_client (built by cargo test)");
    let (mut sock, _) = listener.accept().unwrap();
    let (request, fd) = RemoteRequest::receive(&sock).unwrap();
    assert_eq!(request.len, len);
    assert_eq!(request.pid, child.id() as i32);
    let backend = Arc::new(PatternBackend::new(len));
    let region = RemoteRegion::serve(
        fd,
        request,
        backend.clone(),
        RegionOptions {
            chunk_size: chunk,
            ..RegionOptions::default()
        },
    )
    .unwrap();
    assert_eq!(region.tracking_mode(), TrackingMode::AsyncWriteProtect);
    // The answer of `r3map mount --frontend slice`: 0 means served.
    sock.write_all(&[0]).unwrap();
    let mut mismatches = [0u8; 8];
    sock.read_exact(&mut mismatches).unwrap();
    assert_eq!(
        u64::from_le_bytes(mismatches),
        0,
        "client saw the backend's bytes"
    );
    assert_eq!(region.installed_count(), 64);
    assert_eq!(
        backend.reads.load(std::sync::atomic::Ordering::SeqCst),
        64,
        "one fetch per chunk"
    );
    let expected: Vec<u64> = written_pages.iter().map(|p| p * PAGE / chunk).collect();
    assert_eq!(region.take_dirty().unwrap(), expected);
    sock.write_all(&[1]).unwrap();
    assert!(
        region.wait_closed(Duration::from_secs(20)),
        "server saw the client unmap or exit"
    );
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_file(&path);
}
