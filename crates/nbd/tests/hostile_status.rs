//! `Backend::extents` of the NBD client against a scripted server (`HostileServer`): what a
//! valid `base:allocation` reply becomes, which queries the client sends (whole minimum blocks,
//! 32-bit lengths without extended headers), and that every block status reply that breaks the
//! protocol fails the query and closes the connection, without a panic or a hang. All tests run
//! on a paused clock, so deadlines pass instantly.

use std::sync::Arc;
use std::time::Duration;

use r3map_core::{Backend, Error, Extent};
use r3map_nbd::testing::{self, Advertised, HostileServer, ReceivedRequest};
use r3map_nbd::wire::{cmd, reply_type, state};
use r3map_nbd::Client;

const HOLE: u32 = state::HOLE | state::ZERO;

async fn connect(
    server: &mut HostileServer,
    end: tokio::io::DuplexStream,
    advertised: Advertised,
) -> Arc<Client> {
    let (client, ()) = tokio::join!(
        Client::connect_stream(end, "", testing::hostile_options()),
        server.handshake(&advertised)
    );
    Arc::new(client.expect("handshake"))
}

type Query = tokio::task::JoinHandle<r3map_core::Result<Vec<Extent>>>;

/// Starts `extents(offset, len)` and returns it with the request the server received.
async fn query(
    client: &Arc<Client>,
    server: &mut HostileServer,
    offset: u64,
    len: u64,
) -> (Query, ReceivedRequest) {
    let task = tokio::spawn({
        let client = client.clone();
        async move { client.extents(offset, len).await }
    });
    let request = server.recv_request().await.expect("a request");
    assert_eq!(request.command, cmd::BLOCK_STATUS);
    (task, request)
}

#[tokio::test(start_paused = true)]
async fn a_valid_reply_becomes_holes_and_data_cut_to_the_range() {
    let (end, mut server) = HostileServer::pair();
    let client = connect(&mut server, end, Advertised::default()).await;
    let (task, request) = query(&client, &mut server, 4096, 64 << 10).await;
    assert_eq!((request.offset, request.length), (4096, 64 << 10));
    // Zero-only (allocated zeros) is a hole too; HOLE without ZERO is data. The last descriptor
    // reaches past the request, as servers may.
    let descriptors = [
        (8192, HOLE),
        (4096, state::ZERO),
        (4096, state::HOLE),
        (16384, 0),
        (1 << 19, HOLE),
    ];
    server
        .send(&testing::status_chunk(true, request.handle, 1, &descriptors))
        .await;
    assert_eq!(
        task.await.unwrap().unwrap(),
        vec![
            Extent::hole(12288),
            Extent::data(20480),
            Extent::hole((64 << 10) - 32768)
        ]
    );
    // The connection is still good.
    let (task, request) = query(&client, &mut server, 0, 4096).await;
    server
        .send(&testing::status_chunk(true, request.handle, 1, &[(4096, 0)]))
        .await;
    assert_eq!(task.await.unwrap().unwrap(), vec![Extent::data(4096)]);
}

#[tokio::test(start_paused = true)]
async fn a_short_answer_is_a_prefix() {
    let (end, mut server) = HostileServer::pair();
    let client = connect(&mut server, end, Advertised::default()).await;
    let (task, request) = query(&client, &mut server, 0, 1 << 20).await;
    server
        .send(&testing::status_chunk(true, request.handle, 1, &[(4096, HOLE)]))
        .await;
    assert_eq!(task.await.unwrap().unwrap(), vec![Extent::hole(4096)]);
}

#[tokio::test(start_paused = true)]
async fn unaligned_ranges_are_asked_in_whole_minimum_blocks() {
    let (end, mut server) = HostileServer::pair();
    let advertised = Advertised {
        block_size: Some((4096, 4096, 1 << 20)),
        ..Advertised::default()
    };
    let client = connect(&mut server, end, advertised).await;
    let (task, request) = query(&client, &mut server, 5000, 100).await;
    assert_eq!((request.offset, request.length), (4096, 4096));
    server
        .send(&testing::status_chunk(true, request.handle, 1, &[(4096, HOLE)]))
        .await;
    assert_eq!(task.await.unwrap().unwrap(), vec![Extent::hole(100)]);
}

#[tokio::test(start_paused = true)]
async fn without_extended_headers_a_query_stays_within_32_bits() {
    let (end, mut server) = HostileServer::pair();
    let advertised = Advertised {
        size: 8 << 30,
        block_size: Some((512, 4096, 1 << 20)),
        ..Advertised::default()
    };
    let client = connect(&mut server, end, advertised).await;
    let (task, request) = query(&client, &mut server, 0, 8 << 30).await;
    let longest = u64::from(u32::MAX) / 512 * 512;
    assert_eq!((request.offset, request.length), (0, longest));
    server
        .send(&testing::status_chunk(
            true,
            request.handle,
            1,
            &[(longest as u32, HOLE)],
        ))
        .await;
    assert_eq!(task.await.unwrap().unwrap(), vec![Extent::hole(longest)]);
}

