//! gRPC across processes: `r3map serve --grpc` serves the same export over NBD and gRPC, a
//! managed mount of `grpc://` runs through the delay proxy, and a wrong token is refused.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::{free_port, have_fuse, mounted_path, run, Proc};
use r3map_core::testing::pattern;

const LONG: Duration = Duration::from_secs(120);

/// Starts `r3map serve EXPORT --grpc …`; returns the process and its grpc:// URI prefix.
fn serve_grpc(export: &str, extra: &[&str]) -> (Proc, String) {
    let (nbd, grpc) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let mut args = vec!["serve", export, "--listen", &nbd, "--grpc", &grpc];
    args.extend_from_slice(extra);
    let mut server = Proc::start(&args);
    server.wait_for("serving nbd", LONG);
    let line = server.wait_for("serving grpc", LONG);
    let uri = line
        .trim_start_matches("serving ")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    (server, uri)
}

#[test]
fn a_managed_mount_over_grpc_through_the_delay_proxy_reads_and_writes_back() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("remote.img");
    let content = pattern(9, 8 << 20);
    std::fs::write(&image, &content).unwrap();
    let (mut server, uri) = serve_grpc(&format!("disk=file:{}", image.display()), &[]);
    // Writable without TLS or a token: the server says so.
    server.wait_for("WITHOUT TLS AND WITHOUT A TOKEN", LONG);
    let grpc_addr = uri
        .trim_start_matches("grpc://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let proxy_addr = format!("127.0.0.1:{}", free_port());
    let mut proxy = Proc::start(&[
        "delay-proxy",
        "--listen",
        &proxy_addr,
        "--upstream",
        &grpc_addr,
        "--rtt",
        "20ms",
    ]);
    proxy.wait_for("delaying", LONG);

    let mnt = dir.path().join("mnt");
    let remote = format!("grpc://{proxy_addr}/disk");
    let mut mount = Proc::start(&[
        "mount",
        &remote,
        mnt.to_str().unwrap(),
        "--managed",
        "--chunk-size",
        "256KiB",
        "--push-interval",
        "1h",
    ]);
    let path = mounted_path(&mount.wait_for("mounted ", LONG));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut read = vec![0u8; content.len()];
    file.read_exact_at(&mut read, 0).unwrap();
    assert!(
        read == content,
        "the mount over gRPC reads other bytes than the server's file"
    );
    let written = pattern(10, 300_000);
    file.write_all_at(&written, 3_000_001).unwrap();
    assert!(
        std::fs::read(&image).unwrap()[3_000_001..3_300_001] != written[..],
        "the write reached the server before any push"
    );
    file.sync_all().unwrap(); // pushed over gRPC before it returns
    assert_eq!(
        &std::fs::read(&image).unwrap()[3_000_001..3_300_001],
        &written[..]
    );
    drop(file);
    assert!(mount.terminate(LONG), "the mount did not stop cleanly");
    assert!(proxy.terminate(LONG));
    assert!(server.terminate(LONG));
}

#[test]
fn a_grpc_server_with_a_token_refuses_a_wrong_one_and_serves_the_right_one() {
    let dir = tempfile::tempdir().unwrap();
    let (right, wrong) = (dir.path().join("right"), dir.path().join("wrong"));
    std::fs::write(&right, "s3cret\n").unwrap();
    std::fs::write(&wrong, "guess\n").unwrap();
    let (server, uri) = serve_grpc("m=memory:4MiB", &["--token-file", right.to_str().unwrap()]);
    let remote = uri; // grpc://ADDR/m
    let (ok, _, stderr) = run(&[
        "mirror",
        "--remote",
        &remote,
        "--token-file",
        wrong.to_str().unwrap(),
    ]);
    assert!(!ok, "a wrong token got through");
    assert!(stderr.contains("token"), "{stderr}");
    let (ok, _, stderr) = run(&[
        "mirror",
        "--remote",
        &remote,
        "--token-file",
        right.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(server.terminate(LONG));
}

/// A writable gRPC export open to more than the holders of a credential is announced: over TLS
/// without client authentication, and with a token that travels in plain text.
#[test]
fn writable_exports_without_client_authentication_or_tls_are_announced() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = run(&["cert", dir.path().to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let (cert, key) = (
        dir.path().join("server-cert.pem"),
        dir.path().join("server-key.pem"),
    );
    let (mut server, uri) = serve_grpc(
        "m=memory:1MiB",
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(uri.starts_with("grpcs://"), "{uri}");
    server.wait_for_line("over TLS WITHOUT CLIENT AUTHENTICATION", LONG);
    assert!(server.terminate(LONG));

    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let (mut server, _) = serve_grpc("m=memory:1MiB", &["--token-file", token.to_str().unwrap()]);
    server.wait_for_line("WITHOUT TLS: the token travels in plain text", LONG);
    assert!(server.terminate(LONG));
}
