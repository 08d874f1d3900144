//! `--metrics` across processes: every long-running command is scraped over HTTP while a real
//! workload runs through it, and its counters must move by what the workload did.

mod common;
mod scrape;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use common::{have_fuse, mounted_path, run, serve, Proc};
use r3map_core::testing::pattern;
use scrape::{metrics_addr, scrape_until, Scrape};

const LONG: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

fn bytes(scrape: &Scrape, role: &str, op: &str) -> f64 {
    scrape.value("r3map_backend_bytes_total", &[("role", role), ("op", op)])
}

/// Requests counted and latencies observed agree, and there is at least one.
fn assert_timed(scrape: &Scrape, role: &str, op: &str) {
    let labels = [("role", role), ("op", op)];
    let requests = scrape.value("r3map_backend_requests_total", &labels);
    let timed = scrape.value("r3map_backend_request_duration_seconds_count", &labels);
    assert!(requests >= 1.0, "no {role} {op} requests:\n{}", scrape.text);
    assert_eq!(requests, timed, "every {role} {op} request has a latency");
}

/// Serves `content` from a file with metrics on; returns the server, its URI and metrics.
fn serve_file(dir: &std::path::Path, content: &[u8]) -> (Proc, String, String) {
    let image = dir.join("remote.img");
    std::fs::write(&image, content).unwrap();
    let (mut server, uri) = serve(
        &format!("disk=file:{}", image.display()),
        "127.0.0.1:0",
        &["--metrics", "127.0.0.1:0"],
    );
    let addr = metrics_addr(&mut server, LONG);
    (server, uri, addr)
}

/// Direct mount: reading N bytes through FUSE makes the mount fetch at least N from its remote
/// and the server serve at least N; a write and fsync are counted on both sides.
#[test]
fn a_direct_mount_and_its_server_count_what_was_read_and_written() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let content = pattern(3, 32 << 20);
    let (server, uri, server_metrics) = serve_file(dir.path(), &content);
    let mnt = dir.path().join("mnt");
    let mut mount = Proc::start(&["mount", &uri, mnt.to_str().unwrap(), "--metrics", "127.0.0.1:0"]);
    let path = mounted_path(&mount.wait_for("mounted ", LONG));
    let mount_metrics = metrics_addr(&mut mount, LONG);
    let before = Scrape::get(&mount_metrics);
    let fetched_before = before
        .get_value("r3map_backend_bytes_total", &[("role", "remote"), ("op", "read")])
        .unwrap_or(0.0);

    let n = 8 * MIB;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut got = vec![0u8; n as usize];
    file.read_exact_at(&mut got, 4 * MIB).unwrap();
    assert!(got == content[4 << 20..12 << 20], "the mount read other bytes");

    let after = Scrape::get(&mount_metrics);
    assert!(
        bytes(&after, "remote", "read") - fetched_before >= n as f64,
        "the mount read {n} bytes but fetched less:\n{}",
        after.text
    );
    assert!(bytes(&after, "frontend", "read") >= n as f64, "{}", after.text);
    assert_timed(&after, "remote", "read");
    assert_timed(&after, "frontend", "read");
    let served = Scrape::get(&server_metrics);
    assert!(bytes(&served, "export", "read") >= n as f64, "{}", served.text);
    assert_timed(&served, "export", "read");

    file.write_all_at(&vec![7u8; MIB as usize], 20 * MIB).unwrap();
    file.sync_all().unwrap();
    let after = Scrape::get(&mount_metrics);
    assert!(bytes(&after, "remote", "write") >= MIB as f64, "{}", after.text);
    assert_timed(&after, "remote", "sync");
    let served = Scrape::get(&server_metrics);
    assert!(bytes(&served, "export", "write") >= MIB as f64, "{}", served.text);
    assert_eq!(after.value("r3map_reconnects_total", &[]), 0.0);
    drop(file);
    assert!(mount.terminate(LONG));
    assert!(server.terminate(LONG));
}

