//! Redis, Redis Cluster and S3 backends across processes, against real `redis-server` and
//! SeaweedFS processes: `r3map serve` exports them over NBD and gRPC, `r3map mirror` uses them
//! directly as remotes, and a store that is down or refuses the credentials is an error naming
//! its endpoint. (Mounts and faults: cli_store_faults.rs.)

mod common;

use std::process::Command;
use std::time::Duration;

use common::stores::{cluster_spec, redis_content, redis_spec, s3_content, s3_credentials_file, s3_spec};
use common::{free_port, mirror_checksum, Proc};
use r3map_core::testing::{pattern, skip};
use r3map_stores::testing::{RedisCluster, RedisServer, SeaweedFs};
use r3map_stores::RedisOptions;

const LONG: Duration = Duration::from_secs(120);
const SIZE: u64 = 4 << 20;

/// Runs `r3map ARGS` with extra environment variables; returns (success, stdout, stderr).
fn r3map_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_r3map"))
        .args(args)
        .env_remove("R3MAP_REDIS_PASSWORD")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .envs(env.iter().copied())
        .output()
        .expect("run r3map");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `r3map mirror --remote REMOTE` writing 20 % of it; returns the checksum it verified. Each
/// call writes other data (a new seed), so every mirror changes the store.
fn mirror(remote: &str, extra: &[&str]) -> u32 {
    static SEED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let seed = SEED
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .to_string();
    let mut args = vec![
        "mirror",
        "--remote",
        remote,
        "--chunk-size",
        "64KiB",
        "--write-percent",
        "20",
        "--seed",
        &seed,
    ];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = r3map_with_env(&args, &[]);
    assert!(ok, "mirror of {remote}: {stdout}\n{stderr}");
    mirror_checksum(&stdout)
}

/// The store holds exactly what a mirror verified, and the mirror's writes changed it.
fn assert_store_holds(content: &[u8], checksum: u32, before: &[u8]) {
    assert_eq!(
        crc32fast::hash(content),
        checksum,
        "the store does not hold what the mirror verified"
    );
    assert!(content != before, "the mirror's writes never reached the store");
}

#[test]
fn serve_exports_redis_over_nbd_and_grpc_and_mirror_uses_it_directly() {
    let server = match RedisServer::start(&[]) {
        Ok(server) => server,
        Err(reason) => return skip(&reason),
    };
    let options = RedisOptions::standalone(server.address(), "disk");
    let mut before = pattern(3, SIZE as usize);
    redis_content(&options, SIZE, Some(&before));

    let spec = redis_spec(&server.address(), "disk", SIZE);
    let (nbd, grpc) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let export = format!("disk={spec}");
    let mut serve = Proc::start(&["serve", &export, "--listen", &nbd, "--grpc", &grpc]);
    serve.wait_for("serving nbd", LONG);
    serve.wait_for("serving grpc", LONG);

    for remote in [format!("nbd://{nbd}/disk"), format!("grpc://{grpc}/disk")] {
        let checksum = mirror(&remote, &[]);
        let content = redis_content(&options, SIZE, None);
        assert_store_holds(&content, checksum, &before);
        before = content;
    }
    assert!(serve.terminate(LONG), "serve did not stop on SIGTERM");

    let checksum = mirror(&spec, &[]);
    assert_store_holds(&redis_content(&options, SIZE, None), checksum, &before);
}

#[test]
fn mirror_uses_s3_with_a_credentials_file_and_a_redis_cluster() {
    let store = match SeaweedFs::start() {
        Ok(store) => store,
        Err(reason) => return skip(&reason),
    };
    let cluster = match RedisCluster::start(3, 0) {
        Ok(cluster) => cluster,
        Err(reason) => return skip(&reason),
    };
    let dir = tempfile::tempdir().unwrap();
    let credentials = s3_credentials_file(dir.path());
    r3map_core::testing::block_on(store.create_bucket("disks"));
    let before = pattern(4, SIZE as usize);
    s3_content(&store, "disks", "vm1", SIZE, Some(&before));
    let checksum = mirror(
        &s3_spec(&store, "disks", "vm1", SIZE),
        &["--s3-credentials", credentials.to_str().unwrap()],
    );
    assert_store_holds(&s3_content(&store, "disks", "vm1", SIZE, None), checksum, &before);

    let options = RedisOptions::cluster(cluster.addresses(), "vm2");
    let checksum = mirror(&cluster_spec(&cluster.addresses(), "vm2", SIZE), &[]);
    assert_store_holds(
        &redis_content(&options, SIZE, None),
        checksum,
        &vec![0; SIZE as usize],
    );
    assert!(
        cluster.key_counts().iter().all(|&keys| keys > 0),
        "every master holds chunks: {:?}",
        cluster.key_counts()
    );
}

