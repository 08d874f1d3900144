//! The S3 backend against a real SeaweedFS object store (master, two volume servers, filer and
//! S3 gateway as separate `weed` processes on loopback): the conformance suite, the Go r3map's
//! object names, refused credentials, a missing bucket, virtual-hosted addressing, and a gateway
//! that is killed and restarted.
//!
//! SeaweedFS takes seconds to start, so one store serves all the checks of a test, each in its
//! own bucket or prefix.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::test_runner::{Config, TestRunner};
use r3map_core::testing::{self, block_on, pattern, skip};
use r3map_core::Backend;
use r3map_stores::testing::SeaweedFs;
use r3map_stores::{open_backend, Credentials, KeyedOptions, S3Options, S3Store};

fn options(store: &SeaweedFs, bucket: &str, prefix: &str) -> S3Options {
    S3Options::new(
        store.endpoint().parse().unwrap(),
        bucket,
        prefix,
        SeaweedFs::credentials(),
    )
}

async fn backend(options: &S3Options, size: u64, chunk: u64) -> Arc<dyn Backend> {
    let store = S3Store::connect(options).await.expect("open the bucket");
    Arc::new(open_backend(store, size, chunk, KeyedOptions::default()).unwrap())
}

/// An object's bytes, or `None` for 404, fetched with a plain signed GET (not the backend).
async fn raw_get(store: &SeaweedFs, bucket: &str, key: &str) -> Option<Vec<u8>> {
    use rusty_s3::S3Action;
    let bucket = rusty_s3::Bucket::new(
        store.endpoint().parse().unwrap(),
        rusty_s3::UrlStyle::Path,
        bucket.to_string(),
        "us-east-1",
    )
    .unwrap();
    let credentials = SeaweedFs::credentials();
    let url = bucket
        .get_object(Some(&credentials), key)
        .sign(Duration::from_secs(60));
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(url)
        .send()
        .await
        .unwrap();
    match response.status().as_u16() {
        404 => None,
        200 => Some(response.bytes().await.unwrap().to_vec()),
        other => panic!("GET {key}: {other}"),
    }
}

#[test]
fn matches_model_sequentially_and_concurrently() {
    let store = match SeaweedFs::start() {
        Ok(store) => store,
        Err(reason) => return skip(&reason),
    };
    block_on(store.create_bucket("model"));
    let case = AtomicU64::new(0);
    let strategy = (1u64..3000, 0u64..8, 1u64..3000, testing::ops_strategy(8000, 20));
    TestRunner::new(Config::with_cases(16))
        .run(&strategy, |(chunk, chunks, tail, ops)| {
            let size = chunks * chunk + tail;
            let prefix = format!("case{}", case.fetch_add(1, Ordering::Relaxed));
            block_on(async {
                let backend = backend(&options(&store, "model", &prefix), size, chunk).await;
                testing::check_against_model(&*backend, 1, &ops).await
            })
        })
        .unwrap();
    block_on(async {
        let backend = backend(&options(&store, "model", "concurrent"), 48 * 1024 + 300, 1024).await;
        testing::check_concurrent(backend, 1, 8, 60).await.unwrap();
    });
}

