//! TLS, mutual TLS and bearer tokens on a real loopback connection: a server that requires TLS
//! refuses plaintext, mutual TLS refuses unknown certificates, a wrong token is refused, and
//! the right credentials get through.

mod common;

use std::sync::Arc;
use std::time::Duration;

use r3map_core::{Backend, Error, MemoryBackend, SharedBackend};
use r3map_grpc::{ClientOptions, Export, GrpcBackend, GrpcServer, Token};
use r3map_tls::{generate, CertificateSet, ClientTls, ServerTls};

fn certificates() -> CertificateSet {
    generate(
        &["127.0.0.1".into(), "localhost".into()],
        Duration::from_secs(3600),
    )
    .unwrap()
}

fn memory() -> SharedBackend {
    Arc::new(MemoryBackend::new(1 << 20))
}

fn server_tls(set: &CertificateSet, mutual: bool) -> ServerTls {
    let client_ca = mutual.then_some(set.ca.cert.as_bytes());
    ServerTls::from_pem(set.server.cert.as_bytes(), set.server.key.as_bytes(), client_ca).unwrap()
}

fn client_tls(trust: &CertificateSet, identity: Option<&CertificateSet>) -> ClientTls {
    let identity = identity.map(|set| (set.client.cert.as_bytes(), set.client.key.as_bytes()));
    ClientTls::from_pem(trust.ca.cert.as_bytes(), identity).unwrap()
}

fn options(tls: Option<ClientTls>, token: Option<&str>) -> ClientOptions {
    ClientOptions {
        tls,
        token: token.map(|t| Token::new(t).unwrap()),
        connect_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    }
}

async fn round_trip(client: &GrpcBackend) {
    client.write_at(100, b"secret data").await.unwrap();
    let mut buf = [0u8; 11];
    client.read_at(100, &mut buf).await.unwrap();
    assert_eq!(&buf, b"secret data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_server_refuses_plaintext_and_serves_tls() {
    let set = certificates();
    let running =
        common::serve(GrpcServer::new(vec![Export::new("", memory())]).tls(server_tls(&set, false))).await;
    let plaintext = GrpcBackend::connect(&running.addr(), "", options(None, None)).await;
    let err = plaintext.unwrap_err();
    assert!(
        err.is_connection_loss() || matches!(err, Error::Remote(_)),
        "{err:?}"
    );
    let client = GrpcBackend::connect(&running.addr(), "", options(Some(client_tls(&set, None)), None))
        .await
        .unwrap();
    round_trip(&client).await;
    // A client that trusts another CA refuses the server, and says why.
    let other = certificates();
    let wrong_ca =
        GrpcBackend::connect(&running.addr(), "", options(Some(client_tls(&other, None)), None)).await;
    let text = wrong_ca.unwrap_err().to_string();
    assert!(text.contains("TLS handshake"), "{text}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_known_certificate() {
    let set = certificates();
    let running =
        common::serve(GrpcServer::new(vec![Export::new("", memory())]).tls(server_tls(&set, true))).await;
    // No client certificate, and one signed by an unknown CA: both refused.
    let stranger = certificates();
    for identity in [None, Some(&stranger)] {
        let refused = GrpcBackend::connect(
            &running.addr(),
            "",
            options(Some(client_tls(&set, identity)), None),
        )
        .await;
        assert!(
            refused.is_err(),
            "a client with {:?} got in",
            identity.map(|_| "an unknown certificate")
        );
    }
    let client = GrpcBackend::connect(
        &running.addr(),
        "",
        options(Some(client_tls(&set, Some(&set))), None),
    )
    .await
    .unwrap();
    round_trip(&client).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_token_is_refused() {
    let backend = memory();
    let server =
        GrpcServer::new(vec![Export::new("", backend.clone())]).token(Token::new("right-token\n").unwrap());
    let running = common::serve(server).await;
    for token in [None, Some("wrong-token"), Some("right-token-but-longer")] {
        let refused = GrpcBackend::connect(&running.addr(), "", options(None, token)).await;
        let err = refused.unwrap_err();
        assert!(
            matches!(&err, Error::Remote(m) if m.contains("token")),
            "{token:?}: {err:?}"
        );
    }
    let client = GrpcBackend::connect(&running.addr(), "", options(None, Some("right-token")))
        .await
        .unwrap();
    round_trip(&client).await;
    // The raw Go call without a token is refused too (every service checks it).
    let mut go =
        r3map_grpc::pb::mount::backend_client::BackendClient::connect(format!("http://{}", running.addr()))
            .await
            .unwrap();
    let status = go
        .write_at(r3map_grpc::pb::mount::WriteAtArgs {
            off: 0,
            p: bytes::Bytes::from_static(b"x"),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let mut first = [0u8; 1];
    backend.read_at(0, &mut first).await.unwrap();
    assert_eq!(first, [0], "a refused write changed data");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_a_token_together() {
    let set = certificates();
    let server = GrpcServer::new(vec![Export::new("", memory())])
        .tls(server_tls(&set, true))
        .token(Token::new("t0ken").unwrap());
    let running = common::serve(server).await;
    let refused = GrpcBackend::connect(
        &running.addr(),
        "",
        options(Some(client_tls(&set, Some(&set))), Some("nope")),
    )
    .await;
    assert!(refused.is_err());
    let client = GrpcBackend::connect(
        &running.addr(),
        "",
        options(Some(client_tls(&set, Some(&set))), Some("t0ken")),
    )
    .await
    .unwrap();
    round_trip(&client).await;
    running.stop().await;
}

#[test]
fn tokens_must_be_printable_and_stay_out_of_debug_output() {
    assert!(Token::new("  \n").is_err());
    assert!(Token::new("with space").is_err());
    assert!(!format!("{:?}", Token::new("hunter2").unwrap()).contains("hunter2"));
}