#[test]
fn a_store_that_is_down_or_refuses_the_credentials_is_named() {
    let mut server = match RedisServer::start(&["--requirepass", "sesame"]) {
        Ok(server) => server,
        Err(reason) => return skip(&reason),
    };
    let dir = tempfile::tempdir().unwrap();
    let spec = redis_spec(&server.address(), "auth", SIZE);
    let endpoint = format!("redis://{}", server.address());
    let mirror_args = ["mirror", "--remote", &spec, "--chunk-size", "64KiB"];

    for env in [vec![], vec![("R3MAP_REDIS_PASSWORD", "wrong")]] {
        let (ok, _, stderr) = r3map_with_env(&mirror_args, &env);
        assert!(!ok, "a refused password must fail");
        assert!(
            stderr.contains("refused the credentials") && stderr.contains(&endpoint),
            "{stderr}"
        );
    }
    // The right password, from the environment and from a file.
    let (ok, stdout, stderr) = r3map_with_env(&mirror_args, &[("R3MAP_REDIS_PASSWORD", "sesame")]);
    assert!(ok, "{stdout}\n{stderr}");
    let password = dir.path().join("password");
    std::fs::write(&password, "sesame\n").unwrap();
    let mut args = mirror_args.to_vec();
    args.extend(["--redis-password-file", password.to_str().unwrap()]);
    let (ok, stdout, stderr) = r3map_with_env(&args, &[]);
    assert!(ok, "{stdout}\n{stderr}");

    server.kill();
    let (ok, _, stderr) = r3map_with_env(&args, &[]);
    assert!(
        !ok && stderr.contains(&endpoint) && stderr.contains("refused"),
        "{stderr}"
    );

    // S3: wrong keys, and a gateway that is not there.
    let store = match SeaweedFs::start() {
        Ok(store) => store,
        Err(reason) => return skip(&reason),
    };
    r3map_core::testing::block_on(store.create_bucket("locked"));
    let wrong = dir.path().join("wrong-credentials");
    std::fs::write(
        &wrong,
        "[default]\naws_access_key_id = r3map-test-key\naws_secret_access_key = nope\n",
    )
    .unwrap();
    let spec = s3_spec(&store, "locked", "x", SIZE);
    let (ok, _, stderr) = r3map_with_env(
        &[
            "serve",
            &spec,
            "--listen",
            "127.0.0.1:0",
            "--s3-credentials",
            wrong.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!ok, "serve with refused S3 keys must fail");
    assert!(
        stderr.contains("refused the credentials") && stderr.contains(&store.endpoint()),
        "{stderr}"
    );
    let absent = format!("http://127.0.0.1:{}", free_port());
    let spec = format!("s3://locked/x?endpoint={absent}&size=1MiB");
    let (ok, _, stderr) = r3map_with_env(
        &["mirror", "--remote", &spec, "--remote-timeout", "5s"],
        &[
            ("AWS_ACCESS_KEY_ID", "r3map-test-key"),
            ("AWS_SECRET_ACCESS_KEY", "r3map-test-secret"),
        ],
    );
    assert!(!ok && stderr.contains(&absent), "{stderr}");
    // No credentials anywhere: says where it looked.
    let (ok, _, stderr) = r3map_with_env(
        &["mirror", "--remote", &spec],
        &[("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")],
    );
    assert!(!ok && stderr.contains("no S3 credentials"), "{stderr}");
}

/// `migrate seed` and `migrate leech` take the store credentials flags: a resource in a Redis
/// server that requires a password migrates into another prefix of it (`--to redis://…`), and
/// the destination holds the source's bytes.
#[test]
fn a_migration_reads_and_writes_a_store_that_requires_a_password() {
    let server = match RedisServer::start(&["--requirepass", "sesame"]) {
        Ok(server) => server,
        Err(reason) => return skip(&reason),
    };
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "sesame\n").unwrap();
    let options = |prefix: &str| RedisOptions {
        password: Some("sesame".into()),
        ..RedisOptions::standalone(server.address(), prefix)
    };
    let content = pattern(21, SIZE as usize);
    redis_content(&options("src"), SIZE, Some(&content));

    let (src, dest) = (
        redis_spec(&server.address(), "src", SIZE),
        redis_spec(&server.address(), "dest", SIZE),
    );
    let password = password.to_str().unwrap();
    let mut seeder = Proc::start(&[
        "migrate",
        "seed",
        &src,
        "--chunk-size",
        "64KiB",
        "--listen",
        "127.0.0.1:0",
        "--redis-password-file",
        password,
    ]);
    let uri = common::reported_address(&mut seeder, "seeding ", LONG);
    let mut leecher = Proc::start(&[
        "migrate",
        "leech",
        &uri,
        "--to",
        &dest,
        "--redis-password-file",
        password,
    ]);
    leecher.wait_for("migration complete", LONG);
    assert!(leecher.wait_exit(LONG), "the leecher failed");
    assert!(seeder.wait_exit(LONG), "the seeder failed");
    assert!(
        redis_content(&options("dest"), SIZE, None) == content,
        "the destination prefix does not hold the migrated bytes"
    );
}

