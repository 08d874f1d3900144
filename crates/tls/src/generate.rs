//! Certificates for a quick, correct TLS setup: a CA, a server certificate for given hosts, and
//! a client certificate for mutual TLS, all signed by that CA (ECDSA P-256).
//!
//! [`CertificateSet::write_to`] writes them in the layout libnbd (`tls-certificates=DIR`) and
//! QEMU (`tls-creds-x509,dir=DIR`) read: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
//! `client-cert.pem`, `client-key.pem`, plus `ca-key.pem` to issue more later.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

use crate::TlsError;

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct Identity {
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a private key.
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

/// A CA and the server and client certificates it signed.
#[derive(Debug, Clone)]
pub struct CertificateSet {
    pub ca: Identity,
    pub server: Identity,
    pub client: Identity,
}

fn generate_error(err: rcgen::Error) -> TlsError {
    TlsError::Generate(err.to_string())
}

/// Generates a CA, a server certificate valid for every name in `hosts` (DNS names or IP
/// addresses, the first one also its common name) and a client certificate, valid from an hour
/// ago (clock skew) for `valid_for`.
pub fn generate(hosts: &[String], valid_for: Duration) -> Result<CertificateSet, TlsError> {
    if hosts.is_empty() {
        return Err(TlsError::Generate(
            "name at least one host (DNS name or IP address) for the server certificate".into(),
        ));
    }
    let hosts: Vec<String> = hosts
        .iter()
        .map(|host| host.trim_start_matches('[').trim_end_matches(']').to_string())
        .collect();
    if let Some(bad) = hosts
        .iter()
        .find(|host| rustls::pki_types::ServerName::try_from(host.as_str()).is_err())
    {
        return Err(TlsError::Generate(format!(
            "{bad:?} is neither a DNS name nor an IP address"
        )));
    }
    let now = time::OffsetDateTime::now_utc();
    let not_before = now - time::Duration::hours(1);
    let not_after = now
        + time::Duration::try_from(valid_for)
            .map_err(|_| TlsError::Generate("validity period too long".into()))?;
    let dated = |mut params: CertificateParams| {
        params.not_before = not_before;
        params.not_after = not_after;
        params
    };

    let ca_key = KeyPair::generate().map_err(generate_error)?;
    let mut ca_params = dated(CertificateParams::new(Vec::new()).map_err(generate_error)?);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // A name of its own (from its key), so two CAs made for the same host are told apart by
    // name; otherwise the wrong one is taken for the issuer and the error is a bad signature.
    // (Byte 0 of a P-256 public key is the constant 0x04.)
    let tag: String = ca_key.public_key_raw()[1..5]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("r3map CA {tag} for {}", hosts[0]));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(generate_error)?;

    let issue = |names: Vec<String>, common_name: &str, purpose: ExtendedKeyUsagePurpose| {
        let mut params =
            dated(CertificateParams::new(names).map_err(|err| {
                TlsError::Generate(format!("{err} (hosts must be DNS names or IP addresses)"))
            })?);
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![purpose];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(generate_error)?;
        let cert = params
            .signed_by(&key, &ca_cert, &ca_key)
            .map_err(generate_error)?;
        Ok::<_, TlsError>(Identity {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    };
    let server = issue(hosts.clone(), &hosts[0], ExtendedKeyUsagePurpose::ServerAuth)?;
    let client = issue(Vec::new(), "r3map client", ExtendedKeyUsagePurpose::ClientAuth)?;
    Ok(CertificateSet {
        ca: Identity {
            cert: ca_cert.pem(),
            key: ca_key.serialize_pem(),
        },
        server,
        client,
    })
}

impl CertificateSet {
    /// The files [`CertificateSet::write_to`] writes, in order, with their contents.
    fn files(&self) -> [(&'static str, &str, bool); 6] {
        [
            ("ca-cert.pem", self.ca.cert.as_str(), false),
            ("ca-key.pem", self.ca.key.as_str(), true),
            ("server-cert.pem", self.server.cert.as_str(), false),
            ("server-key.pem", self.server.key.as_str(), true),
            ("client-cert.pem", self.client.cert.as_str(), false),
            ("client-key.pem", self.client.key.as_str(), true),
        ]
    }

    /// Writes the set into `dir` (created if missing): certificates readable by all, keys by
    /// the owner only. Refuses to replace existing files unless `overwrite`, so a second run
    /// cannot silently invalidate certificates already handed out. Returns the paths written.
    pub fn write_to(&self, dir: &Path, overwrite: bool) -> Result<Vec<PathBuf>, TlsError> {
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        if !overwrite {
            if let Some(existing) = self
                .files()
                .iter()
                .map(|(name, _, _)| dir.join(name))
                .find(|path| path.exists())
            {
                return Err(TlsError::Write {
                    path: existing,
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "the file exists (replace the whole set with --force)",
                    ),
                });
            }
        }
        let mut written = Vec::new();
        for (name, content, secret) in self.files() {
            let path = dir.join(name);
            write_file(&path, content, secret).map_err(|source| TlsError::Write {
                path: path.clone(),
                source,
            })?;
            written.push(path);
        }
        Ok(written)
    }
}

/// Writes through a temporary file renamed into place, so a crash leaves the old file or the
/// new one; keys get mode 0600 from the start.
fn write_file(path: &Path, content: &str, secret: bool) -> std::io::Result<()> {
    let temporary = path.with_extension("pem.tmp");
    let _ = std::fs::remove_file(&temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&temporary)?;
    file.write_all(content.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}