/// Managed mount: the pull progress reaches the size with every chunk fetched once, writes
/// show up as dirty bytes at once (no push for an hour), and fsync turns them into pushed bytes.
#[test]
fn a_managed_mount_reports_pull_progress_dirty_and_pushed_bytes() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let content = pattern(4, size as usize);
    let (server, uri, server_metrics) = serve_file(dir.path(), &content);
    let mnt = dir.path().join("mnt");
    let mut mount = Proc::start(&[
        "mount",
        &uri,
        mnt.to_str().unwrap(),
        "--managed",
        "--chunk-size",
        "1MiB",
        "--push-interval",
        "1h",
        "--metrics",
        ":0",
    ]);
    let path = mounted_path(&mount.wait_for("mounted ", LONG));
    let addr = metrics_addr(&mut mount, LONG);
    let pulled = scrape_until(&addr, LONG, "the background pull", |s| {
        s.get_value("r3map_pull_local_bytes", &[]) == Some(size as f64)
    });
    assert_eq!(pulled.value("r3map_pull_total_bytes", &[]), size as f64);
    assert_eq!(
        pulled.value("r3map_chunks_fetched_total", &[]),
        (size / MIB) as f64,
        "every chunk is fetched exactly once into an empty cache"
    );
    assert!(bytes(&pulled, "remote", "read") >= size as f64);
    assert_eq!(pulled.value("r3map_dirty_bytes", &[]), 0.0);

    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&vec![9u8; 3 * MIB as usize], MIB).unwrap();
    let written = Scrape::get(&addr);
    assert_eq!(
        written.value("r3map_dirty_bytes", &[]),
        (3 * MIB) as f64,
        "three whole chunks were written and not pushed"
    );
    assert_eq!(written.value("r3map_pushed_bytes_total", &[]), 0.0);
    file.sync_all().unwrap();
    let synced = Scrape::get(&addr);
    assert_eq!(synced.value("r3map_dirty_bytes", &[]), 0.0);
    assert!(synced.value("r3map_pushed_bytes_total", &[]) >= (3 * MIB) as f64);
    assert!(bytes(&synced, "remote", "write") >= (3 * MIB) as f64);
    let served = Scrape::get(&server_metrics);
    assert!(
        bytes(&served, "export", "write") >= (3 * MIB) as f64,
        "{}",
        served.text
    );
    drop(file);
    assert!(mount.terminate(LONG));
    assert!(server.terminate(LONG));
}

/// A program's memory through the slice frontend: its faults are timed.
#[test]
fn slice_faults_are_timed() {
    if !common::have_userfaultfd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let content = pattern(5, 2 << 20);
    let (server, uri, _) = serve_file(dir.path(), &content);
    let socket = dir.path().join("r3map.sock");
    let mut mount = Proc::start(&[
        "mount",
        &uri,
        socket.to_str().unwrap(),
        "--frontend",
        "slice",
        "--managed",
        "--chunk-size",
        "256KiB",
        "--metrics",
        "127.0.0.1:0",
    ]);
    mount.wait_for("mounted ", LONG);
    let addr = metrics_addr(&mut mount, LONG);
    assert_eq!(
        Scrape::get(&addr).value("r3map_fault_duration_seconds_count", &[]),
        0.0,
        "no program has faulted yet"
    );
    let client =
        r3map_core::testing::example_binary(env!("CARGO"), env!("CARGO_MANIFEST_DIR"), "slice_client");
    let output = Command::new(&client)
        .args([socket.to_str().unwrap(), &(2usize << 20).to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("crc32 {:08x}", crc32fast::hash(&content))),
        "{stdout}"
    );
    let scrape = Scrape::get(&addr);
    let faults = scrape.value("r3map_fault_duration_seconds_count", &[]);
    assert!(
        (1.0..=8.0).contains(&faults),
        "reading 2 MiB of 256 KiB chunks takes 1 to 8 served faults, not {faults}"
    );
    assert!(scrape.value("r3map_fault_duration_seconds_sum", &[]) > 0.0);
    assert!(bytes(&scrape, "frontend", "read") >= faults * (256 << 10) as f64);
    assert!(mount.terminate(LONG));
    assert!(server.terminate(LONG));
}

/// Metrics have no authentication: an address beyond loopback needs --metrics-public.
#[test]
fn metrics_beyond_loopback_are_refused_unless_asked_for() {
    let (ok, _, stderr) = run(&[
        "serve",
        "memory:1MiB",
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "0.0.0.0:0",
    ]);
    assert!(!ok);
    assert!(stderr.contains("--metrics-public"), "{stderr}");
}

/// The NBD connection gauge: clients that got the server's greeting are counted (during the
/// handshake too), one over `--max-connections` is refused and not counted, and clients that
/// hang up are counted out.
#[test]
fn serve_counts_its_open_nbd_connections() {
    use std::io::Read;
    let (mut server, uri) = serve(
        "disk=memory:1MiB",
        "127.0.0.1:0",
        &["--max-connections", "3", "--metrics", "127.0.0.1:0"],
    );
    let addr = metrics_addr(&mut server, LONG);
    assert_eq!(Scrape::get(&addr).value("r3map_nbd_connections", &[]), 0.0);
    let nbd_addr = uri
        .trim_start_matches("nbd://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    // The first 18 bytes of the handshake: NBDMAGIC, IHAVEOPT and the server's flags. The
    // server sends them from the connection's task, so the connection is counted by then.
    let greeted = || {
        let mut client = std::net::TcpStream::connect(&nbd_addr).unwrap();
        client.set_read_timeout(Some(LONG)).unwrap();
        let mut greeting = [0u8; 18];
        let got = client.read_exact(&mut greeting);
        (client, got.map(|()| greeting))
    };
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (client, greeting) = greeted();
            assert_eq!(&greeting.expect("the server's greeting")[..8], b"NBDMAGIC");
            client
        })
        .collect();
    assert_eq!(Scrape::get(&addr).value("r3map_nbd_connections", &[]), 3.0);
    let (_refused, greeting) = greeted();
    assert!(
        greeting.is_err(),
        "a fourth client got a greeting past --max-connections 3"
    );
    assert_eq!(Scrape::get(&addr).value("r3map_nbd_connections", &[]), 3.0);
    drop(clients);
    // The server notices the hang-ups asynchronously.
    scrape_until(&addr, LONG, "counting out the closed connections", |scrape| {
        scrape.value("r3map_nbd_connections", &[]) == 0.0
    });
    assert!(server.terminate(LONG));
}

