//! A managed mount over a persistent cache, killed with SIGKILL again and again while it writes
//! and pushes (a separate process: examples/cache_writer), then restarted on the same cache:
//! every acknowledged write is read back after each restart (the kernel keeps the cache file's
//! page cache), and after a final clean close the remote equals the cache.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

#[path = "../examples/cache_writer/ops.rs"]
mod ops;

const SIZE: u64 = 64 * ops::CHUNK + 1000;
const ROUNDS: u64 = 30;

fn writer() -> std::path::PathBuf {
    r3map_core::testing::example_binary(env!("CARGO"), env!("CARGO_MANIFEST_DIR"), "cache_writer")
}

fn start(dir: &Path, seed: &str) -> (Child, std::io::Lines<BufReader<ChildStdout>>) {
    let mut child = Command::new(writer())
        .arg(dir.join("cache"))
        .arg(dir.join("remote"))
        .arg(dir.join("view"))
        .arg(seed)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start cache_writer");
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// Reads the `ready` line and checks the content the restarted mount reads: every byte as the
/// model has it, except those of the write that was in flight when the process was killed,
/// which may be old or new. Adopts what that write left.
fn check_view(
    dir: &Path,
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    model: &mut [u8],
    in_flight: Option<(u64, Vec<u8>)>,
    round: u64,
) -> String {
    let ready = lines.next().expect("the writer's ready line").unwrap();
    let view = std::fs::read(dir.join("view")).unwrap();
    assert_eq!(view.len(), model.len());
    for (x, (&got, want)) in view.iter().zip(model.iter_mut()).enumerate() {
        let new = in_flight
            .as_ref()
            .filter(|(at, data)| (*at as usize..*at as usize + data.len()).contains(&x))
            .map(|(at, data)| data[x - *at as usize]);
        assert!(
            got == *want || Some(got) == new,
            "round {round}: byte {x} is {got:#04x}, but an acknowledged write left {want:#04x} ({ready})"
        );
        *want = got;
    }
    ready
}

#[test]
fn sigkilled_writers_lose_no_acknowledged_write_and_a_clean_close_pushes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = r3map_core::testing::pattern(77, SIZE as usize);
    std::fs::write(dir.path().join("remote"), &model).unwrap();
    let mut in_flight = None;
    let mut acked_in_all = 0;
    for round in 0..ROUNDS {
        let (mut child, mut lines) = start(dir.path(), &round.to_string());
        let ready = check_view(dir.path(), &mut lines, &mut model, in_flight.take(), round);
        let expected = if round == 0 {
            "ready New"
        } else {
            "ready ProcessCrash"
        };
        assert_eq!(ready, expected, "round {round}");
        // Killed after 0 to 40 acknowledged writes: at start-up, mid-write, mid-fsync, mid-push.
        let wanted = (round * 17) % 41;
        let mut acked = 0;
        if wanted > 0 {
            for line in lines.by_ref() {
                let line = line.unwrap();
                assert_eq!(line, format!("ack {acked}"), "round {round}");
                acked += 1;
                if acked == wanted {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Acknowledgements printed before the kill landed count too.
        for line in lines {
            assert_eq!(line.unwrap(), format!("ack {acked}"), "round {round}");
            acked += 1;
        }
        for n in 0..acked {
            let (offset, data) = ops::op(round, n, SIZE);
            model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
        in_flight = Some(ops::op(round, acked, SIZE));
        acked_in_all += acked;
    }
    assert!(
        acked_in_all > ROUNDS,
        "the writers hardly wrote: {acked_in_all} writes"
    );
    let (mut child, mut lines) = start(dir.path(), "close");
    let ready = check_view(dir.path(), &mut lines, &mut model, in_flight, ROUNDS);
    assert_eq!(ready, "ready ProcessCrash");
    assert_eq!(lines.next().expect("closed").unwrap(), "closed");
    assert!(child.wait().unwrap().success());
    let remote = std::fs::read(dir.path().join("remote")).unwrap();
    let first = remote.iter().zip(&model).position(|(a, b)| a != b);
    assert!(
        first.is_none(),
        "after the clean close the remote differs from the cache at byte {first:?}"
    );
}
