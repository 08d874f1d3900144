//! The Redis backend against a real `redis-server` process: the conformance suite (sequential
//! property test and concurrent workload against a `Vec<u8>` model), the Go r3map's key layout,
//! refused credentials, a server that is down, stopped (deadline) or killed and restarted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::test_runner::{Config, TestRunner};
use r3map_core::testing::{self, block_on, pattern, skip};
use r3map_core::{Backend, Error};
use r3map_stores::testing::{redis_command, RedisServer};
use r3map_stores::{open_backend, KeyLayout, KeyedOptions, RedisOptions, RedisStore};

fn options(server: &RedisServer, prefix: &str) -> RedisOptions {
    RedisOptions::standalone(server.address(), prefix)
}

async fn backend(options: &RedisOptions, size: u64, chunk: u64, deadline: Duration) -> Arc<dyn Backend> {
    let store = RedisStore::connect(options)
        .await
        .expect("connect to redis-server");
    let keyed = KeyedOptions {
        deadline,
        ..KeyedOptions::default()
    };
    Arc::new(open_backend(store, size, chunk, keyed).unwrap())
}

/// A plain redis-rs connection (not the backend's), with no response timeout: its default of
/// 500 ms is too short for an fsync per write on a loaded machine.
async fn raw_connection(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(format!("redis://{}", server.address())).unwrap();
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// Raw bytes of one key, through the redis crate (not through the backend).
async fn raw_get(server: &RedisServer, key: &str) -> Option<Vec<u8>> {
    let mut connection = raw_connection(server).await;
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut connection)
        .await
        .unwrap()
}

#[test]
fn matches_model() {
    let server = match RedisServer::start(&[]) {
        Ok(server) => server,
        Err(reason) => return skip(&reason),
    };
    let case = AtomicU64::new(0);
    let strategy = (1u64..600, 0u64..10, 1u64..600, testing::ops_strategy(2000, 30));
    TestRunner::new(Config::with_cases(32))
        .run(&strategy, |(chunk, chunks, tail, ops)| {
            // A size that is rarely a multiple of the chunk size; a fresh prefix per case.
            let size = chunks * chunk + tail;
            let prefix = format!("model{}", case.fetch_add(1, Ordering::Relaxed));
            block_on(async {
                let backend = backend(&options(&server, &prefix), size, chunk, Duration::from_secs(10)).await;
                testing::check_against_model(&*backend, 1, &ops).await
            })
        })
        .unwrap();
}

#[test]
fn concurrent_workload_matches_model() {
    let server = match RedisServer::start(&[]) {
        Ok(server) => server,
        Err(reason) => return skip(&reason),
    };
    block_on(async {
        let backend = backend(
            &options(&server, "concurrent"),
            64 * 512 + 77,
            512,
            Duration::from_secs(10),
        )
        .await;
        testing::check_concurrent(backend, 1, 8, 200).await.unwrap();
    });
}

#[test]
fn keys_are_go_r3map_offsets_and_missing_keys_read_as_zeros() {
    let server = match RedisServer::start(&[]) {
        Ok(server) => server,
        Err(reason) => return skip(&reason),
    };
    block_on(async {
        // The Go r3map's Redis backend keys chunks by their decimal byte offset, no prefix.
        let chunk = pattern(7, 4096);
        let mut connection = raw_connection(&server).await;
        let () = redis::cmd("SET")
            .arg("8192")
            .arg(&chunk)
            .query_async(&mut connection)
            .await
            .unwrap();

        let backend = backend(&options(&server, ""), 4 * 4096, 4096, Duration::from_secs(10)).await;
        let mut all = vec![0xFF; 4 * 4096];
        backend.read_at(0, &mut all).await.unwrap();
        assert!(
            all[..8192].iter().all(|&b| b == 0),
            "missing keys must read as zeros"
        );
        assert_eq!(&all[8192..12288], &chunk[..]);
        assert!(all[12288..].iter().all(|&b| b == 0));

        // Unaligned writes become whole chunks under the offset keys.
        backend.write_at(4096 + 10, b"hello").await.unwrap();
        let stored = raw_get(&server, "4096").await.expect("key 4096 written");
        assert_eq!(stored.len(), 4096);
        assert_eq!(&stored[10..15], b"hello");
        assert!(raw_get(&server, "0").await.is_none(), "reads never create keys");

        // With a prefix: PREFIX-OFFSET. Trimming whole chunks deletes their keys.
        let prefixed = backend_with_prefix(&server, "vm1").await;
        prefixed.write_at(0, &pattern(3, 8192)).await.unwrap();
        assert_eq!(
            raw_get(&server, "vm1-4096").await,
            Some(pattern(3, 8192)[4096..].to_vec())
        );
        prefixed.trim(0, 4096).await.unwrap();
        assert!(raw_get(&server, "vm1-0").await.is_none(), "trim deletes the key");
        let mut buf = vec![0xFF; 4096];
        prefixed.read_at(0, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&b| b == 0));

        // The folder layout: PREFIX/OFFSET.
        let mut folder = options(&server, "vms/vm2");
        folder.layout = KeyLayout::Folder;
        let foldered = self::backend(&folder, 4 * 4096, 4096, Duration::from_secs(10)).await;
        foldered.write_at(4096, &pattern(4, 4096)).await.unwrap();
        assert_eq!(raw_get(&server, "vms/vm2/4096").await, Some(pattern(4, 4096)));
        assert!(raw_get(&server, "vms/vm2-4096").await.is_none());
    });
}

