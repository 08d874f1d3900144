//! Certificates and keys from PEM files, with errors that say which file and what is wrong.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

use crate::TlsError;

pub(crate) fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn parse_certs(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::Pem {
            what,
            detail: err.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            detail: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

pub(crate) fn parse_key(what: &'static str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    if contains(pem, b"-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        return Err(TlsError::Pem {
            what,
            detail: "the key is encrypted with a passphrase; write an unencrypted copy with \
                     `openssl pkey -in KEY -out KEY.plain` (or create keys with `r3map cert`)"
                .into(),
        });
    }
    PrivateKeyDer::from_pem_slice(pem).map_err(|err| TlsError::Pem {
        what,
        detail: format!("no private key found ({err})"),
    })
}

/// The certificates of a trust file, as trust anchors and as pinned certificates.
pub(crate) struct Trusted {
    pub roots: RootCertStore,
    pub pinned: Vec<CertificateDer<'static>>,
}

pub(crate) fn trusted(what: &'static str, pem: &[u8]) -> Result<Trusted, TlsError> {
    let pinned = parse_certs(what, pem)?;
    let mut roots = RootCertStore::empty();
    for cert in &pinned {
        roots.add(cert.clone()).map_err(|err| TlsError::Pem {
            what,
            detail: err.to_string(),
        })?;
    }
    Ok(Trusted { roots, pinned })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}
