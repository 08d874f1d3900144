//! `r3map migrate` across processes: a seeder, leechers and the application as separate
//! programs over real gRPC connections, while the application keeps writing.

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{have_fuse, run, Proc};

const LONG: Duration = Duration::from_secs(240);

/// The writers' working set: 64 MiB (64 of the resource's chunks), written at random.
const HOT: u64 = 64 << 20;

fn writer_binary() -> PathBuf {
    r3map_core::testing::example_binary(env!("CARGO"), env!("CARGO_MANIFEST_DIR"), "migrate_writer")
}

/// `seeding … at grpc://ADDR` → `grpc://ADDR`.
fn seeding_uri(seeder: &mut Proc) -> String {
    common::reported_address(seeder, "seeding ", LONG)
}

/// The number after `label` in a leecher's report line (e.g. "re-pulled       12 chunks").
fn report_number(lines: &[String], label: &str) -> u64 {
    let line = lines
        .iter()
        .find(|line| line.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} line in the report:\n{}", lines.join("\n")));
    line.trim_start()[label.len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in {line:?}"))
}

/// The downtime in milliseconds from the report.
fn downtime_ms(lines: &[String]) -> f64 {
    let line = lines
        .iter()
        .find(|line| line.trim_start().starts_with("downtime"))
        .unwrap_or_else(|| panic!("no downtime in the report:\n{}", lines.join("\n")));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The state letter of a process (R, S, T, …) from /proc.
fn process_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(") ").unwrap().1.chars().next().unwrap()
}

/// Compares two files piece by piece; panics at the first difference.
fn assert_same_files(a: &Path, b: &Path) {
    let (fa, fb) = (std::fs::File::open(a).unwrap(), std::fs::File::open(b).unwrap());
    let len = fa.metadata().unwrap().len();
    assert_eq!(len, fb.metadata().unwrap().len(), "the copies differ in size");
    let (mut pa, mut pb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut offset = 0;
    while offset < len {
        let n = pa.len().min((len - offset) as usize);
        fa.read_exact_at(&mut pa[..n], offset).unwrap();
        fb.read_exact_at(&mut pb[..n], offset).unwrap();
        if pa[..n] != pb[..n] {
            let at = pa[..n].iter().zip(&pb[..n]).position(|(x, y)| x != y).unwrap();
            panic!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                offset + at as u64
            );
        }
        offset += n as u64;
    }
}

/// Leeches from `uri` into `dest`; returns the leecher's lines once it exited successfully.
fn leech_into(uri: &str, dest: &Path, extra: &[&str]) -> Vec<String> {
    let to = format!("file:{}", dest.display());
    let mut args = vec!["migrate", "leech", uri, "--to", &to];
    args.extend_from_slice(extra);
    let mut leecher = Proc::start(&args);
    leecher.wait_for("migration complete", LONG);
    leecher.wait_for("downtime", LONG);
    let lines = leecher.seen.clone();
    assert!(leecher.wait_exit(LONG), "the leecher failed");
    lines
}

/// Starts a seeder of `resource` whose application (`writer_args`, run after the frontend is
/// up) keeps writing; returns the seeder, its URI and the writer.
fn seed_with_writer(
    dir: &Path,
    resource: &str,
    frontend: &str,
    target: &Path,
    writer_args: impl FnOnce(&Path) -> Vec<String>,
) -> (Proc, String, Proc) {
    let pid_file = dir.join("writer.pid");
    let target = target.to_str().unwrap();
    let mut seeder = Proc::start(&[
        "migrate",
        "seed",
        resource,
        target,
        "--frontend",
        frontend,
        "--pid-file",
        pid_file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let reached = seeder.wait_for("the application reaches the resource at", LONG);
    let path = PathBuf::from(reached.rsplit(" at ").next().unwrap());
    let uri = seeding_uri(&mut seeder);
    let args = writer_args(&path);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut writer = Proc::start_program(writer_binary(), &args);
    std::fs::write(&pid_file, writer.pid().to_string()).unwrap();
    writer.wait_for("writing", LONG);
    (seeder, uri, writer)
}

/// [`seed_with_writer`] for the usual case: `src.img` of `size` in `dir`, served through a
/// file frontend at `dir/mnt`, written by the writer at `rate` blocks per second within `hot`
/// bytes (0: all of it). Returns the seeder, its URI, the writer and the source's path.
fn seed_file_with_writer(dir: &Path, size: &str, rate: u32, hot: u64) -> (Proc, String, Proc, PathBuf) {
    let src = dir.join("src.img");
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let resource = format!("file:{}?size={size}", src.display());
    let (seeder, uri, writer) = seed_with_writer(dir, &resource, "file", &mnt, |path| {
        vec![
            "file".into(),
            path.display().to_string(),
            rate.to_string(),
            hot.to_string(),
        ]
    });
    (seeder, uri, writer, src)
}

/// The thesis' use: a file that an application keeps writing (through the FUSE frontend)
/// moves to another "host"; the destination holds exactly the state at the suspend, the
/// re-pulled chunks show the writes during the migration were caught, and the source's
/// application stays stopped (its copy is stale).
#[test]
fn a_file_that_is_being_written_migrates_with_precopy_rounds() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("dest.img");
    let (mut seeder, uri, writer, src) = seed_file_with_writer(dir.path(), "1GiB", 1000, HOT);
    let lines = leech_into(&uri, &dest, &["--rounds", "4", "--verify"]);
    seeder.wait_for("migration complete", LONG);
    assert!(seeder.wait_exit(LONG), "the seeder failed");
    assert_eq!(
        process_state(writer.pid()),
        'T',
        "the source's application must stay stopped after the handoff"
    );
    let repulled = report_number(&lines, "re-pulled");
    assert!(
        repulled > 0,
        "the writer's changes during the migration were never re-pulled:\n{}",
        lines.join("\n")
    );
    assert!(report_number(&lines, "pre-copy rounds") >= 1);
    assert!(downtime_ms(&lines) >= 0.0);
    assert_same_files(&src, &dest);
    writer.kill();
}

/// Plain process memory: a program's memory served through the slice frontend (userfaultfd,
/// write-protect dirty tracking) keeps changing while it migrates.
#[test]
fn the_memory_of_a_running_program_migrates_through_the_slice_frontend() {
    if !common::have_userfaultfd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src.img"), dir.path().join("dest.img"));
    let socket = dir.path().join("slice.sock");
    let resource = format!("file:{}?size=1GiB", src.display());
    let (mut seeder, uri, writer) = seed_with_writer(dir.path(), &resource, "slice", &socket, |path| {
        vec![
            "slice".into(),
            path.display().to_string(),
            (1u64 << 30).to_string(),
            "1000".into(),
            HOT.to_string(),
        ]
    });
    let lines = leech_into(&uri, &dest, &["--rounds", "3"]);
    seeder.wait_for("migration complete", LONG);
    assert!(seeder.wait_exit(LONG), "the seeder failed");
    assert_eq!(process_state(writer.pid()), 'T');
    assert!(report_number(&lines, "re-pulled") > 0, "{}", lines.join("\n"));
    // The flush at suspend wrote the program's last pages into the source file: both hold
    // the memory as it was when the program stopped.
    assert_same_files(&src, &dest);
    writer.kill();
}

/// A → B → C: B leeches from A and, once complete, seeds onward to C.
#[test]
fn a_resource_migrates_along_a_chain_of_three_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("a.img"), dir.path().join("c.img"));
    let content = r3map_core::testing::pattern(3, 64 << 20);
    std::fs::write(&src, &content).unwrap();
    let resource = format!("file:{}", src.display());
    let mut a = Proc::start(&["migrate", "seed", &resource, "--listen", "127.0.0.1:0"]);
    let a_uri = seeding_uri(&mut a);
    let mut b = Proc::start(&["migrate", "leech", &a_uri, "--then-seed", "127.0.0.1:0"]);
    let b_uri = common::reported_address(&mut b, "seeding onward at", LONG);
    a.wait_for("migration complete", LONG);
    assert!(a.wait_exit(LONG), "A failed");
    leech_into(&b_uri, &dest, &["--verify"]);
    b.wait_for("migration complete", LONG);
    assert!(b.wait_exit(LONG), "B failed");
    assert_eq!(std::fs::read(&dest).unwrap(), content);
}

