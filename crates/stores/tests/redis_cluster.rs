//! The Redis backend against a real Redis Cluster (`redis-server --cluster-enabled yes` processes
//! joined with `redis-cli --cluster create` on loopback ports): the conformance suite, chunks
//! spread over every master, errors naming the nodes, and a master failing over to its replica
//! while the backend is in use.

use std::sync::Arc;
use std::time::{Duration, Instant};

use r3map_core::testing::{self, block_on, pattern, skip};
use r3map_core::Backend;
use r3map_stores::testing::RedisCluster;
use r3map_stores::{open_backend, KeyedOptions, RedisOptions, RedisStore};

async fn backend(options: &RedisOptions, size: u64, chunk: u64) -> Arc<dyn Backend> {
    let store = RedisStore::connect(options)
        .await
        .expect("connect to the cluster");
    let keyed = KeyedOptions {
        deadline: Duration::from_secs(10),
        ..KeyedOptions::default()
    };
    Arc::new(open_backend(store, size, chunk, keyed).unwrap())
}

#[test]
fn three_masters_match_the_model_and_share_the_chunks() {
    let cluster = match RedisCluster::start(3, 0) {
        Ok(cluster) => cluster,
        Err(reason) => return skip(&reason),
    };
    // One node named: the others are discovered from it.
    let options = RedisOptions::cluster(vec![cluster.addresses()[1].clone()], "spread");
    block_on(async {
        let size = 96 * 4096 + 123;
        let backend = backend(&options, size, 4096).await;
        let data = pattern(5, size as usize);
        backend.write_at(0, &data).await.unwrap();
        testing::check_content(&*backend, &data).await.unwrap();
        // Keys hash to slots on their whole name (no hash tags), so every master holds some.
        let counts = cluster.key_counts();
        assert_eq!(counts.iter().sum::<u64>(), 97, "one key per chunk: {counts:?}");
        assert!(
            counts.iter().all(|&count| count >= 10),
            "every master serves a share of the chunks: {counts:?}"
        );

        let concurrent = backend_for(&cluster, "concurrent", 64 * 512 + 77, 512).await;
        testing::check_concurrent(concurrent, 1, 8, 200).await.unwrap();
    });
}

async fn backend_for(cluster: &RedisCluster, prefix: &str, size: u64, chunk: u64) -> Arc<dyn Backend> {
    backend(&RedisOptions::cluster(cluster.addresses(), prefix), size, chunk).await
}

#[test]
fn cluster_errors_name_the_nodes() {
    let mut cluster = match RedisCluster::start(3, 0) {
        Ok(cluster) => cluster,
        Err(reason) => return skip(&reason),
    };
    let addresses = cluster.addresses();
    for node in cluster.nodes_mut() {
        node.kill();
    }
    block_on(async {
        let mut options = RedisOptions::cluster(addresses.clone(), "down");
        options.deadline = Duration::from_secs(5);
        let err = RedisStore::connect(&options).await.unwrap_err().to_string();
        assert!(
            err.contains(&format!("redis+cluster://{}", addresses.join(","))),
            "{err}"
        );
    });
}

#[test]
fn a_master_failing_over_to_its_replica_keeps_the_backend_working() {
    let mut cluster = match RedisCluster::start(3, 1) {
        Ok(cluster) => cluster,
        Err(reason) => return skip(&reason),
    };
    block_on(async {
        let size = 48 * 4096;
        let backend = backend_for(&cluster, "failover", size, 4096).await;
        let mut model = pattern(7, size as usize);
        backend.write_at(0, &model).await.unwrap();
        // Every write is on the replicas before the master dies (replication is asynchronous).
        cluster.wait_replicated();

        let victim = *cluster
            .master_ports()
            .first()
            .expect("the cluster names its serving masters");
        cluster.node_by_port(victim).kill();
        // Writes and reads go on, each retried until the replica took over (bounded).
        let start = Instant::now();
        let next = pattern(8, size as usize);
        loop {
            match backend.write_at(0, &next).await {
                Ok(()) => break,
                Err(err) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(60),
                        "no failover within 60 s: {err}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        model.copy_from_slice(&next);
        testing::check_content(&*backend, &model).await.unwrap();
        assert!(
            !cluster.master_ports().contains(&victim),
            "the killed master is no longer a master"
        );
    });
}