#[tokio::test(start_paused = true)]
async fn without_base_allocation_everything_is_data_and_nothing_is_sent() {
    for advertised in [
        Advertised {
            base_allocation: false,
            ..Advertised::default()
        },
        Advertised {
            structured: false,
            ..Advertised::default()
        },
    ] {
        let (end, mut server) = HostileServer::pair();
        let client = connect(&mut server, end, advertised).await;
        assert_eq!(client.info().base_allocation, None);
        assert_eq!(
            client.extents(4096, 1 << 19).await.unwrap(),
            vec![Extent::data(1 << 19)]
        );
        drop(client);
        // The client's only message after the handshake is its disconnect.
        let sent = server.recv_request().await.expect("a disconnect");
        assert_eq!(sent.command, cmd::DISC);
    }
}

#[tokio::test(start_paused = true)]
async fn a_server_that_never_answers_fails_the_query_at_the_deadline() {
    let (end, mut server) = HostileServer::pair();
    let client = connect(&mut server, end, Advertised::default()).await;
    let (task, _) = query(&client, &mut server, 0, 1 << 20).await;
    let started = tokio::time::Instant::now();
    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    // The client's request deadline (the paused clock jumps straight to it).
    assert!(
        started.elapsed() <= Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// A scripted reply for the request with the given handle.
type Reply = Box<dyn Fn(u64) -> Vec<u8>>;

/// Each reply breaks the protocol for a query of 64 KiB at 4096 of a 1 MiB export: the query
/// fails with a message containing the needle, the connection is closed (nothing more is sent)
/// and later requests fail too.
#[tokio::test(start_paused = true)]
async fn hostile_block_status_replies_are_errors() {
    let compact = |handle, descriptors: &[(u32, u32)]| testing::status_chunk(true, handle, 1, descriptors);
    let cases: Vec<(&str, Reply, &str)> = vec![
        (
            "a descriptor starting past the request",
            Box::new(move |h| compact(h, &[(64 << 10, 0), (4096, HOLE)])),
            "past the requested range",
        ),
        (
            "a descriptor reaching past the export",
            Box::new(move |h| compact(h, &[(4096, 0), (1 << 20, HOLE)])),
            "past the end of the export",
        ),
        (
            "a descriptor of length 0",
            Box::new(move |h| compact(h, &[(4096, 0), (0, HOLE)])),
            "length 0",
        ),
        (
            "no descriptor",
            Box::new(move |h| compact(h, &[])),
            "block status chunk",
        ),
        (
            // 262145 compact descriptors: more than the 2 MiB a status chunk may take, refused
            // from its header before the payload is read or allocated.
            "too many descriptors",
            Box::new(move |h| compact(h, &vec![(4096, 0); (2 << 20) / 8 + 1])),
            "block status chunk of",
        ),
        (
            "another context",
            Box::new(move |h| testing::status_chunk(true, h, 7, &[(4096, 0)])),
            "context 7",
        ),
        (
            "two status chunks",
            Box::new(move |h| {
                let mut out = testing::status_chunk(false, h, 1, &[(4096, 0)]);
                out.extend(compact(h, &[(4096, HOLE)]));
                out
            }),
            "asked for 1 once",
        ),
        (
            "done without a status chunk",
            Box::new(testing::done_chunk),
            "without extents",
        ),
        (
            "a read's data chunk",
            Box::new(move |h| testing::data_chunk(true, h, 4096, &[0; 16])),
            "unexpected chunk type",
        ),
        (
            "a simple reply after a chunk",
            Box::new(move |h| {
                let mut out = testing::status_chunk(false, h, 1, &[(4096, 0)]);
                out.extend(testing::simple_reply(h, 0));
                out
            }),
            "a simple reply to a request answered with chunks",
        ),
        (
            "the status chunk type of extended headers",
            Box::new(move |h| {
                let payload = testing::extended_status_payload(1, &[(4096, 0)]);
                testing::chunk(1, reply_type::BLOCK_STATUS_EXT, h, &payload)
            }),
            "unexpected chunk type",
        ),
    ];
    for (what, reply, needle) in cases {
        let (end, mut server) = HostileServer::pair();
        let client = connect(&mut server, end, Advertised::default()).await;
        let (task, request) = query(&client, &mut server, 4096, 64 << 10).await;
        server.send(&reply(request.handle)).await;
        let err = task.await.unwrap().unwrap_err();
        assert!(err.to_string().contains(needle), "{what}: {err}");
        assert!(server.until_closed().await.is_empty(), "{what}: sent more");
        let later = client.extents(0, 4096).await.unwrap_err();
        assert!(later.to_string().contains(needle), "{what}: later: {later}");
    }
}

/// Extended descriptors carry 64-bit lengths: ones whose sum wraps around, or that reach past
/// the export, are violations, not an overflow.
#[tokio::test(start_paused = true)]
async fn huge_extended_descriptors_are_errors() {
    for (descriptors, needle) in [
        (vec![(4096, 0), (u64::MAX - 100, 3)], "past the end of the export"),
        (vec![(u64::MAX, 0)], "past the end of the export"),
        (vec![(1 << 20, 0), (4096, 3)], "past the requested range"),
    ] {
        let (end, mut server) = HostileServer::pair();
        let advertised = Advertised {
            size: 16 << 30,
            extended: true,
            ..Advertised::default()
        };
        let client = connect(&mut server, end, advertised).await;
        let mut server = server.into_extended();
        let (task, request) = query(&client, &mut server, 4096, 1 << 20).await;
        let payload = testing::extended_status_payload(1, &descriptors);
        server
            .send(&testing::extended_chunk(
                1,
                reply_type::BLOCK_STATUS_EXT,
                request.handle,
                4096,
                &payload,
            ))
            .await;
        let err = task.await.unwrap().unwrap_err();
        assert!(err.to_string().contains(needle), "{descriptors:?}: {err}");
        assert!(server.until_closed().await.is_empty());
    }
}

/// What a `base:allocation` reply of one chunk must become for a query of `offset..end` of an
/// export of `size` bytes (the model): `None` where the reply breaks the protocol (another
/// context, no descriptor, one of length 0, one starting past the request, or one reaching
/// past the export), else the descriptors cut to the range, neighbours of one kind merged, a
/// range being a hole exactly when its status has `NBD_STATE_ZERO`.
fn model(context: u32, descriptors: &[(u32, u32)], offset: u64, end: u64, size: u64) -> Option<Vec<Extent>> {
    if context != 1 || descriptors.is_empty() {
        return None;
    }
    let mut extents: Vec<Extent> = Vec::new();
    let mut at = offset;
    for &(length, status) in descriptors {
        let length = u64::from(length);
        if length == 0 || at >= end || at + length > size {
            return None;
        }
        let piece = Extent {
            len: (at + length).min(end) - at,
            allocation: if status & state::ZERO != 0 {
                r3map_core::Allocation::Hole
            } else {
                r3map_core::Allocation::Data
            },
        };
        match extents.last_mut() {
            Some(last) if last.allocation == piece.allocation => last.len += piece.len,
            _ => extents.push(piece),
        }
        at += length;
    }
    Some(extents)
}

fn descriptor_strategy() -> impl proptest::strategy::Strategy<Value = (u32, u32)> {
    use proptest::prelude::*;
    let length = prop_oneof![
        1 => Just(0u32),
        4 => 1u32..5000,
        4 => (1u32..64).prop_map(|k| k * 4096),
        1 => (u32::MAX - 4096)..=u32::MAX,
    ];
    (length, any::<u32>())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Random block status replies (valid and not) to a random query: the client's answer is
    /// the model's, or an error where the model says the reply breaks the protocol (the
    /// connection then closed, nothing more sent); after a valid one the connection still
    /// answers. Never a panic, a hang or an answer outside the range.
    #[test]
    fn random_status_replies_match_the_model(
        offset in 0u64..(1 << 20),
        len in 1u64..(1 << 20),
        context in proptest::prop_oneof![4 => proptest::strategy::Just(1u32), 1 => proptest::prelude::any::<u32>()],
        descriptors in proptest::collection::vec(descriptor_strategy(), 0..8),
    ) {
        const SIZE: u64 = 1 << 20;
        let len = len.min(SIZE - offset).max(1);
        let offset = offset.min(SIZE - 1);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let (end, mut server) = HostileServer::pair();
            let advertised = Advertised { size: SIZE, ..Advertised::default() };
            let client = connect(&mut server, end, advertised).await;
            let (task, request) = query(&client, &mut server, offset, len).await;
            proptest::prop_assert_eq!((request.offset, request.length), (offset, len));
            server
                .send(&testing::status_chunk(true, request.handle, context, &descriptors))
                .await;
            let answer = task.await.unwrap();
            match model(context, &descriptors, offset, offset + len, SIZE) {
                Some(expected) => {
                    proptest::prop_assert_eq!(answer.unwrap(), expected);
                    let (task, request) = query(&client, &mut server, 0, 4096).await;
                    server
                        .send(&testing::status_chunk(true, request.handle, 1, &[(4096, HOLE)]))
                        .await;
                    proptest::prop_assert_eq!(task.await.unwrap().unwrap(), vec![Extent::hole(4096)]);
                }
                None => {
                    proptest::prop_assert!(answer.is_err(), "accepted {:?}", answer);
                    proptest::prop_assert!(server.until_closed().await.is_empty());
                }
            }
            Ok(())
        })?;
    }
}
