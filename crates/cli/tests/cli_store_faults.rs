//! `r3map mount` of Redis, Redis Cluster and S3 resources while the store fails: redis-server
//! killed (SIGKILL) and restarted on its append-only file, the S3 gateway killed and restarted,
//! a cluster master killed so that its replica takes over. The mount keeps running, reconnects,
//! and loses no write that an fsync acknowledged.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::stores::{cluster_spec, redis_content, redis_spec, s3_content, s3_credentials_file, s3_spec};
use common::{have_fuse, mounted_path, Proc};
use r3map_core::testing::{pattern, skip};
use r3map_stores::testing::{RedisCluster, RedisServer, SeaweedFs};
use r3map_stores::RedisOptions;

const LONG: Duration = Duration::from_secs(120);
const SIZE: u64 = 8 << 20;

/// A mount of `remote` (`--managed` or direct) with 64 KiB chunks, no background push (only
/// fsync pushes), and `extra` flags; returns it and the mounted file once it is ready.
fn mount(remote: &str, mnt: &std::path::Path, managed: bool, extra: &[&str]) -> (Proc, std::fs::File) {
    let mut args = vec![
        "mount",
        remote,
        mnt.to_str().unwrap(),
        "--chunk-size",
        "64KiB",
        "--remote-timeout",
        "60s",
    ];
    if managed {
        args.extend(["--managed", "--push-interval", "1h"]);
    }
    args.extend_from_slice(extra);
    let mut mount = Proc::start(&args);
    let path = mounted_path(&mount.wait_for("mounted ", LONG));
    if managed {
        mount.wait_for("pulled:", LONG);
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    (mount, file)
}

/// What the resource must hold: the writes the test made, in order, on zeros.
struct Model(Vec<u8>);

impl Model {
    fn new() -> Self {
        Self(vec![0; SIZE as usize])
    }

    fn write(&mut self, file: &std::fs::File, seed: u64, offset: u64, len: usize) {
        let data = pattern(seed, len);
        file.write_all_at(&data, offset).unwrap();
        self.0[offset as usize..offset as usize + len].copy_from_slice(&data);
    }

    fn check_file(&self, file: &std::fs::File, what: &str) {
        let mut back = vec![0; SIZE as usize];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back == self.0, "the mounted file differs from the model {what}");
    }

    fn check_store(&self, content: &[u8], what: &str) {
        if let Some(at) = content.iter().zip(&self.0).position(|(a, b)| a != b) {
            panic!("the store differs from the model at byte {at} {what}");
        }
    }
}

/// A managed mount of Redis: an fsynced write is in Redis (the push is an hour away, so only
/// the fsync can have put it there); redis-server dies; writes and reads go on locally; the
/// server restarts on its append-only file; the next fsync reconnects and pushes; nothing that
/// an fsync acknowledged is lost, and after a clean exit Redis holds every write.
#[test]
fn a_managed_redis_mount_survives_a_killed_server_and_loses_no_fsynced_write() {
    if !have_fuse() {
        return;
    }
    let mut server = match RedisServer::start(&[]) {
        Ok(server) => server,
        Err(reason) => return skip(&reason),
    };
    let options = RedisOptions::standalone(server.address(), "vm");
    let dir = tempfile::tempdir().unwrap();
    let (mount, file) = mount(
        &redis_spec(&server.address(), "vm", SIZE),
        &dir.path().join("mnt"),
        true,
        &[],
    );
    let mut model = Model::new();
    model.write(&file, 1, 1_000_000, 200_000);
    file.sync_all().unwrap();
    model.check_store(&redis_content(&options, SIZE, None), "after the first fsync");

    server.kill();
    model.write(&file, 2, 5_000_000, 300_000);
    model.check_file(&file, "while redis-server is down");

    server.restart();
    model.check_store(
        &redis_content(&options, SIZE, None)[..5_000_000],
        "after the restart",
    );
    file.sync_all()
        .expect("fsync after the restart (the mount reconnects)");
    model.check_store(&redis_content(&options, SIZE, None), "after the second fsync");
    model.write(&file, 3, 7_000_000, 100_000);
    drop(file);
    assert!(mount.terminate(LONG), "the mount did not push and exit");
    model.check_store(&redis_content(&options, SIZE, None), "after the mount exited");
}

