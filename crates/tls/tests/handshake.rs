//! Handshakes between our server and client configurations over an in-memory stream: CA-signed
//! certificates, pinned self-signed ones (made by `openssl req -x509`, as a newcomer would), and
//! the errors users get when trust is missing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use r3map_tls::{describe_handshake_error, generate, ClientTls, ServerTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Runs both sides of a handshake over an in-memory pipe, then one byte each way. Returns the
/// client's and the server's error, if any.
async fn handshake(server: &ServerTls, client: &ClientTls, name: &str) -> Result<(), (String, String)> {
    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    let acceptor = server.acceptor();
    let server_side = tokio::spawn(async move {
        let mut stream = acceptor.accept(server_io).await?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        stream.write_all(&[byte[0] + 1]).await?;
        stream.flush().await?;
        Ok::<_, std::io::Error>(())
    });
    let client_side = async {
        let name = client.server_name(name).map_err(std::io::Error::other)?;
        let mut stream = client.connector().connect(name, client_io).await?;
        stream.write_all(&[41]).await?;
        stream.flush().await?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        assert_eq!(byte[0], 42);
        Ok::<_, std::io::Error>(())
    };
    let client_result = tokio::time::timeout(Duration::from_secs(10), client_side)
        .await
        .expect("the client side finished");
    let server_result = tokio::time::timeout(Duration::from_secs(10), server_side)
        .await
        .expect("the server side finished")
        .unwrap();
    match (client_result, server_result) {
        (Ok(()), Ok(())) => Ok(()),
        (client, server) => Err((
            client
                .err()
                .map(|e| describe_handshake_error(&e))
                .unwrap_or_default(),
            server
                .err()
                .map(|e| describe_handshake_error(&e))
                .unwrap_or_default(),
        )),
    }
}

fn server(identity: &r3map_tls::Identity, client_ca: Option<&str>) -> ServerTls {
    ServerTls::from_pem(
        identity.cert.as_bytes(),
        identity.key.as_bytes(),
        client_ca.map(str::as_bytes),
    )
    .unwrap()
}