#[test]
fn objects_follow_the_go_layout_and_errors_name_the_endpoint() {
    let store = match SeaweedFs::start() {
        Ok(store) => store,
        Err(reason) => return skip(&reason),
    };
    block_on(async {
        store.create_bucket("layout").await;
        let backend = backend(&options(&store, "layout", "vm1"), 4 * 4096, 4096).await;
        let mut all = vec![0xFF; 4 * 4096];
        backend.read_at(0, &mut all).await.unwrap();
        assert!(all.iter().all(|&b| b == 0), "missing objects read as zeros");
        assert_eq!(
            raw_get(&store, "layout", "vm1-0").await,
            None,
            "reads create nothing"
        );

        backend.write_at(8192 + 5, b"chunk two").await.unwrap();
        let object = raw_get(&store, "layout", "vm1-8192")
            .await
            .expect("object vm1-8192");
        assert_eq!(object.len(), 4096);
        assert_eq!(&object[5..14], b"chunk two");
        backend.trim(8192, 4096).await.unwrap();
        assert_eq!(
            raw_get(&store, "layout", "vm1-8192").await,
            None,
            "trim deletes the object"
        );

        // Refused credentials and a missing bucket: clear errors naming the endpoint.
        let mut wrong = options(&store, "layout", "vm1");
        wrong.credentials = Credentials::new("r3map-test-key", "not-the-secret");
        let err = S3Store::connect(&wrong).await.unwrap_err().to_string();
        assert!(err.contains("refused the credentials"), "{err}");
        assert!(err.contains(&store.endpoint()), "{err}");
        wrong.credentials = Credentials::new("nobody", "nothing");
        let err = S3Store::connect(&wrong).await.unwrap_err().to_string();
        assert!(err.contains("refused the credentials"), "{err}");
        let err = S3Store::connect(&options(&store, "no-such-bucket", "x"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("does not exist") && err.contains("no-such-bucket"),
            "{err}"
        );

        // An object of another length is an error, not silently used: a 4 KiB object where
        // 1 KiB chunks are expected.
        backend.write_at(4096, &pattern(1, 4096)).await.unwrap();
        let small_chunks = self::backend(&options(&store, "layout", "vm1"), 16 * 1024, 1024).await;
        let err = small_chunks
            .read_at(4096, &mut [0; 1024])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("another chunk size") && err.contains("vm1-4096"),
            "{err}"
        );
    });
}

#[test]
fn virtual_hosted_addressing_reaches_the_same_objects() {
    let store = match SeaweedFs::start() {
        Ok(store) => store,
        Err(reason) => return skip(&reason),
    };
    block_on(async {
        store.create_bucket("vhost").await;
        let path_style = backend(&options(&store, "vhost", "p"), 8192, 4096).await;
        path_style.write_at(0, &pattern(9, 8192)).await.unwrap();
        // The gateway serves {bucket}.{domain} (weed s3 -domainName); the name resolves to the
        // gateway's loopback address through the client's resolve override, not DNS.
        let mut virtual_hosted = options(&store, "vhost", "p");
        let domain = SeaweedFs::DOMAIN;
        let port = virtual_hosted.endpoint.port().unwrap();
        virtual_hosted.endpoint = format!("http://{domain}:{port}").parse().unwrap();
        virtual_hosted.virtual_hosted = true;
        virtual_hosted.resolve = vec![(format!("vhost.{domain}"), ([127, 0, 0, 1], port).into())];
        let backend = backend(&virtual_hosted, 8192, 4096).await;
        let mut buf = vec![0; 8192];
        backend.read_at(0, &mut buf).await.unwrap();
        assert_eq!(buf, pattern(9, 8192));
    });
}

#[test]
fn killed_and_restarted_gateway_keeps_every_acknowledged_write() {
    let mut store = match SeaweedFs::start() {
        Ok(store) => store,
        Err(reason) => return skip(&reason),
    };
    block_on(async {
        store.create_bucket("restart").await;
        let size = 16 * 4096;
        let backend = backend(&options(&store, "restart", "r"), size, 4096).await;
        let data = pattern(21, size as usize);
        backend.write_at(0, &data).await.unwrap();

        store.kill_gateway();
        let err = backend.read_at(0, &mut [0; 4096]).await.unwrap_err();
        assert!(
            err.is_connection_loss(),
            "a dead gateway is a connection error: {err:?}"
        );
        assert!(err.to_string().contains(&store.endpoint()), "{err}");

        store.restart_gateway();
        // The HTTP pool opens fresh connections; nothing to retry.
        let mut buf = vec![0; size as usize];
        backend.read_at(0, &mut buf).await.unwrap();
        assert!(
            buf == data,
            "an acknowledged write was lost across the gateway's kill -9"
        );
        backend.write_at(4096, &pattern(22, 4096)).await.unwrap();
    });
}
