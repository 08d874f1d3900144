//! `r3map mirror` end to end, as a user runs it: a separate process, real backends.

mod common;

use common::run as r3map;

#[test]
fn mirror_on_the_embedded_default_pulls_pushes_and_verifies() {
    let (ok, stdout, stderr) = r3map(&["mirror", "--size", "24MiB", "--chunk-size", "256KiB"]);
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("pulled   24.00 MiB"), "{stdout}");
    assert!(
        stdout.contains("verified remote and local view are identical"),
        "{stdout}"
    );
    let pushed_line = stdout.lines().find(|l| l.starts_with("pushed")).unwrap();
    assert!(
        !pushed_line.starts_with("pushed   0 B"),
        "the writes were not pushed: {pushed_line}"
    );
}

#[test]
fn mirror_between_a_file_remote_and_a_directory_cache() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("remote.img");
    // Known content first, so the check covers both what was pulled and what was pushed.
    let before = r3map_core::testing::pattern(7, 5 << 20);
    std::fs::write(&image, &before).unwrap();
    let remote = format!("file:{}", image.display());
    let cache = format!("dir:{}?chunk=64KiB", dir.path().join("cache").display());
    let (ok, stdout, stderr) = r3map(&[
        "mirror",
        "--remote",
        &remote,
        "--cache",
        &cache,
        "--chunk-size",
        "64KiB",
        "--write-percent",
        "30",
    ]);
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    common::assert_holds_the_mirrored_content(&image, &stdout, &before);
}

#[test]
fn bad_specifications_and_sizes_are_explained() {
    let (ok, _, stderr) = r3map(&["mirror", "--remote", "tape:/dev/st0"]);
    assert!(
        !ok && stderr.contains("unknown backend kind \"tape\""),
        "{stderr}"
    );
    let (ok, _, stderr) = r3map(&["mirror", "--remote", "memory:1MiB", "--cache", "memory:2MiB"]);
    assert!(!ok && stderr.contains("must be the same size"), "{stderr}");
    let (ok, _, stderr) = r3map(&["mirror", "--size", "12 parsecs"]);
    assert!(!ok && stderr.contains("unknown size unit"), "{stderr}");
    let (ok, _, stderr) = r3map(&["mirror", "--size", "1MiB", "--chunk-size", "0"]);
    assert!(
        !ok && stderr.contains("chunk size must be greater than zero"),
        "{stderr}"
    );
}

#[test]
fn help_documents_the_commands() {
    let (ok, stdout, _) = r3map(&["--help"]);
    assert!(ok);
    for needle in [
        "mirror",
        "cert",
        "memory:SIZE",
        "dir:PATH",
        "&open-files=N",
        "&direct=true",
        "nbds://",
    ] {
        assert!(stdout.contains(needle), "r3map --help lacks {needle:?}: {stdout}");
    }
    let (ok, stdout, _) = r3map(&["mount", "--help"]);
    assert!(ok);
    for needle in [
        "--keep-serving",
        "--tls-ca",
        "The third signal gives up",
        "--remote-timeout + 5 s",
        "A second signal exits at once",
        "[default: 30s]",
    ] {
        assert!(
            stdout.contains(needle),
            "r3map mount --help lacks {needle:?}: {stdout}"
        );
    }
}
