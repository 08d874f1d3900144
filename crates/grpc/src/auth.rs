//! Optional bearer tokens: the client sends `authorization: Bearer TOKEN` with every call, the
//! server compares it in constant time and answers UNAUTHENTICATED otherwise.

use std::path::Path;
use std::sync::Arc;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

const AUTHORIZATION: &str = "authorization";

/// A bearer token (kept out of `Debug` output).
#[derive(Clone)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// A token from its text (surrounding whitespace, such as a final newline, is dropped).
    pub fn new(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("the token is empty".into());
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token must be printable ASCII without spaces".into());
        }
        Ok(Self(text.into()))
    }

    /// Reads a token file (`--token-file`).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read the token file {}: {err}", path.display()))?;
        Self::new(&text).map_err(|err| format!("{}: {err}", path.display()))
    }

    /// Adds the token to a request.
    pub(crate) fn apply<T>(&self, request: &mut Request<T>) {
        let value =
            MetadataValue::try_from(format!("Bearer {}", self.0)).expect("a token is printable ASCII");
        request.metadata_mut().insert(AUTHORIZATION, value);
    }

    fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        // Constant time in the token's content: every byte is compared.
        presented.len() == expected.len()
            && presented
                .iter()
                .zip(expected)
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

/// The server's check; with no token every call passes.
#[derive(Clone, Default)]
pub(crate) struct Auth(pub Option<Token>);

impl Interceptor for Auth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.0 else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "));
        match presented {
            Some(presented) if token.matches(presented) => Ok(request),
            Some(_) => Err(Status::unauthenticated(
                "wrong bearer token: give the server's token with --token-file",
            )),
            None => Err(Status::unauthenticated(
                "this server requires a bearer token: give it with --token-file",
            )),
        }
    }
}
