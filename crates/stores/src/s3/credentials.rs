//! S3 credentials from the standard sources, so secrets never need to be on a command line
//! (where every user of the machine can read them in `ps`).
//!
//! In order: a credentials file named explicitly (`--s3-credentials FILE`), the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, optionally `AWS_SESSION_TOKEN`), then the
//! shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`). Files use
//! the AWS format (INI sections named after profiles, `aws_access_key_id = …`); the profile is
//! the one given, else `AWS_PROFILE`, else `default`.

use std::path::{Path, PathBuf};

use r3map_core::{Error, Result};
use rusty_s3::Credentials;

/// Credentials and where they came from (for messages; never the secret itself).
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The access key, secret and session token.
    pub credentials: Credentials,
    /// `environment` or `profile NAME in FILE`.
    pub source: String,
}

/// Finds credentials in the standard sources (see the module documentation).
pub fn resolve(file: Option<&Path>, profile: Option<&str>) -> Result<Resolved> {
    let profile = profile
        .map(str::to_string)
        .or_else(|| std::env::var("AWS_PROFILE").ok())
        .unwrap_or_else(|| "default".into());
    if let Some(file) = file {
        return from_file(file, &profile)?.ok_or_else(|| {
            Error::InvalidConfig(format!(
                "{} has no profile [{profile}] with aws_access_key_id and aws_secret_access_key",
                file.display()
            ))
        });
    }
    if let Some(credentials) = from_environment() {
        return Ok(Resolved {
            credentials,
            source: "environment".into(),
        });
    }
    let shared = shared_file();
    if let Some(shared) = &shared {
        if shared.exists() {
            if let Some(resolved) = from_file(shared, &profile)? {
                return Ok(resolved);
            }
        }
    }
    Err(Error::InvalidConfig(format!(
        "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or put profile \
         [{profile}] in {}, or name a credentials file with --s3-credentials",
        shared
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "~/.aws/credentials".into())
    )))
}

fn from_environment() -> Option<Credentials> {
    let key = std::env::var("AWS_ACCESS_KEY_ID")
        .ok()
        .filter(|k| !k.is_empty())?;
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY")
        .ok()
        .filter(|s| !s.is_empty())?;
    Some(
        match std::env::var("AWS_SESSION_TOKEN").ok().filter(|t| !t.is_empty()) {
            Some(token) => Credentials::new_with_token(key, secret, token),
            None => Credentials::new(key, secret),
        },
    )
}

fn shared_file() -> Option<PathBuf> {
    std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".aws/credentials")))
}

fn from_file(path: &Path, profile: &str) -> Result<Option<Resolved>> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        Error::InvalidConfig(format!(
            "cannot read S3 credentials from {}: {err}",
            path.display()
        ))
    })?;
    Ok(parse_profile(&text, profile).map(|credentials| Resolved {
        credentials,
        source: format!("profile {profile} in {}", path.display()),
    }))
}

/// The credentials of `[profile]` in AWS credentials-file text, if it has both keys.
pub fn parse_profile(text: &str, profile: &str) -> Option<Credentials> {
    let (mut key, mut secret, mut token) = (None, None, None);
    let mut in_profile = false;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = section.trim() == profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let value = Some(value.trim().to_string());
        match name.trim() {
            "aws_access_key_id" => key = value,
            "aws_secret_access_key" => secret = value,
            "aws_session_token" => token = value,
            _ => {}
        }
    }
    let (key, secret) = (key?, secret?);
    Some(match token {
        Some(token) => Credentials::new_with_token(key, secret, token),
        None => Credentials::new(key, secret),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# comment
[default]
aws_access_key_id = AKDEFAULT
aws_secret_access_key = s3cret

[other]
aws_access_key_id=AKOTHER
; comment
aws_secret_access_key=other-secret
aws_session_token = tok
[broken]
aws_access_key_id = only-a-key
";

    #[test]
    fn reads_the_named_profile_only() {
        let default = parse_profile(FILE, "default").unwrap();
        assert_eq!(
            (default.key(), default.secret(), default.token()),
            ("AKDEFAULT", "s3cret", None)
        );
        let other = parse_profile(FILE, "other").unwrap();
        assert_eq!(
            (other.key(), other.secret(), other.token()),
            ("AKOTHER", "other-secret", Some("tok"))
        );
        assert!(
            parse_profile(FILE, "broken").is_none(),
            "a profile without a secret is unusable"
        );
        assert!(parse_profile(FILE, "missing").is_none());
    }

    #[test]
    fn a_named_file_without_the_profile_is_an_error_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        std::fs::write(&path, FILE).unwrap();
        let found = resolve(Some(&path), Some("other")).unwrap();
        assert_eq!(found.credentials.key(), "AKOTHER");
        assert!(found.source.contains("profile other"));
        let err = resolve(Some(&path), Some("nope")).unwrap_err().to_string();
        assert!(err.contains("[nope]") && err.contains("credentials"), "{err}");
        let err = resolve(Some(&dir.path().join("absent")), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read S3 credentials"), "{err}");
    }
}
