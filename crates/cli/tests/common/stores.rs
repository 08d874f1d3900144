//! Redis and S3 resources for the CLI's store tests: specifications for `r3map`, and the content
//! a store holds read back through `r3map-stores` (not through the `r3map` process under test).

use std::path::{Path, PathBuf};
use std::time::Duration;

use r3map_core::testing::block_on;
use r3map_core::Backend;
use r3map_stores::testing::SeaweedFs;
use r3map_stores::{open_backend, KeyedOptions, RedisOptions, RedisStore, S3Options, S3Store};

/// Chunk size of the store resources in these tests.
pub const CHUNK: u64 = 64 * 1024;

/// `redis://ADDR/PREFIX?size=SIZE&chunk=64KiB`.
pub fn redis_spec(address: &str, prefix: &str, size: u64) -> String {
    format!("redis://{address}/{prefix}?size={size}&chunk={CHUNK}")
}

/// `redis+cluster://A1,A2,…/PREFIX?size=SIZE&chunk=64KiB`.
pub fn cluster_spec(addresses: &[String], prefix: &str, size: u64) -> String {
    format!(
        "redis+cluster://{}/{prefix}?size={size}&chunk={CHUNK}",
        addresses.join(",")
    )
}

/// `s3://BUCKET/PREFIX?endpoint=URL&size=SIZE&chunk=64KiB`.
pub fn s3_spec(store: &SeaweedFs, bucket: &str, prefix: &str, size: u64) -> String {
    format!(
        "s3://{bucket}/{prefix}?endpoint={}&size={size}&chunk={CHUNK}",
        store.endpoint()
    )
}

/// An AWS-format credentials file in `dir` with the test gateway's keys.
pub fn s3_credentials_file(dir: &Path) -> PathBuf {
    let path = dir.join("s3-credentials");
    std::fs::write(
        &path,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            r3map_stores::testing::S3_ACCESS_KEY,
            r3map_stores::testing::S3_SECRET_KEY
        ),
    )
    .unwrap();
    path
}

fn keyed() -> KeyedOptions {
    KeyedOptions {
        deadline: Duration::from_secs(30),
        ..KeyedOptions::default()
    }
}

/// Reads or writes the whole resource through a fresh store connection.
pub fn redis_content(options: &RedisOptions, size: u64, write: Option<&[u8]>) -> Vec<u8> {
    block_on(async {
        let store = RedisStore::connect(options).await.expect("connect to redis");
        let backend = open_backend(store, size, CHUNK, keyed()).unwrap();
        access(&backend, size, write).await
    })
}

/// Like [`redis_content`], for an S3 resource.
pub fn s3_content(store: &SeaweedFs, bucket: &str, prefix: &str, size: u64, write: Option<&[u8]>) -> Vec<u8> {
    block_on(async {
        let options = S3Options::new(
            store.endpoint().parse().unwrap(),
            bucket,
            prefix,
            SeaweedFs::credentials(),
        );
        let s3 = S3Store::connect(&options).await.expect("open the bucket");
        let backend = open_backend(s3, size, CHUNK, keyed()).unwrap();
        access(&backend, size, write).await
    })
}

async fn access(backend: &dyn Backend, size: u64, write: Option<&[u8]>) -> Vec<u8> {
    if let Some(data) = write {
        backend.write_at(0, data).await.unwrap();
        backend.sync().await.unwrap();
    }
    let mut buf = vec![0; size as usize];
    backend.read_at(0, &mut buf).await.unwrap();
    buf
}
