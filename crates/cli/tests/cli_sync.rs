//! `r3map sync` across processes: a hub, an advertiser and receivers as separate `r3map`
//! processes on loopback; replicas compared byte for byte with the source, bytes on the wire
//! read from the receivers' counters.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::Proc;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 64 * 1024;
const WAIT: Duration = Duration::from_secs(60);

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill(&mut data[..]);
    data
}

/// The address a process printed after `prefix` ("hub listening on 127.0.0.1:PORT").
fn address(proc: &mut Proc, prefix: &str) -> String {
    let line = proc.wait_for(prefix, WAIT);
    line.split_whitespace()
        .find(|word| word.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string()
}

/// A receiver's report of one published version.
#[derive(Debug)]
struct Round {
    version: String,
    blocks: u64,
    block_bytes: u64,
    wire_bytes: u64,
}

/// Waits for the receiver's next "published …" line and parses it ("…, N blocks (B bytes)
/// received, W bytes on the wire").
fn next_round(receiver: &mut Proc) -> Round {
    parse_round(&receiver.wait_for("published ", WAIT))
}

fn parse_round(line: &str) -> Round {
    let number_before = |marker: &str| -> u64 {
        let head = &line[..line
            .find(marker)
            .unwrap_or_else(|| panic!("{marker:?} not in {line:?}"))];
        head.rsplit(|c: char| !c.is_ascii_digit())
            .find(|part| !part.is_empty())
            .unwrap()
            .parse()
            .unwrap()
    };
    let version = line
        .split(": version ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no version in {line:?}"))
        .to_string();
    Round {
        version,
        blocks: number_before(" blocks ("),
        block_bytes: number_before(" bytes) received"),
        wire_bytes: number_before(" bytes on the wire"),
    }
}

/// How the advertiser names the version with `content` (its digest's first 8 bytes in hex).
fn version_of(content: &[u8]) -> String {
    let digest = r3map_sync::BlockHashes::of_bytes(content, BLOCK as u32).digest();
    r3map_sync::source::hex8(&digest)
}

/// Waits for published rounds until the version with `expected` is published (intermediate
/// versions appear when a hash pass saw a write in progress); checks that `replica` holds it
/// and returns the rounds.
fn rounds_until_equal(receiver: &mut Proc, replica: &Path, expected: &[u8]) -> Vec<Round> {
    let version = version_of(expected);
    let mut rounds = Vec::new();
    loop {
        let round = next_round(receiver);
        let done = round.version == version;
        rounds.push(round);
        if done {
            assert!(
                std::fs::read(replica).unwrap() == expected,
                "the published replica differs from the source"
            );
            return rounds;
        }
    }
}

fn start_hub() -> (Proc, String) {
    let mut hub = Proc::start(&["sync", "hub", "--listen", "127.0.0.1:0"]);
    let addr = address(&mut hub, "hub listening on");
    (hub, addr)
}

/// Writes `data` at `offset` in place (as an application updating its file does).
fn write_in_place(path: &Path, offset: u64, data: &[u8]) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(data, offset).unwrap();
}