/// A leecher killed before finalize changes nothing for the source: its application keeps
/// running and a new leecher takes the resource over.
#[test]
fn a_leecher_killed_before_finalize_leaves_the_seeder_serving_the_next_one() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("dest.img");
    let (mut seeder, uri, writer, src) = seed_file_with_writer(dir.path(), "256MiB", 500, HOT);
    // A slow link keeps the first leecher pulling until it is killed.
    let (_proxy, proxied) = common::slow_link(&uri, "1MiB");
    let doomed_dest = dir.path().join("doomed.img");
    let doomed_to = format!("file:{}", doomed_dest.display());
    let mut doomed = Proc::start(&[
        "migrate",
        "leech",
        &format!("grpc://{proxied}"),
        "--to",
        &doomed_to,
    ]);
    doomed.wait_for("leeching", LONG);
    seeder.wait_for("tracking writes", LONG);
    doomed.kill();
    assert_ne!(
        process_state(writer.pid()),
        'T',
        "the source's application was stopped by a leecher that never finalized"
    );
    leech_into(&uri, &dest, &["--rounds", "2"]);
    seeder.wait_for("migration complete", LONG);
    assert!(seeder.wait_exit(LONG));
    assert_same_files(&src, &dest);
    writer.kill();
}

/// `r3map migrate abort` ends a migration before the handoff: the leecher fails without
/// taking over and the source's application runs on.
#[test]
fn abort_resumes_the_source_and_the_leecher_never_takes_over() {
    if !have_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("dest.img");
    let (mut seeder, uri, writer, _) = seed_file_with_writer(dir.path(), "256MiB", 500, HOT);
    let (_proxy, proxied) = common::slow_link(&uri, "1MiB");
    let to = format!("file:{}", dest.display());
    let mut leecher = Proc::start(&["migrate", "leech", &format!("grpc://{proxied}"), "--to", &to]);
    leecher.wait_for("leeching", LONG);
    seeder.wait_for("tracking writes", LONG);
    let (ok, _, stderr) = run(&["migrate", "abort", &uri]);
    assert!(ok, "abort failed: {stderr}");
    assert!(stderr.contains("runs again"), "{stderr}");
    seeder.wait_for("seeder: serving (no migration)", LONG);
    assert!(!leecher.wait_exit(LONG), "the leecher must fail after an abort");
    assert_ne!(process_state(writer.pid()), 'T');
    drop(seeder);
    writer.kill();
}