async fn backend_with_prefix(server: &RedisServer, prefix: &str) -> Arc<dyn Backend> {
    backend(&options(server, prefix), 4 * 4096, 4096, Duration::from_secs(10)).await
}

#[test]
fn a_value_of_another_chunk_size_is_an_error_not_silent_corruption() {
    let server = match RedisServer::start(&[]) {
        Ok(server) => server,
        Err(reason) => return skip(&reason),
    };
    block_on(async {
        assert_eq!(
            redis_command(server.port(), "SET odd-0 short").as_deref(),
            Some("+OK")
        );
        let backend = backend(&options(&server, "odd"), 8192, 4096, Duration::from_secs(10)).await;
        let err = backend.read_at(0, &mut [0; 4096]).await.unwrap_err();
        assert!(err.to_string().contains("another chunk size"), "{err}");
        assert!(err.to_string().contains(&server.address()), "{err}");
    });
}

#[test]
fn refused_credentials_are_named_with_the_endpoint() {
    let server = match RedisServer::start(&["--requirepass", "sesame"]) {
        Ok(server) => server,
        Err(reason) => return skip(&reason),
    };
    block_on(async {
        let mut options = options(&server, "auth");
        for password in [None, Some("wrong".to_string())] {
            options.password = password;
            let err = RedisStore::connect(&options).await.unwrap_err();
            let message = err.to_string();
            assert!(message.contains("refused the credentials"), "{message}");
            assert!(
                message.contains(&format!("redis://{}", server.address())),
                "{message}"
            );
        }
        options.password = Some("sesame".into());
        let store = RedisStore::connect(&options).await.unwrap();
        let backend = open_backend(store, 4096, 4096, KeyedOptions::default()).unwrap();
        backend.write_at(0, &[1; 4096]).await.unwrap();
    });
}

#[test]
fn a_server_that_is_down_gives_a_connection_error_naming_it() {
    let mut server = match RedisServer::start(&[]) {
        Ok(server) => server,
        Err(reason) => return skip(&reason),
    };
    server.kill();
    block_on(async {
        let err = RedisStore::connect(&options(&server, "down")).await.unwrap_err();
        assert!(err.is_connection_loss(), "{err:?}");
        assert!(err.to_string().contains(&server.address()), "{err}");
    });
}

#[test]
fn a_stopped_server_times_out_within_the_deadline() {
    let server = match RedisServer::start(&[]) {
        Ok(server) => server,
        Err(reason) => return skip(&reason),
    };
    block_on(async {
        let deadline = Duration::from_millis(500);
        let backend = backend(&options(&server, "stopped"), 8192, 4096, deadline).await;
        backend.write_at(0, &[5; 8192]).await.unwrap();
        server.pause(true);
        let read = backend.read_at(0, &mut [0; 8192]).await;
        let write = backend.write_at(0, &[6; 4096]).await;
        server.pause(false);
        assert!(
            matches!(read, Err(Error::Timeout(_)) | Err(Error::Io(_))),
            "{read:?}"
        );
        assert!(
            matches!(write, Err(Error::Timeout(_)) | Err(Error::Io(_))),
            "{write:?}"
        );
    });
}

#[test]
fn killed_and_restarted_server_keeps_every_acknowledged_write() {
    let mut server = match RedisServer::start(&[]) {
        Ok(server) => server,
        Err(reason) => return skip(&reason),
    };
    block_on(async {
        let size = 32 * 4096;
        let backend = backend(&options(&server, "restart"), size, 4096, Duration::from_secs(5)).await;
        let mut model = vec![0u8; size as usize];
        let first = pattern(11, size as usize);
        backend.write_at(0, &first).await.unwrap();
        model.copy_from_slice(&first);

        server.kill();
        // Down: errors, not hangs (each request has a deadline; refused connections fail fast).
        assert!(backend.read_at(0, &mut [0; 4096]).await.is_err());

        server.restart();
        // The pool reconnects by itself; the first request after the restart may still meet a
        // dead connection, so retry a bounded number of times.
        let mut buf = vec![0u8; size as usize];
        let mut attempts = 0;
        loop {
            attempts += 1;
            match backend.read_at(0, &mut buf).await {
                Ok(()) => break,
                Err(err) if attempts < 20 && err.is_connection_loss() => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(err) => panic!("no reconnect after {attempts} attempts: {err}"),
            }
        }
        assert!(buf == model, "an acknowledged write was lost across kill -9");
        let second = pattern(12, 4096);
        backend.write_at(4096, &second).await.unwrap();
        model[4096..8192].copy_from_slice(&second);
        testing::check_content(&*backend, &model).await.unwrap();
    });
}
