//! `r3map sync` with mutual TLS across processes: certificates from `r3map cert`, a hub that
//! requires client certificates (their common name is the sync id), and the refusals a peer
//! without a valid certificate or with an unknown identity gets.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{run, Proc};

const WAIT: Duration = Duration::from_secs(60);

fn cert(dir: &Path) -> impl Fn(&str) -> String {
    let (ok, _, stderr) = run(&["cert", dir.to_str().unwrap()]);
    assert!(ok, "r3map cert failed: {stderr}");
    let dir = dir.to_path_buf();
    move |name| dir.join(name).to_str().unwrap().to_string()
}

fn address(proc: &mut Proc, prefix: &str) -> String {
    let line = proc.wait_for(prefix, WAIT);
    line.split_whitespace()
        .find(|word| word.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string()
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    _hub: Proc,
    hub_addr: String,
    _advertiser: Proc,
    content: Vec<u8>,
}

/// A hub requiring client certificates (plus `hub_extra`) and an advertiser registered with it.
fn setup(hub_extra: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let pki = cert(&root.join("pki"));
    let source = root.join("data.bin");
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&source, &content).unwrap();
    let (ca, server_cert, server_key) = (pki("ca-cert.pem"), pki("server-cert.pem"), pki("server-key.pem"));
    let mut hub_args = vec![
        "sync",
        "hub",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        &server_cert,
        "--tls-key",
        &server_key,
        "--tls-client-ca",
        &ca,
    ];
    hub_args.extend_from_slice(hub_extra);
    let mut hub = Proc::start(&hub_args);
    let hub_addr = address(&mut hub, "hub listening on");
    let (client_cert, client_key) = (pki("client-cert.pem"), pki("client-key.pem"));
    let mut advertiser = Proc::start(&[
        "sync",
        "advertise",
        source.to_str().unwrap(),
        "--hub",
        &hub_addr,
        "--tls-ca",
        &ca,
        "--tls-cert",
        &client_cert,
        "--tls-key",
        &client_key,
    ]);
    advertiser.wait_for("advertising data.bin", WAIT);
    Setup {
        _dir: dir,
        root,
        _hub: hub,
        hub_addr,
        _advertiser: advertiser,
        content,
    }
}

fn receive(setup: &Setup, tls: &[&str]) -> (bool, String, PathBuf) {
    let replica = setup.root.join("copy").join("data.bin");
    std::fs::create_dir_all(replica.parent().unwrap()).unwrap();
    let mut args = vec![
        "sync",
        "receive",
        replica.to_str().unwrap(),
        "--from",
        &setup.hub_addr,
        "--once",
    ];
    args.extend_from_slice(tls);
    let (ok, _, stderr) = run(&args);
    (ok, stderr, replica)
}

#[test]
fn mutual_tls_through_the_hub_delivers_the_file() {
    let setup = setup(&[]);
    let pki = |name: &str| setup.root.join("pki").join(name).to_str().unwrap().to_string();
    let (ok, stderr, replica) = receive(
        &setup,
        &[
            "--tls-ca",
            &pki("ca-cert.pem"),
            "--tls-cert",
            &pki("client-cert.pem"),
            "--tls-key",
            &pki("client-key.pem"),
        ],
    );
    assert!(ok, "{stderr}");
    assert_eq!(std::fs::read(replica).unwrap(), setup.content);
}

#[test]
fn mutual_tls_refuses_receivers_without_a_certificate_of_the_ca() {
    let setup = setup(&[]);
    let pki = |name: &str| setup.root.join("pki").join(name).to_str().unwrap().to_string();
    // No client certificate.
    let (ok, stderr, replica) = receive(&setup, &["--tls-ca", &pki("ca-cert.pem")]);
    assert!(
        !ok,
        "a receiver without a client certificate got through: {stderr}"
    );
    assert!(stderr.contains("TLS"), "{stderr}");
    assert!(!replica.exists(), "a refused receiver created its replica");
    // A client certificate from another CA.
    let other = setup.root.join("other-pki");
    let other_pki = cert(&other);
    let (ok, stderr, replica) = receive(
        &setup,
        &[
            "--tls-ca",
            &pki("ca-cert.pem"),
            "--tls-cert",
            &other_pki("client-cert.pem"),
            "--tls-key",
            &other_pki("client-key.pem"),
        ],
    );
    assert!(!ok, "a receiver with a foreign certificate got through: {stderr}");
    assert!(stderr.contains("TLS"), "{stderr}");
    assert!(!replica.exists());
    // Without TLS at all.
    let (ok, stderr, _) = receive(&setup, &["--attempts", "1", "--timeout", "5s"]);
    assert!(!ok, "a plain-TCP receiver got through: {stderr}");
}

#[test]
fn an_unknown_identity_is_refused_by_name() {
    // A direct advertiser that accepts only the sync id "someone else"; the receiver's
    // certificate (from the same CA) names "r3map client".
    let dir = tempfile::tempdir().unwrap();
    let pki = cert(&dir.path().join("pki"));
    let source = dir.path().join("data.bin");
    std::fs::write(&source, b"secret").unwrap();
    let mut advertiser = Proc::start(&[
        "sync",
        "advertise",
        source.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        &pki("server-cert.pem"),
        "--tls-key",
        &pki("server-key.pem"),
        "--tls-client-ca",
        &pki("ca-cert.pem"),
        "--allow-id",
        "someone else",
    ]);
    let addr = address(&mut advertiser, "listening on");
    let replica = dir.path().join("copy/data.bin");
    std::fs::create_dir_all(replica.parent().unwrap()).unwrap();
    let (ok, _, stderr) = run(&[
        "sync",
        "receive",
        replica.to_str().unwrap(),
        "--from",
        &addr,
        "--once",
        "--tls-ca",
        &pki("ca-cert.pem"),
        "--tls-cert",
        &pki("client-cert.pem"),
        "--tls-key",
        &pki("client-key.pem"),
    ]);
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("unknown identity \"r3map client\""), "{stderr}");
    assert!(!replica.exists());
}