/// `rediss://` to a TLS-only Redis port whose certificate a private CA signed (`r3map cert`):
/// with `tls-ca=PATH` the store reads and writes chunks byte for byte, in process and through
/// `r3map mirror`; without the CA (system roots), with another CA, and with plain `redis://` to
/// the TLS port, `r3map` fails at once, naming the endpoint and the way out.
#[test]
fn rediss_verifies_the_server_against_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (certs, other) = (dir.path().join("certs"), dir.path().join("other"));
    for dir in [&certs, &other] {
        let (ok, _, stderr) = r3map_with_env(&["cert", dir.to_str().unwrap()], &[]);
        assert!(ok, "r3map cert: {stderr}");
    }
    let server = match RedisServer::start_tls(&certs, &[]) {
        Ok(server) => server,
        Err(reason) => return skip(&reason),
    };
    let ca = certs.join("ca-cert.pem");
    let options = RedisOptions {
        tls: true,
        tls_ca: Some(ca.clone()),
        ..RedisOptions::standalone(server.address(), "tls")
    };
    let before = pattern(5, SIZE as usize);
    redis_content(&options, SIZE, Some(&before));
    assert!(
        redis_content(&options, SIZE, None) == before,
        "chunks written over TLS do not read back byte for byte"
    );
    let address = server.address();
    let spec = |scheme: &str, query: &str| format!("{scheme}://{address}/tls?size={SIZE}&chunk=64KiB{query}");
    let checksum = mirror(&spec("rediss", &format!("&tls-ca={}", ca.display())), &[]);
    assert_store_holds(&redis_content(&options, SIZE, None), checksum, &before);

    let fails = |spec: &str| {
        let start = std::time::Instant::now();
        let (ok, _, stderr) = r3map_with_env(&["mirror", "--remote", spec, "--remote-timeout", "10s"], &[]);
        assert!(!ok, "{spec} must fail");
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{spec} took {:?} to fail",
            start.elapsed()
        );
        stderr
    };
    let endpoint = format!("rediss://{address}");
    let stderr = fails(&spec("rediss", ""));
    assert!(
        stderr.contains(&endpoint)
            && stderr.contains("system's trusted roots")
            && stderr.contains("tls-ca=PATH"),
        "{stderr}"
    );
    let wrong = other.join("ca-cert.pem");
    let stderr = fails(&spec("rediss", &format!("&tls-ca={}", wrong.display())));
    assert!(
        stderr.contains(&endpoint)
            && stderr.contains("not trusted")
            && stderr.contains(wrong.to_str().unwrap()),
        "{stderr}"
    );
    let stderr = fails(&spec("redis", ""));
    assert!(
        stderr.contains(&format!("redis://{address}")) && stderr.contains("use rediss://"),
        "{stderr}"
    );
    let stderr = fails(&format!(
        "redis://{address}/tls?size={SIZE}&tls-ca={}",
        ca.display()
    ));
    assert!(stderr.contains("use rediss://"), "{stderr}");
}
