//! Migrations over a real loopback gRPC connection: the migration crate's state-machine tests
//! with `GrpcSeederLink` in place of the in-process link (its fault-injecting `FlakyLink`
//! wraps the gRPC link), plus what only a network can do: a seeder server that goes away, the
//! Go protocol, and typed errors crossing the wire.

mod common;
#[path = "../../migration/tests/common/mod.rs"]
mod migration_common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use migration_common::{contents, Faults, FlakyLink, Writer};
use r3map_core::{testing, Backend, Error, MemoryBackend, SharedBackend};
use r3map_grpc::pb::migration::seeder_client::SeederClient;
use r3map_grpc::pb::migration::{SyncArgs, TrackArgs};
use r3map_grpc::{ClientOptions, GrpcSeederLink, GrpcServer};
use r3map_migration::{
    Leecher, LeecherOptions, MigrationError, RoundPolicy, Seeder, SeederHooks, SeederLink, SeederPhase,
    SessionId,
};

const SIZE: u64 = 8 << 20;
const CHUNK: u64 = 64 << 10;

async fn source() -> SharedBackend {
    let backend = MemoryBackend::new(SIZE);
    backend
        .write_at(0, &testing::pattern(1, SIZE as usize))
        .await
        .unwrap();
    Arc::new(backend)
}

fn options(rounds: RoundPolicy) -> LeecherOptions {
    LeecherOptions {
        pull_workers: 16,
        rounds,
        // Generous: a loaded machine must not turn a slow reply into a lost one.
        retry_for: Duration::from_secs(3),
        ..LeecherOptions::default()
    }
}

async fn serve(seeder: &Arc<Seeder>) -> common::Running {
    common::serve(GrpcServer::new(vec![]).seeder(seeder.clone())).await
}