fn hosts(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[tokio::test]
async fn a_generated_set_works_for_every_host_it_names_and_only_those() {
    let set = generate(&hosts(&["localhost", "127.0.0.1", "::1", "nbd.example"]), DAY).unwrap();
    let server = server(&set.server, None);
    let client = ClientTls::from_pem(set.ca.cert.as_bytes(), None).unwrap();
    for name in ["localhost", "127.0.0.1", "[::1]", "nbd.example"] {
        handshake(&server, &client, name)
            .await
            .unwrap_or_else(|err| panic!("{name}: {err:?}"));
    }
    let (client_err, _) = handshake(&server, &client, "other.example").await.unwrap_err();
    assert!(client_err.contains("not valid for name"), "{client_err}");
    assert!(client_err.contains("r3map cert --host NAME"), "{client_err}");
}

#[tokio::test]
async fn mutual_tls_with_a_generated_set_needs_the_client_certificate() {
    let set = generate(&hosts(&["localhost"]), DAY).unwrap();
    let server = server(&set.server, Some(&set.ca.cert));
    assert!(server.is_mutual());
    let with_identity = ClientTls::from_pem(
        set.ca.cert.as_bytes(),
        Some((set.client.cert.as_bytes(), set.client.key.as_bytes())),
    )
    .unwrap();
    handshake(&server, &with_identity, "localhost").await.unwrap();

    let without = ClientTls::from_pem(set.ca.cert.as_bytes(), None).unwrap();
    let (client_err, server_err) = handshake(&server, &without, "localhost").await.unwrap_err();
    assert!(
        server_err.contains("peer sent no certificates"),
        "server: {server_err}; client: {client_err}"
    );

    // A client certificate from another CA is refused by the server.
    let other = generate(&hosts(&["localhost"]), DAY).unwrap();
    let stranger = ClientTls::from_pem(
        set.ca.cert.as_bytes(),
        Some((other.client.cert.as_bytes(), other.client.key.as_bytes())),
    )
    .unwrap();
    let (client_err, server_err) = handshake(&server, &stranger, "localhost").await.unwrap_err();
    assert!(
        server_err.contains("UnknownIssuer") && server_err.contains("trust the CA"),
        "server: {server_err}; client: {client_err}"
    );
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused_with_advice() {
    let set = generate(&hosts(&["localhost"]), DAY).unwrap();
    let other = generate(&hosts(&["localhost"]), DAY).unwrap();
    let client = ClientTls::from_pem(other.ca.cert.as_bytes(), None).unwrap();
    let (client_err, _) = handshake(&server(&set.server, None), &client, "localhost")
        .await
        .unwrap_err();
    assert!(client_err.contains("UnknownIssuer"), "{client_err}");
    assert!(
        client_err.contains("pin it by giving that certificate file"),
        "{client_err}"
    );
}

/// `openssl req -x509` in `dir` with `extra` arguments; returns (cert, key) PEM, or `None`
/// after recording the skip when openssl is missing.
fn openssl_self_signed(dir: &Path, name: &str, extra: &[&str]) -> Option<(String, String)> {
    let cert = dir.join(format!("{name}-cert.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    let status = match Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(extra)
        .output()
    {
        Ok(output) => output,
        Err(_) => {
            r3map_core::testing::skip("openssl is not installed (scripts/install-test-deps installs it)");
            return None;
        }
    };
    assert!(status.status.success(), "openssl req failed: {status:?}");
    Some((
        std::fs::read_to_string(cert).unwrap(),
        std::fs::read_to_string(key).unwrap(),
    ))
}

#[tokio::test]
async fn an_openssl_self_signed_certificate_given_as_the_ca_is_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let Some((cert, key)) = openssl_self_signed(dir.path(), "server", &["-days", "30"]) else {
        return;
    };
    // What openssl makes: CA:TRUE, no subjectAltName; webpki alone refuses it.
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(dir.path().join("server-cert.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("CA:TRUE") && !text.contains("Subject Alternative Name"),
        "{text}"
    );

    let server = ServerTls::from_pem(cert.as_bytes(), key.as_bytes(), None).unwrap();
    let client = ClientTls::from_pem(cert.as_bytes(), None).unwrap();
    // Pinned: any name, since the certificate itself is what is trusted.
    for name in ["localhost", "127.0.0.1", "elsewhere.example"] {
        handshake(&server, &client, name)
            .await
            .unwrap_or_else(|err| panic!("{name}: {err:?}"));
    }

    // Another self-signed certificate is neither pinned nor a CA of this one.
    let Some((other, _)) = openssl_self_signed(dir.path(), "other", &["-days", "30"]) else {
        return;
    };
    let stranger = ClientTls::from_pem(other.as_bytes(), None).unwrap();
    let (client_err, _) = handshake(&server, &stranger, "localhost").await.unwrap_err();
    assert!(client_err.contains("pin it"), "{client_err}");
}

#[tokio::test]
async fn a_pinned_certificate_that_expired_is_refused() {
    // Self-signed and marked as a CA like openssl's (whose `req` cannot backdate before 3.4).
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap().pem();
    let server = ServerTls::from_pem(cert.as_bytes(), key.serialize_pem().as_bytes(), None).unwrap();
    let client = ClientTls::from_pem(cert.as_bytes(), None).unwrap();
    let (client_err, _) = handshake(&server, &client, "localhost").await.unwrap_err();
    assert!(client_err.contains("certificate expired"), "{client_err}");
    assert!(client_err.contains("create a new one"), "{client_err}");
}

#[tokio::test]
async fn a_pinned_self_signed_client_certificate_passes_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let Some((client_cert, client_key)) = openssl_self_signed(dir.path(), "client", &["-days", "30"]) else {
        return;
    };
    let set = generate(&hosts(&["localhost"]), DAY).unwrap();
    let server = server(&set.server, Some(&client_cert));
    let client = ClientTls::from_pem(
        set.ca.cert.as_bytes(),
        Some((client_cert.as_bytes(), client_key.as_bytes())),
    )
    .unwrap();
    handshake(&server, &client, "localhost").await.unwrap();
}

#[test]
fn an_encrypted_private_key_is_explained() {
    let set = generate(&hosts(&["localhost"]), DAY).unwrap();
    let encrypted = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n";
    let err = ServerTls::from_pem(set.server.cert.as_bytes(), encrypted.as_bytes(), None).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("encrypted") && text.contains("openssl pkey"),
        "{text}"
    );
}
