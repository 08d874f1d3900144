//! Slice frontend across processes: r3map serves the page faults of another program, which
//! passed its userfaultfd over a UNIX socket (examples/uffd_client.rs).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use common::{PatternBackend, PAGE};
use r3map_frontends::slice::{RegionError, RegionOptions, RemoteRegion, RemoteRequest, TrackingMode};

fn client_binary() -> std::path::PathBuf {
    r3map_core::testing::example_binary(env!("CARGO"), env!("CARGO_MANIFEST_DIR"), "uffd_client")
}

/// A client process running `uffd_client` with `args` after the socket and length, and the
/// region serving its `len` bytes from the pattern backend in chunks of `chunk` bytes.
struct Served {
    child: std::process::Child,
    sock: std::os::unix::net::UnixStream,
    region: RemoteRegion,
    backend: Arc<PatternBackend>,
    path: std::path::PathBuf,
}

fn serve_client(name: &str, chunk: u64, len: u64, args: &[String]) -> Served {
    let path = std::env::temp_dir().join(format!("r3map-remote-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let child = std::process::Command::new(client_binary())
        .arg(&path)
        .arg(len.to_string())
        .args(args)
        .spawn()
        .expect("run examples/uffd_client (built by cargo test)");
    let (sock, _) = listener.accept().unwrap();
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
    Served {
        child,
        sock,
        region,
        backend,
        path,
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn serves_faults_and_tracks_writes_of_another_process() {
    if !common::have_async_tracking() {
        return;
    }
    let chunk = 16 * PAGE;
    let len = 64 * chunk;
    let written_pages = [3u64, 17, 600, 1023];
    let args: Vec<String> = written_pages.iter().map(|p| p.to_string()).collect();
    let mut served = serve_client("writes", chunk, len, &args);
    let (sock, region, backend) = (&mut served.sock, &served.region, &served.backend);
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
    assert!(served.child.wait().unwrap().success());
}

/// A served process forks: the child's copy of the range is served by nobody, so its
/// never-fetched pages raise SIGBUS there instead of reading as zeros, while the pages the
/// parent had fetched were copied; the parent itself is still served.
#[test]
fn a_forked_child_of_a_served_process_gets_sigbus_for_never_fetched_pages() {
    if !common::have_userfaultfd() {
        return;
    }
    let chunk = 16 * PAGE;
    let len = 8 * chunk;
    let (fetched, never_fetched) = (1u64, 5 * 16 + 3);
    let args = ["fork".to_string(), fetched.to_string(), never_fetched.to_string()];
    let mut served = serve_client("fork", chunk, len, &args);
    served.sock.write_all(&[0]).unwrap();
    let mut report = [0u8; 3];
    served.sock.read_exact(&mut report).unwrap();
    let [signaled, value, parent_ok] = report;
    assert_eq!(
        (signaled, value as i32),
        (1, libc::SIGBUS),
        "the child must die of SIGBUS on the never-fetched page (exit code 3: the fetched page \
         was wrong in the child, 4: the never-fetched read returned)"
    );
    assert_eq!(parent_ok, 1, "the parent still reads the backend's bytes there");
    served.sock.write_all(&[1]).unwrap();
    assert!(served.child.wait().unwrap().success());
}

/// A served process moves part of the range with mremap: a never-fetched page at the new place
/// raises SIGBUS (not zeros), and the region refuses to report dirty chunks from then on,
/// since writes at the new place cannot be tracked.
#[test]
fn mremap_of_a_served_range_raises_sigbus_there_and_take_dirty_refuses() {
    if !common::have_userfaultfd() {
        return;
    }
    let chunk = 16 * PAGE;
    let len = 8 * chunk;
    let args = [
        "mremap".to_string(),
        (4 * chunk).to_string(),
        (2 * chunk).to_string(),
    ];
    let mut served = serve_client("mremap", chunk, len, &args);
    assert!(
        served.region.take_dirty().is_ok(),
        "tracking works before the move"
    );
    served.sock.write_all(&[0]).unwrap();
    let mut moved = [0u8];
    served.sock.read_exact(&mut moved).unwrap();
    // mremap returns once the handler has read the event; it handles it right after.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match served.region.take_dirty() {
            Err(RegionError::Remapped { len, .. }) => {
                assert_eq!(len, 2 * chunk);
                break;
            }
            Ok(_) if std::time::Instant::now() < deadline => std::thread::yield_now(),
            other => panic!("take_dirty after the mremap: {other:?}"),
        }
    }
    served.sock.write_all(&[1]).unwrap();
    let status = served.child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGBUS),
        "the read at the new place must raise SIGBUS ({status}; exit code 4: it returned)"
    );
}

/// A page-fault server that accepts the hand-over but never answers: the client gets a
/// `TimedOut` error naming the socket after its timeout, instead of blocking for good.
#[test]
fn a_hand_over_to_a_server_that_never_answers_times_out() {
    if !common::have_userfaultfd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let silent = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
    });
    let Err(err) = r3map_frontends::slice::hand_over(&path, 16 * PAGE as usize, Duration::from_millis(200))
    else {
        panic!("a server that never answers served the memory");
    };
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(err.to_string().contains("silent.sock"), "{err}");
    drop(silent.join().unwrap());
}
