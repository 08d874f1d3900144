//! Migrations in one process, over a link that can lose its connection: the destination ends up
//! equal to the source as it was at suspend, and every failure leaves exactly one copy
//! authoritative.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{contents, Faults, FlakyLink, Writer};
use r3map_core::{testing, Backend, Error, MemoryBackend, SharedBackend};
use r3map_migration::{
    Leecher, LeecherOptions, LeecherPhase, MigrationError, RoundPolicy, Seeder, SeederHooks, SeederLink,
    SeederPhase, SessionId,
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
        retry_for: Duration::from_millis(300),
        ..LeecherOptions::default()
    }
}

fn flaky(seeder: &Arc<Seeder>) -> (Arc<FlakyLink>, Arc<Faults>) {
    let faults = Arc::new(Faults::default());
    let link = Arc::new(FlakyLink {
        seeder: seeder.clone(),
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
        writer.start(seeder.backend(), 1000, i as u64);
        let leecher = leech(seeder.clone(), rounds).await;
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
        assert!(report.downtime <= report.downtime_bound, "{report:?}");
        // The source is frozen at suspend: that is what the destination must hold.
        let at_suspend = contents(&*resource).await;
        assert_ne!(
            at_suspend,
            testing::pattern(1, SIZE as usize),
            "the writer changed nothing"
        );
        let done = leecher.complete(true).await.unwrap();
        assert_eq!(done.verified_chunks, SIZE / CHUNK);
        assert_eq!(
            contents(&*leecher.backend()).await,
            at_suspend,
            "policy {rounds:?}"
        );
        assert!(
            leecher.status().repulled > 0,
            "writes after tracking began must be re-pulled"
        );
        assert_eq!(seeder.phase(), SeederPhase::Closed);
        assert_eq!(writer.suspends.load(Ordering::SeqCst), 1);
        writer.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destination_application_waits_for_finalize_and_then_owns_the_resource() {
    let resource = source().await;
    let seeder = Seeder::new(resource.clone(), CHUNK, SeederHooks::default()).unwrap();
    let leecher = Arc::new(leech(seeder.clone(), RoundPolicy::default()).await);
    let app = tokio::spawn({
        let backend = leecher.backend();
        async move {
            backend.write_at(10, b"destination").await.unwrap();
        }
    });
    leecher.wait_pulled().await.unwrap();
    assert!(
        !app.is_finished() && !leecher.is_open(),
        "the application got through a closed gate"
    );
    leecher.finalize().await.unwrap();
    app.await.unwrap();
    leecher.complete(false).await.unwrap();
    let mut buf = [0u8; 11];
    leecher.backend().read_at(10, &mut buf).await.unwrap();
    assert_eq!(&buf, b"destination");
    // The source saw none of it, and refuses writes now.
    resource.read_at(10, &mut buf).await.unwrap();
    assert_ne!(&buf, b"destination");
    assert!(matches!(
        seeder.backend().write_at(0, &[1]).await,
        Err(Error::ReadOnly)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_a_to_b_to_c_carries_every_hop_s_writes() {
    let resource = source().await;
    let a = Seeder::new(resource.clone(), CHUNK, SeederHooks::default()).unwrap();
    let b = leech(a.clone(), RoundPolicy::default()).await;
    b.finalize().await.unwrap();
    b.backend()
        .write_at(5 * CHUNK + 3, b"written on B")
        .await
        .unwrap();
    let done = b.complete(true).await.unwrap();
    assert_eq!(
        done.verified_chunks,
        SIZE / CHUNK - 1,
        "the chunk B wrote is not compared"
    );
    let b_content = contents(&*b.backend()).await;
    let b_seeder = b.into_seeder(SeederHooks::default()).unwrap();
    let c = leech(b_seeder.clone(), RoundPolicy::default()).await;
    // B's application keeps writing while C pulls: tracked for the next hop.
    b_seeder.backend().write_at(9 * CHUNK, b"B again").await.unwrap();
    c.finalize().await.unwrap();
    c.complete(true).await.unwrap();
    let mut expected = b_content;
    expected[9 * CHUNK as usize..9 * CHUNK as usize + 7].copy_from_slice(b"B again");
    assert_eq!(contents(&*c.backend()).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leecher_that_dies_before_finalize_leaves_the_seeder_serving_a_new_one() {
    let resource = source().await;
    let mut writer = Writer::new();
    let seeder = Seeder::new(resource.clone(), CHUNK, writer.hooks()).unwrap();
    writer.start(seeder.backend(), 700, 7);
    let first = leech(seeder.clone(), RoundPolicy::default()).await;
    writer.wait_for_more_writes(50).await;
    let first_session = first.session();
    drop(first); // dies without a word
    assert_eq!(writer.suspends.load(Ordering::SeqCst), 0);
    let second = leech(seeder.clone(), RoundPolicy::default()).await;
    // The dead leecher's session is gone: it could never finalize now.
    assert!(matches!(
        seeder.sync(first_session).await,
        Err(MigrationError::StaleSession { .. })
    ));
    writer.wait_for_more_writes(50).await;
    second.finalize().await.unwrap();
    let at_suspend = contents(&*resource).await;
    second.complete(true).await.unwrap();
    assert_eq!(contents(&*second.backend()).await, at_suspend);
    assert_eq!(writer.suspends.load(Ordering::SeqCst), 1);
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replies_during_finalize_are_retried_without_a_second_suspend() {
    let resource = source().await;
    let mut writer = Writer::new();
    let seeder = Seeder::new(resource.clone(), CHUNK, writer.hooks()).unwrap();
    writer.start(seeder.backend(), 3000, 3);
    let (link, faults) = flaky(&seeder);
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_lost_for_good_during_finalize_keeps_the_source_suspended_until_an_abort() {
    let resource = source().await;
    let mut writer = Writer::new();
    let seeder = Seeder::new(resource.clone(), CHUNK, writer.hooks()).unwrap();
    writer.start(seeder.backend(), 500, 4);
    let (link, faults) = flaky(&seeder);
    let leecher = leech(link, RoundPolicy::default()).await;
    leecher.wait_pulled().await.unwrap();
    faults.sync_replies_lost.store(u64::MAX, Ordering::SeqCst);
    let err = leecher.finalize().await.unwrap_err();
    assert!(
        matches!(err, MigrationError::Timeout { step: "sync", .. }),
        "{err}"
    );
    // Neither side took over or gave up: the source is suspended, the destination's gate shut.
    assert!(!leecher.is_open());
    assert!(writer.is_suspended().await);
    assert!(matches!(seeder.phase(), SeederPhase::Synced { .. }));
    assert!(matches!(
        seeder.backend().write_at(0, &[1]).await,
        Err(Error::ReadOnly)
    ));
    // The operator aborts on the source: it runs again, and the destination can never commit.
    seeder.abort().await.unwrap();
    assert!(!writer.is_suspended().await);
    writer.wait_for_more_writes(10).await;
    faults.sync_replies_lost.store(0, Ordering::SeqCst);
    let err = leecher.finalize().await.unwrap_err();
    assert!(matches!(err, MigrationError::StaleSession { .. }), "{err}");
    assert!(!leecher.is_open());
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_that_dies_after_finalize_leaves_the_destination_reporting_what_it_lacks() {
    let resource = source().await;
    let mut writer = Writer::new();
    let seeder = Seeder::new(resource.clone(), CHUNK, writer.hooks()).unwrap();
    writer.start(seeder.backend(), 2000, 5);
    let (link, faults) = flaky(&seeder);
    let leecher = leech(link, RoundPolicy::default()).await;
    leecher.wait_pulled().await.unwrap();
    writer.wait_for_more_writes(100).await;
    faults.dead_after_sync.store(true, Ordering::SeqCst);
    let report = leecher.finalize().await.unwrap();
    assert!(report.dirty_chunks > 0);
    let err = leecher.complete(false).await.unwrap_err();
    let MigrationError::Incomplete { missing, total } = &err else {
        panic!("expected an incomplete migration, got {err}");
    };
    assert_eq!(*total, SIZE / CHUNK);
    // Exactly the chunks the source wrote since tracking began are missing.
    assert_eq!(missing.len() as u64, report.dirty_chunks, "{err}");
    assert_eq!(missing, &leecher.missing_chunks());
    assert_ne!(leecher.status().phase, LeecherPhase::Complete);
    // The application gets an error for a missing chunk, never stale or zero bytes.
    let mut buf = vec![0u8; 10];
    assert!(leecher
        .backend()
        .read_at(missing[0] * CHUNK, &mut buf)
        .await
        .is_err());
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_and_abort_racing_have_exactly_one_winner() {
    for _ in 0..50 {
        let resource: SharedBackend = Arc::new(MemoryBackend::new(16 * CHUNK));
        let mut writer = Writer::new();
        let seeder = Seeder::new(resource, CHUNK, writer.hooks()).unwrap();
        writer.start(seeder.backend(), 100, 9);
        let session = SessionId::random();
        seeder.track(session).await.unwrap();
        seeder.sync(session).await.unwrap();
        let (commit, abort) = tokio::join!(
            tokio::spawn({
                let seeder = seeder.clone();
                async move { seeder.commit(session).await }
            }),
            tokio::spawn({
                let seeder = seeder.clone();
                async move { seeder.abort().await }
            })
        );
        match (commit.unwrap(), abort.unwrap()) {
            (Ok(()), Err(MigrationError::HandedOff { .. })) => {
                assert!(
                    writer.is_suspended().await,
                    "the source resumed after handing off"
                );
            }
            (Err(MigrationError::StaleSession { .. }), Ok(_)) => {
                assert!(!writer.is_suspended().await, "an aborted source stayed suspended");
            }
            other => panic!("commit and abort: {other:?}"),
        }
        writer.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_protocol_without_sessions_or_commit_hands_off_at_close() {
    let resource = source().await;
    let seeder = Seeder::new(resource.clone(), CHUNK, SeederHooks::default()).unwrap();
    let anonymous = SessionId::ANONYMOUS;
    seeder.track(anonymous).await.unwrap();
    seeder.backend().write_at(3 * CHUNK, &[1; 10]).await.unwrap();
    let report = seeder.sync(anonymous).await.unwrap();
    assert_eq!(report.dirty, vec![3]);
    seeder.close(anonymous).await.unwrap();
    assert_eq!(seeder.phase(), SeederPhase::Closed);
    assert!(seeder.read_at(0, &mut [0; 4]).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leecher_that_gives_up_after_sync_resumes_the_source() {
    let resource = source().await;
    let mut writer = Writer::new();
    let seeder = Seeder::new(resource, CHUNK, writer.hooks()).unwrap();
    writer.start(seeder.backend(), 100, 2);
    let session = SessionId::random();
    seeder.track(session).await.unwrap();
    seeder.sync(session).await.unwrap();
    assert!(writer.is_suspended().await);
    seeder.close(session).await.unwrap();
    assert!(!writer.is_suspended().await);
    assert_eq!(seeder.phase(), SeederPhase::Serving);
    writer.wait_for_more_writes(10).await;
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_copy_rounds_stop_when_small_enough_or_no_longer_shrinking() {
    let cases: [(&[&[u64]], RoundPolicy, usize); 3] = [
        // Shrinks to the threshold after three rounds.
        (
            &[&[1, 2, 3, 4], &[1, 2], &[1]],
            RoundPolicy {
                max_rounds: 10,
                max_dirty: 1,
            },
            3,
        ),
        // Stops shrinking at the third round.
        (
            &[&[1, 2, 3], &[1, 2], &[1, 2, 3], &[1]],
            RoundPolicy {
                max_rounds: 10,
                max_dirty: 0,
            },
            3,
        ),
        // The round limit.
        (
            &[&[1, 2, 3, 4], &[1, 2, 3], &[1, 2]],
            RoundPolicy {
                max_rounds: 2,
                max_dirty: 0,
            },
            2,
        ),
    ];
    for (script, policy, expected) in cases {
        let seeder = Seeder::new(source().await, CHUNK, SeederHooks::default()).unwrap();
        let (link, faults) = flaky(&seeder);
        faults
            .scripted_rounds
            .lock()
            .extend(script.iter().map(|r| r.to_vec()));
        let leecher = leech(link, policy).await;
        let rounds = leecher.precopy().await.unwrap();
        assert_eq!(rounds.len(), expected, "{policy:?}: {rounds:?}");
        assert_eq!(leecher.status().rounds, rounds);
    }
}
