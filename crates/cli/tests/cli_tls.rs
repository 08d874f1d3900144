//! TLS across processes, set up as the README tells a newcomer: `r3map cert` (or `openssl req
//! -x509`), `r3map serve --tls-cert/--tls-key [--tls-client-ca] --require-tls`, and clients in
//! other processes: `r3map mirror` and `r3map mount` with `--tls-ca [--tls-cert --tls-key]`,
//! and libnbd's `nbdinfo nbds://…?tls-certificates=DIR`.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{have_fuse, have_tool, mounted_path, run, serve, Proc};
use r3map_core::testing::pattern;

const LONG: Duration = Duration::from_secs(60);
const SIZE: usize = 4 << 20;

/// `r3map cert DIR` for localhost and 127.0.0.1.
fn cert(dir: &Path) {
    let (ok, _, stderr) = run(&["cert", dir.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    for name in [
        "ca-cert.pem",
        "server-cert.pem",
        "server-key.pem",
        "client-cert.pem",
        "client-key.pem",
    ] {
        assert!(
            dir.join(name).exists(),
            "r3map cert did not write {name}: {stderr}"
        );
    }
}

/// A file export with known content; returns the image path and its content.
fn image(dir: &Path, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join("disk.img");
    let content = pattern(seed, SIZE);
    std::fs::write(&path, &content).unwrap();
    (path, content)
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_string()
}

/// `r3map mirror` over TLS with `tls` flags, writing 20 %; returns (ok, stdout, stderr).
fn mirror(uri: &str, tls: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "mirror",
        "--remote",
        uri,
        "--chunk-size",
        "256KiB",
        "--write-percent",
        "20",
    ];
    args.extend_from_slice(tls);
    run(&args)
}

#[test]
fn certificates_from_r3map_cert_secure_serve_and_its_clients() {
    let certs = tempfile::tempdir().unwrap();
    cert(certs.path());
    let dir = tempfile::tempdir().unwrap();
    let (image, before) = image(dir.path(), 1);
    let export = format!("disk=file:{}", image.display());
    let tls_server = [
        "--tls-cert",
        &path(certs.path(), "server-cert.pem"),
        "--tls-key",
        &path(certs.path(), "server-key.pem"),
        "--require-tls",
    ];
    let (server, uri) = serve(&export, "127.0.0.1:0", &tls_server);
    assert!(uri.starts_with("nbds://127.0.0.1:"), "{uri}");

    // The CA from r3map cert: pulled, written, pushed and verified through TLS.
    let ca = path(certs.path(), "ca-cert.pem");
    let (ok, stdout, stderr) = mirror(&uri, &["--tls-ca", &ca]);
    assert!(ok, "{stdout}\n{stderr}");

    // A client without TLS is refused (--require-tls).
    let plain = uri.replacen("nbds://", "nbd://", 1);
    let (ok, _, stderr) = mirror(&plain, &[]);
    assert!(!ok, "a plaintext client was served");
    assert!(stderr.contains("TLS"), "{stderr}");

    // A client trusting another CA refuses the server, and says what to do.
    let other = tempfile::tempdir().unwrap();
    cert(other.path());
    let (ok, _, stderr) = mirror(&uri, &["--tls-ca", &path(other.path(), "ca-cert.pem")]);
    assert!(!ok, "a server signed by another CA was trusted");
    assert!(
        stderr.contains("not signed by a trusted CA") && stderr.contains("pin it"),
        "{stderr}"
    );

    assert!(server.terminate(LONG));
    common::assert_holds_the_mirrored_content(&image, &stdout, &before);
}

#[test]
fn nbdinfo_reads_our_tls_server_with_the_certificate_directory() {
    if !have_tool("nbdinfo", "--version") {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    cert(certs.path());
    let mut args = vec![
        "--tls-cert".to_string(),
        path(certs.path(), "server-cert.pem"),
        "--tls-key".to_string(),
        path(certs.path(), "server-key.pem"),
        "--require-tls".to_string(),
    ];
    for mutual in [false, true] {
        if mutual {
            args.extend(["--tls-client-ca".to_string(), path(certs.path(), "ca-cert.pem")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (server, uri) = serve("disk=memory:4MiB", "127.0.0.1:0", &args);
        let with_certs = format!("{uri}?tls-certificates={}", certs.path().display());
        let out = Command::new("nbdinfo").arg(&with_certs).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "nbdinfo (mutual TLS: {mutual}) failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("export-size: 4194304"), "{stdout}");
        assert!(stdout.contains("TLS"), "{stdout}");
        if mutual {
            // Without a client certificate the server refuses libnbd too.
            let ca_only = tempfile::tempdir().unwrap();
            std::fs::copy(
                certs.path().join("ca-cert.pem"),
                ca_only.path().join("ca-cert.pem"),
            )
            .unwrap();
            let out = Command::new("nbdinfo")
                .arg(format!("{uri}?tls-certificates={}", ca_only.path().display()))
                .output()
                .unwrap();
            assert!(
                !out.status.success(),
                "nbdinfo without a client certificate was served"
            );
        }
        assert!(server.terminate(LONG));
    }
}

#[test]
fn mutual_tls_mount_needs_the_client_certificate() {
    if !have_fuse() {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    cert(certs.path());
    let dir = tempfile::tempdir().unwrap();
    let (image, content) = image(dir.path(), 2);
    let export = format!("disk=file:{}", image.display());
    let ca = path(certs.path(), "ca-cert.pem");
    let (server, uri) = serve(
        &export,
        "127.0.0.1:0",
        &[
            "--tls-cert",
            &path(certs.path(), "server-cert.pem"),
            "--tls-key",
            &path(certs.path(), "server-key.pem"),
            "--tls-client-ca",
            &ca,
            "--require-tls",
        ],
    );

    // Without a client certificate the mount is refused, and says why.
    let mnt = dir.path().join("mnt");
    let (ok, _, stderr) = run(&["mount", &uri, mnt.to_str().unwrap(), "--tls-ca", &ca]);
    assert!(!ok, "mounted without a client certificate");
    assert!(stderr.contains("requires a client certificate"), "{stderr}");

    // With it: a direct mount reads the server's bytes and writes through to it.
    let mut mount = Proc::start(&[
        "mount",
        &uri,
        mnt.to_str().unwrap(),
        "--tls-ca",
        &ca,
        "--tls-cert",
        &path(certs.path(), "client-cert.pem"),
        "--tls-key",
        &path(certs.path(), "client-key.pem"),
    ]);
    let file_path = mounted_path(&mount.wait_for("mounted ", LONG));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file_path)
        .unwrap();
    let mut back = vec![0u8; SIZE];
    file.read_exact_at(&mut back, 0).unwrap();
    assert!(
        back == content,
        "the mount shows other bytes than the server holds"
    );
    file.write_all_at(b"over mutual TLS", 123_456).unwrap();
    file.sync_all().unwrap();
    assert_eq!(
        &std::fs::read(&image).unwrap()[123_456..123_471],
        b"over mutual TLS",
        "fsync returned before the server held the write"
    );
    drop(file);
    assert!(mount.terminate(LONG));
    assert!(server.terminate(LONG));
}

#[test]
fn a_self_signed_openssl_certificate_is_pinned_by_the_client() {
    if !have_tool("openssl", "version") {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (path(certs.path(), "cert.pem"), path(certs.path(), "key.pem"));
    // The usual way (README): a self-signed certificate, which openssl marks as a CA.
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args([
            "-days",
            "30",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &key,
            "-out",
            &cert,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let dir = tempfile::tempdir().unwrap();
    let (image, before) = image(dir.path(), 3);
    let (server, uri) = serve(
        &format!("disk=file:{}", image.display()),
        "127.0.0.1:0",
        &["--tls-cert", &cert, "--tls-key", &key, "--require-tls"],
    );
    let (ok, stdout, stderr) = mirror(&uri, &["--tls-ca", &cert]);
    assert!(
        ok,
        "the pinned self-signed certificate was refused: {stdout}\n{stderr}"
    );
    assert!(server.terminate(LONG));
    common::assert_holds_the_mirrored_content(&image, &stdout, &before);
}

#[test]
fn cert_keeps_keys_private_and_existing_certificates_unless_forced() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("tls");
    cert(&certs);
    for name in ["ca-key.pem", "server-key.pem", "client-key.pem"] {
        let mode = std::fs::metadata(certs.join(name)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{name} is readable by others: {mode:o}");
    }
    let first = std::fs::read(certs.join("ca-cert.pem")).unwrap();
    let (ok, _, stderr) = run(&["cert", certs.to_str().unwrap()]);
    assert!(
        !ok && stderr.contains("exists") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(certs.join("ca-cert.pem")).unwrap(),
        first,
        "replaced without --force"
    );
    let (ok, _, stderr) = run(&[
        "cert",
        certs.to_str().unwrap(),
        "--force",
        "--host",
        "nbd.example",
    ]);
    assert!(ok, "{stderr}");
    assert_ne!(std::fs::read(certs.join("ca-cert.pem")).unwrap(), first);

    let (ok, _, stderr) = run(&[
        "cert",
        dir.path().join("bad").to_str().unwrap(),
        "--host",
        "not a name",
    ]);
    assert!(
        !ok && stderr.contains("neither a DNS name nor an IP address"),
        "{stderr}"
    );
    assert!(!dir.path().join("bad").join("ca-key.pem").exists());
}