async fn link(running: &common::Running) -> Arc<GrpcSeederLink> {
    let options = ClientOptions {
        request_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    Arc::new(GrpcSeederLink::connect(&running.addr(), options).await.unwrap())
}

fn flaky(link: Arc<GrpcSeederLink>) -> (Arc<FlakyLink>, Arc<Faults>) {
    let faults = Arc::new(Faults::default());
    let link = Arc::new(FlakyLink {
        seeder: link,
        faults: faults.clone(),
    });
    (link, faults)
}

async fn leech(link: Arc<dyn SeederLink>, rounds: RoundPolicy) -> Leecher {
    Leecher::open(link, Arc::new(MemoryBackend::new(SIZE)), options(rounds))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_written_during_migration_arrives_as_it_was_at_suspend() {
    let policies = [
        RoundPolicy::default(),
        RoundPolicy {
            max_rounds: 5,
            max_dirty: 1,
        },
    ];
    for (i, rounds) in policies.into_iter().enumerate() {
        let resource = source().await;
        let mut writer = Writer::new();
        let seeder = Seeder::new(resource.clone(), CHUNK, writer.hooks()).unwrap();
        let running = serve(&seeder).await;
        let link = link(&running).await;
        assert!(link.has_extension());
        assert_eq!(link.info().await.unwrap().chunk_size, CHUNK);
        writer.start(seeder.backend(), 1000, i as u64);
        let leecher = leech(link, rounds).await;
        writer.wait_for_more_writes(200).await;
        let found = leecher.precopy().await.unwrap();
        assert_eq!(
            found.len() as u32 > 0,
            rounds.max_rounds > 0,
            "rounds ran: {found:?}"
        );
        let report = leecher.finalize().await.unwrap();
        assert!(writer.is_suspended().await);
        assert_eq!(
            seeder.phase(),
            SeederPhase::HandedOff {
                session: leecher.session()
            }
        );
        // The suspend time crossed the wire: the downtime is measured from it.
        assert!(report.downtime <= report.downtime_bound, "{report:?}");
        let at_suspend = contents(&*resource).await;
        assert_ne!(
            at_suspend,
            testing::pattern(1, SIZE as usize),
            "the writer changed nothing"
        );
        let done = leecher.complete(true).await.unwrap();
        assert_eq!(done.verified_chunks, SIZE / CHUNK, "hashes over gRPC");
        assert_eq!(
            contents(&*leecher.backend()).await,
            at_suspend,
            "policy {rounds:?}"
        );
        assert!(leecher.status().repulled > 0);
        assert_eq!(seeder.phase(), SeederPhase::Closed);
        assert_eq!(writer.suspends.load(Ordering::SeqCst), 1);
        writer.stop().await;
        running.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replies_during_finalize_are_retried_without_a_second_suspend() {
    let resource = source().await;
    let mut writer = Writer::new();
    let seeder = Seeder::new(resource.clone(), CHUNK, writer.hooks()).unwrap();
    let running = serve(&seeder).await;
    writer.start(seeder.backend(), 3000, 3);
    let (link, faults) = flaky(link(&running).await);
    let leecher = leech(link, RoundPolicy::default()).await;
    writer.wait_for_more_writes(100).await;
    faults.sync_replies_lost.store(2, Ordering::SeqCst);
    faults.commits_lost.store(1, Ordering::SeqCst);
    faults.commit_replies_lost.store(1, Ordering::SeqCst);
    let report = leecher.finalize().await.unwrap();
    assert!(report.dirty_chunks > 0);
    assert_eq!(writer.suspends.load(Ordering::SeqCst), 1);
    let at_suspend = contents(&*resource).await;
    leecher.complete(true).await.unwrap();
    assert_eq!(contents(&*leecher.backend()).await, at_suspend);
    writer.stop().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_lost_during_finalize_keeps_the_source_suspended_until_an_abort_over_grpc() {
    let resource = source().await;
    let mut writer = Writer::new();
    let seeder = Seeder::new(resource.clone(), CHUNK, writer.hooks()).unwrap();
    let running = serve(&seeder).await;
    writer.start(seeder.backend(), 500, 4);
    let grpc = link(&running).await;
    let (link, faults) = flaky(grpc.clone());
    let leecher = leech(link, RoundPolicy::default()).await;
    leecher.wait_pulled().await.unwrap();
    faults.sync_replies_lost.store(u64::MAX, Ordering::SeqCst);
    let err = leecher.finalize().await.unwrap_err();
    assert!(
        matches!(err, MigrationError::Timeout { step: "sync", .. }),
        "{err}"
    );
    assert!(!leecher.is_open());
    assert!(writer.is_suspended().await);
    assert!(matches!(seeder.phase(), SeederPhase::Synced { .. }));
    // The operator aborts through the extension (another client, as `r3map migrate abort`).
    let operator = link_to(&running).await;
    let was = operator.abort().await.unwrap();
    assert!(was.contains("suspended"), "{was}");
    assert!(!writer.is_suspended().await);
    writer.wait_for_more_writes(10).await;
    faults.sync_replies_lost.store(0, Ordering::SeqCst);
    // The typed error crossed the wire.
    let err = leecher.finalize().await.unwrap_err();
    assert!(matches!(err, MigrationError::StaleSession { .. }), "{err}");
    assert!(!leecher.is_open());
    writer.stop().await;
    running.stop().await;
}

async fn link_to(running: &common::Running) -> GrpcSeederLink {
    GrpcSeederLink::connect(&running.addr(), ClientOptions::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_of_the_state_machine_arrive_typed() {
    let seeder = Seeder::new(source().await, CHUNK, SeederHooks::default()).unwrap();
    let running = serve(&seeder).await;
    let link = link_to(&running).await;
    let (first, second) = (SessionId(11), SessionId(22));
    link.track(first).await.unwrap();
    link.track(second).await.unwrap();
    assert!(matches!(
        link.sync(first).await,
        Err(MigrationError::StaleSession { session }) if session == first
    ));
    assert!(matches!(
        link.commit(second).await,
        Err(MigrationError::WrongPhase { call: "commit", .. })
    ));
    link.sync(second).await.unwrap();
    link.commit(second).await.unwrap();
    assert!(matches!(
        link.abort().await,
        Err(MigrationError::HandedOff { session }) if session == second
    ));
    assert!(matches!(
        link.read_at(SIZE - 1, &mut [0; 2]).await,
        Err(MigrationError::Backend(Error::OutOfBounds { .. }))
    ));
    let hashes = link.hashes(second, 2, 3).await.unwrap();
    assert_eq!(hashes.len(), 3);
    assert_eq!(hashes, seeder.hashes(second, 2, 3).await.unwrap());
    link.close(second).await.unwrap();
    assert_eq!(seeder.phase(), SeederPhase::Closed);
    assert!(matches!(
        link.read_at(0, &mut [0; 2]).await,
        Err(MigrationError::WrongPhase { call: "read", .. })
    ));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_server_that_goes_away_after_finalize_leaves_the_destination_reporting_what_it_lacks() {
    let resource = source().await;
    let mut writer = Writer::new();
    let seeder = Seeder::new(resource.clone(), CHUNK, writer.hooks()).unwrap();
    let running = serve(&seeder).await;
    writer.start(seeder.backend(), 2000, 5);
    let leecher = leech(link(&running).await, RoundPolicy::default()).await;
    leecher.wait_pulled().await.unwrap();
    writer.wait_for_more_writes(100).await;
    let report = leecher.finalize().await.unwrap();
    assert!(report.dirty_chunks > 0);
    assert!(leecher.is_open());
    running.stop().await; // the seeder's host is gone
    let err = leecher.complete(false).await.unwrap_err();
    let MigrationError::Incomplete { missing, total } = &err else {
        panic!("expected an incomplete migration, got {err}");
    };
    assert_eq!(*total, SIZE / CHUNK);
    assert!(
        !missing.is_empty() && missing.len() as u64 <= report.dirty_chunks,
        "{err}"
    );
    // Replies that arrived just before the cut may still complete fetches after the first
    // failure. So every chunk still missing is read: each read either fails (and the chunk stays
    // missing) or returns the source's bytes at suspend, never stale or zero bytes.
    let at_suspend = contents(&*resource).await;
    let mut failed = 0;
    for chunk in leecher.missing_chunks() {
        let mut buf = vec![0u8; CHUNK as usize];
        let at = (chunk * CHUNK) as usize;
        match leecher.backend().read_at(chunk * CHUNK, &mut buf).await {
            Ok(()) => assert!(
                buf == at_suspend[at..at + CHUNK as usize],
                "chunk {chunk} has wrong bytes"
            ),
            Err(err) => {
                assert!(err.is_connection_loss(), "{err:?}");
                assert!(leecher.missing_chunks().contains(&chunk));
                failed += 1;
            }
        }
    }
    assert!(
        failed > 0,
        "every missing chunk could be read with the seeder gone"
    );
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_reported_as_one() {
    let seeder = Seeder::new(source().await, CHUNK, SeederHooks::default()).unwrap();
    let running = serve(&seeder).await;
    let link = link_to(&running).await;
    link.track(SessionId(5)).await.unwrap();
    running.stop().await;
    let err = link.sync(SessionId(5)).await.unwrap_err();
    assert!(err.is_connection_loss(), "{err:?}");
    assert!(matches!(seeder.phase(), SeederPhase::Tracking { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_protocol_hands_off_at_close() {
    let resource = source().await;
    let seeder = Seeder::new(resource.clone(), CHUNK, SeederHooks::default()).unwrap();
    let running = common::serve(GrpcServer::new(vec![]).seeder(seeder.clone()).without_extension()).await;
    // The Go calls as a Go leecher makes them: dirty chunks come back as byte offsets.
    let mut go = SeederClient::connect(format!("http://{}", running.addr()))
        .await
        .unwrap();
    go.track(TrackArgs {}).await.unwrap();
    seeder.backend().write_at(3 * CHUNK + 1, &[1; 10]).await.unwrap();
    let reply = go.sync(SyncArgs {}).await.unwrap().into_inner();
    assert_eq!(reply.dirty_offsets, vec![(3 * CHUNK) as i64]);
    // Our leecher against a Go seeder: no sessions, rounds or commit.
    let seeder = Seeder::new(resource.clone(), CHUNK, SeederHooks::default()).unwrap();
    let go_running = common::serve(GrpcServer::new(vec![]).seeder(seeder.clone()).without_extension()).await;
    let options = ClientOptions {
        size: Some(SIZE),
        chunk_size: Some(CHUNK),
        ..ClientOptions::default()
    };
    let link = Arc::new(
        GrpcSeederLink::connect(&go_running.addr(), options)
            .await
            .unwrap(),
    );
    assert!(!link.has_extension());
    let leecher = leech(link, RoundPolicy::default()).await;
    seeder.backend().write_at(7 * CHUNK, b"late write").await.unwrap();
    leecher.finalize().await.unwrap();
    let at_suspend = contents(&*resource).await;
    leecher.complete(false).await.unwrap();
    assert_eq!(contents(&*leecher.backend()).await, at_suspend);
    assert_eq!(seeder.phase(), SeederPhase::Closed);
    running.stop().await;
    go_running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_a_to_b_to_c_over_grpc_carries_every_hop_s_writes() {
    let a = Seeder::new(source().await, CHUNK, SeederHooks::default()).unwrap();
    let a_running = serve(&a).await;
    let b = leech(link(&a_running).await, RoundPolicy::default()).await;
    b.finalize().await.unwrap();
    b.backend()
        .write_at(5 * CHUNK + 3, b"written on B")
        .await
        .unwrap();
    b.complete(true).await.unwrap();
    a_running.stop().await;
    let b_content = contents(&*b.backend()).await;
    let b_seeder = b.into_seeder(SeederHooks::default()).unwrap();
    let b_running = serve(&b_seeder).await;
    let c = leech(link(&b_running).await, RoundPolicy::default()).await;
    b_seeder.backend().write_at(9 * CHUNK, b"B again").await.unwrap();
    c.finalize().await.unwrap();
    c.complete(true).await.unwrap();
    let mut expected = b_content;
    expected[9 * CHUNK as usize..9 * CHUNK as usize + 7].copy_from_slice(b"B again");
    assert_eq!(contents(&*c.backend()).await, expected);
    b_running.stop().await;
}