/// A direct mount of Redis: every write goes to the server; after redis-server is killed and
/// restarted, the mount reconnects on the next request and reads every fsynced write back.
#[test]
fn a_direct_redis_mount_reconnects_after_the_server_restarts() {
    if !have_fuse() {
        return;
    }
    let mut server = match RedisServer::start(&[]) {
        Ok(server) => server,
        Err(reason) => return skip(&reason),
    };
    let options = RedisOptions::standalone(server.address(), "direct");
    let dir = tempfile::tempdir().unwrap();
    let (mount, file) = mount(
        &redis_spec(&server.address(), "direct", SIZE),
        &dir.path().join("mnt"),
        false,
        &[],
    );
    let mut model = Model::new();
    model.write(&file, 4, 123_456, 500_000);
    file.sync_all().unwrap();

    server.kill();
    server.restart();
    // Reads and the fsynced write after the restart need a new connection to the store.
    model.check_file(&file, "after the restart");
    model.write(&file, 5, 4_000_000, 70_000);
    file.sync_all().unwrap();
    drop(file);
    assert!(mount.terminate(LONG));
    model.check_store(&redis_content(&options, SIZE, None), "after the mount exited");
}

/// A managed mount of S3 through a SeaweedFS gateway that is killed and restarted: same
/// guarantees as for Redis.
#[test]
fn a_managed_s3_mount_survives_a_killed_gateway_and_loses_no_fsynced_write() {
    if !have_fuse() {
        return;
    }
    let mut store = match SeaweedFs::start() {
        Ok(store) => store,
        Err(reason) => return skip(&reason),
    };
    r3map_core::testing::block_on(store.create_bucket("faults"));
    let dir = tempfile::tempdir().unwrap();
    let credentials = s3_credentials_file(dir.path());
    let (mount, file) = mount(
        &s3_spec(&store, "faults", "vm", SIZE),
        &dir.path().join("mnt"),
        true,
        &["--s3-credentials", credentials.to_str().unwrap()],
    );
    let stored = |store: &SeaweedFs| s3_content(store, "faults", "vm", SIZE, None);
    let mut model = Model::new();
    model.write(&file, 6, 2_000_000, 400_000);
    file.sync_all().unwrap();
    model.check_store(&stored(&store), "after the first fsync");

    store.kill_gateway();
    model.write(&file, 7, 6_000_000, 300_000);
    model.check_file(&file, "while the gateway is down");

    store.restart_gateway();
    model.check_store(&stored(&store)[..6_000_000], "after the restart");
    file.sync_all().expect("fsync after the gateway restarted");
    model.check_store(&stored(&store), "after the second fsync");
    model.write(&file, 8, 100, 1000);
    drop(file);
    assert!(mount.terminate(LONG), "the mount did not push and exit");
    model.check_store(&stored(&store), "after the mount exited");
}

/// A managed mount of a 3-master cluster with one replica each: a master is killed after its
/// replica holds everything; reads and writes go on, the next fsync succeeds once the replica
/// has taken over (within the remote timeout), and the cluster holds every write.
#[test]
fn a_cluster_master_failing_over_keeps_the_mount_working() {
    if !have_fuse() {
        return;
    }
    let mut cluster = match RedisCluster::start(3, 1) {
        Ok(cluster) => cluster,
        Err(reason) => return skip(&reason),
    };
    let options = RedisOptions::cluster(cluster.addresses(), "ha");
    let dir = tempfile::tempdir().unwrap();
    let (mount, file) = mount(
        &cluster_spec(&cluster.addresses(), "ha", SIZE),
        &dir.path().join("mnt"),
        true,
        &[],
    );
    let mut model = Model::new();
    model.write(&file, 9, 0, SIZE as usize);
    file.sync_all().unwrap();
    cluster.wait_replicated();

    let victim = *cluster
        .master_ports()
        .get(1)
        .expect("the cluster names its serving masters");
    cluster.node_by_port(victim).kill();
    model.write(&file, 10, 3_000_000, 2_000_000);
    model.check_file(&file, "while a master is down");
    file.sync_all().expect("fsync across the failover");
    assert!(
        !cluster.master_ports().contains(&victim),
        "the killed node still serves slots"
    );
    model.check_store(&redis_content(&options, SIZE, None), "after the failover");
    drop(file);
    assert!(mount.terminate(LONG));
}