#[test]
fn hub_feeds_two_receivers_that_follow_changes_growth_and_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("disk.img");
    let mut content = random(64 * BLOCK + 1000, 1);
    std::fs::write(&source, &content).unwrap();
    let (_hub, hub_addr) = start_hub();
    let mut advertiser = Proc::start(&["sync", "advertise", source.to_str().unwrap(), "--hub", &hub_addr]);
    advertiser.wait_for("advertising disk.img", WAIT);
    let replicas = [dir.path().join("a/disk.img"), dir.path().join("b/disk.img")];
    let mut receivers: Vec<Proc> = replicas
        .iter()
        .map(|replica| {
            std::fs::create_dir_all(replica.parent().unwrap()).unwrap();
            Proc::start(&["sync", "receive", replica.to_str().unwrap(), "--from", &hub_addr])
        })
        .collect();
    for (receiver, replica) in receivers.iter_mut().zip(&replicas) {
        let rounds = rounds_until_equal(receiver, replica, &content);
        assert_eq!(
            rounds.iter().map(|r| r.blocks).sum::<u64>(),
            65,
            "the first sync sends every block"
        );
    }

    // Two blocks changed in place: each receiver gets exactly those, and the bytes on the
    // wire are the changed bytes plus a small overhead.
    let mut changes = Vec::new();
    for block in [3usize, 40] {
        let new = random(BLOCK, block as u64 + 100);
        content[block * BLOCK..(block + 1) * BLOCK].copy_from_slice(&new);
        changes.push((block, new));
    }
    let file = std::fs::OpenOptions::new().write(true).open(&source).unwrap();
    for (block, new) in &changes {
        file.write_all_at(new, (*block * BLOCK) as u64).unwrap();
    }
    drop(file);
    for (receiver, replica) in receivers.iter_mut().zip(&replicas) {
        let rounds = rounds_until_equal(receiver, replica, &content);
        let blocks: u64 = rounds.iter().map(|r| r.blocks).sum();
        let wire: u64 = rounds.iter().map(|r| r.wire_bytes).sum();
        assert_eq!(blocks, 2, "only the changed blocks are sent: {rounds:?}");
        assert_eq!(
            rounds.iter().map(|r| r.block_bytes).sum::<u64>(),
            2 * BLOCK as u64
        );
        let changed = 2 * BLOCK as u64;
        assert!(
            wire >= changed && wire <= changed + changed / 50 + 1024,
            "{wire} bytes on the wire for {changed} changed bytes"
        );
    }

    // Growth (a new partial block) and truncation (cut inside a block).
    let tail = random(3 * BLOCK / 2, 7);
    content.extend_from_slice(&tail);
    write_in_place(&source, (content.len() - tail.len()) as u64, &tail);
    for (receiver, replica) in receivers.iter_mut().zip(&replicas) {
        rounds_until_equal(receiver, replica, &content);
    }
    content.truncate(10 * BLOCK + 123);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&source)
        .unwrap()
        .set_len(content.len() as u64)
        .unwrap();
    for (receiver, replica) in receivers.iter_mut().zip(&replicas) {
        let rounds = rounds_until_equal(receiver, replica, &content);
        let blocks: u64 = rounds.iter().map(|r| r.blocks).sum();
        assert_eq!(blocks, 1, "a cut inside a block sends only the new last block");
    }
    for receiver in receivers {
        assert!(
            receiver.terminate(WAIT),
            "the receiver did not stop cleanly on SIGTERM"
        );
    }
    assert!(advertiser.terminate(WAIT));
}

#[test]
fn a_restarted_receiver_gets_only_what_changed_while_it_was_away() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("state.bin");
    let replica = dir.path().join("copy/state.bin");
    std::fs::create_dir_all(replica.parent().unwrap()).unwrap();
    let mut content = random(32 * BLOCK, 2);
    std::fs::write(&source, &content).unwrap();
    let (_hub, hub_addr) = start_hub();
    let mut advertiser = Proc::start(&["sync", "advertise", source.to_str().unwrap(), "--hub", &hub_addr]);
    advertiser.wait_for("advertising state.bin", WAIT);
    let receive = || Proc::start(&["sync", "receive", replica.to_str().unwrap(), "--from", &hub_addr]);
    let mut receiver = receive();
    rounds_until_equal(&mut receiver, &replica, &content);
    assert!(receiver.terminate(WAIT));
    // Changed while no receiver runs.
    let new = random(BLOCK, 9);
    content[5 * BLOCK..6 * BLOCK].copy_from_slice(&new);
    write_in_place(&source, (5 * BLOCK) as u64, &new);
    let mut receiver = receive();
    let rounds = rounds_until_equal(&mut receiver, &replica, &content);
    assert_eq!(rounds.iter().map(|r| r.blocks).sum::<u64>(), 1, "{rounds:?}");
}

