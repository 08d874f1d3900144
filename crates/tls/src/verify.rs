//! Certificate verification: the usual chain to a trusted CA (webpki), or else pinning.
//!
//! A certificate is pinned when it is itself one of the trusted certificates (the CA file holds
//! it). Then neither its issuer, nor its CA flag, nor its names matter: `openssl req -x509`
//! makes self-signed certificates marked as CAs and often without a subjectAltName, which webpki
//! rejects as end-entity certificates (`CaUsedAsEndEntity`) even when trusted. A pinned
//! certificate is still checked for its validity dates, and the peer still proves in the
//! handshake that it holds the certificate's private key (the signature checks are webpki's),
//! so only the holder of that key can pass.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
};
use webpki::Error as WebPkiError;

/// Whether `cert` is one of `pinned` and valid at `now`: `Ok(true)` if so, `Ok(false)` if it is
/// not pinned, an error if it is pinned but outside its validity dates (or unparsable).
fn pinned_and_valid(
    pinned: &[CertificateDer<'static>],
    cert: &CertificateDer<'_>,
    now: UnixTime,
) -> Result<bool, Error> {
    if !pinned.iter().any(|p| p.as_ref() == cert.as_ref()) {
        return Ok(false);
    }
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let validity = parsed.validity();
    let seconds = |t: x509_parser::time::ASN1Time| {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(t.timestamp().max(0) as u64))
    };
    let (not_before, not_after) = (seconds(validity.not_before), seconds(validity.not_after));
    if now.as_secs() < not_before.as_secs() {
        return Err(Error::InvalidCertificate(CertificateError::NotValidYetContext {
            time: now,
            not_before,
        }));
    }
    if now.as_secs() > not_after.as_secs() {
        return Err(Error::InvalidCertificate(CertificateError::ExpiredContext {
            time: now,
            not_after,
        }));
    }
    Ok(true)
}

/// The handshake signature checks, webpki's for pinned certificates too: the peer must hold the
/// key of the certificate it presented.
macro_rules! webpki_signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.webpki.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.webpki.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.webpki.supported_verify_schemes()
        }
    };
}

/// Verifies server certificates against the trusted CAs, or accepts a pinned one.
#[derive(Debug)]
pub(crate) struct ServerVerifier {
    pub webpki: Arc<WebPkiServerVerifier>,
    pub pinned: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Ok(verified) => Ok(verified),
            Err(err) => match pinned_and_valid(&self.pinned, end_entity, now)? {
                true => Ok(ServerCertVerified::assertion()),
                false => Err(err),
            },
        }
    }

    webpki_signature_checks!();
}

/// Verifies client certificates against the trusted CAs, or accepts a pinned one.
#[derive(Debug)]
pub(crate) struct ClientVerifier {
    pub webpki: Arc<dyn ClientCertVerifier>,
    pub pinned: Vec<CertificateDer<'static>>,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.webpki.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.webpki.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        match self.webpki.verify_client_cert(end_entity, intermediates, now) {
            Ok(verified) => Ok(verified),
            Err(err) => match pinned_and_valid(&self.pinned, end_entity, now)? {
                true => Ok(ClientCertVerified::assertion()),
                false => Err(err),
            },
        }
    }

    webpki_signature_checks!();
}

/// What a rejected certificate means and what to do, for the common cases.
pub(crate) fn advice(err: &Error) -> Option<&'static str> {
    const PIN_OR_CA: &str = "trust the CA that signed the peer's certificate, or pin the \
        peer's own certificate by giving that very file as the trusted certificate; `r3map \
        cert` creates a CA with server and client certificates";
    let Error::InvalidCertificate(kind) = err else {
        return match err {
            Error::AlertReceived(rustls::AlertDescription::UnknownCA)
            | Error::AlertReceived(rustls::AlertDescription::BadCertificate) => Some(
                "the peer rejected our certificate: it must be signed by the CA the peer \
                 trusts (or be pinned there)",
            ),
            Error::AlertReceived(rustls::AlertDescription::CertificateRequired) => {
                Some("the peer requires a client certificate (mutual TLS): give one and its key")
            }
            _ => None,
        };
    };
    Some(match kind {
        CertificateError::UnknownIssuer => {
            "the peer's certificate is not signed by a trusted CA and is not itself trusted: \
             trust the CA that signed it, or pin it by giving that certificate file as the \
             trusted certificate"
        }
        CertificateError::BadSignature => {
            "the peer's certificate names a trusted CA as its issuer but was not signed by it \
             (another CA of the same name?): trust the CA that really signed it"
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            "the peer's certificate is for other names than the one connected to: connect by \
             a name it holds, or create one for this name (`r3map cert --host NAME`), or pin \
             the certificate itself"
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "the certificate has expired: create a new one (`r3map cert`)"
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "the certificate is not valid yet: check the clocks of both machines"
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "the certificate is not made for this role (server or client authentication): \
             create server and client certificates with `r3map cert`"
        }
        CertificateError::Other(OtherError(inner)) => match inner.downcast_ref::<WebPkiError>() {
            Some(WebPkiError::CaUsedAsEndEntity) => {
                "the peer presents a CA certificate as its own (as `openssl req -x509` makes); \
                 pin it by giving that very certificate file as the trusted certificate, or \
                 create a CA and a server certificate with `r3map cert`"
            }
            _ => PIN_OR_CA,
        },
        _ => PIN_OR_CA,
    })
}