/// Signals while the leecher finalizes: the source is suspended then, so the first signal only
/// says what stopping would do; the second aborts the migration, which resumes the source, and
/// the leecher exits without taking over.
#[test]
fn a_leecher_signalled_twice_during_finalize_aborts_and_the_source_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src.img"), dir.path().join("dest.img"));
    std::fs::write(&src, r3map_core::testing::pattern(5, 8 << 20)).unwrap();
    // The suspend command holds finalize until the test writes to the FIFO.
    let (hold, resumed) = (dir.path().join("hold"), dir.path().join("resumed"));
    assert!(Command::new("mkfifo").arg(&hold).status().unwrap().success());
    let suspend = format!("echo suspend-started >&2; read line < {}", hold.display());
    let resume = format!("touch {}", resumed.display());
    let resource = format!("file:{}", src.display());
    let mut seeder = Proc::start(&[
        "migrate",
        "seed",
        &resource,
        "--listen",
        "127.0.0.1:0",
        "--suspend",
        &suspend,
        "--resume",
        &resume,
    ]);
    let uri = seeding_uri(&mut seeder);
    let to = format!("file:{}", dest.display());
    let mut leecher = Proc::start(&["migrate", "leech", &uri, "--to", &to]);
    leecher.wait_for("finalizing", LONG);
    seeder.wait_for("suspend-started", LONG);
    leecher.signal("TERM");
    leecher.wait_for("Signal again to abort", LONG);
    assert!(
        !leecher.seen.iter().any(|line| line.contains("gave up")),
        "the first signal must not stop finalize"
    );
    leecher.signal("TERM");
    // Released only once the leecher is asking for the abort (and so no longer reads the sync's
    // reply): the abort queues behind the seeder's sync, and releasing the suspend command
    // lets both run.
    leecher.wait_for("aborting the migration", LONG);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&hold)
        .unwrap()
        .write_all(b"go\n")
        .unwrap();
    assert!(
        !leecher.wait_exit(LONG),
        "a leecher that gave up must exit non-zero"
    );
    assert!(
        leecher
            .seen
            .iter()
            .any(|line| line.contains("the migration was aborted")),
        "{}",
        leecher.seen.join("\n")
    );
    assert!(
        !leecher.seen.iter().any(|line| line.contains("finalized:")),
        "the leecher took over"
    );
    seeder.wait_for("seeder: serving (no migration)", LONG);
    assert!(resumed.exists(), "the source was not resumed");
}

/// A seeder with TLS and a bearer token: a leecher without the token, or without trusting the
/// seeder's certificate, is refused with an error that says so; with both it migrates.
#[test]
fn a_seeder_with_tls_and_a_token_takes_only_leechers_that_have_both() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let (ok, _, stderr) = run(&["cert", tls.to_str().unwrap()]);
    assert!(ok, "r3map cert failed: {stderr}");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token-for-the-test\n").unwrap();
    let (src, dest) = (dir.path().join("src.img"), dir.path().join("dest.img"));
    let content = r3map_core::testing::pattern(5, 8 << 20);
    std::fs::write(&src, &content).unwrap();
    let resource = format!("file:{}", src.display());
    let pem = |name: &str| tls.join(name).display().to_string();
    let mut seeder = Proc::start(&[
        "migrate",
        "seed",
        &resource,
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        &pem("server-cert.pem"),
        "--tls-key",
        &pem("server-key.pem"),
        "--token-file",
        token.to_str().unwrap(),
    ]);
    let uri = seeding_uri(&mut seeder);
    assert!(uri.starts_with("grpcs://"), "{uri}");
    let to = format!("file:{}", dest.display());
    let (ok, _, stderr) = run(&[
        "migrate",
        "leech",
        &uri,
        "--to",
        &to,
        "--tls-ca",
        &pem("ca-cert.pem"),
    ]);
    assert!(
        !ok && stderr.to_lowercase().contains("token"),
        "a leecher without the token: {stderr}"
    );
    let (ok, _, stderr) = run(&[
        "migrate",
        "leech",
        &uri,
        "--to",
        &to,
        "--token-file",
        token.to_str().unwrap(),
    ]);
    assert!(
        !ok && stderr.contains("--tls-ca"),
        "a leecher that does not trust the seeder: {stderr}"
    );
    let (ok, _, stderr) = run(&[
        "migrate",
        "leech",
        &uri,
        "--to",
        &to,
        "--tls-ca",
        &pem("ca-cert.pem"),
        "--token-file",
        token.to_str().unwrap(),
        "--verify",
    ]);
    assert!(ok, "the leecher with TLS and the token failed: {stderr}");
    assert!(seeder.wait_exit(LONG));
    assert_eq!(std::fs::read(&dest).unwrap(), content);
}