#[test]
fn receiver_killed_mid_transfer_keeps_the_old_replica_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("big.img");
    let replica = dir.path().join("copy/big.img");
    std::fs::create_dir_all(replica.parent().unwrap()).unwrap();
    let old = random(128 * BLOCK, 3);
    let new = random(128 * BLOCK, 4);
    std::fs::write(&replica, &old).unwrap();
    std::fs::write(&source, &new).unwrap();
    let mut advertiser = Proc::start(&[
        "sync",
        "advertise",
        source.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let upstream = address(&mut advertiser, "listening on");
    // 8 MiB at 2 MiB/s: the transfer takes about 4 s, long enough to be cut.
    let mut proxy = Proc::start(&[
        "delay-proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--rtt",
        "1ms",
        "--rate",
        "2MiB",
    ]);
    let proxy_addr = address(&mut proxy, "delaying");
    let staging = dir.path().join("copy/.big.img.r3map-sync");
    let receiver = Proc::start(&[
        "sync",
        "receive",
        replica.to_str().unwrap(),
        "--from",
        &proxy_addr,
        "--once",
    ]);
    // Kill once some blocks of the new version are staged (bounded wait on the file's state).
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let staged = std::fs::read(&staging).unwrap_or_default();
        if staged.len() == new.len() && staged[..4 * BLOCK] == new[..4 * BLOCK] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the transfer never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    receiver.kill();
    assert_eq!(
        std::fs::read(&replica).unwrap(),
        old,
        "kill -9 mid-transfer changed the replica"
    );
    // A new run resumes from the staging copy: fewer blocks than the whole file.
    let (ok, _, stderr) = common::run(&[
        "sync",
        "receive",
        replica.to_str().unwrap(),
        "--from",
        &upstream,
        "--once",
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("resuming from"), "{stderr}");
    let line = stderr
        .lines()
        .find(|line| line.starts_with("published "))
        .unwrap_or_else(|| panic!("{stderr}"));
    let round = parse_round(line);
    assert!(round.blocks <= 124 && round.blocks > 0, "{round:?}");
    assert_eq!(std::fs::read(&replica).unwrap(), new);
    assert!(
        !staging.exists(),
        "the staging copy was left behind after publishing"
    );
}

#[test]
fn readers_of_the_replica_never_see_a_mix_of_two_versions() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("doc.bin");
    let replica = dir.path().join("copy/doc.bin");
    std::fs::create_dir_all(replica.parent().unwrap()).unwrap();
    let len = 48 * BLOCK;
    let version = |n: u8| vec![n; len];
    // Each source version is written whole and renamed over the file, so every version the
    // advertiser can send is uniform; a replica that mixes two would show two byte values.
    let replace = |n: u8| {
        let temp = dir.path().join("doc.bin.tmp");
        std::fs::write(&temp, version(n)).unwrap();
        std::fs::rename(&temp, &source).unwrap();
    };
    replace(1);
    let mut advertiser = Proc::start(&[
        "sync",
        "advertise",
        source.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let addr = address(&mut advertiser, "listening on");
    let mut receiver = Proc::start(&["sync", "receive", replica.to_str().unwrap(), "--from", &addr]);
    rounds_until_equal(&mut receiver, &replica, &version(1));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let replica = replica.clone();
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let bytes = std::fs::read(&replica).unwrap();
                assert_eq!(bytes.len(), len, "a reader saw a partial file");
                assert!(
                    bytes.iter().all(|b| *b == bytes[0]),
                    "a reader saw two versions mixed"
                );
                reads += 1;
            }
            reads
        })
    };
    for n in 2..=12u8 {
        replace(n);
        rounds_until_equal(&mut receiver, &replica, &version(n));
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("the reader saw a torn replica");
    assert!(reads > 0);
}