/// A migration: the source reports tracking while a destination pulls; the destination
/// reports its phase, rounds, the bytes it fetched and the downtime it measured.
#[test]
fn a_migration_reports_phase_rounds_and_downtime() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    let src = dir.path().join("src.img");
    std::fs::write(&src, pattern(6, size as usize)).unwrap();
    let resource = format!("file:{}", src.display());
    let mut seeder = Proc::start(&[
        "migrate",
        "seed",
        &resource,
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let uri = common::reported_address(&mut seeder, "seeding ", LONG);
    let seeder_metrics = metrics_addr(&mut seeder, LONG);
    let idle = Scrape::get(&seeder_metrics);
    assert_eq!(idle.value("r3map_migration_phase", &[("phase", "serving")]), 1.0);
    assert_eq!(idle.value("r3map_migration_phase", &[("phase", "tracking")]), 0.0);

    let dest = dir.path().join("dest.img");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let to = format!("file:{}", dest.display());
    // A capped link: the pull takes seconds, so the source is seen tracking while it runs.
    let (proxy, link) = common::slow_link(&uri, "8MiB");
    let link = format!("grpc://{link}");
    let mut leecher = Proc::start(&[
        "migrate",
        "leech",
        &link,
        mnt.to_str().unwrap(),
        "--frontend",
        "file",
        "--to",
        &to,
        "--rounds",
        "3",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let tracking = scrape_until(&seeder_metrics, LONG, "tracking on the source", |scrape| {
        scrape.value("r3map_migration_phase", &[("phase", "tracking")]) == 1.0
    });
    assert_eq!(
        tracking.value("r3map_migration_phase", &[("phase", "serving")]),
        0.0
    );

    leecher.wait_for("serving the application at", LONG);
    let addr = metrics_addr(&mut leecher, LONG);
    let done = Scrape::get(&addr);
    assert_eq!(done.value("r3map_migration_phase", &[("phase", "complete")]), 1.0);
    assert_eq!(done.value("r3map_migration_phase", &[("phase", "pulling")]), 0.0);
    let rounds = leecher
        .seen
        .iter()
        .find(|l| l.trim_start().starts_with("pre-copy rounds"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse::<f64>().ok())
        .expect("the report names the rounds");
    assert_eq!(done.value("r3map_migration_round", &[]), rounds);
    let downtime = done.value("r3map_migration_downtime_seconds", &[]);
    let bound = done.value("r3map_migration_downtime_bound_seconds", &[]);
    // Both hosts are this one: the suspend comes after `sync` was sent, so the measured
    // downtime stays under the bound (1 ms allowed for reading two different clocks).
    assert!(
        downtime > 0.0 && downtime <= bound + 0.001,
        "downtime {downtime} s, bound {bound} s:\n{}",
        done.text
    );
    assert_eq!(done.value("r3map_pull_local_bytes", &[]), size as f64);
    assert_eq!(done.value("r3map_pull_total_bytes", &[]), size as f64);
    assert!(done.value("r3map_chunks_fetched_total", &[]) >= (size / MIB) as f64);
    assert!(bytes(&done, "remote", "read") >= size as f64, "{}", done.text);
    assert_timed(&done, "remote", "read");
    seeder.wait_for("migration complete", LONG);
    assert!(seeder.wait_exit(LONG), "the seeder failed");
    assert!(leecher.terminate(LONG));
    proxy.kill();
}

/// Delta sync through a hub: the receiver's versions and blocks count what it published, and
/// the advertiser, the hub and the receiver count bytes on the wire.
#[test]
fn sync_counts_versions_blocks_and_bytes_on_every_side() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.bin");
    let replica = dir.path().join("replica.bin");
    std::fs::write(&source, pattern(7, 1 << 20)).unwrap();
    let mut hub = Proc::start(&[
        "sync",
        "hub",
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let hub_line = hub.wait_for("hub listening on", LONG);
    let hub_addr = hub_line.split_whitespace().last().unwrap().to_string();
    let hub_metrics = metrics_addr(&mut hub, LONG);
    let mut advertiser = Proc::start(&[
        "sync",
        "advertise",
        source.to_str().unwrap(),
        "--hub",
        &hub_addr,
        "--block-size",
        "64KiB",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let advertiser_metrics = metrics_addr(&mut advertiser, LONG);
    advertiser.wait_for("advertising source.bin", LONG);
    let mut receiver = Proc::start(&[
        "sync",
        "receive",
        replica.to_str().unwrap(),
        "--from",
        &hub_addr,
        "--name",
        "source.bin",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let receiver_metrics = metrics_addr(&mut receiver, LONG);
    receiver.wait_for("published ", LONG);
    let first = Scrape::get(&receiver_metrics);
    assert_eq!(first.value("r3map_sync_versions_total", &[]), 1.0);
    assert_eq!(
        first.value("r3map_sync_blocks_total", &[]),
        16.0,
        "1 MiB in 64 KiB blocks"
    );
    assert!(first.value("r3map_sync_bytes_total", &[("direction", "received")]) >= (1 << 20) as f64);

    // One block changes: the next version moves one block.
    let file = std::fs::OpenOptions::new().write(true).open(&source).unwrap();
    file.write_all_at(&[0xAB; 100], 5 << 16).unwrap();
    drop(file);
    receiver.wait_for("published ", LONG);
    let second = Scrape::get(&receiver_metrics);
    let versions = second.value("r3map_sync_versions_total", &[]);
    let blocks = second.value("r3map_sync_blocks_total", &[]);
    assert!(versions >= 2.0, "{}", second.text);
    assert!(
        (17.0..16.0 + versions).contains(&blocks),
        "each later version moved the one changed block: {blocks} blocks in {versions} versions"
    );
    let advertised = scrape_until(&advertiser_metrics, LONG, "the advertiser's count", |s| {
        s.get_value("r3map_sync_versions_total", &[]) == Some(versions)
    });
    assert_eq!(advertised.value("r3map_sync_blocks_total", &[]), blocks);
    assert!(advertised.value("r3map_sync_bytes_total", &[("direction", "sent")]) >= (1 << 20) as f64);
    let relayed = Scrape::get(&hub_metrics);
    assert!(relayed.value("r3map_sync_bytes_total", &[("direction", "sent")]) >= (1 << 20) as f64);
    assert!(relayed.value("r3map_sync_bytes_total", &[("direction", "received")]) >= (1 << 20) as f64);
    assert!(receiver.terminate(LONG));
    assert!(advertiser.terminate(LONG));
    assert!(hub.terminate(LONG));
}

/// A direct mount whose server is killed: a read times out (counted as a timeout of the
/// remote), and once a server is back on the same address the mount reconnects once.
#[test]
fn timeouts_and_reconnects_of_a_lost_remote_are_counted() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("remote.img");
    let content = pattern(8, 4 << 20);
    std::fs::write(&image, &content).unwrap();
    let export = format!("disk=file:{}", image.display());
    let listen = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let (server, uri) = serve(&export, &listen, &[]);
    let mnt = dir.path().join("mnt");
    let mut mount = Proc::start(&[
        "mount",
        &uri,
        mnt.to_str().unwrap(),
        "--remote-timeout",
        "1s",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let path = mounted_path(&mount.wait_for("mounted ", LONG));
    let addr = metrics_addr(&mut mount, LONG);
    let file = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0u8; 4096];
    file.read_exact_at(&mut buf, 0).unwrap();
    let before = Scrape::get(&addr);
    assert_eq!(before.value("r3map_reconnects_total", &[]), 0.0);
    let timeouts = [("role", "remote"), ("op", "read")];
    assert_eq!(before.get_value("r3map_backend_timeouts_total", &timeouts), None);

    server.kill();
    let err = file.read_exact_at(&mut buf, 2 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "{err}");
    let down = Scrape::get(&addr);
    assert!(
        down.value("r3map_backend_timeouts_total", &timeouts) >= 1.0,
        "{}",
        down.text
    );
    assert!(down.value("r3map_backend_errors_total", &timeouts) >= 1.0);
    assert_eq!(
        down.value("r3map_reconnects_total", &[]),
        0.0,
        "nothing to reconnect to yet"
    );

    let (server, _) = serve(&export, &listen, &[]);
    file.read_exact_at(&mut buf, 3 << 20).unwrap();
    assert!(buf == content[3 << 20..(3 << 20) + 4096]);
    let back = Scrape::get(&addr);
    assert_eq!(back.value("r3map_reconnects_total", &[]), 1.0, "{}", back.text);
    drop(file);
    assert!(mount.terminate(LONG));
    assert!(server.terminate(LONG));
}