/// Two "hosts": network namespaces joined by a veth pair, the seeder in one and the leecher
/// in the other.
#[test]
fn a_migration_crosses_network_namespaces_joined_by_veth() {
    let Some(hosts) = Hosts::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src.img"), dir.path().join("dest.img"));
    let content = r3map_core::testing::pattern(9, 32 << 20);
    std::fs::write(&src, &content).unwrap();
    let resource = format!("file:{}", src.display());
    let bin = env!("CARGO_BIN_EXE_r3map");
    let listen = format!("{}:0", Hosts::SEEDER_IP);
    let mut seeder = Proc::start_program(
        "ip",
        &[
            "netns",
            "exec",
            &hosts.seeder,
            bin,
            "migrate",
            "seed",
            &resource,
            "--listen",
            &listen,
        ],
    );
    let uri = seeding_uri(&mut seeder);
    assert!(uri.contains(Hosts::SEEDER_IP), "{uri}");
    let to = format!("file:{}", dest.display());
    let mut leecher = Proc::start_program(
        "ip",
        &[
            "netns",
            "exec",
            &hosts.leecher,
            bin,
            "migrate",
            "leech",
            &uri,
            "--to",
            &to,
            "--verify",
        ],
    );
    leecher.wait_for("migration complete", LONG);
    assert!(leecher.wait_exit(LONG));
    assert!(seeder.wait_exit(LONG));
    assert_eq!(std::fs::read(&dest).unwrap(), content);
}

/// Two network namespaces with a veth pair between them, removed on drop (also after a
/// partial setup: the pair is deleted where it was created).
struct Hosts {
    seeder: String,
    leecher: String,
    veth: String,
}

impl Hosts {
    const SEEDER_IP: &'static str = "10.213.7.1";
    const LEECHER_IP: &'static str = "10.213.7.2";

    fn create() -> Option<Self> {
        let ip = |args: &str| {
            Command::new("ip")
                .args(args.split_whitespace())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ip("netns list") {
            r3map_core::testing::skip("ip netns is unavailable (iproute2 missing or not root)");
            return None;
        }
        let id = std::process::id();
        let hosts = Hosts {
            seeder: format!("r3map-seed-{id}"),
            leecher: format!("r3map-leech-{id}"),
            veth: format!("r3s{id}"),
        };
        let (seeder, leecher, veth_a, veth_b) =
            (&hosts.seeder, &hosts.leecher, &hosts.veth, format!("r3l{id}"));
        let steps = [
            format!("netns add {seeder}"),
            format!("netns add {leecher}"),
            format!("link add {veth_a} type veth peer name {veth_b}"),
            format!("link set {veth_a} netns {seeder}"),
            format!("link set {veth_b} netns {leecher}"),
            format!("-n {seeder} addr add {}/24 dev {veth_a}", Self::SEEDER_IP),
            format!("-n {leecher} addr add {}/24 dev {veth_b}", Self::LEECHER_IP),
            format!("-n {seeder} link set {veth_a} up"),
            format!("-n {leecher} link set {veth_b} up"),
            format!("-n {seeder} link set lo up"),
            format!("-n {leecher} link set lo up"),
        ];
        for step in &steps {
            if !ip(step) {
                r3map_core::testing::skip(&format!("cannot set up network namespaces (ip {step} failed)"));
                return None;
            }
        }
        Some(hosts)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("ip")
                .args(args)
                .stderr(std::process::Stdio::null())
                .status();
        };
        // Deleting a namespace deletes the veth end inside it, and with it the pair; a pair
        // that never left the root namespace is deleted there.
        for ns in [&self.seeder, &self.leecher] {
            quiet(&["netns", "del", ns]);
        }
        quiet(&["link", "del", &self.veth]);
    }
}
